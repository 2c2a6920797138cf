"""Q-Adapter decoding against the base model: tokens per second, and the prefill and the decode
phase apart, for three ways to decode the same policy and two ways to decode the base alone.

- ``mixed_batch``: ``QAdapterModel.generate`` -- per token ONE forward over 2B rows (adapter
  rows and peft ``"__base__"`` rows, one KV cache), then ``combined_sample_from_hidden`` on the
  last hidden states (ONE LM-head product, on h_c = (h_q + alpha_0 h_b) / alpha_tilde; no logits row stored).
- ``two_pass``: ``QAdapterModel.generate(two_pass=True)`` -- a forward with the adapter and one
  without per token, two KV caches, the fused sampler with both streams' head products.
- ``authors``: what the authors' patched forward does: two causal-LM forwards per token (adapter
  on; adapter off), each with its own KV cache and returning full logits (all prompt positions
  at the prefill), then ``reference.combined_logits`` and the argmax. Skipped where its two
  prompt-logits tensors would pass ``AUTHORS_LOGITS_BUDGET``.
- ``base_alone``: ``QAdapterModel.generate(adapter=False)`` -- the base model alone (B rows, the
  same loop and sampler).
- ``hf_base``: transformers' own ``generate`` of the plain base model (the same weights loaded
  again, no peft wrapper, its default cache): what a user runs without an adapter, and the anchor
  every provider is compared with (``x hf_base tok/s``).
- ``hf_base_2B``: the same on 2B rows (every prompt twice), tok/s counted over the B prompts: the
  rows mixed_batch runs, so its floor in each phase (``x floor``): the adapter stream is a second
  stream of compute, and a step's cost grows with its rows wherever the products are not bound by
  reading the weights alone.
- ``base_alone_2B``: ``base_alone`` on the same 2B rows, tok/s counted over the B prompts: the floor
  through the package's own loop and sampler (``x own floor``), so what mixed_batch adds beyond the
  second stream's rows (the LoRA deltas, the routing) shows apart from what the rows cost.

Every call decodes greedily (temperature 0; hf_base ``do_sample=False``) exactly ``new`` tokens
(no EOS: hf_base gets ``min_new_tokens=new``). Before timing, greedy decoding of a few tokens is
checked to give the same tokens with every adapter decoder, and the same with hf_base and
base_alone (the same model two ways). tokens/s = B x new / (median wall time of the whole call,
prefill included). Phases: ``prefill ms`` is the median time of a call with 1 new token (the
prompt forward up to the first token), ``ms/token`` the decode phase's (time(new) - time(1)) /
(new - 1), both from the same run.

Configs: a tiny random Llama (2 layers, hidden 256, vocab 32000; B in {1, 8}, prompt 128, 128 new)
and SmolLM2-135M-Instruct (the embedded GGUF, fp32; CUDA: bf16) over B in {1, 8, 32}, new in
{32, 128}, prompt in {128, 1024}. ``--quick``: the tiny model at hidden 64, prompt 16, 8 new
tokens, B in {1, 2}. Targets (CPU): mixed_batch >= 1.4x two_pass tokens/s at batch 1, >= 0.95x
base_alone at batch 1 and >= 0.75x at batch 8 (prompt 128 + 128 new); on SmolLM2 >= 1.0x hf_base
tokens/s at batch 1 and >= 0.9x at batch 8 (prompt 128, 32 and 128 new). Run from the repo root::

    python benchmarks/bench_generation.py [--quick] [--batches 1,8,32] [--new 32,128] [--prompts 128,1024]
        [--models tiny,smollm2] [--decoders ...] [--device cpu|cuda] [--reps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers import DynamicCache

from qadapter_kernels import reference
from qadapter_kernels.decoding.streams import cache_keyword
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from models import build_causal_lm, build_model, random_llama_kwargs, smollm2_folder
from targets import Target, verdict_lines
from runner import (BenchResult, add_common_arguments, default_out_dir, machine_info, measure_interleaved,
                    save_results)

MIXED, TWO_PASS, AUTHORS, BASE, HF_BASE = "mixed_batch", "two_pass", "authors", "base_alone", "hf_base"
FLOOR, OWN_FLOOR = "hf_base_2B", "base_alone_2B"
DECODERS = (MIXED, TWO_PASS, AUTHORS, BASE, HF_BASE, FLOOR, OWN_FLOOR)
ADAPTER_DECODERS = (MIXED, TWO_PASS, AUTHORS)  # the customised policy: the same greedy tokens
RATIO, TARGET_RATIO = "x two_pass tok/s", 1.4
BASE_RATIO, HF_RATIO = "x base_alone tok/s", "x hf_base tok/s"
PREFILL, DECODE = "prefill ms", "ms/token"
PREFILL_RATIO, DECODE_RATIO = "prefill x hf_base", "decode x hf_base"
BASE_TARGETS = {1: 0.95, 8: 0.75}  # batch -> mixed_batch's least fraction of base_alone's tokens/s (128+128)
HF_TARGETS = {1: 1.0, 8: 0.9}  # batch -> mixed_batch's least fraction of hf_base's tokens/s (SmolLM2, prompt 128)
FLOOR_RATIOS = {floor: {"tok/s": f"x {label} tok/s", PREFILL: f"prefill x {label}", DECODE: f"decode x {label}"}
                for floor, label in ((FLOOR, "floor"), (OWN_FLOOR, "own floor"))}  # mixed_batch against each
AGREEMENT_TOKENS = 8
AUTHORS_LOGITS_BUDGET = 4 * 2**30  # bytes of the authors' two fp32 prompt-logits tensors it may hold


@dataclass(frozen=True)
class Config:
    name: str
    llama: dict | None  # LlamaConfig kwargs of a random model; None: SmolLM2
    batches: tuple[int, ...]
    prompts: tuple[int, ...]
    news: tuple[int, ...]
    targets: bool = True  # the performance targets are stated on this config (not on --quick's)


TINY = Config("tiny Llama", random_llama_kwargs(256, 2, 32000, 4, 2, 512), (1, 8), (128,), (128,))
SMOLLM2 = Config("SmolLM2-135M", None, (1, 8, 32), (128, 1024), (32, 128))
QUICK = Config("tiny Llama (quick)", random_llama_kwargs(64, 2, 4096, 4, 2, 128), (1, 2), (16,), (8,), targets=False)


@torch.no_grad()
def authors_generate(model: QAdapterModel, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy: two full-logits forwards per token, each with its own cache; combine; argmax."""
    causal_lm, cfg = model.base_causal_lm, model.qadapter_config
    caches = [DynamicCache(config=causal_lm.config) for _ in range(2)]
    keyword = cache_keyword(causal_lm)
    out, step_ids = ids, ids
    for _ in range(new):
        q = causal_lm(step_ids, use_cache=True, **{keyword: caches[0]}).logits[:, -1]
        with model.peft_model.disable_adapter():
            base = causal_lm(step_ids, use_cache=True, **{keyword: caches[1]}).logits[:, -1]
        combined = reference.combined_logits(q, base, alpha_tilde=cfg.alpha_tilde, alpha_0=cfg.alpha_0)
        step_ids = combined.argmax(-1, keepdim=True)
        out = torch.cat([out, step_ids], 1)
    return out


