"""The main job: a Q-Adapter learns a new preference on a real model, end to end, on a CPU.

    python -m qadapter_cli demo [--preference NAME] [--output-dir DIR] [--max-steps N] [--prompts K]

With the embedded SmolLM2-135M-Instruct and a shipped preference (``--preference``: ``lowercase``
by default, answers written entirely in lowercase; ``signoff``, a fixed closing line; ``concise``,
one short sentence; ``app/make_preferences.py``), it shows both sides, what is learnt and what is kept:

1. the base model answers K held-out prompts (greedy; the adapter off);
2. the base model's knowledge-retention score on a fixed subset of the shipped probe, and its
   greedy answers to a few of the probe's questions it gets right;
3. held-out pair accuracy before training (a fresh adapter: Q = the base logits);
4. a brief Q-Adapter training on the train split (the Trainer's progress bar);
5. held-out pair accuracy after training;
6. the Q-Adapter answers the same prompts and the same probe questions (greedy, one mixed-batch
   forward per token), shown beside the base answers, and its retention score on the same subset;
7. the summary: answers that satisfy the preference (its checker), retention, pair accuracy,
   before and after; the adapter is saved to ``--output-dir`` (``qadapter generate --adapter DIR``).

Every phase is timed; the whole run takes about 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from .common import (add_param_arguments, build_dataset, config_from_args, evaluate_pairs, load_base, load_tokenizer,
                     positive_float, positive_int, resolve_data_path, resolve_model_path, side_by_side)
from ..params import LEARNING_RATE, LR_SCHEDULER
from ..preferences import DEFAULT_PREFERENCE, PREFERENCE_CHECKERS, PREFERENCE_RULES
from ..signal_latch import SignalLatch

__all__ = ["add_demo_arguments", "run_demo"]


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--model", help="local transformers folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--preference", choices=list(PREFERENCE_CHECKERS), default=DEFAULT_PREFERENCE,
                   help=f"the shipped preference learnt (default: {DEFAULT_PREFERENCE})")
    p.add_argument("--output-dir", help="where the trained adapter is saved (default: a temporary folder)")
    p.add_argument("--prompts", type=positive_int, default=6, help="held-out prompts answered")
    p.add_argument("--retention-items", type=positive_int, default=60,
                   help="knowledge-retention probe items scored before and after (spread over its categories)")
    p.add_argument("--retention-questions", type=positive_int, default=3,
                   help="probe questions the base model gets right, answered before and after")
    p.add_argument("--max-new-tokens", type=positive_int, default=96,
                   help="tokens generated at most per answer (room for a whole answer and a closing line)")
    g = p.add_argument_group("training (defaults: a brief run that learns the shipped preference)")
    g.add_argument("--max-steps", type=positive_int, default=40, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=4, help="preference pairs per batch")
    g.add_argument("--lr", type=positive_float, default=LEARNING_RATE, help="learning rate (linear decay to 0)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    add_param_arguments(p, with_lora=False, defaults=demo_config())
    p.set_defaults(handler=run_demo)


def demo_config():
    """The library's defaults (chosen by benchmarks/bench_forgetting.py; docs/forgetting.md)."""
    from ..model.config import QAdapterConfig

    return QAdapterConfig()


def _heldout_prompts(preference: str, count: int) -> list[str]:
    """``count`` user messages spread evenly over the preference's held-out split."""
    lines = resolve_data_path(f"shipped:{preference}:heldout").read_text().splitlines()
    picks = [json.loads(lines[round(i * len(lines) / count)]) for i in range(min(count, len(lines)))]
    return [p["prompt"][-1]["content"] if isinstance(p["prompt"], list) else p["prompt"] for p in picks]


def _percent(flags: list[bool]) -> str:
    return f"{100.0 * sum(flags) / len(flags):.1f}%"


class _Phases:
    """Prints each phase's title and keeps its duration for the summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, title: str, fn, *args, **kwargs):
        print(f"\n== {title}", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[title] = time.perf_counter() - start
        return result


class _TokenBar:
    """A ``generate`` streamer that only advances a progress bar, one step per decoded token."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar, self._prompt_seen = tqdm(total=total, desc=desc, unit="tok"), False

    def put(self, ids) -> None:
        if self._prompt_seen:
            self._bar.update(1)
        self._prompt_seen = True

    def end(self) -> None:
        self._bar.close()


