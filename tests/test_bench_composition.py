"""The composition benchmark's --quick pass: one adapter per shipped preference, every weight setting decoded."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_composition import weight_settings  # noqa: E402


def test_weight_settings():
    assert weight_settings(2) == [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
    assert weight_settings(1) == [(1.0,), (0.5,)]


def test_quick_run_trains_each_adapter_and_decodes_every_setting(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_composition.py"), "--quick", "--device", "cpu",
           "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"composition_quick.json", "composition_quick.md"}
    result = json.loads((tmp_path / "composition_quick.json").read_text())
    names = result["preferences"]
    assert [row["weights"] for row in result["rows"]] == [None, *map(list, weight_settings(len(names)))]
    for row in result["rows"]:
        assert set(row["satisfied_pct"]) == set(names)
        assert all(0 <= v <= 100 for v in row["satisfied_pct"].values())
        assert len(row["answers"]) == len(result["prompts"])
    assert len(set(result["prompts"])) == len(result["prompts"])