def decoders(model: QAdapterModel, base_lm: torch.nn.Module | None, ids: torch.Tensor) -> dict[str, Callable]:
    """name -> ``call(new)``: greedy decoding of exactly ``new`` tokens of the prompts ``ids``, the output ids."""
    greedy = dict(temperature=0.0, eos_token_id=[])
    calls = {
        MIXED: lambda new: model.generate(ids, max_new_tokens=new, **greedy),
        TWO_PASS: lambda new: model.generate(ids, max_new_tokens=new, two_pass=True, **greedy),
        AUTHORS: lambda new: authors_generate(model, ids, new),
        BASE: lambda new: model.generate(ids, max_new_tokens=new, adapter=False, **greedy),
        OWN_FLOOR: lambda new: model.generate(torch.cat([ids, ids]), max_new_tokens=new, adapter=False, **greedy),
    }
    if base_lm is not None:
        for name, rows in ((HF_BASE, ids), (FLOOR, torch.cat([ids, ids]))):
            calls[name] = functools.partial(_hf_generate, base_lm, rows)
    return calls


def _hf_generate(base_lm: torch.nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    return base_lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                            min_new_tokens=new)


def check_same_tokens(calls: dict[str, Callable], new: int = AGREEMENT_TOKENS) -> str:
    """Runs every call for ``new`` greedy tokens; raises unless all give the same ids; says what it checked."""
    tokens = {name: call(new) for name, call in calls.items()}
    first = next(iter(tokens))
    for name, out in tokens.items():
        if not torch.equal(out, tokens[first]):
            raise RuntimeError(f"greedy {name} differs from {first}: {out.tolist()} vs {tokens[first].tolist()}")
    return f"greedy decoding gives the same {new} tokens with {', '.join(tokens)}"


