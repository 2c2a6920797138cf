"""Whether a model's customised policy can be decoded from one head product on h_c (docs/DESIGN.md §1 (the logit identity)).

``(Q + alpha_0 * log_softmax(L)) / alpha_tilde = W h_c + b' - const`` needs Q and L to be the
same affine head applied to the final hidden states. Models that change the logits after the head
(final-logit softcapping, logit scaling) or a head that is not a plain shared ``nn.Linear`` (a LoRA
or a per-adapter copy on ``lm_head``) break it; ``generate`` then computes both logits rows.
"""
from __future__ import annotations

import torch

# Config fields by which a model changes its logits after the LM head (softcapping, scaling), and
# the values at which they change nothing (the training layer refuses the others: training/model.py).
POST_HEAD_LOGIT_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
NEUTRAL_VALUES = (None, 0, 1, 1.0)


def identity_break(model) -> str | None:
    """Why ``model`` (a ``QAdapterModel``) cannot decode on h_c, or None when it can."""
    config = model.base_causal_lm.config
    # Multimodal configs keep the language model's fields in text_config.
    configs = [config] + ([config.text_config] if getattr(config, "text_config", None) is not None else [])
    for field in POST_HEAD_LOGIT_FIELDS:
        for source in configs:
            value = getattr(source, field, None)
            if value not in NEUTRAL_VALUES:
                return f"the model's config sets {field}={value!r}, which changes the logits after the LM head"
    head = model.lm_head
    if type(head) is not torch.nn.Linear:
        return (f"the LM head is a {type(head).__name__}, not a plain torch.nn.Linear shared by both streams "
                f"(e.g. a LoRA or modules_to_save on lm_head)")
    return None
