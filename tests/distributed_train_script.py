"""A few QAdapterTrainer steps on a tiny random Llama; launched by tests/test_training_distributed.py.

Run as one process (``python tests/distributed_train_script.py OUT --batch 2``) or under a
launcher (``torchrun --nproc_per_node 2 tests/distributed_train_script.py OUT --batch 1``,
``accelerate launch ...``): the Trainer picks the distributed setup (gloo on CPU) up from the
launcher's environment. The main process writes ``OUT/result.json`` (per-step logged losses,
world size) and ``OUT/lora_initial.safetensors`` (the LoRA weights before training); every process saves
the trained adapter with ``trainer.save_model(OUT/adapter)`` (under FSDP that gathers the shards).
``--save-steps N`` adds Trainer checkpoints (``OUT/trainer/checkpoint-N``), ``--resume CKPT`` resumes from one.

Everything that could make the 1-process and 2-process runs differ is pinned: the model is
built from a fixed seed (and DDP broadcasts rank 0's parameters anyway), LoRA dropout is 0,
the data order is sequential (``train_sampling_strategy="sequential"``; the Trainer's default
"random" reshuffles every epoch), and the dataset is fixed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import weakref
from pathlib import Path

import peft
import safetensors.torch
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels.training.data import PreferenceCollator, TokenizedPair
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from qadapter_kernels.training.trainer import QAdapterTrainer
from training_helpers import collate_pairs  # this script's folder is on sys.path

VOCAB, T, PAD = 128, 16, 0
PAIRS = 2
# Both pairs have the same prompt and response lengths (different tokens): every row has the
# same number of scored tokens, and all rows are pre-padded to the same T. That is what makes
# "1 process x 2 pairs" and "2 processes x 1 pair" the same objective, not just close:
#   - the regulariser is beta * sum(scored r^2) / sum(scored) over the whole batch, so with
#     equal counts per pair the mean of the two per-pair regularisers equals the batch one;
#   - length normalisation divides by T - 1 of the batch, so T must not depend on the batch.
# The preference term is a mean over pairs, so the DDP-averaged gradient of two one-pair
# losses equals the gradient of the two-pair loss.
PROMPT_LEN, RESPONSE_LEN = 5, 6


def tiny_causal_lm() -> LlamaForCausalLM:
    """The base model, the same on every call (fixed seed)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         tie_word_embeddings=True, initializer_range=0.1, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def tiny_model() -> QAdapterModel:
    model = QAdapterModel(tiny_causal_lm(), QAdapterConfig(lora_dropout=0.0, beta=0.05))
    gen = torch.Generator().manual_seed(1)  # peft starts LoRA B at zero: make the adapter matter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


