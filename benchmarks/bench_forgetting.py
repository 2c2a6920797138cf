"""Does it forget? Q-Adapter against SFT and DPO with the same LoRA, budget and data (issue 9).

Rows: the base model; SFT on the chosen answers; DPO (sigmoid, reference = adapter off) at two
betas; Q-Adapter (bellman) over alpha_0 in {0.01, 0.1, 0.5, 1.0, 2.0} x alpha_tilde in {1.0, 0.5};
Q-Adapter "official" at the authors' setting. Every trained row is trained once per seed;
``--rows`` runs a subset.
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

    python benchmarks/bench_forgetting.py [--quick] [--preference NAME] [--reps SEEDS] [--steps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qadapter_kernels.preferences import DEFAULT_PREFERENCE, PREFERENCE_CHECKERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import add_common_arguments, default_out_dir, machine_info  # noqa: E402

ALPHA_0_GRID = (0.01, 0.1, 0.5, 1.0, 2.0)
ALPHA_TILDE_GRID = (1.0, 0.5)
DPO_BETAS = (0.1, 0.5)
AUTHORS = dict(alpha_tilde=1.0, alpha_0=0.01)  # the setting both reward variants are compared at
METRICS = ("pref", "pair_acc", "retention", "retention_pct_base", "kl", "train_s")


@dataclass
class Sizes:
    steps: int
    batch: int
    retention_items: int | None  # None: all
    pref_prompts: int | None
    heldout_pairs: int | None
    kl_prompts: int
    max_new_tokens: int


# Sized for about an hour on 2 CPU cores with one seed (an estimate from per-step costs, not a measured run);
# add seeds for the rows that matter with --rows ... --reps 3.
FULL = Sizes(steps=30, batch=4, retention_items=100, pref_prompts=40, heldout_pairs=40, kl_prompts=12,
             max_new_tokens=40)
QUICK = Sizes(steps=3, batch=2, retention_items=24, pref_prompts=6, heldout_pairs=8, kl_prompts=4, max_new_tokens=8)


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
        rows.append(Row(f"Q-Adapter a~={alpha_tilde} a0={alpha_0}", "qadapter",
                        {"alpha_tilde": alpha_tilde, "alpha_0": alpha_0, "variant": "bellman"}))
    rows.append(Row(f"Q-Adapter official a~={AUTHORS['alpha_tilde']} a0={AUTHORS['alpha_0']}", "qadapter",
                    {**AUTHORS, "variant": "official"}))
    if only:
        rows = [r for r in rows if r.method == "base" or any(r.name.startswith(prefix) for prefix in only)]
    return rows


# ----------------------------------------------------------------------------- models


def quick_model_and_tokenizer(texts: list[str]):
    """A tiny random Llama and a byte-level BPE tokenizer trained on ``texts``, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + "
                               "eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return model, tokenizer


class FreshModels:
    """Hands out fresh copies of the base model (each method injects its own LoRA into the one it gets)."""

    def __init__(self, model):
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # a GGUF-loaded model's marker; the weights are fp32 already
            del config.quantization_config
        self._config, self._cls = config, type(model)
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def get(self):
        model = self._cls(self._config)
        model.load_state_dict(self._state)
        return model.eval()


# ----------------------------------------------------------------------------- one row, one seed


def train_row(row: Row, fresh: FreshModels, tokenizer, train_examples, budget):
    from qadapter_kernels.baselines import train_baseline, train_qadapter
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel

    causal_lm = fresh.get()
    if row.method == "base":
        return QAdapterModel(causal_lm, QAdapterConfig()), 0.0
    start = time.perf_counter()  # training only: building the model copy is not part of a method's cost
    if row.method == "qadapter":
        model = train_qadapter(causal_lm, tokenizer, train_examples, QAdapterConfig(**row.settings), budget)
    else:
        model = train_baseline(row.method, causal_lm, tokenizer, train_examples, budget=budget,
                               dpo_beta=row.settings.get("beta", 0.1))
    return model, time.perf_counter() - start