def authors_fits(batch: int, prompt: int, vocab: int) -> bool:
    """Whether the authors' two fp32 logits tensors over every prompt position fit ``AUTHORS_LOGITS_BUDGET``."""
    return 2 * batch * prompt * vocab * 4 <= AUTHORS_LOGITS_BUDGET


def add_ratios(rows: list[BenchResult]) -> None:
    """Each row's throughput against two_pass, base_alone and hf_base, and its phases against hf_base's."""
    by_name = {r.provider: r.extra for r in rows}
    for r in rows:
        for ratio, anchor in ((RATIO, TWO_PASS), (BASE_RATIO, BASE), (HF_RATIO, HF_BASE)):
            if anchor in by_name:
                r.extra[ratio] = r.extra["tok/s"] / by_name[anchor]["tok/s"]
        if HF_BASE in by_name:
            r.extra[PREFILL_RATIO] = r.extra[PREFILL] / by_name[HF_BASE][PREFILL]
            r.extra[DECODE_RATIO] = r.extra[DECODE] / by_name[HF_BASE][DECODE]
        for floor, columns in FLOOR_RATIOS.items():
            if floor in by_name and r.provider == MIXED:
                r.extra[columns["tok/s"]] = r.extra["tok/s"] / by_name[floor]["tok/s"]
                for phase in (PREFILL, DECODE):
                    r.extra[columns[phase]] = r.extra[phase] / by_name[floor][phase]