class PairDataset(torch.utils.data.Dataset):
    """PAIRS fixed pairs; each item is one pair as [2, T] rows (chosen, rejected), right-padded."""

    def __init__(self):
        gen = torch.Generator().manual_seed(2)
        self.items = []
        for _ in range(PAIRS):
            prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=gen)
            rows = [torch.cat([prompt, torch.randint(3, VOCAB, (RESPONSE_LEN,), generator=gen)]) for _ in range(2)]
            ids = torch.full((2, T), PAD)
            ids[:, : PROMPT_LEN + RESPONSE_LEN] = torch.stack(rows)
            attention = (torch.arange(T) < PROMPT_LEN + RESPONSE_LEN).long().expand(2, T).clone()
            loss_mask = ((torch.arange(T) >= PROMPT_LEN) & (attention[0] == 1)).expand(2, T).clone()
            self.items.append({"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def tokenized(self) -> list[TokenizedPair]:
        """The same pairs as TokenizedPair (what a cached base pass needs), for PreferenceCollator(PAD, pad_to=T)."""
        pairs = []
        for item in self.items:
            ids, n = item["input_ids"], PROMPT_LEN + RESPONSE_LEN
            pairs.append(TokenizedPair(ids[0, :PROMPT_LEN].tolist(), ids[0, PROMPT_LEN:n].tolist(),
                                       ids[1, PROMPT_LEN:n].tolist()))
        return pairs


def shard_with_fsdp_on_cpu() -> None:
    """Lets ``accelerate launch --config_file .../fsdp.yaml`` shard with FSDP on a CPU-only gloo group.

    accelerate selects FSDP only when the process group runs on an accelerator (CUDA, XPU, ...);
    on CPU it silently falls back to DDP (MULTI_CPU). This turns that fallback into FSDP with the
    plugin accelerate built from the launcher's settings; everything after it (accelerate's
    fully_shard wrapping, the Trainer's FSDP save and resume paths) is the code a GPU run executes.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def fsdp_groups(model: torch.nn.Module) -> list[str]:
    """Names of the modules FSDP2 shards as one group each ("" is the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def train(args: argparse.Namespace) -> weakref.ref:
    """Trains and writes the results; returns a weak reference to the (DDP/FSDP-wrapped) model trained."""
    model = tiny_model()
    initial = {n: t.detach().clone() for n, t in peft.get_peft_model_state_dict(model.peft_model).items()}
    # accelerate enables DeepSpeed only when not told to use the CPU; DeepSpeed's CPU accelerator then runs on gloo.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    training_args = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        train_sampling_strategy="sequential", use_cpu=not deepspeed, report_to=[], seed=0, dataloader_num_workers=0,
        disable_tqdm=True, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    if args.cache_dir is None:
        data, collator = PairDataset(), collate_pairs
    else:  # the same batches, plus the cached base columns
        data, collator = PairDataset().tokenized(), PreferenceCollator(PAD, pad_to=T)
        training_args.precompute_base, training_args.base_cache_dir = True, str(args.cache_dir)
    trainer = QAdapterTrainer(model=model, args=training_args, train_dataset=data, data_collator=collator)
    trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    # Every process takes part: under FSDP the adapter's shards are gathered for the save.
    trainer.save_model(str(args.out / "adapter"))

    world_size = trainer.accelerator.num_processes
    # pairs per optimizer step must be the same in every configuration compared
    assert world_size * args.batch == PAIRS, (world_size, args.batch)
    if trainer.accelerator.is_main_process:
        # The Trainer's logged "loss" is gathered and averaged over processes (and our extra
        # metrics are reduced the same way), so it is comparable to the 1-process batch loss.
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        safetensors.torch.save_file(initial, str(args.out / "lora_initial.safetensors"))
        (args.out / "result.json").write_text(json.dumps({
            "world_size": world_size, "distributed_type": str(trainer.accelerator.distributed_type),
            "fsdp_groups": fsdp_groups(trainer.model),
            "steps": [e["step"] for e in logs], "loss": [e["loss"] for e in logs],
            "pref_loss": [e["pref_loss"] for e in logs], "reg_loss": [e["reg_loss"] for e in logs],
        }, indent=2))
    wrapped = weakref.ref(trainer.model_wrapped)
    trainer.accelerator.free_memory()  # drops the accelerator's references to the model and optimizer
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, required=True, help="pairs per process and step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", type=Path, help="a checkpoint folder to resume from")
    parser.add_argument("--cache-dir", type=Path, default=None, help="train with a cached base pass kept here")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        shard_with_fsdp_on_cpu()
    wrapped = train(parser.parse_args())
    # Teardown order matters. DDP's Reducer holds a reference to the gloo group, and Python frees
    # the Reducer with the GIL held. Were it the group's last holder (after destroy_process_group),
    # ~ProcessGroupGloo would join the group's worker threads while holding the GIL, and a worker
    # still releasing a finished collective's Python-owned tensors waits for that GIL: a deadlock
    # at exit. So the DDP model is freed first, while the group is still registered; then the
    # group goes through destroy_process_group, whose binding releases the GIL when it frees it.
    gc.collect()
    if isinstance(wrapped(), torch.nn.parallel.DistributedDataParallel) and torch.distributed.is_initialized():
        raise RuntimeError("the DDP-wrapped model outlived its trainer: the gloo teardown could deadlock")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # leave together: a peer exiting early can abort (SIGABRT) in gloo
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
