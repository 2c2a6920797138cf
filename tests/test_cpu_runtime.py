"""The CPU kernels' run-time choices: which ISA build is loaded, and their one kept output block.

One build holds the kernels compiled for DEFAULT, AVX2 and AVX512; a process loads one. Each level
this CPU supports is forced in a subprocess and checked against the reference
(tests/cpu_kernels_smoke.py, the same script CI runs from the wheel under emulated older CPUs).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qadapter_kernels as qk
from qadapter_kernels.ops.native import CAPABILITIES

SMOKE = Path(__file__).with_name("cpu_kernels_smoke.py")
SUPPORTED = CAPABILITIES[: CAPABILITIES.index(qk.cpu_capability()) + 1]


def _run(code_or_script: list[str], threads: int = 1, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("QADAPTER_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    environment.update(env, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, *code_or_script], env=environment, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("level", CAPABILITIES)
def test_each_isa_build_matches_the_reference(level):
    if level not in SUPPORTED:
        pytest.skip(f"this CPU runs at most {SUPPORTED[-1]}")
    result = _run([str(SMOKE), "--expect", level], QADAPTER_CPU_CAPABILITY=level)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cpu kernels smoke: {level} 12 passed, 0 failed" in result.stdout


def test_the_kernels_split_over_two_threads_match_the_reference():
    """The suite may run with one thread per test process (tests/conftest.py): the kernels' parallel
    partitions (and the thread-dependent paths, e.g. the from-hidden sampler's row tiles) on two."""
    result = _run([str(SMOKE)], threads=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cpu kernels smoke: {SUPPORTED[-1]} 12 passed, 0 failed" in result.stdout


def test_the_default_is_the_level_torch_picks_and_aten_cpu_capability_lowers_it():
    printed = "from qadapter_kernels.ops.native import cpu_capability; print(cpu_capability())"
    assert _run(["-c", printed]).stdout.strip() == qk.cpu_capability() == SUPPORTED[-1]
    assert _run(["-c", printed], ATEN_CPU_CAPABILITY="default").stdout.strip() == "DEFAULT"


def test_a_forced_level_the_cpu_lacks_or_a_misspelt_one_is_refused_in_one_line():
    above = _run(["-c", "import qadapter_kernels"], ATEN_CPU_CAPABILITY="default", QADAPTER_CPU_CAPABILITY="AVX2")
    assert above.returncode != 0
    assert "ValueError: QADAPTER_CPU_CAPABILITY=AVX2, but this CPU runs at most DEFAULT" in above.stderr
    misspelt = _run(["-c", "import qadapter_kernels"], QADAPTER_CPU_CAPABILITY="avx-512")
    assert "ValueError: QADAPTER_CPU_CAPABILITY must be one of DEFAULT, AVX2, AVX512, got 'AVX-512'" in misspelt.stderr


# The kept block: a dQ of 32 MiB or more (see csrc/streaming_output.h).
VOCAB = 32000
ROWS = -(-(32 << 20) // (VOCAB * 4))
DQ_BYTES = -(-ROWS * VOCAB * 4 // (2 << 20)) * (2 << 20)  # rounded up to whole 2 MiB pages


@pytest.fixture
def restored_limit():
    limit = qk.cached_memory_limit_bytes()
    qk.release_cached_memory()
    yield
    qk.set_cached_memory_limit(limit / 2**20)
    qk.release_cached_memory()


def _backward_once() -> None:
    q = torch.randn(ROWS, VOCAB, requires_grad=True)
    values, q_taken = qk.residual_q_values(q, torch.randn(ROWS, VOCAB), torch.zeros(ROWS, dtype=torch.long))
    (values.sum() + q_taken.sum()).backward()
    del q  # frees dQ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="blocks are kept on Linux only")
def test_the_kept_block_is_reported_released_and_bounded(restored_limit):
    _backward_once()
    assert qk.cached_memory_bytes() == DQ_BYTES
    assert qk.release_cached_memory() == DQ_BYTES
    assert qk.cached_memory_bytes() == 0 and qk.release_cached_memory() == 0

    qk.set_cached_memory_limit(DQ_BYTES / 2**20 - 1)  # just below the block: not kept
    _backward_once()
    assert qk.cached_memory_bytes() == 0

    qk.set_cached_memory_limit(DQ_BYTES / 2**20)
    _backward_once()
    assert qk.cached_memory_bytes() == DQ_BYTES
    qk.set_cached_memory_limit(0)  # a lower limit releases the kept block at once
    assert qk.cached_memory_bytes() == 0 and qk.cached_memory_limit_bytes() == 0


def test_the_cache_is_off_with_one_setting_and_bad_limits_are_refused():
    off = _run(["-c", "import torch, qadapter_kernels as qk\n"
                f"q = torch.randn({ROWS}, {VOCAB}, requires_grad=True)\n"
                f"qk.residual_q_values(q, q.detach(), torch.zeros({ROWS}, dtype=torch.long))[0].sum().backward()\n"
                "del q\nprint(qk.cached_memory_limit_bytes(), qk.cached_memory_bytes())"],
               QADAPTER_OUTPUT_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0"]
    bad = _run(["-c", "import qadapter_kernels"], QADAPTER_OUTPUT_CACHE_MB="lots")
    assert "ValueError: QADAPTER_OUTPUT_CACHE_MB must be a number of MiB (0 turns the cache off), got 'lots'" in bad.stderr
    for limit in (-1, float("nan"), "64", True):
        with pytest.raises(ValueError, match="megabytes must be a number >= 0"):
            qk.set_cached_memory_limit(limit)
