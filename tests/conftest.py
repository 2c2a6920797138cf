"""Test session setup.

Without CUDA the Triton kernels can only run in the interpreter, which triton.jit selects when
the kernel modules are imported: TRITON_INTERPRET must be set before anything imports
qadapter_kernels. With CUDA they must run natively, so it is left alone there.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "qadapter_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "qadapter_kernels was imported before tests/conftest.py could set TRITON_INTERPRET=1"
        )
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (pytest -n): one thread each, in this process and the ones
    # it starts, or torch's OpenMP threads thrash (10-50x). test_cpu_runtime runs the kernels on two.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from qadapter_kernels.ops import backend as _backend  # noqa: E402

# The switch is read once, at import: make sure it took effect as intended.
if _backend.TRITON_INTERPRETED != (not torch.cuda.is_available()):
    raise RuntimeError(
        f"Triton interpreter is {'on' if _backend.TRITON_INTERPRETED else 'off'} but CUDA is "
        f"{'available' if torch.cuda.is_available() else 'not available'}: unset or set TRITON_INTERPRET"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    # The interpreter evaluates masked-out lanes with numpy too (e.g. exp(0 - LSE) past the end
    # of a row whose LSE is -1e4): numpy warns about values that are never stored.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test id: different cases draw different inputs, reproducibly."""
    import zlib

    return zlib.crc32(request.node.nodeid.encode()) % (2**31)



# The command-line tests' model and data, one per test module. cli_helpers is imported here, not at the
# top: it loads transformers, which most test sessions never need.
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder holding a tiny random Llama and its tokenizer (cli_helpers.save_tiny_llama)."""
    from cli_helpers import save_tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A preference file holding cli_helpers.PAIRS."""
    from cli_helpers import write_pairs

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    write_pairs(path)
    return path


# ----------------------------------------------------------------------------- vLLM (its own venv)


@pytest.fixture(scope="module")
def vllm():
    from serving_helpers import ENGINE_ENV

    module = pytest.importorskip("vllm")
    os.environ.update(ENGINE_ENV)
    return module


@pytest.fixture(scope="module")
def smollm2_checkpoint(vllm):
    """The embedded SmolLM2-135M-Instruct as a plain fp32 folder (exported once, cached)."""
    from pathlib import Path

    from training_helpers import SMOLLM2_GGUF, smollm2_folder

    from qadapter_kernels.serving import plain_checkpoint

    return plain_checkpoint(Path(smollm2_folder()) / SMOLLM2_GGUF)
