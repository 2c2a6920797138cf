"""``qadapter train``: checks everything it can before the first step, then trains, saves, resumes.

Before any compute: the flags, the data, the model, whose run the output folder holds (see
``run_folder``), that it is writable and has room for a checkpoint. During training the first
SIGINT/SIGTERM saves a resumable checkpoint and prints the command that resumes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import time
from pathlib import Path

from ..signal_latch import SignalLatch
from .common import (UserError, build_dataset, check_writable_folder, config_from_args, load_base, load_tokenizer,
                     on_main_process, resolve_data_path, resolve_model_path)

__all__ = ["resume_command", "run_record", "run_train"]

# Disk needed before training: per trainable parameter, 4 bytes each for the checkpoint's weights and
# Adam's two moments, and for the final adapter; plus the small files (configs, states, RNG).
_BYTES_PER_TRAINABLE_PARAMETER = 16
_CHECKPOINT_OVERHEAD_BYTES = 1 << 20


def run_record(args: argparse.Namespace, model_path: Path, data_path: Path | str, config) -> dict:
    """What makes two runs the same run: the data's bytes, the model, the hyper-parameters that change
    the result (not the step budget: a run may be resumed with a larger ``--max-steps``)."""
    from .run_folder import data_sha256

    return {
        "data_sha256": data_sha256(data_path),
        "model": str(model_path.resolve()),
        "qadapter": json.loads(dataclasses.replace(config, base_model=None).to_json()),
        "training": {name: getattr(args, name) for name in (
            "batch_size", "grad_accum", "lr", "warmup_steps", "lr_scheduler", "seed", "max_length",
            "max_prompt_length", "prompt_truncation", "bf16")},
    }


def _check_bf16() -> None:
    import torch

    if torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise UserError("--bf16: this GPU does not support bf16")
        return
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as e:
        raise UserError(f"--bf16: bf16 autocast does not run on this CPU ({e})") from None


def _target_steps(args: argparse.Namespace):
    from ..training.checkpoints import TRAINER_STATE_NAME

    def target(checkpoint: Path | None) -> int | None:
        if args.max_steps > 0:
            return args.max_steps
        if checkpoint is None:
            return None
        try:
            steps = json.loads((checkpoint / TRAINER_STATE_NAME).read_text()).get("max_steps")
        except (OSError, ValueError, AttributeError):
            return None
        return steps if isinstance(steps, int) and steps > 0 else None

    return target


def resume_command(argv: list[str]) -> str:
    """The command line that resumes the run of ``qadapter ARGV``."""
    if "--resume-from-checkpoint" not in argv:
        argv = [*argv, "--resume-from-checkpoint"]
    return "qadapter " + shlex.join(argv)


def _training_arguments(args: argparse.Namespace, with_eval: bool):
    """The Trainer's arguments; under a launcher (``accelerate launch``, ``torchrun``) building them joins
    the process group."""
    import torch
    import transformers

    # Without a GPU, processes started by a launcher form a gloo group only when told to use the CPU
    # (otherwise each would train alone); DeepSpeed, whose CPU accelerator runs gloo itself, is the exception.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    try:
        training_args = transformers.TrainingArguments(
            output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
            lr_scheduler_type=args.lr_scheduler, weight_decay=0.0, seed=args.seed, logging_steps=args.logging_steps,
            save_steps=args.save_steps, save_total_limit=args.save_total_limit, bf16=args.bf16, report_to=[],
            eval_strategy="steps" if with_eval and args.eval_steps else "no",
            eval_steps=args.eval_steps or None, remove_unused_columns=False, dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available() and not deepspeed,
        )
    except ValueError as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    # The cached base pass (training.base_cache), read by QAdapterTrainer.
    training_args.precompute_base = args.cache_base
    training_args.base_cache_dir = args.cache_dir
    training_args.base_cache_max_gb = args.cache_max_gb
    return training_args


def _before_training(signum: int) -> str:
    return (f"qadapter train: {signal.Signals(signum).name} received: stopping before training starts (nothing is "
            "trained or written); Ctrl-C again aborts now")


def run_train(args: argparse.Namespace, latch: SignalLatch) -> int:
    """``qadapter train``. ``latch``: armed by ``main`` before any heavy import; a signal during the
    imports and the loading is handled below, at a safe point, instead of wherever it lands."""
    import transformers

    from ..model import QAdapterModel
    from ..training.base_cache import BaseCacheTooLarge
    from ..training.checkpoints import trained_steps
    from ..training.data import PreferenceCollator
    from ..training.interrupt import StopOnSignal
    from ..training.trainer import QAdapterTrainer
    from .run_folder import check_free_space, plan_run, write_record

    latch.announce = _before_training  # imports done: a second Ctrl-C raises KeyboardInterrupt from here
    latch.abort_message = None
    if latch.received is not None:  # a signal came during the imports: nothing is loaded or written
        return _stopped_before_training(latch.received)

    config = config_from_args(args)  # checked before anything slow
    if not args.cache_base and (args.cache_max_gb is not None or args.cache_dir is not None):
        raise UserError("--cache-max-gb and --cache-dir need --cache-base")
    try:
        transformers.SchedulerType(args.lr_scheduler)
    except ValueError:
        names = ", ".join(t.value for t in transformers.SchedulerType)
        raise UserError(f"unknown --lr-scheduler {args.lr_scheduler!r} (one of: {names})") from None
    if args.bf16:
        _check_bf16()
    model_path = resolve_model_path(args.model)
    data_path = resolve_data_path(args.data)
    if args.eval_data is not None:
        resolve_data_path(args.eval_data)
    output_dir = Path(args.output_dir)
    record = run_record(args, model_path, data_path, config)
    target = _target_steps(args)
    training_args = _training_arguments(args, with_eval=args.eval_data is not None)
    main_process = training_args.process_index == 0

    def prepare_folder():
        plan = plan_run(output_dir, record, args.resume_from_checkpoint, args.overwrite, target)
        created = not output_dir.exists()
        check_writable_folder(output_dir, "--output-dir")  # creates the folder
        return plan, created

    # The output folder is read, cleaned and claimed once, by the main process; the others wait for its plan.
    plan, created = on_main_process(prepare_folder)
    created = created and main_process
    try:
        tokenizer = load_tokenizer(model_path)
        if plan.removed:
            print("removed what interrupted saves left: " + ", ".join(p.name for p in plan.removed), flush=True)
        if plan.finished_at is not None:
            return _finish_without_training(output_dir, plan, record, tokenizer) if main_process else 0
        train_set = build_dataset(args.data, tokenizer, args.max_length, args.max_prompt_length,
                                  prompt_truncation=args.prompt_truncation)
        eval_set = (build_dataset(args.eval_data, tokenizer, args.max_length, args.max_prompt_length,
                                  prompt_truncation=args.prompt_truncation)
                    if args.eval_data is not None else None)
        print(f"train pairs: {train_set.summary()}" + (f"\neval pairs: {eval_set.summary()}" if eval_set else ""),
              flush=True)
        transformers.set_seed(args.seed)  # the LoRA initialisation is random too
        try:
            model = QAdapterModel(load_base(model_path), dataclasses.replace(config, base_model=str(model_path)))
        except ValueError as e:  # e.g. peft: target modules not found in the base model
            raise UserError(f"cannot put the adapter on {model_path}: {e}") from None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        check_free_space(output_dir, trainable * _BYTES_PER_TRAINABLE_PARAMETER + _CHECKPOINT_OVERHEAD_BYTES)
    except UserError:
        _remove_if_empty(output_dir, created)
        raise
    if latch.received is not None:
        _remove_if_empty(output_dir, created)
        return _stopped_before_training(latch.received)
    if main_process:
        write_record(output_dir, record)  # the folder is this run's from now on
    resumed_at = (trained_steps(plan.checkpoint) or 0) if plan.checkpoint is not None else 0
    stop = StopOnSignal(latch, prefix="qadapter train: ", first_step=resumed_at + 1)
    trainer = QAdapterTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                              data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                              run_record=record, callbacks=[stop])
    if plan.checkpoint is not None:
        print(f"resuming from {plan.checkpoint} (the newest complete checkpoint of this run)", flush=True)
    elif args.resume_from_checkpoint:
        print("no complete checkpoint of this run yet: starting at step 0", flush=True)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    except BaseCacheTooLarge as e:
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - start
    if stop.received is not None and result.global_step < trainer.state.max_steps:
        print(f"stopped by signal {stop.received} at step {result.global_step}; a resumable checkpoint is in "
              f"{output_dir}. Resume with:\n  {resume_command(args.argv)}", flush=True)
        return 128 + stop.received
    trainer.save_model(args.output_dir)  # adapter (QAdapterModel.save_pretrained) + tokenizer + record
    if main_process:
        write_record(output_dir, record, completed_steps=result.global_step)
    # global_step counts from the run's start, across resumes; the time and the loss are this command's.
    ran = result.global_step - resumed_at
    resumed = f" (resumed at step {resumed_at}, now at step {result.global_step})" if resumed_at else ""
    print(f"trained {ran} step{'' if ran == 1 else 's'}{resumed} in {seconds:.1f} s "
          f"(train loss {result.training_loss:.4f}); adapter saved to {args.output_dir}", flush=True)
    latch.disarm()  # the run is saved: from here a Ctrl-C stops at once
    if eval_set is not None:
        metrics = trainer.evaluate()
        print("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                       if isinstance(v, float)), flush=True)
    return 0


def _stopped_before_training(signum: int) -> int:
    print(f"stopped by signal {signum} before training started: nothing was trained or written", flush=True)
    return 128 + signum


def _remove_if_empty(output_dir: Path, created: bool) -> None:
    """Removes the output folder this run created when nothing was put in it."""
    if created and output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()


def _finish_without_training(output_dir: Path, plan, record: dict, tokenizer) -> int:
    """A resume of a finished run: the final adapter is made whole (a kill may have cut its save), nothing trains."""
    from .run_folder import publish_final_adapter, write_record
    if plan.checkpoint is not None and not _same_adapter(plan.checkpoint, output_dir):
        publish_final_adapter(plan.checkpoint, output_dir)
    if not (output_dir / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(output_dir))
    write_record(output_dir, record, completed_steps=plan.finished_at)
    print(f"nothing to do: this run finished at step {plan.finished_at}; its adapter is in {output_dir}", flush=True)
    return 0


def _same_adapter(checkpoint: Path, output_dir: Path) -> bool:
    from .run_folder import adapter_is_published, file_sha256

    if not adapter_is_published(output_dir):
        return False
    return all(file_sha256(checkpoint / name) == file_sha256(output_dir / name)
               for name in ("adapter_model.safetensors", "qadapter_config.json"))
