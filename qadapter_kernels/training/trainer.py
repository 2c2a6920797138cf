"""``transformers.Trainer`` for Q-Adapter: the loss, its metrics, and adapter-only checkpoints.

Progress bars, logging, gradient accumulation, mixed precision, resume and multi-process
training (DDP, FSDP, DeepSpeed through accelerate) are the Trainer's own.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate.utils import save_fsdp_optimizer
from transformers.trainer import SCHEDULER_NAME

from . import base_cache, checkpoints
from .arguments import QAdapterTrainingArguments
from .data import PreferenceCollator
from ..model.sharded_state import gather_adapter_state, load_adapter_state
from .trainer_inputs import (ModelSource, default_tokenizer, disable_dropout, model_init_kwargs, qadapter_model_from,
                             tokenized_preferences)

# What a batch may hold for QAdapterModel.forward (the last two: from a cached base pass).
BATCH_COLUMNS = ("input_ids", "attention_mask", "loss_mask", "base_hidden", "base_lse")

# Logged per window, in this order, as means over the window's preference pairs (never over its batches,
# whose last one may be smaller); evaluation metrics get the Trainer's "eval_" prefix.
METRIC_NAMES = ("pref_loss", "reg_loss", "accuracy", "chosen_score", "rejected_score", "margin")
# Summed per split besides METRIC_NAMES: the loss itself, which evaluation reports per pair (the Trainer's
# own eval_loss weighs each batch by its 2B rows and then cuts them to the number of pairs).
_SUMMED = ("loss", *METRIC_NAMES)


class QAdapterTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains a Q-Adapter; called like TRL's ``DPOTrainer``::

        QAdapterTrainer(model="org/model", args=QAdapterTrainingArguments(output_dir=...),
                        train_dataset=rows, processing_class=tokenizer, peft_config=LoraConfig(...))

    ``model``: a model path or name (local folder, ``.gguf`` file, or a model in the local Hugging
    Face cache), a transformers causal LM (modified in place: peft injects the LoRA), a
    ``peft.PeftModel`` holding the LoRA, or a ``QAdapterModel``. ``peft_config``: the LoRA to put on
    a base model (default: ``QAdapterConfig``'s); the saved folder records it (peft's
    ``adapter_config.json`` in full, ``qadapter_config.json`` its r, alpha, dropout and modules).
    ``args``: a ``QAdapterTrainingArguments`` sets the hyper-parameters (over a ``QAdapterModel``'s
    own); plain ``TrainingArguments`` leave them to the model's ``QAdapterConfig``. As with
    ``DPOTrainer``, a model named by path or name is loaded with ``args.model_init_kwargs``,
    ``args.trust_remote_code`` and ``quantization_config`` (a ``BitsAndBytesConfig``); ``ref_model``
    must be None (the reference is the base model itself, adapter off).
    Without ``data_collator`` the datasets may be preference files, sequences of rows
    (``prompt``/``chosen``/``rejected``) or ``datasets.Dataset``s: they are tokenised with
    ``processing_class`` (loaded from ``model`` when that is a path) within the arguments' limits
    and batched by ``PreferenceCollator``. With a ``data_collator`` they are used as given.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``loss_mask`` of 2B rows,
    chosen first (docs/DESIGN.md §2). Besides ``loss`` it logs ``pref_loss``, ``reg_loss``,
    ``accuracy``, ``chosen_score``, ``rejected_score`` and ``margin``, averaged over the pairs of
    each logging window (and over processes). Checkpoints hold the adapter folder of
    ``QAdapterModel.save_pretrained`` plus the Trainer's optimizer, scheduler and RNG states; each
    appears whole or not at all (``training.checkpoints``), and ``save_total_limit`` counts whole
    ones only. The tokenizer (``processing_class``) is saved with the final model, not with every
    checkpoint. ``run_record``: a JSON-able description of the run (data, model, hyper-parameters)
    written as ``qadapter_run.json`` beside every save, so a resume can tell its own checkpoints.
    ``evaluate()`` reports the same metrics with the ``eval_`` prefix, per pair: the numbers of
    ``qadapter eval`` on the same data, whatever the batch size; ``predict()`` returns the
    [B, 2] (chosen, rejected) scores as predictions.

    A cached base pass (``training.base_cache``) is read from the training arguments:
    ``precompute_base`` (default False), ``base_cache_dir`` (None: ``base_cache.default_cache_dir()``)
    and ``base_cache_max_gb`` (None: no limit). With it, the first dataloader of each dataset
    builds (or reuses) the cache, and every step skips the base decoder pass. Several processes:
    the main process of each node builds the one shared file while the others wait
    (``main_process_first``), then every process reads it memory-mapped.
    """

    # The loss is a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: ModelSource | None = None, args: transformers.TrainingArguments | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, *, peft_config: peft.LoraConfig | None = None,
                 ref_model: Any = None, quantization_config: Any = None, run_record: dict | None = None,
                 **kwargs: Any):
        if model is None:
            raise TypeError("QAdapterTrainer needs model= (a model name or path, a causal LM, a PeftModel or a "
                            "QAdapterModel)")
        if ref_model is not None:
            raise ValueError("ref_model must be None: the Q-Adapter's reference is its own base model with the "
                             "adapter switched off")
        is_qadapter_args = isinstance(args, QAdapterTrainingArguments)
        model_source = model
        init_kwargs = model_init_kwargs(model, args, quantization_config)
        model = qadapter_model_from(model, args.qadapter_config() if is_qadapter_args else None, peft_config,
                                    init_kwargs)
        if getattr(args, "disable_dropout", False):
            disable_dropout(model)
        if data_collator is None:
            if processing_class is None:
                processing_class = default_tokenizer(model_source, init_kwargs)
            train_dataset = tokenized_preferences(train_dataset, processing_class, "train_dataset", args)
            eval_dataset = tokenized_preferences(eval_dataset, processing_class, "eval_dataset", args)
            if processing_class is None:
                raise ValueError("without data_collator, QAdapterTrainer needs processing_class= (the tokenizer) to pad")
            data_collator = PreferenceCollator.for_tokenizer(processing_class)
        self.run_record = run_record
        # The training pairs as tokenised (the base cache wraps train_dataset later): they know how the
        # prompts were encoded.
        self._tokenized_train_pairs = train_dataset
        # While a checkpoint is written: the staging folder standing in for the output folder.
        self._checkpoint_run_dir: Path | None = None
        # Running sums of _SUMMED per split ("train", "eval") since the last log, and pair counts.
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        # model(...) and not model.compute_loss(...): a DDP/FSDP wrapper must see the forward.
        out = model(**{k: inputs[k] for k in BATCH_COLUMNS if k in inputs})
        self._accumulate_metrics(out, "train" if model.training else "eval")
        if return_outputs:
            return out.loss, {"chosen_scores": out.chosen_scores, "rejected_scores": out.rejected_scores}
        return out.loss

    # ------------------------------------------------------------------ the cached base pass

    def _with_base_cache(self, dataset):
        """``dataset`` with its cached base rows attached (built once; the collator learns the columns)."""
        if not getattr(self.args, "precompute_base", False) or dataset is None:
            return dataset
        if isinstance(dataset, base_cache.CachedBaseDataset):
            return dataset
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        with self.args.main_process_first(desc="base cache"):
            cache = base_cache.open_or_build(
                model, dataset, tokenizer=self.processing_class, tokenization=getattr(dataset, "tokenization", None),
                cache_dir=getattr(self.args, "base_cache_dir", None),
                max_gb=getattr(self.args, "base_cache_max_gb", None),
                batch_size=getattr(self.args, "precompute_ref_batch_size", None) or self.args.per_device_eval_batch_size,
                autocast=self.autocast_smart_context_manager,
                log=print if self.is_local_process_zero() else lambda line: None)
        if not isinstance(self.data_collator, base_cache.CachedBaseCollator):
            self.data_collator = base_cache.CachedBaseCollator(self.data_collator)
        return base_cache.CachedBaseDataset(dataset, cache)

    def get_train_dataloader(self):
        self.train_dataset = self._with_base_cache(self.train_dataset)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, str) or (eval_dataset is None and isinstance(self.eval_dataset, dict)):
            return super().get_eval_dataloader(eval_dataset)  # named eval sets: uncached
        if eval_dataset is None:
            self.eval_dataset = self._with_base_cache(self.eval_dataset)
            return super().get_eval_dataloader()
        return super().get_eval_dataloader(self._with_base_cache(eval_dataset))

    def _accumulate_metrics(self, out, split: str) -> None:
        chosen, rejected = out.chosen_scores.detach().float(), out.rejected_scores.detach().float()
        pairs = chosen.numel()
        # Per-pair sums: the batch means of the losses weighted by the batch's pairs, and the pair accuracy
        # counted as `qadapter eval` counts it (margin > 0), so the metrics do not depend on the batch size.
        values = torch.stack([out.loss.detach().float() * pairs, out.pref_loss.detach().float() * pairs,
                              out.reg_loss.detach().float() * pairs,
                              (chosen > rejected).sum().float(), chosen.sum(), rejected.sum(),
                              (chosen - rejected).sum()])
        # Summed on the device without a host sync; read once per logging window.
        self._metric_sums[split] = self._metric_sums.get(split, 0) + values
        self._metric_counts[split] = self._metric_counts.get(split, 0) + pairs

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, scores = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), torch.stack([scores["chosen_scores"], scores["rejected_scores"]], dim=-1), None

    def _pop_averages(self, split: str) -> dict[str, float]:
        """The window's averages of _SUMMED over pairs and processes; resets the window."""
        sums = self._metric_sums.pop(split, None)
        count = self._metric_counts.pop(split, 0)
        if sums is None:
            return {}
        # Every process gets here (log() and evaluation_loop() run on all): a collective is safe.
        totals = self.accelerator.reduce(torch.cat([sums, sums.new_tensor([count])]), reduction="sum")
        return dict(zip(_SUMMED, (totals[:-1] / totals[-1]).tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-window log: the Trainer averaged "loss" over the same steps
            averages = self._pop_averages("train")
            averages.pop("loss", None)  # the Trainer's own, as it counts gradient accumulation
            logs.update(averages)
        elif "train_loss" in logs:  # the end-of-training summary: drop the unlogged tail of the last window
            self._metric_sums.pop("train", None)
            self._metric_counts.pop("train", None)
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        self._metric_sums.pop("eval", None)
        self._metric_counts.pop("eval", None)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_averages("eval").items()})
        return output

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the adapter folder, not the whole model (Trainer's default for a non-PreTrainedModel)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._record_prompt_format(model)
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None and self._checkpoint_run_dir is None:
            self.processing_class.save_pretrained(output_dir)
        # JSON rather than the Trainer's pickled training_args.bin, which resume does not need.
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())
        if self.run_record is not None:
            with open(os.path.join(output_dir, checkpoints.RUN_RECORD_NAME), "w") as f:
                f.write(json.dumps(self.run_record, indent=2, sort_keys=True))

    def _record_prompt_format(self, model) -> None:
        """How the training prompts were encoded, into the model's config (and so into the saved folder),
        where decoding reads it; kept as it is when the training data do not say (pre-collated batches)."""
        record = getattr(self._tokenized_train_pairs, "prompt_format_record", None)
        if record is None or record()["prompt_format"] is None:
            return
        model.qadapter_config = dataclasses.replace(model.qadapter_config, **record())

    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_run_dir is not None:
            return str(self._checkpoint_run_dir)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed into place when whole."""
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        staging = checkpoints.staging_folder(run_dir, step)
        self._checkpoint_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_run_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            final = run_dir / f"{checkpoints.CHECKPOINT_PREFIX}{step}"
            checkpoints.publish_checkpoint(staging / final.name, final)
            staging.rmdir()
            checkpoints.rotate_checkpoints(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # The Trainer's FSDP save gathers the whole model, frozen base included; the adapter is enough.
        self._save(output_dir, state_dict=gather_adapter_state(self.model))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The Trainer would also write the whole model, frozen base included (pytorch_model_fsdp.bin) to
        # every checkpoint; resume reads the adapter from adapter_model.safetensors instead.
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_deepspeed_enabled:  # its engine loads its own checkpoint files
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled:  # every process loads the whole adapter into its shards
            return load_adapter_state(unwrapped.peft_model, resume_from_checkpoint)
        unwrapped.load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)
