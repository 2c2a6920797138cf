"""Does a short run at the library defaults learn a preference that changes the length of answers? (issue 9 item 5)

For each shipped preference asked for and each setting (the library defaults, and the defaults with
``length_norm="none"``, the demo's setting), a Q-Adapter is trained on the embedded
SmolLM2-135M-Instruct with the demo's budget and scored before (adapter off) and after:

- pref %: greedy answers to ``--prompts`` held-out prompts (spread over the split) that pass the
  preference's checker;
- retention %: the shipped knowledge probe on ``--retention-items`` items spread over its categories.

    PYTHONPATH=. python benchmarks/probe_learnability.py [--preference signoff concise] [--out probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forgetting import FreshModels  # noqa: E402

SETTINGS = {"defaults": {}, "length_norm=none": {"length_norm": "none"}}


def main(argv: list[str] | None = None) -> int:
    from qadapter_kernels.baselines import TrainingBudget, train_qadapter
    from qadapter_kernels.evaluation import PolicyScorer, metrics
    from qadapter_kernels.evaluation.checkers import read_task_records
    from qadapter_kernels.loading import default_model_path, load_model_and_tokenizer
    from qadapter_kernels.preferences import PREFERENCE_CHECKERS
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel, load_preferences, shipped_data_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preference", nargs="+", default=["signoff", "concise"], choices=sorted(PREFERENCE_CHECKERS))
    parser.add_argument("--setting", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--retention-items", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-base", action="store_true", help="skip the base model's scores (already measured)")
    parser.add_argument("--out", type=Path, default=Path("probe_learnability.json"))
    args = parser.parse_args(argv)

    base_model, tokenizer = load_model_and_tokenizer(default_model_path())
    fresh = FreshModels(base_model)
    retention = metrics.evenly_spaced(read_task_records("retention"), args.retention_items)
    results = {"budget": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "scheduler": "linear"},
               "defaults": {k: str(v) for k, v in vars(QAdapterConfig()).items()}, "runs": []}

    def score(model, adapter: bool, preference: str) -> dict:
        scorer = PolicyScorer(model, tokenizer, adapter=adapter, batch_size=16)
        prompts = metrics.evenly_spaced(read_task_records("preference", preference), args.prompts)
        pref, answers = metrics.preference_satisfaction(scorer, prompts, max_new_tokens=args.max_new_tokens)
        return {"pref": 100.0 * pref, "retention": 100.0 * metrics.retention_accuracy(scorer, retention),
                "answers": answers}

    base = QAdapterModel(fresh.get(), QAdapterConfig())
    for preference in args.preference:
        if not args.no_base:
            before = score(base, False, preference)
            results["runs"].append({"preference": preference, "setting": "base", **before})
            print(f"{preference} base: pref {before['pref']:.0f}%  retention {before['retention']:.1f}%", flush=True)
        for setting in args.setting:
            start = time.perf_counter()
            examples = load_preferences(shipped_data_path("train", preference))
            budget = TrainingBudget(max_steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                                    logging_steps=max(1, args.steps // 4))
            model = train_qadapter(fresh.get(), tokenizer, examples, QAdapterConfig(**SETTINGS[setting]), budget)
            seconds = time.perf_counter() - start
            after = score(model, True, preference)
            results["runs"].append({"preference": preference, "setting": setting, "train_s": seconds, **after})
            print(f"{preference} {setting}: pref {after['pref']:.0f}%  retention {after['retention']:.1f}%  "
                  f"({seconds:.0f} s)", flush=True)
            for answer in after["answers"][:3]:
                print(f"    {answer!r}", flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
