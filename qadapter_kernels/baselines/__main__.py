"""``python3 -m qadapter_kernels.baselines``: train an SFT or DPO LoRA baseline on a preference file.

The output folder loads like a Q-Adapter's (``QAdapterModel.from_pretrained``, the lm-eval
model's ``adapter=DIR``) with alpha_tilde = 1 and alpha_0 = 0: the LoRA model's own policy.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..training import QAdapterConfig
from .trl_training import BASELINE_METHODS, TrainingBudget

_DEFAULTS = TrainingBudget()
_LORA = QAdapterConfig()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m qadapter_kernels.baselines", description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=BASELINE_METHODS)
    p.add_argument("--data", required=True, help="JSON Lines preference file (prompt, chosen, rejected)")
    p.add_argument("--output-dir", required=True, help="where the adapter folder is written")
    p.add_argument("--model", help="base model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (default 0.1)")
    p.add_argument("--max-steps", type=int, default=_DEFAULTS.max_steps)
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="preference pairs per step")
    p.add_argument("--lr", type=float, default=_DEFAULTS.learning_rate)
    p.add_argument("--max-length", type=int, default=_DEFAULTS.max_length)
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--lora-r", type=int, default=_LORA.lora_r)
    p.add_argument("--lora-alpha", type=float, default=_LORA.lora_alpha)
    p.add_argument("--target-modules", default=",".join(_LORA.target_modules), help="comma-separated module names")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import trl  # noqa: F401  (fail before loading a model)

        from ..loading import embedded_model_path, load_model_and_tokenizer
        from ..training import load_preferences
        from .trl_training import train_baseline

        budget = TrainingBudget(max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.lr,
                                max_length=args.max_length, seed=args.seed)
        lora = QAdapterConfig(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                              target_modules=tuple(m for m in args.target_modules.split(",") if m)).validate()
        examples = load_preferences(args.data)
        causal_lm, tokenizer = load_model_and_tokenizer(args.model or embedded_model_path())
    except ImportError as e:
        print(f"qadapter baselines: error: {e.name} is not installed (pip install 'qadapter-kernels[baselines]')",
              file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError) as e:
        print(f"qadapter baselines: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    train_baseline(args.method, causal_lm, tokenizer, examples, lora=lora, budget=budget, dpo_beta=args.beta,
                   output_dir=args.output_dir)
    print(f"{args.method}: {budget.max_steps} steps in {time.perf_counter() - start:.1f} s; "
          f"adapter saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
