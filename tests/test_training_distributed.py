"""Data-parallel and sharded (FSDP) training give the same result as one process with the whole batch (CPU, gloo).

tests/distributed_train_script.py runs 3 QAdapterTrainer steps on a tiny random Llama over 2
fixed preference pairs, as 1 process x 2 pairs and as 2 processes x 1 pair. DDP averages the
gradients of the two processes; each process's loss is the Q-Adapter loss of its one pair, and
the script's data is built so that the mean of the two one-pair losses *is* the two-pair loss
(preference term: a mean over pairs; regulariser and length normalisation: equal token counts
and padded length per pair; see the script). So the averaged gradient equals the 1-process
gradient, and after the same AdamW steps the LoRA weights agree up to float summation order.
The logged per-step "loss" of the 2-process run is the Trainer's all-gather mean over
processes, hence comparable to the 1-process batch loss step by step.

FSDP and DeepSpeed run through the shipped accelerate configs (qadapter_kernels/accelerate_configs/: FSDP2, ZeRO-2,
ZeRO-3): gradients are reduce-scattered instead of all-reduced, so the same equality holds; their
checkpoints resume to the uninterrupted run's adapter, and the saved folder loads unsharded. The
DeepSpeed tests run where deepspeed is installed (it is optional: ``pip install deepspeed``, CPU
build with ``DS_BUILD_OPS=0``); DeepSpeed's CPU accelerator uses gloo.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch

from cli_helpers import save_tiny_llama, write_pairs
from distributed_train_script import PairDataset, tiny_causal_lm
from qadapter_kernels.training import checkpoints
from qadapter_kernels.model import QAdapterModel
from training_helpers import collate_pairs

SCRIPT = Path(__file__).resolve().parent / "distributed_train_script.py"
ROOT = SCRIPT.parents[1]
CONFIGS = ROOT / "qadapter_kernels" / "accelerate_configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",  # no GPU, whatever the machine has: gloo on CPU
        OMP_NUM_THREADS="1",  # two processes on a 2-core machine
        HF_HOME=str(tmp_path / "hf_home"),  # no user accelerate config (default_config.yaml) is read
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("TRITON_INTERPRET", None)  # the trainer never runs Triton kernels on CPU
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # never inherit a surrounding launcher's setup
    return env


def run(cmd: list[str], out: Path, tmp_path: Path) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((out / "result.json").read_text())
    result["lora"] = safetensors.torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))
    result["lora_initial"] = safetensors.torch.load_file(str(out / "lora_initial.safetensors"))
    return result


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: 1 process, both pairs in one batch."""
    tmp = tmp_path_factory.mktemp("single")
    result = run([sys.executable, str(SCRIPT), str(tmp / "out"), "--batch", "2"], tmp / "out", tmp)
    assert result["world_size"] == 1 and result["steps"] == [1, 2, 3]
    # The comparison means something: training moved the adapter, and the loss went down.
    assert all(not torch.allclose(result["lora"][n], w, atol=1e-3) for n, w in result["lora_initial"].items())
    assert result["loss"][-1] < result["loss"][0]
    return result


def assert_same_training(got: dict, want: dict, distributed_type: str = "MULTI_CPU") -> None:
    assert got["world_size"] == 2 and got["distributed_type"] == f"DistributedType.{distributed_type}", got
    assert got["steps"] == want["steps"]
    for key in ("loss", "pref_loss", "reg_loss"):  # per step; the 2-process value is the mean over processes
        assert got[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), key
    assert got["lora"].keys() == want["lora"].keys()
    for name in want["lora"]:
        torch.testing.assert_close(got["lora_initial"][name], want["lora_initial"][name], atol=0, rtol=0)
        torch.testing.assert_close(got["lora"][name], want["lora"][name], atol=1e-5, rtol=1e-5, msg=name)


def test_torchrun_two_processes_match_one(single_process, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT), str(out), "--batch", "1"]
    assert_same_training(run(cmd, out, tmp_path), single_process)


def test_accelerate_launch_two_processes_match_one(single_process, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless given an MPI host
    # file (--mpirun_hostfile; multi-process CPU goes through mpirun there, and no MPI is
    # installed here): the script would then see world size 1 and fail its own check.
    # `--multi_gpu` selects accelerate's torchrun-based launcher; with no GPU visible and
    # TrainingArguments(use_cpu=True) the processes join a gloo group (MULTI_CPU).
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(SCRIPT), str(out), "--batch", "1"]
    assert_same_training(run(cmd, out, tmp_path), single_process)


