"""Plain-PyTorch Q-Adapter: the single oracle that tests and benchmarks import.

Readable rather than fast: it materialises every [N, V] intermediate. Inputs are upcast to
fp32 (fp64 stays fp64), so it doubles as a float64 ground truth.
"""
import torch
import torch.nn.functional as F

from .outputs import QAdapterLossOutput
from .params import (
    LengthNorm,
    PolicyParams,
    QAdapterParams,
    RewardVariant,
    SamplingParams,
    resolve,
    split_overrides,
    with_param_keywords,
)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


@with_param_keywords(PolicyParams)
def residual_q_values(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    actions: torch.Tensor,
    params: PolicyParams | None = None,
    *,
    base_lse: torch.Tensor | None = None,
    **overrides,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft value V(s) and Q(s, a) per row: ``[..., V]`` logits -> two ``[...]`` tensors.

    ``base_lse``: ``[...]`` LSE(base_logits) as a cached base pass recorded it, used in place of
    the one computed here (the value's ``- alpha_0 * LSE(L)`` term).
    """
    p = resolve(PolicyParams, params, overrides)
    alpha_tilde, alpha_0 = p.alpha_tilde, p.alpha_0
    q, base = _acc(q_logits), _acc(base_logits)
    y = (q + alpha_0 * base) / alpha_tilde
    lse_l = torch.logsumexp(base, -1) if base_lse is None else base_lse.to(y.dtype)
    values = alpha_tilde * torch.logsumexp(y, -1) - alpha_0 * lse_l
    q_taken = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return values, q_taken


def next_token_actions(input_ids: torch.Tensor) -> torch.Tensor:
    """actions[:, t] = input_ids[:, t + 1]; the last column has no action (0, never scored)."""
    return F.pad(input_ids[:, 1:], (0, 1))


def scored_positions(loss_mask: torch.Tensor, variant: RewardVariant | str) -> torch.Tensor:
    """[2B, T] bool: whether the action at position t enters the loss."""
    scored = torch.zeros_like(loss_mask)
    if RewardVariant.parse(variant) is RewardVariant.OFFICIAL:
        scored[:, :-1] = loss_mask[:, :-1]
    else:
        scored[:, :-1] = loss_mask[:, 1:]
    return scored


def rewards(values, q_taken, loss_mask, gamma: float, variant: RewardVariant | str) -> torch.Tensor:
    """r2(s_t, a_t) at scored positions, 0 elsewhere."""
    scored = scored_positions(loss_mask, variant)
    if RewardVariant.parse(variant) is RewardVariant.BELLMAN:
        # V(s_{t+1}) counts only while the response goes on: past its end the episode is over.
        nxt = torch.zeros_like(values)
        nxt[:, :-2] = torch.where(loss_mask[:, 2:], values[:, 1:-1], torch.zeros_like(values[:, 1:-1]))
        r = q_taken - gamma * nxt
    else:
        r = q_taken - gamma * values
    return torch.where(scored, r, torch.zeros_like(r))


def score_norm(scored: torch.Tensor, length_norm: LengthNorm | str | bool) -> torch.Tensor | int:
    """What each sequence's summed reward is divided by: [2B] scored counts (at least 1), T - 1, or 1."""
    rule = LengthNorm.parse(length_norm)
    if rule is LengthNorm.RESPONSE:
        return scored.sum(-1).clamp_min(1)
    return scored.shape[1] - 1 if rule is LengthNorm.PADDED else 1


@with_param_keywords(QAdapterParams)
def pair_loss(
    values: torch.Tensor,
    q_taken: torch.Tensor,
    loss_mask: torch.Tensor,
    params: QAdapterParams | None = None,
    **overrides,
) -> QAdapterLossOutput:
    """Bradley-Terry loss of [2B, T] per-position values and picked Q (chosen rows first)."""
    p = resolve(QAdapterParams, params, overrides)
    rows, T = values.shape
    B = rows // 2
    # No scored token in the batch: reg_loss is 0 / 0 = NaN, as on every backend (the public API raises).
    scored = scored_positions(loss_mask, p.variant)
    beta = p.beta
    r = rewards(values, q_taken, loss_mask, p.gamma, p.variant)
    scores = r.sum(-1) / score_norm(scored, p.length_norm)
    chosen, rejected = scores[:B], scores[B:]
    # softplus(x) = log(1 + e^x), exact for every x (F.softplus switches to x above 20).
    margin = rejected - chosen
    pref = torch.logaddexp(torch.zeros_like(margin), margin).mean()
    reg = beta * (r * r).sum() / scored.sum()
    return QAdapterLossOutput(
        loss=pref + reg,
        pref_loss=pref,
        reg_loss=reg,
        chosen_scores=chosen,
        rejected_scores=rejected,
        accuracy=(chosen > rejected).to(scores.dtype).mean(),
    )


@with_param_keywords(QAdapterParams)
def qadapter_loss(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    params: QAdapterParams | None = None,
    **overrides,
) -> QAdapterLossOutput:
    """The Q-Adapter loss from [2B, T, V] adapter and base logits (docs/DESIGN.md §2)."""
    p = resolve(QAdapterParams, params, overrides)
    values, q_taken = residual_q_values(q_logits, base_logits.detach(), next_token_actions(input_ids), p)
    return pair_loss(values, q_taken, loss_mask.bool(), p)


@with_param_keywords(QAdapterParams)
def authors_qadapter_loss(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    params: QAdapterParams | None = None,
    **overrides,
) -> torch.Tensor:
    """The authors' formula as their training code writes it (the benchmark baseline).

    Full fp32 [2B, T, V] tensors for log_softmax(L), the combined logits and their
    logsumexp, a gather, and cross-entropy over (chosen, rejected) scores: the "official"
    variant with the "padded" length normalisation, whatever ``params`` say about those two.
    Returns the loss only.
    """
    p = resolve(QAdapterParams, params, overrides)
    alpha_tilde, alpha_0, gamma, beta = p.alpha_tilde, p.alpha_0, p.gamma, p.beta
    B2, T, _ = q_logits.shape
    q = q_logits.float()
    log_pi1 = torch.log_softmax(base_logits.float(), dim=-1)
    combined = (q + alpha_0 * log_pi1) / alpha_tilde
    v = alpha_tilde * torch.logsumexp(combined, dim=-1)
    labels = input_ids[:, 1:].unsqueeze(-1)
    q_a = torch.gather(q[:, :-1], 2, labels).squeeze(-1)
    mask = loss_mask[:, :-1].float()
    r = (q_a - gamma * v[:, :-1]) * mask
    seq = r.sum(-1) / (T - 1)
    pair_logits = torch.stack([seq[: B2 // 2], seq[B2 // 2 :]], dim=-1)
    target = torch.zeros(B2 // 2, dtype=torch.long, device=q.device)
    pref = F.cross_entropy(pair_logits, target)
    reg = beta * (r**2).sum() / mask.sum()
    return pref + reg


@with_param_keywords(PolicyParams)
def combined_logits(
    q_logits: torch.Tensor, base_logits: torch.Tensor, params: PolicyParams | None = None, **overrides
) -> torch.Tensor:
    """The customised policy's logits ``(Q + alpha_0 * log_softmax(L)) / alpha_tilde`` in fp32."""
    p = resolve(PolicyParams, params, overrides)
    alpha_tilde, alpha_0 = p.alpha_tilde, p.alpha_0
    return (_acc(q_logits) + alpha_0 * torch.log_softmax(_acc(base_logits), -1)) / alpha_tilde


@with_param_keywords(PolicyParams)
def combined_log_probs(
    q_logits: torch.Tensor, base_logits: torch.Tensor, tokens: torch.Tensor, params: PolicyParams | None = None,
    **overrides,
) -> torch.Tensor:
    """log pi~(tokens): the customised policy's log-probabilities of ``tokens`` ``[...]`` from logits ``[..., V]``."""
    z = combined_logits(q_logits, base_logits, params, **overrides)
    return torch.log_softmax(z, -1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _per_row(value, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device).expand(rows).clone()


@with_param_keywords(SamplingParams)
def filtered_logits(logits: torch.Tensor, sampling: SamplingParams | None = None, **overrides) -> torch.Tensor:
    """Hugging Face's warpers in their order (temperature -> top_k -> top_p -> min_p), per row.

    Sort-based, like transformers' TopK/TopP/MinPLogitsWarper with min_tokens_to_keep=1; each
    parameter a scalar or a [B] tensor. Removed entries become -inf. Rows with temperature 0
    are returned unscaled and unfiltered (they are decoded greedily).
    """
    s = resolve(SamplingParams, sampling, overrides)
    temperature, top_k, top_p, min_p = s.temperature, s.top_k, s.top_p, s.min_p
    rows, vocab = logits.shape
    device = logits.device
    t = _per_row(temperature, rows, logits.dtype, device)
    k = _per_row(top_k, rows, torch.long, device)
    p = _per_row(top_p, rows, logits.dtype, device)
    mp = _per_row(min_p, rows, logits.dtype, device)
    sampled = t > 0
    z = torch.where(sampled[:, None], logits / torch.where(sampled, t, 1)[:, None], logits)
    neg_inf = torch.tensor(-float("inf"), dtype=z.dtype, device=device)
    # top-k keeps every entry tied with the k-th largest.
    k_eff = torch.where((k > 0) & (k < vocab), k, vocab)
    kth = z.sort(-1, descending=True).values.gather(-1, (k_eff - 1)[:, None])
    z = torch.where(sampled[:, None] & (z < kth), neg_inf, z)
    # top-p drops the ascending prefix whose cumulative probability is <= 1 - top_p, except entries
    # tied with the smallest one it keeps: Hugging Face drops whichever of those its (unstable) sort
    # puts first; the kernels compare against a threshold and keep them all, as top-k does.
    sorted_z, order = z.sort(-1)
    cumulative = sorted_z.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= (1 - p)[:, None]
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    smallest_kept = torch.where(drop, torch.inf, z).amin(-1, keepdim=True)
    drop &= z < smallest_kept
    z = torch.where(sampled[:, None] & (p < 1)[:, None] & drop, neg_inf, z)
    # min-p drops probabilities below min_p times the largest one.
    probs = z.softmax(-1)
    z = torch.where(sampled[:, None] & (probs < mp[:, None] * probs.max(-1, keepdim=True).values), neg_inf, z)
    return z


@with_param_keywords(PolicyParams, SamplingParams)
def combined_sample(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    params: PolicyParams | None = None,
    sampling: SamplingParams | None = None,
    *,
    generator: torch.Generator | None = None,
    **overrides,
) -> torch.Tensor:
    """Combine, filter with the sort-based warpers, then torch.multinomial (greedy where temperature is 0)."""
    policy_overrides, sampling_overrides = split_overrides(overrides)
    s = resolve(SamplingParams, sampling, sampling_overrides)
    z = filtered_logits(combined_logits(q_logits, base_logits, params, **policy_overrides), s)
    greedy = _per_row(s.temperature, z.shape[0], z.dtype, z.device) == 0
    drawn = torch.multinomial(z.softmax(-1), 1, generator=generator).squeeze(-1)
    return torch.where(greedy, z.argmax(-1), drawn)
