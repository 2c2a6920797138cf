"""The forgetting study: its CI pass (``--quick`` end to end on a tiny model), its splits, selection rule and reading."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from forgetting_study import PREREGISTRATION, choose, complete_rows, read_outcome  # noqa: E402
from study_splits import study_splits  # noqa: E402


@pytest.mark.ci_quick_pass
def test_quick_pass_runs_end_to_end_with_the_preregistration_first(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("trl")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "forgetting_study.py"), "--quick", "--device", "cpu",
           "--jobs", "2", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "forgetting_study_quick.json").read_text()
    payload = json.loads(text)
    keys = list(payload)
    assert keys[0] == "preregistration" and payload["preregistration"] == PREREGISTRATION
    assert keys.index("preregistration") < keys.index("validation") < keys.index("chosen") < keys.index("rows")
    assert payload["status"] == "complete"
    assert payload["split_overlap"]["test"]["shared_templates"] == 0
    assert payload["split_overlap"]["test"]["shared_items"] == 0
    assert set(payload["chosen"]) == {"SFT", "DPO", "Q-Adapter default", "Q-Adapter anchored"}
    rows = {r["row"]: r for r in payload["rows"]}
    assert "base" in rows and any(r["family"] == "control" for r in payload["rows"])
    assert any(name.startswith("official at the authors' settings") for name in rows)
    for budget in ("demo", "long"):
        for family in payload["chosen"]:
            row = rows[f"{family} [{budget}]"]
            assert row["lr"] == payload["chosen"][family]["lr"] and row["seeds"] == [0]
            for metric in ("pref", "pair_acc", "retention_acc", "open_answer_acc", "margin_change_vs_base", "kl",
                           "kl_neutral"):
                m = row["metrics"][metric]
                assert m["low"] <= m["mean"] <= m["high"], (family, metric, m)
            assert len(row["mcnemar_vs_base"]["retention"]) == 1
    assert rows["base"]["metrics"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert set(payload["outcome"]) == {f"{f} [{b}]" for f in ("Q-Adapter default", "Q-Adapter anchored")
                                       for b in ("demo", "long")}
    md = (tmp_path / "forgetting_study_quick.md").read_text()
    assert md.index("Pre-registered") < md.index("### Validation") < md.index("### Test") < md.index("### Outcome")
    assert (tmp_path / "forgetting_study_quick.png").stat().st_size > 0
    # Every run is in the log (validation: the grid and base; test: every row's seeds), for a later rerun to reuse.
    log = tmp_path / "forgetting_study_quick_runs.jsonl"
    runs = log.read_text().splitlines()
    assert len(runs) == len(payload["validation"]) + 1 + sum(len(r["seeds"]) for r in payload["rows"])
    # A study stopped with three test runs unfinished: the same command keeps every finished run as it was
    # and runs only the three.
    kept, dropped = runs[:-3], runs[-3:]
    log.write_text("".join(line + "\n" for line in kept))
    # Stopped before any of the three could start: an interim report of the rows with every seed, read only
    # where its budget has every row.
    stopped = subprocess.run(cmd + ["--max-minutes", "0.0001"], capture_output=True, text=True, timeout=600, env=env)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    interim = json.loads((tmp_path / "forgetting_study_quick.json").read_text())
    assert interim["status"].startswith(f"interim: {len(kept) - len(payload['validation']) - 1} of ")
    unfinished = {json.loads(line)["row"] for line in dropped}
    # (every row's change is against base, so without base no row is summarised)
    assert {r["row"] for r in interim["rows"]} == (set() if "base" in unfinished else set(rows) - unfinished)
    assert "Status: interim" in (tmp_path / "forgetting_study_quick.md").read_text()
    assert log.read_text().splitlines() == kept
    # Resumed, the study's first rewrite of the report (a new file moved in) is the interim one again, not a
    # report that has forgotten what the earlier session finished.
    report = tmp_path / "forgetting_study_quick.json"
    inode = report.stat().st_ino
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as resumed:
        first_rewrite = None
        while first_rewrite is None and resumed.poll() is None:
            if report.stat().st_ino != inode:
                first_rewrite = json.loads(report.read_text())
            time.sleep(0.02)
        stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert first_rewrite is not None and first_rewrite["status"] == interim["status"]
    assert [r["row"] for r in first_rewrite["rows"]] == [r["row"] for r in interim["rows"]]
    assert f"runs reused from {log}; running 3" in stdout
    rerun = log.read_text().splitlines()
    assert rerun[:len(kept)] == kept and len(rerun) == len(runs)
    assert {json.loads(line)["key"] for line in rerun[len(kept):]} == {json.loads(line)["key"] for line in dropped}


def test_splits_share_no_item_or_template_and_cover_every_pair():
    splits = study_splits("signoff")
    assert sum(splits.sizes().values()) == 513
    for name in ("validation", "test"):
        assert splits.overlap[name]["shared_items"] == 0 and splits.overlap[name]["shared_templates"] == 0
        assert splits.overlap[name]["identical_prompts"] == 0
    assert all(splits.templates[n] for n in ("train", "validation", "test"))
    assert splits.prompts("test") == study_splits("lowercase").prompts("test")  # one split for every preference


def _run(family, lr, pref, kl, pair_acc=50.0, settings=None):
    return {"family": family, "method": "m", "settings": settings or {}, "lr": lr, "pref": pref, "kl": kl,
            "pair_acc": pair_acc}


def test_selection_takes_the_lowest_kl_within_five_points_of_the_best_preference():
    runs = [_run(f, lr, pref, kl) for f in ("SFT", "DPO", "Q-Adapter default", "Q-Adapter anchored")
            for lr, pref, kl in ((3e-4, 60.0, 0.1), (1e-3, 96.0, 0.5), (3e-3, 100.0, 0.9))]
    assert {f: c["lr"] for f, c in choose(runs).items()} == dict.fromkeys(
        ("SFT", "DPO", "Q-Adapter default", "Q-Adapter anchored"), 1e-3)
    tie = [_run("SFT", 1e-3, 90.0, 0.2, 60.0), _run("SFT", 3e-4, 90.0, 0.2, 70.0)]
    assert choose(tie + runs[3:])["SFT"]["lr"] == 3e-4  # then the higher pair accuracy


def _row(name, family, pref, change, low=None, high=None):
    low = change - 0.1 if low is None else low
    high = change + 0.1 if high is None else high
    return {"row": name, "family": family, "item_margin_change": [change] * 50,
            "metrics": {"pref": {"mean": pref}, "margin_change_vs_base": {"mean": change, "low": low, "high": high}}}


def test_the_reading_follows_the_preregistered_rule():
    control = _row("control [long]", "control", 90, -2.0)
    rows = [control, _row("SFT [demo]", "SFT", 95, -1.0), _row("DPO [demo]", "DPO", 95, 0.0),
            _row("Q-Adapter default [demo]", "Q-Adapter default", 90, -0.2),
            _row("Q-Adapter anchored [demo]", "Q-Adapter anchored", 50, -1.0)]
    outcome = read_outcome(rows)
    assert outcome["Q-Adapter default [demo]"].startswith("SUPPORTED")
    assert outcome["Q-Adapter anchored [demo]"].startswith("UNTESTED")  # 45 points less preference
    rows[3] = _row("Q-Adapter default [demo]", "Q-Adapter default", 90, -1.0)
    assert read_outcome(rows)["Q-Adapter default [demo]"].startswith("REFUTED")
    rows[1] = _row("SFT [demo]", "SFT", 95, 0.0)
    assert read_outcome(rows)["Q-Adapter default [demo]"].startswith("UNTESTED")  # only the control drops
    assert read_outcome(rows[:1] + rows[2:])["Q-Adapter default [demo]"].startswith("INCOMPLETE: SFT [demo]")
    rows[0] = _row("control [long]", "control", 90, -0.05)
    assert read_outcome(rows)["Q-Adapter default [demo]"].startswith("PROBE INSENSITIVE")
    assert read_outcome(rows)["Q-Adapter default [long]"].startswith("INCOMPLETE")
    assert read_outcome(rows[1:])["Q-Adapter default [demo]"].startswith("INCOMPLETE: the control")


def test_the_reading_weighs_only_the_baselines_that_drop_and_are_comparable():
    control = _row("control [long]", "control", 90, -2.0)

    def outcome(sft, dpo, qa):
        return read_outcome([control, _row("SFT [demo]", "SFT", *sft), _row("DPO [demo]", "DPO", *dpo),
                             _row("Q-Adapter default [demo]", "Q-Adapter default", *qa)])["Q-Adapter default [demo]"]

    # Comparable to SFT, which kept its knowledge, and 13 points below DPO, which lost some: nothing to weigh.
    untested = outcome((81.5, 0.2), (98.5, -0.4), (85.5, 0.1))
    assert untested.startswith("UNTESTED") and "DPO's 98.5%" in untested and "SFT" not in untested
    # Both dropped; only SFT is within 10 points, and the Q-Adapter drops less than it.
    supported = outcome((80.0, -1.0), (99.0, -0.3), (85.0, -0.2))
    assert supported.startswith("SUPPORTED") and "vs SFT" in supported and "vs DPO" not in supported
    # Comparable to both, less than SFT but not than DPO, and dropping itself.
    assert outcome((95.0, -1.0), (95.0, -0.3), (90.0, -0.5)).startswith("REFUTED")
    # As much as SFT lost, but its own CI is too wide to call a drop: neither supported nor refuted.
    assert outcome((95.0, -1.0), (95.0, 0.0), (90.0, -1.0, -2.0, 0.1)).startswith("INCONCLUSIVE")


def test_only_rows_with_every_planned_seed_are_complete():
    plan = [{"row": "base"}] + [{"row": "SFT [demo]"}] * 3 + [{"row": "DPO [demo]"}] * 3
    test = [{"row": "base"}, {"row": "SFT [demo]", "seed": 0}, {"row": "DPO [demo]", "seed": 0},
            {"row": "SFT [demo]", "seed": 1}, {"row": "SFT [demo]", "seed": 2}]
    assert [r["row"] for r in complete_rows(plan, test)] == ["base", "SFT [demo]", "SFT [demo]", "SFT [demo]"]


def test_the_docs_state_the_preregistered_rule_and_reading_verbatim():
    text = (ROOT / "docs" / "forgetting.md").read_text()
    assert PREREGISTRATION["selection_rule"] in text and PREREGISTRATION["reading"] in text


def test_the_estimate_adds_measured_step_and_evaluation_costs():
    from forgetting_study import QUICK, costs_from, estimate, validation_plan

    runs = [{"method": m, "budget": "demo", "train_cpu_s": 4 * s, "eval_cpu_s": e}
            for m, s, e in (("sft", 1.0, 10.0), ("dpo", 3.0, 12.0), ("qadapter", 2.0, 11.0))]
    runs.append({"method": "qadapter", "budget": "long", "train_cpu_s": 4 * 3.0, "eval_cpu_s": 30.0})
    costs = costs_from(runs, 4)
    assert costs["cpu_s_per_step"] == {"sft": 1.0, "dpo": 3.0, "qadapter": 2.0}
    assert costs["long_step_factor"] == 1.5 and costs["eval_cpu_s"] == {"validation": 12.0, "test": 30.0}
    plan = validation_plan(QUICK)  # base, then 2 lrs each of SFT, DPO, Q-Adapter default and anchored
    steps = QUICK.demo_steps
    expected = 9 * 12.0 + 2 * steps * (1.0 + 3.0 + 2.0 + 2.0)
    got = estimate(plan, QUICK, 2, 300, costs)
    assert got["runs"] == 9 and got["worker_minutes"] == round(expected / 60, 1)
    assert got["wall_minutes_with_jobs"] == round(expected / 120, 1)
    assert estimate(plan, QUICK, 2, 300, None)["wall_minutes_with_jobs"] is None


def test_lm_eval_tasks_are_scored_per_document_in_order():
    pytest.importorskip("lm_eval")
    from forgetting_runs import quick_model_and_tokenizer
    from forgetting_study import task_scores

    from qadapter_kernels.evaluation import PolicyScorer
    from qadapter_kernels.evaluation.checkers import read_task_records, retention_choices, retention_process_results
    from qadapter_kernels.evaluation.metrics import retention_pairs
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel

    items = read_task_records("retention")[:6]
    model, tokenizer = quick_model_and_tokenizer([f"Question: {r['question']}\nAnswer: " + " ".join(r["options"])
                                                  for r in read_task_records("retention")])
    policy = QAdapterModel(model, QAdapterConfig())
    context = {"config": {"tasks": ("qadapter_retention",), "task_limit": len(items)}, "tokenizer": tokenizer}
    scores = task_scores(policy, context, False)["qadapter_retention"]
    # The task's first metric is acc, scored as the probe scores it, document by document.
    lls = [ll for ll, _ in PolicyScorer(policy, tokenizer, adapter=False).continuation_logprobs(
        retention_pairs(tokenizer, items))]
    expected, offset = [], 0
    for item in items:
        n = len(retention_choices(item))
        expected.append(retention_process_results(item, lls[offset:offset + n])["acc"])
        offset += n
    assert scores == expected
