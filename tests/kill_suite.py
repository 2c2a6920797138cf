"""Kill ``qadapter train`` somewhere, resume it, and check that nothing was lost, mixed or left behind.

Used by tests/test_train_faults.py (a few chosen kill points, in CI) and tests/kill_loop.py (many
random ones). Each run is a subprocess of ``fault_runner.py`` on the tiny random Llama.
"""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from qadapter_kernels.training import checkpoints

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"
STEPS, SAVE_STEPS = 6, 2
OUTPUT_NAME = "run"


@dataclass(frozen=True)
class Setup:
    model: Path
    data: Path
    reference: Path  # the output folder of an uninterrupted run
    reached: dict  # how often each fault point is reached in it
    seconds: float  # its wall time


def train_argv(setup_model: Path, data: Path, output_dir: Path) -> list[str]:
    # Dropout on (the default 0.05): a resume must restore the RNG states too, not only the weights.
    return ["train", "--data", str(data), "--model", str(setup_model), "--output-dir", str(output_dir),
            "--max-steps", str(STEPS), "--save-steps", str(SAVE_STEPS), "--batch-size", "2", "--max-length", "64",
            "--logging-steps", "100", "--lr", "1e-2"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _default_signals() -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that: a user's Ctrl-C
    # reaches a program with the default handler, so the runs here get it too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(spec: str, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), spec, *argv], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, preexec_fn=_default_signals)


def make_setup(folder: Path) -> Setup:
    from cli_helpers import save_tiny_llama, write_pairs

    model, data = folder / "model", folder / "pairs.jsonl"
    save_tiny_llama(model)
    write_pairs(data)
    reference = folder / "reference"
    start = time.perf_counter()
    done = run("count", train_argv(model, data, reference))
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    return Setup(model, data, reference, json.loads(done.stderr.strip().splitlines()[-1]), seconds)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(folder: Path, reference: Path) -> None:
    got, want = adapter_tensors(folder), adapter_tensors(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run"
    assert (folder / "qadapter_config.json").read_text() == (reference / "qadapter_config.json").read_text()


def assert_no_incomplete_checkpoint(folder: Path) -> None:
    """Whatever the kill cut, a folder with a checkpoint's name is a whole checkpoint."""
    if folder.is_dir():
        named = [p for p in folder.iterdir() if checkpoints.checkpoint_step(p) is not None]
        assert all(checkpoints.is_complete(p) for p in named), [p.name for p in named]


def assert_nothing_left_behind(folder: Path) -> None:
    assert checkpoints.leftovers(folder) == []
    stray = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert stray == [], stray


def kill_and_resume(setup: Setup, workdir: Path, spec: str | None = None, after_seconds: float | None = None,
                    sig: int = signal.SIGKILL) -> str:
    """Runs training with the fault ``spec`` (or ``sig`` sent from outside after ``after_seconds``), then
    resumes until it finishes; checks the invariants; returns a one-line account of what happened."""
    output = workdir / OUTPUT_NAME
    argv = train_argv(setup.model, setup.data, output)
    if spec is not None:
        first = run(spec, argv)
        code, out, err = first.returncode, first.stdout, first.stderr
    else:
        proc = subprocess.Popen([sys.executable, str(RUNNER), "count", *argv], env=_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_signals)
        time.sleep(after_seconds)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        code = proc.returncode
    if code == 1:  # only a Ctrl-C while Python was still importing, before the program ran: nothing started
        assert err.rstrip().endswith("KeyboardInterrupt") and not output.exists(), err
    # A SIGTERM before the program installs its handler, or a SIGINT before Python does, ends it as the
    # default action does (-15, -2).
    assert code in (0, 1, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT,
                    128 + signal.SIGTERM), (code, out)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped by the program
        if (output / "qadapter_run.json").is_file():  # it says how to resume
            assert "Resume with:" in out + err and "--resume-from-checkpoint" in out + err, out + err
        else:  # the signal came while it was starting: it stopped before writing anything
            assert "before training started" in out + err and not output.exists(), out + err
    assert_no_incomplete_checkpoint(output)
    resumes = 0
    while not (output / "qadapter_run.json").is_file() or '"completed_steps"' not in (
            output / "qadapter_run.json").read_text():
        resume = argv + (["--resume-from-checkpoint"] if (output / "qadapter_run.json").is_file() else [])
        again = run("count", resume)
        assert again.returncode == 0, again.stdout + again.stderr
        resumes += 1
        assert resumes <= 2, "resumed twice without finishing"
    if resumes == 0 and code != 0:  # the kill came after the run had finished: a resume has nothing to do
        again = run("count", argv + ["--resume-from-checkpoint"])
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert_same_adapter(output, setup.reference)
    assert_nothing_left_behind(output)
    return f"{spec or f'signal {sig} after {after_seconds:.2f} s'}: exit {code}, {resumes} resume(s), adapter identical"