def measure(model, tokenizer, adapter: bool, data: dict, base_scorer, sizes: Sizes) -> dict:
    from qadapter_kernels.evaluation import PolicyScorer, metrics

    scorer = PolicyScorer(model, tokenizer, adapter=adapter, batch_size=16)
    pref, _ = metrics.preference_satisfaction(scorer, data["pref_prompts"], max_new_tokens=sizes.max_new_tokens)
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
    from qadapter_kernels.loading import default_model_path, load_model_and_tokenizer
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel, load_preferences, shipped_data_path

    train_examples = load_preferences(shipped_data_path("train", args.preference))
    heldout = load_preferences(shipped_data_path("heldout", args.preference))
    retention = read_task_records("retention")
    if args.quick:
        texts = [str(e.prompt) + str(e.chosen) + str(e.rejected) for e in train_examples]
        texts += [f"Question: {r['question']}\nAnswer: " + " ".join(r["options"]) for r in retention]
        base_model, tokenizer = quick_model_and_tokenizer(texts)
    else:
        base_model, tokenizer = load_model_and_tokenizer(args.model or default_model_path())
    fresh = FreshModels(base_model.to(args.device))
    data = {"heldout": metrics.evenly_spaced(heldout, sizes.heldout_pairs),
            "retention": metrics.evenly_spaced(retention, sizes.retention_items),
            "pref_prompts": metrics.evenly_spaced(read_task_records("preference", args.preference), sizes.pref_prompts)}
    base = QAdapterModel(fresh.get(), QAdapterConfig()).to(args.device)
    base_scorer = PolicyScorer(base, tokenizer, adapter=False, batch_size=16)
    kl_prompts = [r["question"] for r in metrics.evenly_spaced(retention, sizes.kl_prompts)]
    data["kl_pairs"] = metrics.base_answers(base_scorer, kl_prompts, max_new_tokens=sizes.max_new_tokens)

    rows = planned_rows(args.rows.split(";") if args.rows else None)
    if args.no_length_norm:
        for row in rows:
            if row.method == "qadapter":
                row.settings["length_norm"] = False
    seeds = list(range(args.reps or 1))
    for row in rows:
        for seed in seeds[:1] if row.method == "base" else seeds:
            steps = args.steps or sizes.steps
            budget = TrainingBudget(max_steps=steps, batch_size=args.batch or sizes.batch, seed=seed,
                                    logging_steps=max(1, steps // 4))
            model, seconds = train_row(row, fresh, tokenizer, train_examples, budget)
            result = measure(model.to(args.device), tokenizer, row.method != "base", data, base_scorer, sizes)
            result["train_s"] = seconds
            row.runs.append(result)
            print(f"{row.name} seed {seed}: " + ", ".join(f"{k}={v:.3g}" for k, v in result.items()), flush=True)
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


def markdown(rows: list[Row], title: str, info: dict, seeds: int) -> str:
    def cell(summary, metric, digits):
        s = summary[metric]
        return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")

    lines = [f"## {title}", "",
             f"{info['device_name']}, torch {info['torch']}, {info['cpu_threads']} threads, {info['date']}; "
             f"mean ± sample std over {seeds} seed(s) for trained rows (base: deterministic).", "",
             "| row | pref % | pair acc % | retention % (chance 25) | retention % of base "
             "| KL(base‖model) nats/token | train s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row.summary()
        lines.append(f"| {row.name} | {cell(s, 'pref', 1)} | {cell(s, 'pair_acc', 1)} | {cell(s, 'retention', 1)} | "
                     f"{cell(s, 'retention_pct_base', 1)} | {cell(s, 'kl', 4)} | {cell(s, 'train_s', 1)} |")
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
    parser.add_argument("--preference", choices=sorted(PREFERENCE_CHECKERS), default=DEFAULT_PREFERENCE,
                        help=f"the shipped preference trained and scored (default {DEFAULT_PREFERENCE})")
    parser.add_argument("--no-length-norm", action="store_true",
                        help="Q-Adapter rows with length_norm=False (the demo's setting), not the library default")
    args = parser.parse_args(argv)
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
    # Another preference's results go next to the default's, never over them.
    name = "forgetting" + ("" if args.preference == DEFAULT_PREFERENCE else f"_{args.preference}")
    name += "_quick" if args.quick else ""
    title = "Does it forget? " + ("(quick smoke run: tiny random model, numbers meaningless)" if args.quick
                                  else f"SmolLM2-135M-Instruct, preference '{args.preference}'")
    seeds = args.reps or 1
    out = Path(args.out) if args.out else default_out_dir(args.device)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, title, info, seeds)
    payload = {"name": name, "preference": args.preference, "machine": info, "sizes": sizes.__dict__, "steps": args.steps or sizes.steps,
               "batch": args.batch or sizes.batch, "length_norm": False if args.no_length_norm else "library default",
               "seeds": seeds, "rows": [{"name": r.name, "method": r.method, "settings": r.settings, "runs": r.runs,
                                         "summary": r.summary()} for r in rows]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    if not args.no_plot:
        plot(rows, out / f"{name}.png", title)
    print(md)
    print(f"wrote {out / name}.{{json,md{',png' if not args.no_plot else ''}}} in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
