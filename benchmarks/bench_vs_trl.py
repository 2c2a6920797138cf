"""What a Q-Adapter training step costs against TRL's DPO step: time and peak memory per optimizer step.

Rows (``--rows``, keys in brackets), each in its own process (``trainer_step_run.py``, forked from a
server that imported the libraries once) so that its peak is its own:
- ``qadapter`` [qadapter]: ``QAdapterTrainer``, the default hyper-parameters (``qadapter_kernels.params``).
- ``qadapter cached base`` [qadapter-cached]: the same with ``precompute_base=True``: the base model's
  hidden states and LSE are computed once (``training.base_cache``) and every step skips the base pass.
- ``trl dpo`` [trl]: ``trl.DPOTrainer``, ``loss_type=["sigmoid"]``, no ``ref_model``: with a peft model
  the reference is the same model with the adapter off.
- ``trl dpo precompute_ref_log_probs=True`` [trl-precompute]: the reference log-probs computed once.
- ``trl dpo use_liger_kernel=True`` [trl-liger]: Liger's kernels patched into the model; where it cannot
  run (not installed, or no GPU for its Triton kernels) the row says why instead of numbers.

Every row trains the same LoRA (``QAdapterConfig``'s r, alpha and target modules, dropout 0) on the
same pairs (token ids drawn once, uniform in [3, 4096), each response ending with EOS), 2 pairs per
step, AdamW at the same learning rate and schedule, fp32, no gradient checkpointing (TRL's default
turns it on; ``QAdapterTrainer`` does not use it). Settings (``--settings``), tokens per pair as
prompt + chosen / rejected (the rejected row right-padded):
- ``short`` ("short chat pairs"): 64 + 64 / 56; ``long`` ("1024-token pairs"): 256 + 768 / 704.
- ``--quick``: a tiny random Llama, 16 + 16 / 12 (seconds per row, for the regression gate).

Measured per row:
- ``ms``: one optimizer step as the trainer's loop runs it (batch collation, forward, backward, gradient
  clipping, AdamW, scheduler): the wall time between the ends of consecutive steps (a
  ``TrainerCallback``), median, min and max of the timed steps after the warm-up steps. ``cpu ms``: the
  median step's process CPU time; a row whose wall time passes it by over 10% shared its core with
  another process, and the notes say so (rerun that row with ``--merge``).
- ``peak MiB``: CPU: the process's peak resident set size during ``trainer.train()`` (warm-up and timed
  steps: optimizer states, gradients, activations, the Trainer's buffers) minus its resident set size
  just before ``train()``, which is after the model was loaded, the trainer built and any
  precomputation done (its data, memory-mapped from a file, included), with garbage collected, glibc's
  free heap trimmed (``malloc_trim(0)``) and every readable file mapping's pages mapped in (library
  code first run by the step does not count as its memory). The kernel's high-water mark is reset at
  that point (``/proc/self/clear_refs``), so loading does not count. Run to run it moves by about
  +-50 MiB (the allocator's heap). ``RSS peak MiB``: the high-water mark itself (model, libraries and
  data included). CUDA: the allocator's peak minus its allocation at the start (``allocated peak
  MiB``: that peak).
- ``precompute ms / pair``: the one-off cost of the precomputing rows (cache build, reference
  log-probs) over the training set, per pair.
- ``x trl dpo``, ``x trl dpo cpu``, ``x trl dpo peak``: ms, cpu ms and peak MiB over the ``trl dpo`` row's
  of the same setting (on a core shared with other work the CPU-time ratio is the steadier one).
- ``load``, ``measured (UTC)``: the 1-minute load average before the row, and when it ran (``--merge``
  keeps rows of earlier runs).

Correctness guard (each row, or the run fails): the LoRA weights change in the first optimizer step,
the mean loss over all steps is finite (NaN filtering off), and TRL's tokenized pairs are exactly the
ids the Q-Adapter rows train on. Targets (CPU, not ``--quick``): ``qadapter`` <= 1.0x ``trl dpo`` in time
and in peak memory; ``qadapter cached base`` <= 0.8x ``trl dpo`` in time. Run from the repo root::

    taskset -c 0 env OMP_NUM_THREADS=1 python3 benchmarks/bench_vs_trl.py [--quick] [--settings short,long]
        [--rows qadapter,trl,...] [--merge] [--model PATH] [--warmup N] [--reps N] [--note TEXT]
        [--device cpu|cuda] [--out DIR] [--no-plot]
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import trainer_step_run
from models import random_llama_kwargs
from runner import BenchResult, Timing, add_common_arguments, default_out_dir, machine_info, save_results
from targets import Target, verdict_lines

PAIRS_PER_STEP = 2
ID_RANGE = 4096  # token ids are drawn from [trainer_step_run.FIRST_WORD, ID_RANGE)
TIME_RATIO, CPU_RATIO, PEAK_RATIO = "x trl dpo", "x trl dpo cpu", "x trl dpo peak"
PEAK_COLUMN = {True: "RSS peak MiB", False: "allocated peak MiB"}  # keyed by "on CPU"
DTYPE = "float32"


@dataclass(frozen=True)
class Row:
    key: str
    name: str
    trainer: str  # "qadapter" or "trl"
    precompute: bool = False
    liger: bool = False
    may_fail: bool = False  # a row that cannot run here is reported with its reason, not an error


ROWS = (
    Row("qadapter", "qadapter", "qadapter"),
    Row("qadapter-cached", "qadapter cached base", "qadapter", precompute=True),
    Row("trl", "trl dpo", "trl"),
    Row("trl-precompute", "trl dpo precompute_ref_log_probs=True", "trl", precompute=True),
    Row("trl-liger", "trl dpo use_liger_kernel=True", "trl", liger=True, may_fail=True),
)
REFERENCE = "trl dpo"


@dataclass(frozen=True)
class Setting:
    key: str
    name: str
    prompt: int  # tokens; the responses' counts include their EOS
    chosen: int
    rejected: int
    warmup: int
    reps: int

    @property
    def tokens(self) -> str:
        return f"{PAIRS_PER_STEP} x ({self.prompt}+{self.chosen}/{self.rejected})"


SETTINGS = {
    "short": Setting("short", "short chat pairs", 64, 64, 56, warmup=2, reps=5),
    "long": Setting("long", "1024-token pairs", 256, 768, 704, warmup=1, reps=3),
}
QUICK = Setting("quick", "tiny pairs", 16, 16, 12, warmup=2, reps=5)
QUICK_LLAMA = random_llama_kwargs(64, 2, 4096, 4, 2, 128)


def make_pairs(setting: Setting, count: int, seed: int = 0) -> list[list[list[int]]]:
    """``count`` pairs of token ids [prompt, chosen, rejected]; each response ends with EOS."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(trainer_step_run.FIRST_WORD, ID_RANGE, (n,), generator=gen).tolist()  # noqa: E731
    eos = [trainer_step_run.EOS_ID]
    return [[draw(setting.prompt), draw(setting.chosen - 1) + eos, draw(setting.rejected - 1) + eos]
            for _ in range(count)]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def row_spec(row: Row, setting: Setting, model: dict, device: str, warmup: int, reps: int, pairs: list) -> dict:
    """What ``trainer_step_run`` needs to run one row."""
    return {"row": asdict(row), "device": device, "dtype": DTYPE, **model, "pairs": pairs, "warmup": warmup,
            "reps": reps, "pairs_per_step": PAIRS_PER_STEP, "seed": 0, "id_range": ID_RANGE,
            "max_length": setting.prompt + setting.chosen}


