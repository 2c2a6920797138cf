"""Q-Adapter decoding throughput: new tokens per second, three ways to decode the same policy,
against the base model alone.

- ``mixed_batch``: ``QAdapterModel.generate`` -- per token ONE forward over 2B rows (adapter
  rows and peft ``"__base__"`` rows, one KV cache), then ``combined_sample_from_hidden`` on the
  last hidden states (ONE LM-head product, on h_c = (h_q + alpha_0 h_b) / alpha_tilde; no logits row stored).
- ``two_pass``: ``QAdapterModel.generate(two_pass=True)`` -- a forward with the adapter and one
  without per token, two KV caches, the fused sampler with both streams' head products.
- ``base_alone``: ``QAdapterModel.generate(adapter=False)`` -- the base model alone (B rows, the
  same loop and sampler): the floor decoding with an adapter is measured against.
- ``authors``: what the authors' patched forward does: two causal-LM forwards per token (adapter
  on; adapter off), each with its own KV cache and returning full logits (all prompt positions
  at the prefill), then ``reference.combined_logits``, Hugging Face's temperature and top-p
  warpers, softmax and ``torch.multinomial``.

Before timing, greedy decoding of a few tokens is checked to give the same tokens all three
ways. Rows decode exactly ``new`` tokens (no EOS). Sampling: temperature 0.7, top-p 0.9.
tokens/s = B x new tokens / (median wall time of the whole call, prefill included).

Configs: prompt 128 tokens, 128 new, B in {1, 8}, on a tiny random Llama (2 layers, hidden 256,
vocab 32000) and SmolLM2-135M-Instruct (the embedded GGUF, fp32; CUDA: bf16). ``--quick``: the
tiny model, prompt 16, 8 new tokens, B in {1, 2}.
Targets (CPU): mixed_batch >= 1.4x two_pass tokens/s at batch 1; on SmolLM2 mixed_batch
>= 0.95x base_alone tokens/s at batch 1 and >= 0.75x at batch 8 (batch 32 reported). Run from the repo root::

    python benchmarks/bench_generation.py [--quick] [--batches 1,8,32] [--device cpu|cuda] [--reps N] [--out DIR]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from qadapter_kernels import reference
from qadapter_kernels.decoding.streams import cache_keyword
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from models import build_model, random_llama_kwargs, smollm2_folder
from targets import Target, verdict_lines
from runner import BenchResult, add_common_arguments, default_out_dir, machine_info, measure_time, save_results

MIXED, TWO_PASS, AUTHORS, BASE = "mixed_batch", "two_pass", "authors", "base_alone"
TEMPERATURE, TOP_P = 0.7, 0.9
RATIO, TARGET_RATIO = "x two_pass tok/s", 1.4
BASE_RATIO = "x base_alone tok/s"
DECODERS = (MIXED, TWO_PASS, AUTHORS, BASE)
BASE_TARGETS = {1: 0.95, 8: 0.75}  # batch -> mixed_batch's least fraction of base_alone's tokens/s


@dataclass
class Config:
    name: str
    llama: dict | None  # LlamaConfig kwargs of a random model; None: SmolLM2
    batches: tuple[int, ...]
    prompt: int
    new: int
    targets: bool = True  # the performance target is stated on this config (not on --quick's)


TINY = Config("tiny Llama", random_llama_kwargs(256, 2, 32000, 4, 2, 512), (1, 8), 128, 128)
SMOLLM2 = Config("SmolLM2-135M", None, (1, 8, 32), 128, 128)
QUICK = Config("tiny Llama (quick)", random_llama_kwargs(64, 2, 4096, 4, 2, 128), (1, 2), 16, 8, targets=False)


@torch.no_grad()
def authors_generate(model: QAdapterModel, ids: torch.Tensor, new: int, temperature: float, top_p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Two full-logits forwards per token, each with its own cache; combine; HF warpers; multinomial."""
    causal_lm, cfg = model.base_causal_lm, model.qadapter_config
    caches = [DynamicCache(config=causal_lm.config) for _ in range(2)]
    keyword = cache_keyword(causal_lm)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
                                  if temperature > 0 else [])
    out, step_ids = ids, ids
    for _ in range(new):
        q = causal_lm(step_ids, use_cache=True, **{keyword: caches[0]}).logits[:, -1]
        with model.peft_model.disable_adapter():
            base = causal_lm(step_ids, use_cache=True, **{keyword: caches[1]}).logits[:, -1]
        scores = warpers(out, reference.combined_logits(q, base, alpha_tilde=cfg.alpha_tilde, alpha_0=cfg.alpha_0))
        if temperature > 0:
            step_ids = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)
        else:
            step_ids = scores.argmax(-1, keepdim=True)
        out = torch.cat([out, step_ids], 1)
    return out


