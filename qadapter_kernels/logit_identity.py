"""Where the logit identity holds: when the customised policy is one head product on h_c.

``(Q + alpha_0 * log_softmax(L)) / alpha_tilde = W h_c + b' - const`` (``PolicyParams.combined_hidden``
and ``combined_bias``; docs/DESIGN.md §1) needs Q and L to be the same affine head applied to the final
hidden states. Models that change the logits after the head (final-logit softcapping, logit scaling)
break it: the model refuses them for training (the fused loss applies the head alone), serving refuses
them, and decoding computes both logits rows instead. So does a head that is not a plain shared
``nn.Linear`` (a LoRA or a per-adapter copy on ``lm_head``), which only decoding meets.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["NEUTRAL_VALUES", "POST_HEAD_LOGIT_FIELDS", "identity_break", "post_head_logit_change"]

# Config fields by which a model changes its logits after the LM head (softcapping, scaling), and
# the values at which they change nothing.
POST_HEAD_LOGIT_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
NEUTRAL_VALUES = (None, 0, 1, 1.0)


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def post_head_logit_change(config: Any) -> tuple[str, Any] | None:
    """``(field, value)`` of the first setting by which a model's config (an object or a config.json
    dict) changes the logits after the LM head, or None. Multimodal configs keep the language model's
    fields in ``text_config``, which is read too."""
    text_config = _field(config, "text_config")
    for field in POST_HEAD_LOGIT_FIELDS:
        for source in (config, text_config):
            value = None if source is None else _field(source, field)
            if value not in NEUTRAL_VALUES:
                return field, value
    return None


def identity_break(model) -> str | None:
    """Why ``model`` (a ``QAdapterModel``) cannot decode on h_c, or None when it can."""
    change = post_head_logit_change(model.base_causal_lm.config)
    if change is not None:
        return f"the model's config sets {change[0]}={change[1]!r}, which changes the logits after the LM head"
    head = model.lm_head
    if type(head) is not torch.nn.Linear:
        return (f"the LM head is a {type(head).__name__}, not a plain torch.nn.Linear shared by both streams "
                f"(e.g. a LoRA or modules_to_save on lm_head)")
    return None
