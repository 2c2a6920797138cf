"""The Q-Adapter-vs-TRL-DPO benchmark: its --quick pass (every row trains: the run asserts the LoRA moves
and the loss stays finite) gives every row finite numbers, or for a row that cannot run here its reason;
and the word tokenizer gives DPOTrainer the token ids the Q-Adapter rows train on."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_vs_trl  # noqa: E402
import trainer_step_run  # noqa: E402


def test_word_tokenizer_gives_the_pairs_ids_back():
    tokenizer = trainer_step_run.word_tokenizer(64)
    prompt, response = [5, 63, 3], [7, 9]
    text = trainer_step_run.words(prompt) + " " + trainer_step_run.words(response) + tokenizer.eos_token
    assert tokenizer(text)["input_ids"] == prompt + response + [trainer_step_run.EOS_ID]
    assert tokenizer.pad_token_id == trainer_step_run.PAD_ID


def test_pairs_have_the_settings_lengths_and_end_with_eos():
    setting = bench_vs_trl.SETTINGS["short"]
    pairs = bench_vs_trl.make_pairs(setting, 3)
    assert pairs == bench_vs_trl.make_pairs(setting, 3)  # seeded: every row gets the same data
    for prompt, chosen, rejected in pairs:
        assert (len(prompt), len(chosen), len(rejected)) == (setting.prompt, setting.chosen, setting.rejected)
        assert chosen[-1] == rejected[-1] == trainer_step_run.EOS_ID
        assert min(prompt + chosen[:-1] + rejected[:-1]) >= trainer_step_run.FIRST_WORD


def test_quick_run_measures_every_row(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--quick", "--reps", "2", "--no-plot",
           "--device", "cpu", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"vs_trl_quick.json", "vs_trl_quick.md"}
    payload = json.loads((tmp_path / "vs_trl_quick.json").read_text())
    rows = {r["provider"]: r for r in payload["results"]}
    assert list(rows) == [row.name for row in bench_vs_trl.ROWS]
    for row in bench_vs_trl.ROWS:
        result = rows[row.name]
        if row.may_fail and result["ms"] is None:
            assert result["extra"]["note"].startswith("did not run: ") and len(result["extra"]["note"]) > 14
            continue
        numbers = [result["ms"], result["ms_min"], result["ms_max"], result["peak_bytes"],
                   *(result["extra"][k] for k in ("x trl dpo", "x trl dpo cpu", "x trl dpo peak", "cpu ms",
                                                  "mean loss"))]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), (row.name, numbers)
        assert result["ms"] > 0 and result["extra"]["cpu ms"] > 0
        precompute = result["extra"]["precompute ms / pair"]
        assert (precompute > 0) if row.precompute else precompute is None
    assert rows["trl dpo"]["extra"]["x trl dpo"] == 1.0
    assert sum(line.startswith("INFO target: ") for line in payload["notes"]) == len(bench_vs_trl.targets())
