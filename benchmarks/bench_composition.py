"""Two preferences at once: Q-Adapters trained separately, composed at decode with weights.

Each shipped preference (``qadapter_kernels/data/<name>/``) gets its own Q-Adapter, trained with the
demo's budget and settings through ``qadapter train`` (40 steps x 4 pairs, the library's learning
rate with linear decay and its hyper-parameters). The adapters are then loaded into one model and decode together,

    pi~ ∝ exp((sum_i w_i Q_i + alpha_0 log pi_1) / alpha_tilde),

greedily, on held-out prompts drawn evenly from every preference's held-out split. For each weight
setting the table gives the share of answers each preference's checker accepts
(``preferences.PREFERENCE_CHECKERS``); the base model (adapters off) is the first row. Composition
approximates an adapter trained on the weighted sum of the preferences; it is not one.

Trained adapters are kept in ``--work-dir`` (default ``$TMPDIR/qadapter_composition_adapters``) and reused.
``--quick`` trains on a tiny random Llama with a tokenizer trained on the shipped text (a smoke run:
its numbers mean nothing). Outputs ``composition[_quick].{json,md}``.

    python benchmarks/bench_composition.py [--quick] [--preferences lowercase signoff] [--prompts 20]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forgetting import quick_model_and_tokenizer  # noqa: E402
from runner import add_common_arguments, default_out_dir, machine_info  # noqa: E402

# The pair docs/composition.md reports. Their checkers exclude each other (the sign-off line has a capital H), so
# the table shows how the weights trade one preference against the other.
PAIR = ("lowercase", "signoff")


@dataclasses.dataclass(frozen=True)
class Sizes:
    steps: int
    batch: int
    prompts: int
    max_new_tokens: int


FULL = Sizes(steps=40, batch=4, prompts=20, max_new_tokens=96)  # the demo's budget and answer length
QUICK = Sizes(steps=2, batch=2, prompts=4, max_new_tokens=8)


def weight_settings(count: int) -> list[tuple[float, ...]]:
    """Each adapter alone, all at 1, all at 0.5: (1, 0), (0, 1), (1, 1), (0.5, 0.5) for two."""
    alone = [tuple(float(i == j) for j in range(count)) for i in range(count)]
    settings = alone + [(1.0,) * count, (0.5,) * count]
    return list(dict.fromkeys(settings))


def heldout_prompts(preferences: list[str], total: int) -> list[str]:
    """``total`` distinct user messages spread evenly over the preferences' held-out splits, taken in turn
    (the shipped generators ask several preferences the same questions: each is asked once)."""
    from itertools import chain, zip_longest

    from qadapter_kernels.evaluation.metrics import evenly_spaced
    from qadapter_kernels.training.data import load_preferences, shipped_data_path

    def user_message(prompt) -> str:
        return prompt[-1]["content"] if isinstance(prompt, list) else prompt

    splits = [[user_message(e.prompt) for e in load_preferences(shipped_data_path("heldout", name))]
              for name in preferences]
    interleaved = (p for p in chain.from_iterable(zip_longest(*splits)) if p is not None)
    return evenly_spaced(list(dict.fromkeys(interleaved)), total)


def quick_model_folder(preferences: list[str], folder: Path) -> Path:
    """The tiny random Llama and its tokenizer, saved where ``qadapter train --model`` reads them."""
    from qadapter_kernels.training.data import load_preferences, shipped_data_path

    texts = [str(e.prompt) + str(e.chosen) + str(e.rejected)
             for name in preferences for e in load_preferences(shipped_data_path("train", name))]
    model, tokenizer = quick_model_and_tokenizer(texts)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_adapter(name: str, folder: Path, model: Path | None, sizes: Sizes) -> float:
    """Trains ``name``'s adapter into ``folder`` with ``qadapter train`` unless it is there; returns seconds."""
    from qadapter_kernels.app.cli import main as qadapter
    from qadapter_kernels.training.data import shipped_data_path

    if (folder / "qadapter_config.json").is_file():
        print(f"{name}: reusing the adapter in {folder}", flush=True)
        return 0.0
    start = time.perf_counter()
    argv = ["train", "--data", str(shipped_data_path("train", name)), "--output-dir", str(folder),
            "--max-steps", str(sizes.steps), "--batch-size", str(sizes.batch),
            "--save-steps", str(10 * sizes.steps),
            "--logging-steps", str(max(1, sizes.steps // 4))] + (["--model", str(model)] if model else [])
    if qadapter(argv) != 0:
        raise SystemExit(f"training the {name} adapter failed")
    return time.perf_counter() - start


def satisfaction(answers: list[str], preferences: list[str]) -> dict[str, float]:
    from qadapter_kernels.preferences import PREFERENCE_CHECKERS

    return {name: 100.0 * sum(map(PREFERENCE_CHECKERS[name], answers)) / len(answers) for name in preferences}


def run(args, sizes: Sizes, work_dir: Path) -> dict:
    import torch

    from qadapter_kernels.loading import load_tokenizer
    from qadapter_kernels.model import QAdapterModel

    model_path = quick_model_folder(args.preferences, work_dir / "tiny_llama") if args.quick else args.model
    folders = {name: work_dir / name for name in args.preferences}
    train_s = {name: train_adapter(name, folder, model_path, sizes) for name, folder in folders.items()}
    model = QAdapterModel.from_pretrained(folders, base_model=model_path).to(args.device).eval()
    tokenizer = load_tokenizer(folders[args.preferences[0]])
    prompts = heldout_prompts(args.preferences, args.prompts or sizes.prompts)
    decode = dict(max_new_tokens=sizes.max_new_tokens, temperature=0.0)

    rows = []
    for weights in [None, *weight_settings(len(folders))]:
        start = time.perf_counter()
        if weights is None:
            answers = model.generate_text(tokenizer, prompts, adapter=False, **decode)
        else:
            answers = model.generate_text(tokenizer, prompts, adapters=dict(zip(folders, weights)), **decode)
        rows.append({"weights": weights, "satisfied_pct": satisfaction(answers, args.preferences),
                     "decode_s": time.perf_counter() - start, "answers": answers})
        label = "base (adapters off)" if weights is None else str(weights)
        print(f"{label}: " + ", ".join(f"{k} {v:.0f}%" for k, v in rows[-1]["satisfied_pct"].items()), flush=True)
    config = model.qadapter_config
    return {"preferences": args.preferences, "model": str(model_path or config.base_model), "prompts": prompts,
            "alpha_tilde": config.alpha_tilde, "alpha_0": config.alpha_0, "sizes": dataclasses.asdict(sizes),
            "train_s": train_s, "torch_threads": torch.get_num_threads(), "rows": rows}


def markdown(result: dict, title: str, info: dict) -> str:
    names = result["preferences"]
    lines = [f"# {title}", "",
             f"{len(result['prompts'])} distinct held-out prompts (spread over {', '.join(names)}), greedy, "
             f"{result['sizes']['max_new_tokens']} new tokens at most; adapters trained {result['sizes']['steps']} "
             f"steps x {result['sizes']['batch']} pairs each; alpha_tilde = {result['alpha_tilde']}, "
             f"alpha_0 = {result['alpha_0']}. Cells: % of answers the preference's checker accepts.", "",
             "| weights (" + ", ".join(names) + ") | " + " | ".join(f"{n} %" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for row in result["rows"]:
        label = "base (adapters off)" if row["weights"] is None else ", ".join(f"{w:g}" for w in row["weights"])
        lines.append(f"| {label} | " + " | ".join(f"{row['satisfied_pct'][n]:.0f}" for n in names) + " |")
    lines += ["", f"Machine: {info['device_name']}, {info['cpu_threads']} thread(s); wall {info['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qadapter_kernels.preferences import PREFERENCE_CHECKERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, quick_help="tiny random model, a few steps and prompts (CI smoke run)",
                         reps_help="unused (one greedy decode per weight setting)")
    parser.add_argument("--preferences", nargs="+", help=f"shipped preferences to compose (default {' '.join(PAIR)}, "
                                                         "those of them that are shipped)")
    parser.add_argument("--prompts", type=int, help=f"held-out prompts (default {FULL.prompts}; quick {QUICK.prompts})")
    parser.add_argument("--model", help="base model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--work-dir", help="where the adapters are trained and reused (default $TMPDIR/qadapter_"
                                           "composition_adapters; a fresh temporary folder with --quick)")
    args = parser.parse_args(argv)
    if args.preferences is None:
        args.preferences = [name for name in PAIR if name in PREFERENCE_CHECKERS]
    unknown = [name for name in args.preferences if name not in PREFERENCE_CHECKERS]
    if unknown or len(set(args.preferences)) != len(args.preferences):
        parser.error(f"--preferences: distinct names among {sorted(PREFERENCE_CHECKERS)}, got {args.preferences}")
    sizes = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else default_out_dir(args.device)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        default = scratch if args.quick else Path(tempfile.gettempdir()) / "qadapter_composition_adapters"
        work_dir = Path(args.work_dir or default)
        result = run(args, sizes, work_dir)
    info["wall_s"] = time.perf_counter() - start
    name = "composition_quick" if args.quick else "composition"
    title = "Composed preferences" + (" (quick smoke run: tiny random model, numbers meaningless)" if args.quick
                                      else f": {' + '.join(args.preferences)}")
    md = markdown(result, title, info)
    (out / f"{name}.json").write_text(json.dumps({"name": name, "machine": info, **result}, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {out / name}.{{json,md}} in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