def run_demo(args: argparse.Namespace, latch: SignalLatch) -> int:
    """``qadapter demo``; ``latch`` (a ``SignalLatch`` armed by ``main``) holds Ctrl-C until the imports end."""
    import torch
    import transformers

    from ..evaluation import PolicyScorer
    from ..evaluation.checkers import read_task_records
    from ..evaluation.metrics import evenly_spaced, retention_correct
    from ..training.data import PreferenceCollator
    from ..model import QAdapterModel
    from ..training.trainer import QAdapterTrainer

    latch.disarm()  # imports done: from here a Ctrl-C stops the demo at once

    total_start = time.perf_counter()
    config = config_from_args(args, demo_config())
    phases = _Phases()
    model_path = resolve_model_path(args.model)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="qadapter-demo-")

    def load():
        tokenizer = load_tokenizer(model_path)
        transformers.set_seed(args.seed)  # the LoRA initialisation is random
        model = QAdapterModel(load_base(model_path), dataclasses.replace(config, base_model=str(model_path)))
        sets = [build_dataset(f"shipped:{args.preference}:{split}", tokenizer, 512, 256)
                for split in ("train", "heldout")]
        return tokenizer, model, *sets

    tokenizer, model, train_set, heldout_set = phases.run(f"loading {model_path.name}", load)
    satisfies = PREFERENCE_CHECKERS[args.preference]
    prompts = _heldout_prompts(args.preference, args.prompts)
    probe = evenly_spaced(read_task_records("retention"), args.retention_items)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    decode = dict(max_new_tokens=args.max_new_tokens, temperature=0.0)

    def answers(texts: list[str], adapter: bool) -> list[str]:
        bar = _TokenBar(args.max_new_tokens, "decoding")
        return model.generate_text(tokenizer, texts, adapter=adapter, streamer=bar, **decode)

    def retention(adapter: bool) -> list[bool]:
        return retention_correct(PolicyScorer(model, tokenizer, adapter=adapter, batch_size=16), probe)

    base_answers = phases.run(f"base model: answers to {len(prompts)} held-out prompts", answers, prompts, False)
    for prompt, answer in zip(prompts, base_answers):
        print(f"  {prompt}\n    -> {answer}")
    base_right = phases.run(f"base model: knowledge-retention probe ({len(probe)} items, chance 25%)", retention,
                            False)
    print(f"  {_percent(base_right)} right")
    # Questions the base model gets right, spread over the subset (so over the probe's categories).
    questions = evenly_spaced([item for item, right in zip(probe, base_right) if right], args.retention_questions)
    question_texts = [item["question"] for item in questions]
    base_replies = phases.run(f"base model: {len(questions)} probe questions it gets right", answers,
                              question_texts, False)
    for item, reply in zip(questions, base_replies):
        print(f"  {item['question']} (right: {item['options'][item['target']]})\n    -> {reply}")
    before = phases.run(f"held-out pair accuracy before training ({len(heldout_set)} pairs)", evaluate_pairs,
                        model, heldout_set, collator, 8, progress="scoring")
    print(f"  accuracy {before['accuracy']:.3f}, mean margin {before['mean_margin']:+.3f}")

    training_args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type=LR_SCHEDULER, weight_decay=0.0, seed=args.seed,
        logging_steps=max(args.max_steps // 4, 1), save_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available())
    trainer = QAdapterTrainer(model=model, args=training_args, train_dataset=train_set, data_collator=collator)
    phases.run(f"training the Q-Adapter: {args.max_steps} steps x {args.batch_size} pairs", trainer.train)
    model.save_pretrained(output_dir)

    after = phases.run("held-out pair accuracy after training", evaluate_pairs, model, heldout_set, collator, 8,
                       progress="scoring")
    print(f"  accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"mean margin {before['mean_margin']:+.3f} -> {after['mean_margin']:+.3f}")
    adapted_answers = phases.run("Q-Adapter: answers to the same prompts", answers, prompts, True)
    for prompt, left, right in zip(prompts, base_answers, adapted_answers):
        print(f"\n>>> {prompt}\n" + side_by_side("base model", left, "Q-Adapter", right))
    adapted_right = phases.run("Q-Adapter: the same knowledge-retention probe", retention, True)
    print(f"  {_percent(base_right)} -> {_percent(adapted_right)} right")
    adapted_replies = phases.run("Q-Adapter: the same probe questions", answers, question_texts, True)
    for item, left, right in zip(questions, base_replies, adapted_replies):
        print(f"\n>>> {item['question']} (right: {item['options'][item['target']]})\n"
              + side_by_side("base model", left, "Q-Adapter", right))

    def satisfied(texts):
        return f"{sum(map(satisfies, texts))}/{len(texts)}"

    print("\n== summary")
    print(f"  answers that satisfy the preference {args.preference!r} ({PREFERENCE_RULES[args.preference]}): "
          f"base {satisfied(base_answers)}, Q-Adapter {satisfied(adapted_answers)}")
    print(f"  knowledge retention ({len(probe)} probe items, chance 25%): base {_percent(base_right)}, "
          f"Q-Adapter {_percent(adapted_right)}")
    print(f"  held-out pair accuracy: {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    for title, seconds in phases.seconds.items():
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  {time.perf_counter() - total_start:7.1f} s  total; adapter saved to {output_dir}")
    return 0