def decoders(model: QAdapterModel, ids: torch.Tensor, new: int, temperature: float, seed: int) -> dict:
    sampling = dict(max_new_tokens=new, temperature=temperature, top_p=TOP_P, eos_token_id=[])
    return {
        MIXED: lambda: model.generate(ids, generator=seed, **sampling),
        TWO_PASS: lambda: model.generate(ids, generator=seed, two_pass=True, **sampling),
        AUTHORS: lambda: authors_generate(model, ids, new, temperature, TOP_P,
                                          torch.Generator(ids.device).manual_seed(seed)),
        BASE: lambda: model.generate(ids, generator=seed, adapter=False, **sampling),
    }


def check_greedy_agreement(model: QAdapterModel, ids: torch.Tensor, chosen: set[str], new: int = 8) -> None:
    tokens = {name: fn() for name, fn in decoders(model, ids, new, 0.0, 0).items() if name in chosen - {BASE}}
    first = next(iter(tokens))
    for name, out in tokens.items():
        assert torch.equal(out, tokens[first]), f"greedy {name} differs from {first}: {out} vs {tokens[first]}"
    print(f"  agreement: greedy decoding gives the same {new} tokens with {', '.join(tokens)}", flush=True)


def bench_config(config: Config, device: str, warmup: int, reps: int, batches: tuple[int, ...] | None = None,
                 chosen: set[str] = frozenset(DECODERS)) -> list[BenchResult]:
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda and config.llama is None else torch.float32
    model = build_model(config.llama, dtype, device, QAdapterConfig()).eval()
    vocab = model.lm_head.weight.shape[0]
    results = []
    for batch in batches or config.batches:
        ids = torch.randint(1, vocab, (batch, config.prompt), generator=torch.Generator().manual_seed(batch)).to(device)
        check_greedy_agreement(model, ids, chosen)
        info = {"model": config.name, "B": batch, "prompt+new": f"{config.prompt}+{config.new}"}
        rows = []
        for name, fn in decoders(model, ids, config.new, TEMPERATURE, 0).items():
            if name not in chosen:
                continue
            print(f"  {name} B={batch} ...", flush=True)
            r = BenchResult(name, info, str(dtype).removeprefix("torch."), device)
            r.set_timing(measure_time(fn, warmup, reps, device, whole_calls=True))
            r.extra["tok/s"] = batch * config.new / (r.ms / 1e3)
            r.extra["ms/token"] = r.ms / config.new
            rows.append(r)
        by_name = {r.provider: r for r in rows}
        for r in rows:
            for ratio, reference_name in ((RATIO, TWO_PASS), (BASE_RATIO, BASE)):
                if reference_name in by_name:
                    r.extra[ratio] = r.extra["tok/s"] / by_name[reference_name].extra["tok/s"]
        results += rows
    return results


def targets(configs: list[Config]) -> list[Target]:
    """mixed_batch >= 1.4x two_pass tokens/s at batch 1 on the configs the target is stated on (CPU)."""
    stated_on = {c.name for c in configs if c.targets}
    return [Target(MIXED, RATIO, ">=", TARGET_RATIO, "cpu",
                   lambda r: r.config["model"] in stated_on and r.config["B"] == 1)] + [
        Target(MIXED, BASE_RATIO, ">=", bound, "cpu",
               lambda r, batch=batch: r.config["model"] == SMOLLM2.name and r.config["B"] == batch)
        for batch, bound in BASE_TARGETS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "the tiny model, 8 new tokens (seconds)", "timed calls per decoder (default 3)")
    parser.add_argument("--batches", type=lambda text: tuple(int(x) for x in text.split(",") if x),
                        help="comma-separated batch sizes for every model (default: 1,8 tiny; 1,8,32 SmolLM2)")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated from tiny,smollm2 (default both)")
    parser.add_argument("--decoders", default=",".join(DECODERS),
                        help=f"comma-separated from {','.join(DECODERS)} (default all)")
    args = parser.parse_args()
    chosen = set(args.models.split(","))
    configs = [QUICK] if args.quick else ([TINY] if "tiny" in chosen else []) + (
        [SMOLLM2] if "smollm2" in chosen and smollm2_folder() else [])
    info = machine_info(args.device)
    results: list[BenchResult] = []
    for config in configs:
        print(f"running {config.name} on {args.device} ...", flush=True)
        results += bench_config(config, args.device, 1, args.reps or 3, args.batches, set(args.decoders.split(",")))
    name = "generation_quick" if args.quick else "generation"
    save_results(results, name, args.out or default_out_dir(args.device), info,
                 "Q-Adapter decoding: tokens per second",
                 ["ms: the whole generate call (prefill + all new tokens); tok/s = B x new tokens / that time.",
                  *verdict_lines(targets(configs), results, args.device)], plot=not args.no_plot,
                 time_label="generate call (ms)")


if __name__ == "__main__":
    main()
