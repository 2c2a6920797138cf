"""Ctrl-C on the ``qadapter`` command: answered at once in one line, whenever it comes.

Each test runs the real ``qadapter`` console script in a subprocess and sends SIGINT as a terminal
would. The script's entry point (``qadapter_cli``) arms the latch before the package imports torch:
the test waits until the process catches SIGTERM (Python alone never does) and signals it then, while
torch, transformers and peft are still importing.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that; a terminal's
    # Ctrl-C reaches a program with the default handler, so the command gets it too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def console_script() -> list[str]:
    """The ``qadapter`` script pip installed beside this interpreter (what a user types); the same entry
    point through ``-m`` where the package is only on the path."""
    script = Path(sys.executable).parent / "qadapter"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qadapter_cli"]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*console_script(), *argv], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the latch's), read from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def torch_is_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def train_argv(model_dir, data_file, out, *extra) -> list[str]:
    return ["train", "--data", str(data_file), "--model", str(model_dir), "--output-dir", str(out),
            "--batch-size", "2", "--max-length", "64", "--logging-steps", "1000", *extra]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_a_ctrl_c_while_the_command_imports_ends_it_in_one_line(tmp_path, model_dir, data_file):
    out = tmp_path / "out"
    proc = start(train_argv(model_dir, data_file, out, "--max-steps", "2"))
    # After torch, while the command's own modules, transformers and peft import.
    wait_for(lambda: proc.poll() is not None or (catches_sigterm(proc.pid) and torch_is_loaded(proc.pid)),
             what="the latch and torch")
    start_imports = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert time.monotonic() - start_imports < 120
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    assert stderr.splitlines() == ["qadapter train: SIGINT received: stopping as soon as loading ends (nothing is "
                                   "written); Ctrl-C again aborts now"], stderr
    assert stdout.splitlines() == ["stopped by signal 2 before training started: nothing was trained or written"]
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_a_ctrl_c_before_torch_is_loaded_ends_it_in_one_line(tmp_path, model_dir, data_file):
    out = tmp_path / "out"
    proc = start(train_argv(model_dir, data_file, out, "--max-steps", "2"))
    wait_for(lambda: proc.poll() is not None or catches_sigterm(proc.pid), what="the latch")
    loaded = torch_is_loaded(proc.pid)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert not loaded, "the latch was armed only after torch loaded: the window this test is for was missed"
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    assert stderr.splitlines() == ["qadapter train: SIGINT received: stopping as soon as loading ends (nothing is "
                                   "written); Ctrl-C again aborts now"], stderr
    assert stdout.splitlines() == ["stopped by signal 2 before training started: nothing was trained or written"]
    assert not out.exists()


def read_stderr_until(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """What ``proc`` wrote to stderr up to ``text`` (or its end); ``proc.stderr`` stays non-blocking."""
    os.set_blocking(proc.stderr.fileno(), False)
    seen = []

    def arrived() -> bool:
        try:
            seen.append(os.read(proc.stderr.fileno(), 1 << 16).decode())
        except BlockingIOError:
            pass
        return text in "".join(seen) or proc.poll() is not None

    wait_for(arrived, timeout, what=repr(text))
    os.set_blocking(proc.stderr.fileno(), True)
    return "".join(seen)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_a_second_ctrl_c_while_importing_aborts_at_once_in_one_line(tmp_path, model_dir, data_file):
    proc = start(train_argv(model_dir, data_file, tmp_path / "out", "--max-steps", "2"))
    wait_for(lambda: proc.poll() is not None or catches_sigterm(proc.pid), what="the latch")
    proc.send_signal(signal.SIGINT)
    # Two signals that land inside one native call reach Python's handler once: the second is sent
    # after the first was answered, as a user presses it again after reading the answer.
    first = read_stderr_until(proc, "\n")
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=300)
    # Ended at once, not by a KeyboardInterrupt inside an import (which can leave a native module half-loaded).
    assert proc.returncode == 130, stdout + first + rest
    assert (first + rest).splitlines() == [
        "qadapter train: SIGINT received: stopping as soon as loading ends (nothing is written); Ctrl-C again "
        "aborts now", "qadapter train: interrupted while loading: nothing was written"], first + rest
    assert not (tmp_path / "out").exists()


def test_the_first_ctrl_c_in_training_says_at_once_which_step_finishes_before_the_save(tmp_path, model_dir,
                                                                                      data_file):
    out = tmp_path / "out"
    proc = start(train_argv(model_dir, data_file, out, "--max-steps", "100000", "--save-steps", "100000"))
    wait_for(lambda: proc.poll() is not None or (out / "qadapter_run.json").is_file(), what="the run to start")
    time.sleep(3)  # into the training loop
    proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    announced = read_stderr_until(proc, "SIGINT received", timeout=30)
    delay = time.monotonic() - signalled
    stdout, rest = proc.communicate(timeout=300)
    stderr = announced + rest
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    first = next(line for line in stderr.splitlines() if "SIGINT received" in line)
    step = int(first.split("finishing step ")[1].split(",")[0])
    assert first == (f"qadapter train: SIGINT received: finishing step {step}, then saving a resumable "
                     "checkpoint; Ctrl-C again aborts without saving")
    assert delay < 5, f"the announcement came {delay:.1f} s after the signal"
    assert f"stopped by signal 2 at step {step};" in stdout  # the step announced is the one saved
    assert (out / f"checkpoint-{step}").is_dir()


def test_the_entry_point_arms_the_latch_with_the_standard_library_alone():
    probe = ("import sys, qadapter_cli\nqadapter_cli._signal_latch_module()\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'transformers'))\n"
             "import qadapter_kernels.signal_latch as latch\n"
             "print(heavy, latch is sys.modules['qadapter_kernels.signal_latch'])")
    out = subprocess.run([sys.executable, "-c", probe], env=_env(), cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"], out.stdout + out.stderr
