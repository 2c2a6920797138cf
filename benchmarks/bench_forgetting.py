"""Does it forget? Q-Adapter against SFT and DPO with the same LoRA, budget and data.

Rows: the base model; SFT on the chosen answers; DPO (sigmoid, reference = adapter off) at two
betas; Q-Adapter over alpha_0 in {0.01, 0.1, 0.5, 1.0, 2.0} x alpha_tilde in {1.0, 1 + alpha_0}
(with ``alpha_tilde = 1 + alpha_0`` a fresh adapter decodes exactly the base model: its policy is the
base model's at temperature ``alpha_tilde / (1 + alpha_0)``; at 0.01 the two values coincide) with
the reward variant, length normalisation and regulariser of ``GRID``; the other two reward variants
at the authors' alphas; and two rows that change one more setting of ``GRID`` (the length
normalisation, the regulariser). Q-Adapter rows state every setting they use, so the table does
not change meaning when a library default does. Every method gets the same budget: steps, pairs per
step, LoRA and learning rate (``TrainingBudget``: the library's ``LEARNING_RATE``, linear decay).
Every trained row is trained once per seed; ``--rows`` runs a subset, ``--shard K/N``
every N-th trained row (run N shards side by side, one thread each, then ``--merge`` their JSON);
``--jobs N`` does exactly that in one command (the full run on 2 cores: ``--jobs 2``).
Columns (``qadapter_kernels.evaluation.metrics``):

- pref %: greedy answers to the held-out prompts of the shipped preference (``--preference``, default
  ``lowercase``) that satisfy it;
- pair acc: held-out pairs where the policy gives the chosen response the higher log-likelihood;
- retention: the shipped knowledge probe (chance 0.25; case is not counted), and as % of base;
- KL: mean per-token KL(base || model) along the base model's own greedy answers to out-of-domain
  prompts (the probe's questions, asked as chat prompts);
- train s: wall seconds of training.

Means over seeds with the spread (sample std; min-max in the JSON). The full run uses the embedded
SmolLM2-135M-Instruct; ``--quick`` a tiny random Llama with a tokenizer trained here on the shipped
text (every method trained and scored once, small subsets: a smoke run, its numbers mean nothing).
Outputs ``forgetting[_NAME][_quick].{json,md,png}`` (``_NAME`` for a preference other than the default); the plot is preference satisfaction against retention
(% of base), one point per row, the Pareto front drawn.

    python benchmarks/bench_forgetting.py [--quick] [--jobs N] [--preference NAME] [--reps SEEDS] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qadapter_kernels.params import LEARNING_RATE
from qadapter_kernels.preferences import DEFAULT_PREFERENCE, PREFERENCE_CHECKERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forgetting_runs import FreshModels, quick_model_and_tokenizer, train_policy  # noqa: E402
from runner import add_common_arguments, default_out_dir, machine_info  # noqa: E402

ALPHA_0_GRID = (0.01, 0.1, 0.5, 1.0, 2.0)
ALPHA_TILDE_GRID = (1.0, "1+a0")  # a number, or the calibrated 1 + alpha_0
DPO_BETAS = (0.1, 0.5)
AUTHORS = dict(alpha_tilde=1.0, alpha_0=0.01)  # the alphas the reward variants are compared at
# The grid's other settings: the library defaults this benchmark chose (params.QAdapterParams).
GRID = dict(variant="advantage", length_norm="response", beta=0.1)
PARTIAL_NAME = "forgetting_partial.jsonl"  # each finished (row, seed) as it finishes, until the run's outputs exist
# One setting changed against the grid's row at the authors' alphas: what the defaults' choice also rests on.
EXTRA_ROWS = (("length_norm=none", dict(length_norm="none")), ("beta=0.01", dict(beta=0.01)))
METRICS = ("pref", "pair_acc", "retention", "retention_pct_base", "kl", "train_s")


@dataclass
class Sizes:
    steps: int
    batch: int
    retention_items: int | None  # None: all
    pref_prompts: int | None
    heldout_pairs: int | None
    kl_prompts: int
    answer_tokens: int  # per greedy answer scored for the preference: room for a whole answer and a closing line
    kl_tokens: int  # per base-model answer the KL is measured along


# The demo's budget (40 steps of 4 pairs), so the defaults chosen here are the demo's. 54 min with --jobs 2
# on the 2-core AMD EPYC for one seed (2026-12-06); add seeds for the rows that matter with --rows ... --seeds 1,2.
FULL = Sizes(steps=40, batch=4, retention_items=100, pref_prompts=40, heldout_pairs=40, kl_prompts=12,
             answer_tokens=96, kl_tokens=40)
QUICK = Sizes(steps=3, batch=2, retention_items=24, pref_prompts=6, heldout_pairs=8, kl_prompts=4, answer_tokens=8,
              kl_tokens=8)


@dataclass
class Row:
    name: str
    method: str  # base | sft | dpo | qadapter
    settings: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)  # one dict of METRICS per seed

    def summary(self) -> dict:
        out = {}
        for metric in METRICS:
            values = [run[metric] for run in self.runs]
            spread_ = statistics.stdev(values) if len(values) > 1 else 0.0
            out[metric] = {"mean": statistics.fmean(values), "std": spread_, "min": min(values), "max": max(values),
                           "n": len(values)}
        return out


def planned_rows(only: list[str] | None = None) -> list[Row]:
    """Every row, or those whose name starts with one of ``only`` (the base row always: it is the reference)."""
    rows = [Row("base", "base"), Row("SFT", "sft")]
    rows += [Row(f"DPO beta={b}", "dpo", {"beta": b}) for b in DPO_BETAS]
    for alpha_tilde, alpha_0 in [(t, a) for t in ALPHA_TILDE_GRID for a in ALPHA_0_GRID]:
        if alpha_tilde == "1+a0":
            alpha_tilde = round(1.0 + alpha_0, 6)
            if alpha_tilde == 1.01:  # the grid's alpha_tilde = 1 row already, to a percent
                continue
        rows.append(Row(f"Q-Adapter a~={alpha_tilde} a0={alpha_0}", "qadapter",
                        {**GRID, "alpha_tilde": alpha_tilde, "alpha_0": alpha_0}))
    alphas = f"a~={AUTHORS['alpha_tilde']} a0={AUTHORS['alpha_0']}"
    for variant in ("bellman", "official"):
        rows.append(Row(f"Q-Adapter {variant} {alphas}", "qadapter", {**GRID, **AUTHORS, "variant": variant}))
    for label, settings in EXTRA_ROWS:
        rows.append(Row(f"Q-Adapter {label} {alphas}", "qadapter", {**GRID, **AUTHORS, **settings}))
    if only:
        rows = [r for r in rows if r.method == "base" or any(r.name.startswith(prefix) for prefix in only)]
    return rows


# ----------------------------------------------------------------------------- one row, one seed


def train_row(row: Row, fresh: FreshModels, tokenizer, train_examples, budget):
    return train_policy(row.method, row.settings, fresh, tokenizer, train_examples, budget)


def measure(model, tokenizer, adapter: bool, data: dict, base_scorer, sizes: Sizes) -> dict:
    from qadapter_kernels.evaluation import PolicyScorer, metrics

    scorer = PolicyScorer(model, tokenizer, adapter=adapter, batch_size=16)
    pref, _ = metrics.preference_satisfaction(scorer, data["pref_prompts"], max_new_tokens=sizes.answer_tokens)
    return {
        "pref": 100.0 * pref,
        "pair_acc": 100.0 * metrics.pair_accuracy(scorer, data["heldout"]),
        "retention": 100.0 * metrics.retention_accuracy(scorer, data["retention"]),
        "kl": metrics.mean_token_kl(base_scorer, scorer, data["kl_pairs"]),
    }


def run(args, sizes: Sizes) -> list[Row]:
    from qadapter_kernels.baselines import TrainingBudget
    from qadapter_kernels.evaluation import PolicyScorer, metrics
    from qadapter_kernels.evaluation.checkers import read_task_records
    from qadapter_kernels.loading import embedded_model_path, load_model_and_tokenizer
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel, load_preferences, shipped_data_path

    train_examples = load_preferences(shipped_data_path("train", args.preference))
    heldout = load_preferences(shipped_data_path("heldout", args.preference))
    retention = read_task_records("retention")
    if args.quick:
        texts = [str(e.prompt) + str(e.chosen) + str(e.rejected) for e in train_examples]
        texts += [f"Question: {r['question']}\nAnswer: " + " ".join(r["options"]) for r in retention]
        base_model, tokenizer = quick_model_and_tokenizer(texts)
    else:
        base_model, tokenizer = load_model_and_tokenizer(args.model or embedded_model_path())
    fresh = FreshModels(base_model.to(args.device))
    data = {"heldout": metrics.evenly_spaced(heldout, sizes.heldout_pairs),
            "retention": metrics.evenly_spaced(retention, sizes.retention_items),
            "pref_prompts": metrics.evenly_spaced(read_task_records("preference", args.preference), sizes.pref_prompts)}
    base = QAdapterModel(fresh.get(), QAdapterConfig()).to(args.device)
    base_scorer = PolicyScorer(base, tokenizer, adapter=False, batch_size=16)
    kl_prompts = [r["question"] for r in metrics.evenly_spaced(retention, sizes.kl_prompts)]
    data["kl_pairs"] = metrics.base_answers(base_scorer, kl_prompts, max_new_tokens=sizes.kl_tokens)

    rows = planned_rows(args.rows.split(";") if args.rows else None)
    if args.shard:
        index, count = args.shard
        rows = [rows[0]] + rows[1:][index - 1::count]
    seeds = args.seeds or list(range(args.reps or 1))
    for row in rows:
        for seed in seeds[:1] if row.method == "base" else seeds:
            steps = args.steps or sizes.steps
            budget = TrainingBudget(max_steps=steps, batch_size=args.batch or sizes.batch, seed=seed,
                                    logging_steps=max(1, steps // 4))
            model, seconds = train_row(row, fresh, tokenizer, train_examples, budget)
            result = measure(model.to(args.device), tokenizer, row.method != "base", data, base_scorer, sizes)
            result["train_s"] = seconds
            result["seed"] = seed
            row.runs.append(result)
            print(f"{row.name} seed {seed}: " + ", ".join(f"{k}={v:.3g}" for k, v in result.items()), flush=True)
            if args.out:  # what finished survives a later row's failure or an interrupted run
                partial = Path(args.out) / PARTIAL_NAME
                partial.parent.mkdir(parents=True, exist_ok=True)
                with open(partial, "a") as f:
                    f.write(json.dumps({"row": row.name, **result}) + "\n")
    base_retention = rows[0].runs[0]["retention"]
    for row in rows:
        for result in row.runs:
            result["retention_pct_base"] = 100.0 * result["retention"] / base_retention if base_retention else 0.0
    return rows


# ----------------------------------------------------------------------------- outputs


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


# How the defaults are chosen from a run: among the Q-Adapter rows that keep the base model's knowledge
# (mean retention at least this % of base: the probe's own spread is about 3% of its score), the highest
# preference satisfaction, then the higher held-out pair accuracy, then the lower KL.
KEEPS_KNOWLEDGE_PCT = 97.0


def recommended(rows: list[Row]) -> Row | None:
    """The Q-Adapter row the selection rule above picks, or None when no row keeps the knowledge."""
    keeping = [r for r in rows if r.method == "qadapter" and r.runs
               and r.summary()["retention_pct_base"]["mean"] >= KEEPS_KNOWLEDGE_PCT]
    if not keeping:
        return None
    return max(keeping, key=lambda r: (r.summary()["pref"]["mean"], r.summary()["pair_acc"]["mean"],
                                       -r.summary()["kl"]["mean"]))


def markdown(rows: list[Row], title: str, meta: dict, seeds: int) -> str:
    info = meta["machine"]
    def cell(summary, metric, digits):
        s = summary[metric]
        return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")

    lines = [f"## {title}", "",
             f"{info['device_name']}, torch {info['torch']}, {info['cpu_threads']} threads, {info['date']}; "
             f"mean ± sample std over {seeds} seed(s) for trained rows (base: deterministic).",
             f"Every method: {meta['steps']} steps of {meta['batch']} pairs, the same LoRA, learning rate "
             f"{meta.get('learning_rate', 'as the library default')} (linear decay). "
             f"Q-Adapter rows: {GRID['variant']}, length_norm={GRID['length_norm']}, beta={GRID['beta']} unless "
             "the row says otherwise.", "",
             "| row | pref % | pair acc % | retention % (chance 25) | retention % of base "
             "| KL(base‖model) nats/token | train s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row.summary()
        lines.append(f"| {row.name} | {cell(s, 'pref', 1)} | {cell(s, 'pair_acc', 1)} | {cell(s, 'retention', 1)} | "
                     f"{cell(s, 'retention_pct_base', 1)} | {cell(s, 'kl', 4)} | {cell(s, 'train_s', 1)} |")
    pick = recommended(rows)
    lines += ["", f"Selection rule: among Q-Adapter rows with retention >= {KEEPS_KNOWLEDGE_PCT:g}% of base, the highest "
              "preference satisfaction (then pair accuracy, then lower KL): "
              + (f"**{pick.name}** ({pick.settings})." if pick else "no row qualifies.")]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [row.summary() for row in rows]
    points = [(s["retention_pct_base"]["mean"], s["pref"]["mean"]) for s in summaries]
    fig, ax = plt.subplots(figsize=(8, 6))
    colours = {"base": "black", "sft": "tab:orange", "dpo": "tab:red", "qadapter": "tab:blue"}
    for row, s, (x, y) in zip(rows, summaries, points):
        ax.errorbar(x, y, xerr=s["retention_pct_base"]["std"], yerr=s["pref"]["std"], fmt="o",
                    color=colours[row.method], capsize=2)
        ax.annotate(row.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--s", color="grey", markersize=12,
            markerfacecolor="none", label="Pareto front")  # the ring shows a front of one point too
    ax.set_xlabel("knowledge retention (% of base)")
    ax.set_ylabel("preference satisfaction (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, quick_help="tiny random model, every method once on small subsets (CI smoke run)",
                         reps_help="seeds per trained row (default 1)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per method (default {FULL.steps}; quick "
                                                  f"{QUICK.steps})")
    parser.add_argument("--batch", type=int,
                        help=f"preference pairs per step (default {FULL.batch}; quick {QUICK.batch})")
    parser.add_argument("--model", help="base model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rows", help="only the rows whose name starts with one of these ';'-separated prefixes "
                                       "(e.g. 'SFT;DPO beta=0.1;Q-Adapter a~=1.0 a0=1.0'); base is always run")
    for name in ("retention_items", "pref_prompts", "heldout_pairs", "kl_prompts"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"subset size (default {getattr(FULL, name)}; quick {getattr(QUICK, name)})")
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")],
                        help="these seeds (comma-separated) for the trained rows instead of 0..reps-1: add seeds "
                             "to an earlier run, then --merge")
    parser.add_argument("--shard", type=shard_spec, help="K/N: only every N-th trained row from the K-th (1-based)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the trained rows as this many shards side by side (each in its own process with "
                             "cores/N threads), then merge them (default 1)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write the tables of these shards' JSON outputs as one run (nothing is trained)")
    parser.add_argument("--preference", choices=sorted(PREFERENCE_CHECKERS), default=DEFAULT_PREFERENCE,
                        help=f"the shipped preference trained and scored (default {DEFAULT_PREFERENCE})")
    args = parser.parse_args(argv)
    if args.merge:
        return write_outputs(*merge_runs(args.merge), args)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and not args.shard:
        return run_shards(args, sys.argv[1:] if argv is None else argv)
    if args.out and (Path(args.out) / PARTIAL_NAME).exists():  # appending to it would mix two runs
        parser.error(f"--out {args.out} holds {PARTIAL_NAME}, the rows of an interrupted run: move it away "
                     "(or choose another --out) to start a new run")
    try:
        import lm_eval  # noqa: F401  (the task files' scoring is shared with the lm-eval plug-in)
        import trl  # noqa: F401
    except ImportError as e:
        print(f"bench_forgetting: skipped: {e.name} is not installed (pip install 'qadapter-kernels[eval,baselines]')")
        return 0
    sizes = QUICK if args.quick else FULL
    overrides = {k: getattr(args, k) for k in ("retention_items", "pref_prompts", "heldout_pairs", "kl_prompts")}
    sizes = Sizes(**{**sizes.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    info = machine_info(args.device)
    start = time.perf_counter()
    rows = run(args, sizes)
    info["wall_s"] = time.perf_counter() - start
    meta = {"name": output_name(args), "preference": args.preference, "machine": info,
            "sizes": sizes.__dict__, "steps": args.steps or sizes.steps, "batch": args.batch or sizes.batch,
            "learning_rate": LEARNING_RATE, "quick": bool(args.quick)}
    status = write_outputs(rows, meta, args)
    if args.out:  # the whole run is in the outputs now
        (Path(args.out) / PARTIAL_NAME).unlink(missing_ok=True)
    return status


def output_name(args) -> str:
    """``forgetting[_NAME][_quick]``: another preference's results go next to the default's, never over them."""
    name = "forgetting" + ("" if args.preference == DEFAULT_PREFERENCE else f"_{args.preference}")
    return name + ("_quick" if args.quick else "")


def shard_spec(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 1/2, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"K/N needs 1 <= K <= N, got {text!r}")
    return index, count


def run_shards(args, argv: list[str]) -> int:
    """``--jobs N``: this script as N ``--shard K/N`` processes side by side (their output lines prefixed
    ``[K/N]``), then their outputs merged. The shards write under ``<out>/forgetting_shards/``, kept only
    when one fails (with the rows it finished in its partial file)."""
    out = Path(args.out) if args.out else default_out_dir(args.device)
    shard_root = out / "forgetting_shards"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    start = time.perf_counter()
    procs, pumps = [], []
    for k in range(1, args.jobs + 1):
        tag = f"{k}/{args.jobs}"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--jobs", "1", "--shard", tag, "--no-plot",
               "--out", str(shard_root / str(k))]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_prefix_lines, args=(proc.stdout, f"[{tag}] "), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    codes = [proc.wait() for proc in procs]
    for pump in pumps:
        pump.join()
    failed = [k for k, code in enumerate(codes, 1) if code != 0]
    if failed:
        print(f"bench_forgetting: error: shard(s) {failed} of {args.jobs} failed; what they finished is in "
              f"{shard_root}", file=sys.stderr)
        return 1
    name = output_name(args)
    rows, meta = merge_runs([str(shard_root / str(k) / f"{name}.json") for k in range(1, args.jobs + 1)])
    meta["machine"] = {**meta["machine"], "wall_s": time.perf_counter() - start, "jobs": args.jobs,
                       "shard_wall_s_total": meta["machine"]["wall_s"]}
    del meta["machine"]["merged_from"]  # the shard folders are removed below
    status = write_outputs(rows, meta, args)
    shutil.rmtree(shard_root)
    return status


def _prefix_lines(stream, prefix: str) -> None:
    for line in stream:
        print(prefix + line, end="", flush=True)


def merge_runs(paths: list[str]) -> tuple[list[Row], dict]:
    """The rows of several outputs of one configuration (shards, extra seeds) as one run, in the planned
    order; a (row, seed) measured twice is kept once (the first file's)."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    for payload in payloads:  # outputs from before --preference existed are the default's
        payload.setdefault("preference", DEFAULT_PREFERENCE)
    keys = ("sizes", "steps", "batch", "learning_rate", "quick", "preference")
    for path, payload in zip(paths[1:], payloads[1:]):
        if any(payload.get(k) != payloads[0].get(k) for k in keys):
            raise SystemExit(f"bench_forgetting: error: {path} was run with other {'/'.join(keys)} than {paths[0]}")
    merged: dict[str, Row] = {}
    for payload in payloads:
        for record in payload["rows"]:
            row = merged.setdefault(record["name"], Row(record["name"], record["method"], record["settings"]))
            seen = {run["seed"] for run in row.runs}
            if row.method != "base" or not row.runs:  # base is deterministic: measured once
                row.runs += [run for run in record["runs"] if run["seed"] not in seen]
    order = {row.name: i for i, row in enumerate(planned_rows())}
    rows = sorted(merged.values(), key=lambda r: order.get(r.name, len(order)))
    meta = {k: payloads[0].get(k) for k in ("name", *keys)}
    meta["machine"] = {**payloads[0]["machine"], "wall_s": sum(p["machine"]["wall_s"] for p in payloads),
                       "merged_from": [str(p) for p in paths]}
    return rows, meta


def write_outputs(rows: list[Row], meta: dict, args) -> int:
    name, info = meta["name"], meta["machine"]
    title = "Does it forget? " + ("(quick smoke run: tiny random model, numbers meaningless)" if meta["quick"]
                                  else f"SmolLM2-135M-Instruct, preference '{meta['preference']}'")
    seeds = max(len(r.runs) for r in rows)
    out = Path(args.out) if args.out else default_out_dir(args.device)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, title, meta, seeds)
    pick = recommended(rows)
    payload = {**meta, "seeds": seeds, "recommended": pick.name if pick else None,
               "rows": [{"name": r.name, "method": r.method, "settings": r.settings, "runs": r.runs,
                         "summary": r.summary()} for r in rows]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    if not args.no_plot:
        plot(rows, out / f"{name}.png", title)
    print(md)
    print(f"wrote {out / name}.{{json,md{',png' if not args.no_plot else ''}}} ({info['wall_s']:.0f} s of runs)")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
