"""One row of ``bench_vs_trl.py``, alone in its process: build one trainer, run it, record its steps.

``bench_vs_trl.py`` runs :func:`row_process` in a process forked from a server that imported the
libraries once (``multiprocessing``'s forkserver). By hand, e.g. under a profiler::

    python3 benchmarks/trainer_step_run.py SPEC.json RESULT.json

SPEC: the row (trainer, flags), the model, the token ids of every pair, pairs per step, warm-up
and timed steps (``bench_vs_trl.row_spec``). RESULT: the timed steps, the peak memory, the one-off
precomputation, the mean loss and whether the LoRA moved; or ``{"error": ...}`` when the row could
not run (e.g. ``use_liger_kernel`` without a GPU), which ``bench_vs_trl.py`` reports in its table.

Both trainers get the same LoRA (``QAdapterConfig``'s r, alpha, target modules; dropout 0), the same
pairs in the same batches, the same optimizer settings, no gradient checkpointing and fp32.
``QAdapterTrainer`` reads the pairs as token ids; ``DPOTrainer`` reads them as text and tokenizes
it with a word-level tokenizer whose word ``w<i>`` is token i (checked: it gets the same ids), so
both see exactly the stated lengths, whatever the model.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

from qadapter_kernels.loading import load_base_model
from qadapter_kernels.model import QAdapterConfig
from qadapter_kernels.params import LEARNING_RATE, LR_SCHEDULER
from models import build_causal_lm

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
FIRST_WORD = 3  # the word ``w<i>`` is id i for i >= FIRST_WORD


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer of ``vocab_size`` ids: the specials, then the words ``w3`` ... ``w<vocab_size - 1>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {PAD: PAD_ID, EOS: EOS_ID, UNK: UNK_ID, **{f"w{i}": i for i in range(FIRST_WORD, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


MADV_POPULATE_READ = 22  # Linux >= 5.14: map a range's pages into the page table, without SIGBUS past a file's end


def populate_file_mappings() -> None:
    """Maps every page of every readable file mapping (shared libraries, memory-mapped data) into this
    process's page table, so that none first counts in the resident set when the measured region runs
    code of a library it had not touched yet (in a forked process, even pages its parent had touched)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/") and "r" in fields[1]:
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, stop - start, MADV_POPULATE_READ)  # a kernel without it: nothing mapped, no harm


class PeakMemory:
    """Peak memory of a region beyond what was resident at its start.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset at the start by writing 5 to
    /proc/self/clear_refs, after ``gc.collect()``, glibc's ``malloc_trim(0)`` (free heap pages given
    back, so memory freed earlier does not hide the region's own growth) and
    :func:`populate_file_mappings` (library code and mapped data count before the region, not in it).
    CUDA: the caching allocator's peak and its allocation at the start."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim or populate
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            populate_file_mappings()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as e:
            raise RuntimeError(f"peak RSS needs Linux's /proc/self/clear_refs to reset the high-water mark: {e}") from e
        self.baseline = _status_kib("VmRSS") * 1024

    def stop(self) -> tuple[int, int]:
        """(peak, baseline) in bytes: the region's highest use and the use at its start."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(), self.baseline
        return _status_kib("VmHWM") * 1024, self.baseline


# --------------------------------------------------------------------------- steps


class StepClock(transformers.TrainerCallback):
    """Wall and process CPU time at the end of every optimizer step, and whether the LoRA moved in the first.

    The CPU time leaves out what a busy machine takes from the process (time slices given to others)."""

    def __init__(self, lora: list[torch.Tensor]):
        self.lora, self.before = lora, [p.detach().clone() for p in lora]
        self.ends: list[tuple[float, float]] = []
        self.moved_in_first_step: bool | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append((time.perf_counter(), time.process_time()))
        if self.moved_in_first_step is None:
            self.moved_in_first_step = any(not torch.equal(p.detach(), b) for p, b in zip(self.lora, self.before))
            self.before = None


def training_arguments(spec: dict, scratch: str) -> dict:
    """The ``TrainingArguments`` both trainers share."""
    steps = spec["warmup"] + spec["reps"]
    return dict(output_dir=scratch, max_steps=steps, per_device_train_batch_size=spec["pairs_per_step"],
                learning_rate=LEARNING_RATE, lr_scheduler_type=LR_SCHEDULER, weight_decay=0.0, seed=spec["seed"],
                logging_steps=steps + 1, save_strategy="no", report_to=[], bf16=False, fp16=False,
                dataloader_num_workers=0, dataloader_pin_memory=False, gradient_checkpointing=False,
                use_cpu=spec["device"] == "cpu", disable_tqdm=True, max_length=spec["max_length"],
                precompute_ref_batch_size=spec["pairs_per_step"],
                logging_nan_inf_filter=False)  # a non-finite step loss must reach the mean loss


def qadapter_trainer(spec: dict, causal_lm, tokenizer, lora: QAdapterConfig, scratch: str):
    """``QAdapterTrainer`` with the default Q-Adapter hyper-parameters; returns (trainer, precompute seconds)."""
    from qadapter_kernels.training import (PreferenceCollator, QAdapterTrainer, QAdapterTrainingArguments,
                                           TokenizedPair)

    pairs = [TokenizedPair(*pair) for pair in spec["pairs"]]
    args = QAdapterTrainingArguments(**training_arguments(spec, scratch), precompute_base=spec["row"]["precompute"],
                                     base_cache_dir=scratch)
    transformers.set_seed(spec["seed"])  # peft's LoRA initialisation is random
    trainer = QAdapterTrainer(model=causal_lm, args=args, train_dataset=pairs,
                              data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                              peft_config=lora.lora_config())
    start = time.perf_counter()
    trainer.get_train_dataloader()  # with precompute_base: builds the cache, which train() then reuses
    return trainer, time.perf_counter() - start