def accelerate_launch(config: str, out: Path, tmp_path: Path, *script_args: str) -> dict:
    """The script under ``accelerate launch --config_file <shipped config>``, 2 processes x 1 pair."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(SCRIPT), str(out), "--batch", "1", *script_args]
    return run(cmd, out, tmp_path)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 processes x 1 pair under FSDP2, 3 steps, a checkpoint after step 2."""
    tmp = tmp_path_factory.mktemp("fsdp")
    result = accelerate_launch("fsdp.yaml", tmp / "out", tmp, "--save-steps", "2")
    result["out"] = tmp / "out"
    return result


def test_fsdp_two_processes_match_one(single_process, fsdp_run):
    assert_same_training(fsdp_run, single_process, distributed_type="FSDP")
    # Sharded per decoder layer (the model's _no_split_modules), not as one flat group.
    assert set(fsdp_run["fsdp_groups"]) == {"", "peft_model.base_model.model.model.layers.0",
                                            "peft_model.base_model.model.model.layers.1"}, fsdp_run["fsdp_groups"]


def test_fsdp_checkpoint_resumes_to_the_uninterrupted_adapter(fsdp_run, tmp_path):
    checkpoint = fsdp_run["out"] / "trainer" / "checkpoint-2"
    assert checkpoints.is_complete(checkpoint)
    # The adapter alone, whole, in safetensors; no copy of the frozen base model in each checkpoint.
    assert not (checkpoint / "pytorch_model_fsdp.bin").exists()
    at_two = safetensors.torch.load_file(str(checkpoint / "adapter_model.safetensors"))
    assert all(not torch.equal(at_two[n], w) for n, w in fsdp_run["lora"].items())  # step 3 changed it

    out = tmp_path / "out"
    resumed = accelerate_launch("fsdp.yaml", out, tmp_path, "--resume", str(checkpoint))
    assert resumed["distributed_type"] == "DistributedType.FSDP"
    assert resumed["steps"] == [1, 2, 3] and resumed["loss"][-1] == fsdp_run["loss"][-1]
    for name, weight in fsdp_run["lora"].items():
        torch.testing.assert_close(resumed["lora"][name], weight, atol=0, rtol=0, msg=name)


def test_fsdp_adapter_loads_unsharded(single_process, fsdp_run):
    model = QAdapterModel.from_pretrained(fsdp_run["out"] / "adapter", base_model=tiny_causal_lm())
    loaded = peft.get_peft_model_state_dict(model.peft_model)
    assert loaded.keys() == fsdp_run["lora"].keys()
    for name, weight in fsdp_run["lora"].items():
        torch.testing.assert_close(loaded[name], weight, atol=0, rtol=0, msg=name)
    # The loaded adapter scores like the one trained in one process.
    batch = collate_pairs([PairDataset()[i] for i in range(2)])
    reference = QAdapterModel(tiny_causal_lm(), model.qadapter_config)
    peft.set_peft_model_state_dict(reference.peft_model, single_process["lora"])
    with torch.no_grad():
        got, want = model(**batch), reference(**batch)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (optional: pip install deepspeed; on CPU DS_BUILD_OPS=0)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process_and_resumes(single_process, tmp_path, stage):
    config = f"deepspeed_zero{stage}.yaml"
    trained = accelerate_launch(config, tmp_path / "out", tmp_path, "--save-steps", "2")
    assert_same_training(trained, single_process, distributed_type="DEEPSPEED")
    checkpoint = tmp_path / "out" / "trainer" / "checkpoint-2"
    assert checkpoints.is_complete(checkpoint)
    resumed = accelerate_launch(config, tmp_path / "resumed", tmp_path, "--resume", str(checkpoint))
    for name, weight in trained["lora"].items():
        torch.testing.assert_close(resumed["lora"][name], weight, atol=0, rtol=0, msg=name)


def test_qadapter_train_under_accelerate_launch(tmp_path):
    """The command line as docs/training.md launches it: one gloo group of 2, the folder claimed once."""
    model, data, out = tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "run"
    save_tiny_llama(model)
    write_pairs(data)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           "-m", "qadapter_cli", "train", "--data", str(data), "--output-dir", str(out),
           "--model", str(model), "--max-steps", "2", "--batch-size", "1", "--lora-r", "4", "--save-steps", "1",
           "--save-total-limit", "1", "--max-length", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("trained 2 steps") == 2, proc.stdout  # both processes ran the whole run
    checkpoint = out / "checkpoint-2"
    assert checkpoints.is_complete(checkpoint)
    # One RNG state per process: the two trained as one data-parallel group, not each alone.
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert json.loads((out / checkpoints.RUN_RECORD_NAME).read_text())["completed_steps"] == 2
    assert checkpoints.leftovers(out) == []
    QAdapterModel.from_pretrained(out)