def row_processes() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that imported the trainers' libraries once: a row's process starts in
    a fraction of a second instead of ~10 s of imports, and its peak memory is still its own."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["trainer_step_run", "trl", "datasets", "qadapter_kernels.training",
                                    "qadapter_kernels.baselines.trl_training"])
    return context


def run_row(processes, row: Row, setting: Setting, spec: dict) -> BenchResult:
    """One row in its own process; its result, or (a ``may_fail`` row) the reason it did not run."""
    result = BenchResult(row.name, {"model": spec["name"], "setting": setting.name, "tokens": setting.tokens},
                         DTYPE, spec["device"])
    load, start = os.getloadavg()[0], utc_now()
    print(f"  {row.name} ...", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        out_path, log_path = Path(scratch, "result.json"), Path(scratch, "log.txt")
        proc = processes.Process(target=trainer_step_run.row_process, args=(spec, str(out_path), str(log_path)))
        proc.start()
        proc.join()
        got = json.loads(out_path.read_text()) if out_path.exists() else {"error": f"exit status {proc.exitcode}"}
        log = log_path.read_text() if log_path.exists() else ""
    if "error" in got:
        if not row.may_fail:
            raise SystemExit(f"{row.name} failed: {got['error']}\n{log[-4000:]}")
        print(f"  {row.name}: did not run: {got['error']}", flush=True)
        result.extra["note"] = f"did not run: {got['error']}"
        return result
    if got["threads"] != torch.get_num_threads():
        raise SystemExit(f"{row.name} ran with {got['threads']} threads, this process has {torch.get_num_threads()}")
    steps = got["step_ms"]
    result.set_timing(Timing(statistics.median(steps), min(steps), max(steps)))
    result.peak_bytes = got["peak_bytes"] - got["baseline_bytes"]
    precompute = got["precompute_s"] * 1e3 / len(spec["pairs"]) if row.precompute else None
    result.extra.update({PEAK_COLUMN[spec["device"] == "cpu"]: got["peak_bytes"] / 2**20,
                         "cpu ms": statistics.median(got["step_cpu_ms"]), "precompute ms / pair": precompute, "mean loss": got["mean_loss"], "load": load,
                         "measured (UTC)": start})
    print(f"  {row.name}: {result.ms:.0f} ms/step, peak +{result.peak_bytes / 2**20:.0f} MiB", flush=True)
    return result


def with_ratios(results: list[BenchResult]) -> list[BenchResult]:
    """Each result's time, CPU time and peak over the ``trl dpo`` row's of its setting, as the first extra
    columns."""
    reference = {r.config["setting"]: r for r in results if r.provider == REFERENCE and r.ms is not None}
    for r in results:
        r.extra = {k: v for k, v in r.extra.items() if k not in (TIME_RATIO, CPU_RATIO, PEAK_RATIO)}
        ref = reference.get(r.config["setting"])
        if ref is not None and r.ms is not None:
            r.extra = {TIME_RATIO: r.ms / ref.ms, CPU_RATIO: r.extra["cpu ms"] / ref.extra["cpu ms"],
                       PEAK_RATIO: r.peak_bytes / ref.peak_bytes, **r.extra}
    return results


def merged(results: list[BenchResult], path: Path, model_name: str) -> list[BenchResult]:
    """``results`` plus the rows of the earlier run in ``path`` that this run did not measure again."""
    if not path.exists():
        return results
    earlier = [BenchResult(**r) for r in json.loads(path.read_text())["results"]]
    models = {r.config["model"] for r in earlier} - {model_name}
    if models:
        raise SystemExit(f"--merge: {path} holds rows of another model ({sorted(models)}); use another --out")
    measured = {(r.config["setting"], r.provider) for r in results}
    kept = [r for r in earlier if (r.config["setting"], r.provider) not in measured]
    order = [(s.name, row.name) for s in (*SETTINGS.values(), QUICK) for row in ROWS]
    return sorted(kept + results, key=lambda r: order.index((r.config["setting"], r.provider)))


def shared_core_lines(results: list[BenchResult]) -> list[str]:
    """A warning per row whose step took over 10% more wall time than CPU time: with one thread, another
    process held the core part of the time, so that row's ms and ratios are inflated."""
    row_keys = {r.name: r.key for r in ROWS}
    setting_flags = {s.name: f"--settings {s.key}" for s in SETTINGS.values()} | {QUICK.name: "--quick"}
    return [f"WARNING: {r.provider} ({r.config['setting']}) took {r.ms:.0f} ms of wall time per step but "
            f"{r.extra['cpu ms']:.0f} ms of CPU time: the core was shared, its wall-time ratio is off; rerun it "
            f"alone: {setting_flags[r.config['setting']]} --rows {row_keys[r.provider]} --merge"
            for r in results if r.device == "cpu" and r.ms is not None and r.ms > 1.1 * r.extra["cpu ms"]]


def targets() -> list[Target]:
    stated = lambda r: r.config["setting"] != QUICK.name  # noqa: E731
    return [Target("qadapter", TIME_RATIO, "<=", 1.0, "cpu", stated),
            Target("qadapter", PEAK_RATIO, "<=", 1.0, "cpu", stated),
            Target("qadapter cached base", TIME_RATIO, "<=", 0.8, "cpu", stated)]


def keys(text: str, known: dict, what: str) -> list:
    chosen = [k for k in text.split(",") if k]
    unknown = [k for k in chosen if k not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated from {sorted(known)}, got {text!r}")
    return [known[k] for k in chosen]


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "a tiny random Llama, short pairs (seconds per row)",
                         "timed steps per row (default: short 5, long 3, quick 5)")
    parser.add_argument("--settings", type=lambda t: keys(t, SETTINGS, "--settings"),
                        help="comma-separated: short, long (default both; not with --quick)")
    parser.add_argument("--rows", type=lambda t: keys(t, {r.key: r for r in ROWS}, "--rows"), default=list(ROWS),
                        help=f"comma-separated row keys (default all): {', '.join(r.key for r in ROWS)}")
    parser.add_argument("--warmup", type=positive, help="untimed steps first (default: short 2, long 1, quick 2)")
    parser.add_argument("--model", default="embedded",
                        help="base model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the earlier table in --out that this run does not measure")
    parser.add_argument("--note", help="a line on the conditions, put in the table's title (e.g. other load)")
    args = parser.parse_args()
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.quick and (args.settings or args.model != "embedded"):
        parser.error("--settings and --model do not apply with --quick (a tiny random Llama, its own setting)")
    if not args.quick and args.model != "embedded" and not Path(args.model).exists():
        parser.error(f"--model: no such file or folder: {args.model}")
    return args


def model_spec(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"name": "tiny Llama", "model_path": None, "llama": QUICK_LLAMA}
    if args.model == "embedded":
        from qadapter_kernels.loading import embedded_model_path

        path = embedded_model_path()
    else:
        path = Path(args.model)
    return {"name": path.stem, "model_path": str(path), "llama": None}


def main() -> None:
    args = parse_args()
    settings = [QUICK] if args.quick else (args.settings or list(SETTINGS.values()))
    model = model_spec(args)
    info = machine_info(args.device)
    processes = row_processes()
    results: list[BenchResult] = []
    for setting in settings:
        warmup, reps = args.warmup or setting.warmup, args.reps or setting.reps
        pairs = make_pairs(setting, PAIRS_PER_STEP * (warmup + reps))  # one epoch: every step its own pairs
        print(f"running {setting.name} {setting.tokens} on {model['name']} {DTYPE} {args.device}, "
              f"{warmup} warm-up + {reps} timed steps per row ...", flush=True)
        results += [run_row(processes, row, setting, row_spec(row, setting, model, args.device, warmup, reps, pairs))
                    for row in args.rows]
    name = "vs_trl_quick" if args.quick else "vs_trl"
    out_dir = Path(args.out) if args.out else default_out_dir(args.device)
    if args.merge:
        results = merged(results, out_dir / f"{name}.json", model["name"])
    results = with_ratios(results)
    notes = [
        f"Each row in its own process, {info['cpu_threads']} threads; ms: median step after the warm-up steps "
        "(the trainer's whole loop iteration); peak MiB: the process's peak RSS during train() above its RSS "
        "just before it (benchmarks/bench_vs_trl.py's docstring defines both). Same LoRA, pairs, lengths and "
        f"optimizer for every row; {PAIRS_PER_STEP} pairs per step.",
        *verdict_lines(targets(), results, args.device),
        *shared_core_lines(results),
    ]
    title = "Q-Adapter training step vs TRL's DPO step" + (f" ({args.note})" if args.note else "")
    save_results(results, name, out_dir, info, title, notes, plot=not args.no_plot,
                 time_label="optimizer step time (ms)")


if __name__ == "__main__":
    main()
