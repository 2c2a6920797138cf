"""Result types shared by the fused ops and the reference."""
from dataclasses import dataclass

import torch


@dataclass
class QAdapterLossOutput:
    """Everything one Q-Adapter loss evaluation returns (docs/DESIGN.md §2).

    ``loss = pref_loss + reg_loss``; the scores are the per-sequence sums of rewards divided as
    ``length_norm`` says (params.LengthNorm); ``accuracy`` is the fraction of pairs whose
    chosen score beats the rejected one. All are fp32 (fp64 for fp64 inputs).
    """

    loss: torch.Tensor
    pref_loss: torch.Tensor
    reg_loss: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    accuracy: torch.Tensor