def bench_config(config: Config, device: str, warmup: int, reps: int, chosen: set[str]) -> tuple[list, list[str]]:
    """The results of every (B, prompt, new) of ``config`` and the agreement checks' lines."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda and config.llama is None else torch.float32
    model = build_model(config.llama, dtype, device, QAdapterConfig()).eval()
    base_lm = build_causal_lm(config.llama, dtype, device).eval() if chosen & {HF_BASE, FLOOR} else None
    vocab = model.lm_head.weight.shape[0]
    results, checks = [], []
    for batch in config.batches:
        for prompt in config.prompts:
            ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
            calls = decoders(model, base_lm, ids)
            runs = [n for n in DECODERS if n in chosen and (n != AUTHORS or authors_fits(batch, prompt, vocab))]
            where_text = f"{config.name} B={batch} prompt={prompt}"
            for group in ([n for n in ADAPTER_DECODERS if n in runs], [n for n in (BASE, HF_BASE) if n in runs]):
                if group:
                    checks.append(f"{where_text}: {check_same_tokens({n: calls[n] for n in group})}")
                    print(f"  {checks[-1]}", flush=True)
            if AUTHORS in chosen and AUTHORS not in runs:
                checks.append(f"{where_text}: authors skipped (its prompt logits pass {AUTHORS_LOGITS_BUDGET} bytes)")
            print(f"  timing {', '.join(runs)} at {where_text}, new in {(1, *config.news)} ...", flush=True)
            timed = measure_interleaved({(name, new): functools.partial(calls[name], new)
                                         for name in runs for new in (1, *config.news)}, warmup, reps, device)
            for new in config.news:
                info = {"model": config.name, "B": batch, "prompt+new": f"{prompt}+{new}"}
                rows = []
                for name in runs:
                    r = BenchResult(name, info, str(dtype).removeprefix("torch."), device)
                    r.set_timing(timed[name, new])
                    r.extra[PREFILL] = timed[name, 1].median_ms
                    r.extra[DECODE] = (r.ms - r.extra[PREFILL]) / (new - 1)
                    r.extra["tok/s"] = batch * new / (r.ms / 1e3)
                    rows.append(r)
                add_ratios(rows)
                results += rows
    return results, checks


def floor_lines(results: list[BenchResult]) -> list[str]:
    """How close mixed_batch comes to its floors (hf_base_2B, base_alone_2B) in each phase, per config."""
    lines = []
    for r in results:
        for floor, columns in FLOOR_RATIOS.items():
            if r.provider == MIXED and columns[PREFILL] in r.extra:
                config = " ".join(f"{k}={v}" for k, v in r.config.items())
                ratios = ", ".join(f"{k} {r.extra[v]:.3g}x" for k, v in columns.items())
                lines.append(f"floor: mixed_batch at {config} against {floor}: {ratios}")
    return lines


def stated_on(models: set[str], batch: int, prompt_new: set[str]) -> Callable[[BenchResult], bool]:
    """A ``Target.stated_on``: results of one of ``models`` at batch ``batch`` and a ``prompt+new`` in ``prompt_new``."""
    return lambda r: r.config["model"] in models and r.config["B"] == batch and r.config["prompt+new"] in prompt_new


def targets(configs: list[Config]) -> list[Target]:
    """The CPU targets of mixed_batch (module docstring), each on the configs it is stated on."""
    stated, smollm2 = {c.name for c in configs if c.targets}, {SMOLLM2.name}
    return ([Target(MIXED, RATIO, ">=", TARGET_RATIO, "cpu", stated_on(stated, 1, {"128+128"}))]
            + [Target(MIXED, BASE_RATIO, ">=", bound, "cpu", stated_on(smollm2, b, {"128+128"}))
               for b, bound in BASE_TARGETS.items()]
            + [Target(MIXED, HF_RATIO, ">=", bound, "cpu", stated_on(smollm2, b, {"128+32", "128+128"}))
               for b, bound in HF_TARGETS.items()])


def sizes(name: str, least: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers >= ``least``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(",") if x)
        except ValueError:
            values = ()
        if not values or min(values) < least:
            raise argparse.ArgumentTypeError(f"{name} takes comma-separated integers >= {least}, got {text!r}")
        return values

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "the tiny model, 8 new tokens (seconds)", "timed calls per decoder and phase (default 3)")
    parser.add_argument("--batches", type=sizes("--batches", 1), help="batch sizes (default: each model's)")
    parser.add_argument("--new", type=sizes("--new", 2), help="new-token counts, >= 2 (default: each model's)")
    parser.add_argument("--prompts", type=sizes("--prompts", 1), help="prompt lengths (default: each model's)")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated from tiny,smollm2 (default both)")
    parser.add_argument("--decoders", default=",".join(DECODERS),
                        help=f"comma-separated from {','.join(DECODERS)} (default all)")
    args = parser.parse_args()
    chosen_models, chosen = set(args.models.split(",")), set(args.decoders.split(","))
    for flag, picked, known in (("--models", chosen_models, {"tiny", "smollm2"}), ("--decoders", chosen, DECODERS)):
        if not picked <= set(known):
            parser.error(f"{flag}: unknown {', '.join(sorted(picked - set(known)))} (known: {', '.join(sorted(known))})")
    configs = [QUICK] if args.quick else ([TINY] if "tiny" in chosen_models else []) + (
        [SMOLLM2] if "smollm2" in chosen_models and smollm2_folder() else [])
    configs = [replace(c, batches=args.batches or c.batches, news=args.new or c.news, prompts=args.prompts or c.prompts)
               for c in configs]
    info = machine_info(args.device)
    results, checks = [], []
    for config in configs:
        print(f"running {config.name} on {args.device} ...", flush=True)
        config_results, config_checks = bench_config(config, args.device, 1, args.reps or 3, chosen)
        results += config_results
        checks += config_checks
    name = "generation_quick" if args.quick else "generation"
    save_results(results, name, args.out or default_out_dir(args.device), info,
                 "Q-Adapter decoding against the base model: tokens per second, prefill and decode",
                 ["ms: the whole greedy generate call (prefill + all new tokens); tok/s = B x new tokens / that time.",
                  f"{PREFILL}: a call with 1 new token; {DECODE}: (ms - {PREFILL}) / (new - 1); "
                  f"{PREFILL_RATIO}, {DECODE_RATIO}: those times over hf_base's (lower is faster).",
                  "mixed_batch's floors: hf_base_2B (x floor) and base_alone_2B (x own floor), the base model on "
                  "the 2B rows the mixed batch runs through transformers' generate and through the package's loop "
                  "(tok/s over B prompts): tok/s, and each phase's time over the floor's.",
                  *checks, *floor_lines(results), *verdict_lines(targets(configs), results, args.device)],
                 plot=not args.no_plot, time_label="generate call (ms)")


if __name__ == "__main__":
    main()