def dpo_trainer(spec: dict, causal_lm, tokenizer, lora: QAdapterConfig, scratch: str):
    """TRL's ``DPOTrainer``: sigmoid loss, reference = the same model with the adapter off (no ``ref_model``
    with a peft model); returns (trainer, seconds spent precomputing the reference log-probs)."""
    import datasets
    import trl

    from qadapter_kernels.baselines.trl_training import trainable_plain_model

    class TimedDPOTrainer(trl.DPOTrainer):
        """Times the reference log-probs' precomputation, which DPOTrainer runs inside its constructor."""

        precompute_seconds = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                TimedDPOTrainer.precompute_seconds += time.perf_counter() - start

    rows = [{"prompt": words(p), "chosen": " " + words(c[:-1]), "rejected": " " + words(r[:-1])}
            for p, c, r in spec["pairs"]]  # DPOTrainer appends the EOS each response ends with
    row = spec["row"]
    args = trl.DPOConfig(**training_arguments(spec, scratch), beta=0.1, loss_type=["sigmoid"],
                         precompute_ref_log_probs=row["precompute"], use_liger_kernel=row["liger"])
    trainer = TimedDPOTrainer(model=trainable_plain_model(causal_lm), ref_model=None, args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=lora.lora_config())
    tokenized = trainer.train_dataset
    got = [[tokenized[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] for i in range(len(tokenized))]
    if got != spec["pairs"]:
        raise RuntimeError("DPOTrainer tokenized the pairs to other ids than the Q-Adapter rows train on")
    if row["precompute"] and not TimedDPOTrainer.precompute_seconds:
        raise RuntimeError("precompute_ref_log_probs=True but DPOTrainer._precompute_ref_logps never ran: "
                           "this TRL precomputes elsewhere, update the timer")
    return trainer, TimedDPOTrainer.precompute_seconds


TRAINERS = {"qadapter": qadapter_trainer, "trl": dpo_trainer}


def build_causal_lm_for(spec: dict):
    dtype = getattr(torch, spec["dtype"])
    if spec["model_path"] is not None:
        return load_base_model(spec["model_path"]).to(device=spec["device"], dtype=dtype)
    return build_causal_lm(spec["llama"], dtype, spec["device"])


def run(spec: dict) -> dict:
    """Builds the row's trainer, runs warm-up + timed steps, returns what RESULT holds."""
    causal_lm = build_causal_lm_for(spec)
    vocab = causal_lm.get_output_embeddings().weight.shape[0]
    if vocab < spec["id_range"]:
        raise ValueError(f"the model's vocabulary ({vocab}) is smaller than the benchmark's token ids "
                         f"(< {spec['id_range']})")
    tokenizer = word_tokenizer(spec["id_range"])
    lora = QAdapterConfig(lora_dropout=0.0)
    with tempfile.TemporaryDirectory() as scratch:
        trainer, precompute_s = TRAINERS[spec["row"]["trainer"]](spec, causal_lm, tokenizer, lora, scratch)
        clock = StepClock([p for p in trainer.model.parameters() if p.requires_grad])
        trainer.add_callback(clock)
        memory = PeakMemory(spec["device"])
        memory.start()
        output = trainer.train()
        peak, baseline = memory.stop()
    if not clock.moved_in_first_step:
        raise RuntimeError("the LoRA weights did not change in the first optimizer step")
    if not math.isfinite(output.training_loss):
        raise RuntimeError(f"the mean training loss is not finite: {output.training_loss}")
    ends = clock.ends
    if len(ends) != spec["warmup"] + spec["reps"]:
        raise RuntimeError(f"{len(ends)} optimizer steps ran, {spec['warmup'] + spec['reps']} were asked")
    timed = list(zip(ends[spec["warmup"] - 1:], ends[spec["warmup"]:]))
    return {"step_ms": [(b[0] - a[0]) * 1e3 for a, b in timed], "step_cpu_ms": [(b[1] - a[1]) * 1e3 for a, b in timed],
            "peak_bytes": peak, "baseline_bytes": baseline,
            "precompute_s": precompute_s, "mean_loss": output.training_loss, "lora_moved": True,
            "threads": torch.get_num_threads()}


def write_result(spec: dict, result_path: Path) -> None:
    """Runs the row and writes RESULT; a failure is written as ``{"error": ...}`` (its traceback printed)."""
    try:
        result = run(spec)
    except Exception as e:  # the row's failure, reported by the benchmark (a missing or GPU-only kernel)
        traceback.print_exc()
        raised_in = traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[-1]
        message = str(e).splitlines()[0] if str(e) else ""
        result = {"error": f"{type(e).__name__} from {raised_in}: {message}"}
    Path(result_path).write_text(json.dumps(result))


def row_process(spec: dict, result_path: str, log_path: str) -> None:
    """The body of a row's process: its output (the trainers' warnings, a traceback) goes to ``log_path``."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        write_result(spec, Path(result_path))
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: trainer_step_run.py SPEC.json RESULT.json", file=sys.stderr)
        return 2
    write_result(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
