"""The forgetting benchmark's --quick pass: every method trained and scored once on a tiny model, outputs written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_forgetting import pareto_front, planned_rows  # noqa: E402

from qadapter_kernels.evaluation.metrics import evenly_spaced  # noqa: E402


def run_quick(out: Path, *options: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_forgetting.py"), "--quick", "--device", "cpu",
           "--out", str(out), *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}  # this checkout's package
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_quick_run_trains_and_scores_every_method(tmp_path):
    run_quick(tmp_path, "--jobs", "2")  # two shards side by side, merged: the full run's way on 2 cores
    # The merged outputs only: the shards' folder is gone once they are merged.
    assert {p.name for p in tmp_path.iterdir()} == {f"forgetting_quick.{ext}" for ext in ("json", "md", "png")}
    payload = json.loads((tmp_path / "forgetting_quick.json").read_text())
    assert payload["machine"]["jobs"] == 2 and payload["machine"]["wall_s"] > 0
    rows = payload["rows"]
    assert [r["name"] for r in rows] == [r.name for r in planned_rows()]
    assert {r["method"] for r in rows} == {"base", "sft", "dpo", "qadapter"}
    for row in rows:
        (run,) = row["runs"]
        assert 0 <= run["pref"] <= 100 and 0 <= run["pair_acc"] <= 100 and 0 <= run["retention"] <= 100
        assert run["kl"] >= -1e-6 and run["train_s"] >= 0
    assert rows[0]["runs"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # base against itself
    settings = {tuple(sorted(r["settings"].items())) for r in rows if r["method"] == "qadapter"}
    assert {dict(s)["alpha_0"] for s in settings} == {0.01, 0.1, 0.5, 1.0, 2.0}
    assert {dict(s)["variant"] for s in settings} == {"bellman", "official", "advantage"}


def test_another_preference_is_trained_on_and_written_apart(tmp_path):
    run_quick(tmp_path, "--preference", "signoff", "--rows", "no such row", "--no-plot")
    assert {p.name for p in tmp_path.iterdir()} == {"forgetting_signoff_quick.json", "forgetting_signoff_quick.md"}
    payload = json.loads((tmp_path / "forgetting_signoff_quick.json").read_text())
    assert payload["preference"] == "signoff" and [r["name"] for r in payload["rows"]] == ["base"]
    # A random tiny model never ends an answer with the sign-off phrase.
    assert payload["rows"][0]["runs"][0]["pref"] == 0.0


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_an_interrupted_runs_partial_rows_are_never_appended_to(tmp_path, jobs):
    """A folder holding an interrupted run's partial file is refused, the file left as it was (with
    --jobs 2: in the shards' folder, which a failed run keeps)."""
    folder = tmp_path / "forgetting_shards" / "1" if jobs == "2" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "forgetting_partial.jsonl"
    partial.write_text('{"row": "SFT", "seed": 0}\n')
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_forgetting.py"), "--quick", "--device", "cpu",
           "--out", str(tmp_path), "--jobs", jobs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "holds forgetting_partial.jsonl, the rows of an interrupted run" in proc.stdout + proc.stderr
    assert partial.read_text() == '{"row": "SFT", "seed": 0}\n'
    assert not (tmp_path / "forgetting_quick.json").exists()


def test_pareto_front_and_spread():
    points = [(100.0, 0.0), (90.0, 50.0), (80.0, 40.0), (95.0, 50.0), (50.0, 90.0)]
    assert pareto_front(points) == [4, 3, 0]
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6] and evenly_spaced([1, 2], None) == [1, 2]
    assert [r.name for r in planned_rows(["SFT"])] == ["base", "SFT"]


def _payload(rows, wall_s=1.0):
    return {"name": "forgetting", "sizes": {"steps": 1}, "steps": 1, "batch": 2, "quick": False,
            "machine": {"wall_s": wall_s}, "rows": rows}


def _record(name, method, seeds, pref):
    runs = [{"seed": s, "pref": pref + s, "pair_acc": 0.0, "retention": 50.0, "retention_pct_base": 100.0,
             "kl": 0.0, "train_s": 1.0} for s in seeds]
    return {"name": name, "method": method, "settings": {}, "runs": runs}


def test_merge_joins_shards_and_seeds_in_planned_order(tmp_path):
    from bench_forgetting import merge_runs, shard_spec

    qa = "Q-Adapter a~=1.0 a0=1.0"
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    c = tmp_path / "c.json"
    a.write_text(json.dumps(_payload([_record("base", "base", [0], 0.0), _record(qa, "qadapter", [0], 10.0)])))
    b.write_text(json.dumps(_payload([_record("base", "base", [0], 0.0), _record("SFT", "sft", [0], 20.0)], 2.0)))
    c.write_text(json.dumps(_payload([_record(qa, "qadapter", [0, 1, 2], 99.0)])))
    rows, meta = merge_runs([str(a), str(b), str(c)])
    assert [r.name for r in rows] == ["base", "SFT", qa]
    assert [run["pref"] for run in rows[2].runs] == [10.0, 100.0, 101.0]  # seed 0 kept from the first file
    assert rows[2].summary()["pref"]["n"] == 3 and meta["machine"]["wall_s"] == 4.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_payload([]), "steps": 2}))
    with pytest.raises(SystemExit, match="other sizes/steps/batch/learning_rate/quick/preference"):
        merge_runs([str(a), str(other)])
    assert shard_spec("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(Exception, match="K/N"):
            shard_spec(bad)


def test_the_selection_rule_keeps_knowledge_first():
    from bench_forgetting import Row, recommended

    def row(name, method, pref, retention_pct, kl=0.1):
        return Row(name, method, runs=[{"pref": pref, "pair_acc": 50.0, "retention": 70.0,
                                        "retention_pct_base": retention_pct, "kl": kl, "train_s": 1.0}])

    rows = [row("base", "base", 5, 100), row("SFT", "sft", 90, 100), row("forgets", "qadapter", 95, 80),
            row("keeps", "qadapter", 60, 98), row("keeps, less", "qadapter", 40, 101)]
    assert recommended(rows).name == "keeps"
    assert recommended(rows[:3]) is None
