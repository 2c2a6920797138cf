"""What ``QAdapterTrainingArguments`` does with each field TRL's ``DPOConfig`` adds to ``TrainingArguments``.

A DPO script switches to Q-Adapter by swapping ``DPOConfig``/``DPOTrainer`` for
``QAdapterTrainingArguments``/``QAdapterTrainer``; TRL's own scripts also read or set some of these
fields (``trust_remote_code``, ``model_init_kwargs``), and their command lines accept all of them.
So every field exists here, and each is in exactly one table:

- ``HONOURED``: it means what it means for DPO, or the nearest thing for the method (how, in words);
- ``REFUSED``: accepted at the value given there (DPOConfig's default, or what it normalises to) and a
  ``ValueError`` with the reason at any other;
- ``IGNORED``: any value, with the reason it changes nothing.

``tests/test_trl_scripts.py`` enumerates ``dataclasses.fields(trl.DPOConfig)`` against these tables, so a
field that a new TRL adds fails a test instead of passing silently. Needs no TRL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DPOConfigFields", "HONOURED", "IGNORED", "REFUSED", "check_dpo_fields", "normalise_dpo_fields"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DPOConfigFields:
    """The fields of ``DPOConfig`` that neither ``TrainingArguments`` nor ``QAdapterParams`` (``beta``)
    nor the sequence limits (``max_length``) already declare, with DPOConfig's types and defaults
    (``disable_dropout`` excepted: the authors train the LoRA with dropout)."""

    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata=_help(
        "keywords of from_pretrained when model= is a name or path (dtype, revision, attn_implementation, ...)"))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "let a model named by path or name run the Python code it ships (model and tokenizer)"))
    disable_dropout: bool = field(default=False, metadata=_help(
        "set every dropout probability to 0, LoRA's included (default False: the authors' LoRA dropout trains)"))
    precompute_ref_log_probs: bool = field(default=False, metadata=_help(
        "DPO's name for precompute_base: the frozen base pass is computed once and cached"))
    precompute_ref_batch_size: int | None = field(default=None, metadata=_help(
        "pairs per batch of the cached base pass (None: per_device_eval_batch_size)"))
    router_aux_loss_coef: float | None = field(default=None, metadata=_help("refused unless None"))
    dataset_num_proc: int | None = field(default=None, metadata=_help("ignored: pairs are tokenised in-process"))
    truncation_mode: str = field(default="keep_start", metadata=_help("refused unless 'keep_start'"))
    padding_free: bool = field(default=False, metadata=_help("refused unless False"))
    pad_to_multiple_of: int | str | None = field(default="auto", metadata=_help("refused unless 'auto' or None"))
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata=_help(
        "refused unless 'sigmoid' (the Bradley-Terry loss the method uses)"))
    loss_weights: list[float] | None = field(default=None, metadata=_help("refused unless None"))
    ld_alpha: float | None = field(default=None, metadata=_help("refused unless None"))
    f_divergence_type: str = field(default="reverse_kl", metadata=_help("refused unless 'reverse_kl'"))
    f_alpha_divergence_coef: float = field(default=0.5, metadata=_help(
        "ignored: read only with f_divergence_type='alpha_divergence'"))
    label_smoothing: float = field(default=0.0, metadata=_help("refused unless 0"))
    use_weighting: bool = field(default=False, metadata=_help("refused unless False"))
    discopop_tau: float = field(default=0.05, metadata=_help("ignored: read only with loss_type='discopop'"))
    activation_offloading: bool = field(default=False, metadata=_help("refused unless False"))
    sync_ref_model: bool = field(default=False, metadata=_help("refused unless False"))
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("ignored: read only with sync_ref_model"))
    ref_model_sync_steps: int = field(default=512, metadata=_help("ignored: read only with sync_ref_model"))
    pad_token: str | None = field(default=None, metadata=_help("refused unless None (deprecated in TRL)"))


HONOURED: dict[str, str] = {
    "model_init_kwargs": "passed to from_pretrained when model= is a name or path (a JSON string is parsed)",
    "trust_remote_code": "passed to the model's and the tokenizer's from_pretrained when model= is a name or path",
    "disable_dropout": "True sets every dropout probability of the model to 0 (LoRA dropout included)",
    "max_length": "tokens per prompt + response (max_prompt_length and prompt_truncation say how a prompt is cut)",
    "precompute_ref_log_probs": "turns on the cached base pass (precompute_base): the frozen base model plays "
                                "DPO's reference and runs once over the data",
    "precompute_ref_batch_size": "the batch size of the cached base pass",
    "beta": "QAdapterParams.beta: the weight of the squared-reward regulariser, NOT DPO's KL temperature",
}

REFUSED: dict[str, tuple[object, str]] = {
    "router_aux_loss_coef": (None, "the Mixture-of-Experts load-balancing loss is not added to the Q-Adapter loss"),
    "truncation_mode": ("keep_start", "a long prompt is cut by prompt_truncation (its start and end kept) and a "
                                      "response at its end; 'keep_end' is deprecated in TRL"),
    "padding_free": (False, "batches are padded rows, chosen first, which the fused loss and the base cache index"),
    "pad_to_multiple_of": (None, "rows are padded to the batch's longest pair; padding is masked out"),
    "loss_type": (["sigmoid"], "the method's preference term is the Bradley-Terry (sigmoid) loss on its residual "
                               "rewards; other DPO losses are not implemented for it"),
    "loss_weights": (None, "there is one loss; beta weighs its regulariser"),
    "ld_alpha": (None, "length-desensitised DPO is not implemented; length_norm says how a score is normalised"),
    "f_divergence_type": ("reverse_kl", "the customised policy's distance to the base is set by alpha_0 and "
                                        "alpha_tilde, not by an f-divergence"),
    "label_smoothing": (0.0, "robust/EXO label smoothing is not implemented for the Q-Adapter loss"),
    "use_weighting": (False, "WPO weighting is not implemented for the Q-Adapter loss"),
    "activation_offloading": (False, "not implemented; gradient_checkpointing=True saves the adapter pass's "
                                     "activations instead"),
    "sync_ref_model": (False, "the base model is the frozen policy the Q-function is a residual on: it never moves"),
    "pad_token": (None, "deprecated in TRL: set tokenizer.pad_token and pass the tokenizer as processing_class"),
}

IGNORED: dict[str, str] = {
    "dataset_num_proc": "pairs are tokenised in the training process (a small cost next to training)",
    "f_alpha_divergence_coef": "read only with f_divergence_type='alpha_divergence', which is refused",
    "discopop_tau": "read only with loss_type='discopop', which is refused",
    "ref_model_mixup_alpha": "read only with sync_ref_model=True, which is refused",
    "ref_model_sync_steps": "read only with sync_ref_model=True, which is refused",
}


def normalise_dpo_fields(args) -> None:
    """The forms DPOConfig also accepts, made canonical in place: a ``loss_type`` string becomes a
    one-item list; ``pad_to_multiple_of`` "auto" (which pads only on AWS Neuron) and "none" become None."""
    if isinstance(args.loss_type, str):
        args.loss_type = [args.loss_type]
    if isinstance(args.pad_to_multiple_of, str) and args.pad_to_multiple_of.lower() in ("auto", "none", "null"):
        args.pad_to_multiple_of = None
    if args.precompute_ref_log_probs:
        args.precompute_base = True


def check_dpo_fields(args) -> None:
    """``ValueError`` naming the first refused field that holds another value than the one accepted, with why."""
    for name, (accepted, reason) in REFUSED.items():
        value = getattr(args, name)
        if value != accepted:
            raise ValueError(f"{name}={value!r} is not supported by QAdapterTrainingArguments (only "
                             f"{accepted!r}): {reason}")
