"""The cached base pass: the op's ``base_lse`` input, the cache file, and the trainer with the cache.

1. ``fused_linear_qadapter_loss(base_lse=...)``: one head product per tile on h_c. Oracle: the
   reference loss on materialised logits of both streams (``test_fused_linear.reference_fused``),
   on every backend, dtype, with and without bias; the given LSE is the one used; bad input.
2. The cache: its key (a change of any component rebuilds, LoRA training does not), its size
   line and limit, atomic writes, the file is plain safetensors.
3. Training: losses and LoRA gradients equal to the uncached step's (fp32, relative 1e-6);
   the Trainer with gradient accumulation, with resume, and with 2 gloo processes.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import qadapter_kernels as qk
from qadapter_kernels import reference
from qadapter_kernels.training import base_cache
from qadapter_kernels.training.data import PreferenceCollator, PreferenceDataset, PreferenceExample
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from qadapter_kernels.training.trainer import QAdapterTrainer

from helpers import assert_close
from test_fused_linear import TINY_BUDGET_MB, cast_problem, compare, make_problem, reference_fused, run
from test_training_distributed import assert_same_training, cpu_env, free_port
from training_helpers import tiny_tokenizer

ops = torch.ops.qadapter
KEYWORDS = dict(alpha_tilde=0.875, alpha_0=0.25, gamma=0.9375, beta=0.375)  # fp32-exact, away from the defaults


def true_lse(p, dtype=torch.float64) -> torch.Tensor:
    """LSE(base_hidden @ W.T + b) per position, in fp64: what a cached base pass records."""
    bias = None if p.bias is None else p.bias.to(dtype)
    return torch.logsumexp(F.linear(p.base_hidden.to(dtype), p.weight.to(dtype), bias), -1)


# --------------------------------------------------------------------------- 1. the op input


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("seed", [0, 1])
def test_base_lse_matches_two_stream_reference(backend, dtype, bias, seed):
    if backend != "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16: the torch backend rounds its logits to bf16 and the interpreter is slow; C++ only")
    p = cast_problem(make_problem(2, 9, 12, 37, seed=seed, bias=bias), dtype)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    base_lse = true_lse(p).to(ref_dtype)
    out, grads = run(qk.fused_linear_qadapter_loss, p, dtype=dtype, backend=backend, tile_budget_mb=TINY_BUDGET_MB,
                     base_lse=base_lse, **KEYWORDS)
    ref, ref_grads = run(reference_fused, p, dtype=ref_dtype, **KEYWORDS)
    compare(out, grads, ref, ref_grads, dtype, what=f"{backend} base_lse")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_the_given_base_lse_is_the_one_used(backend):
    """An LSE off by a per-position shift moves each value by -alpha_0 * shift, as the reference says."""
    p = make_problem(2, 8, 10, 29, seed=3, bias=True)
    shift = torch.linspace(-2.0, 3.0, p.input_ids.numel()).view(p.input_ids.shape)
    base_lse = (true_lse(p) + shift).float()
    out = qk.fused_linear_qadapter_loss(p.adapter_hidden, p.base_hidden, p.weight, p.input_ids, p.loss_mask,
                                        lm_head_bias=p.bias, backend=backend, base_lse=base_lse, **KEYWORDS)
    logits = lambda h: F.linear(h, p.weight, p.bias)  # noqa: E731
    actions = reference.next_token_actions(p.input_ids)
    values, q_taken = reference.residual_q_values(logits(p.adapter_hidden), logits(p.base_hidden), actions,
                                                  base_lse=base_lse, alpha_tilde=0.875, alpha_0=0.25)
    want = reference.pair_loss(values, q_taken, p.loss_mask, **KEYWORDS)
    assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6, what="loss")
    plain = qk.fused_linear_qadapter_loss(p.adapter_hidden, p.base_hidden, p.weight, p.input_ids, p.loss_mask,
                                          lm_head_bias=p.bias, backend=backend, **KEYWORDS)
    assert (out.loss - plain.loss).abs() > 1e-3  # the shift mattered


def test_base_lse_flat_layout_and_out_of_range_action_with_checks_off(monkeypatch):
    p = make_problem(1, 6, 8, 17, seed=4)
    base_lse = true_lse(p).float().reshape(-1)
    ids = p.input_ids.clone()
    ids[0, 3] = 999  # the action of position 2
    rows, T = ids.shape
    ha, hb = p.adapter_hidden.reshape(rows * T, -1), p.base_hidden.reshape(rows * T, -1)
    actions = reference.next_token_actions(ids).reshape(-1)
    values, q_taken, _, _ = ops.fused_linear_residual_q_values(ha, hb, p.weight, None, actions, 0.875, 0.25, 2, 5,
                                                              False, base_lse)
    assert torch.isnan(q_taken[2]) and torch.isfinite(q_taken[torch.arange(rows * T) != 2]).all()
    assert torch.isfinite(values).all()
    with pytest.raises(ValueError, match="input_ids"):
        qk.fused_linear_qadapter_loss(ha, hb, p.weight, ids, p.loss_mask, base_lse=base_lse)


@pytest.mark.parametrize("bad, message", [
    (lambda lse: lse[:, :-1], "base_lse must be"),
    (lambda lse: lse.long(), "base_lse"),
    (lambda lse: lse.reshape(-1)[:-1], "base_lse must be"),
    (lambda lse: torch.where(lse > lse.mean(), float("nan"), lse), "base_lse holds NaN"),
    (lambda lse: torch.where(lse > lse.mean(), float("inf"), lse), "base_lse holds NaN"),
    (lambda lse: [1.0], "base_lse"),
])
def test_bad_base_lse_is_a_value_error_naming_it(bad, message):
    p = make_problem(1, 6, 8, 17, seed=5)
    with pytest.raises((ValueError, TypeError), match=message):
        qk.fused_linear_qadapter_loss(p.adapter_hidden, p.base_hidden, p.weight, p.input_ids, p.loss_mask,
                                      base_lse=bad(true_lse(p).float()))


@pytest.mark.parametrize("launcher", ["dispatcher", "triton"])
def test_direct_op_call_with_missized_base_lse_names_it(launcher):
    from qadapter_kernels.ops import fused_linear as fused_linear_ops

    gen = torch.Generator().manual_seed(0)
    ha, hb, w = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(11, 4, generator=gen)
    actions = torch.zeros(6, dtype=torch.long)
    args = (ha, hb, w, None, actions, 0.9, 0.2, 2, 4, False, torch.zeros(5))
    forward = ops.fused_linear_residual_q_values if launcher == "dispatcher" else fused_linear_ops.fused_linear_rows
    with pytest.raises((ValueError, RuntimeError), match="base_lse"):
        if launcher == "dispatcher":
            forward(*args)
        else:
            forward(*args[:10], via_dispatcher=False, base_lse=args[10])


def _op_args(*, bias, w_grad, ha_grad=True, n=10, hidden=7, vocab=23, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    ha = torch.randn(n, hidden, generator=gen, dtype=dtype).requires_grad_(ha_grad)
    hb = torch.randn(n, hidden, generator=gen, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_(w_grad)
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_(w_grad) if bias else None
    actions = torch.randint(0, vocab, (n,), generator=gen)
    lse = torch.logsumexp(F.linear(hb, w.detach(), None if b is None else b.detach()), -1)
    return (ha, hb, w, b, actions, 0.9, 0.2, 3, 5, ha_grad, lse)


@pytest.mark.parametrize("bias, w_grad", [(False, False), (True, True), (False, True)])
def test_opcheck_with_base_lse(bias, w_grad):
    torch.library.opcheck(ops.fused_linear_residual_q_values, _op_args(bias=bias, w_grad=w_grad))


def test_op_with_base_lse_equals_the_two_stream_op_including_grad_w():
    """Same values, q_taken, grad(adapter_hidden), grad(W), grad(b) as the op without base_lse (fp64)."""
    args = _op_args(bias=True, w_grad=True)
    results = []
    for with_lse in (False, True):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args]
        if not with_lse:
            leaves[-1] = None
        values, q_taken, _, _ = ops.fused_linear_residual_q_values(*leaves)
        (values * torch.linspace(-1, 1, values.numel(), dtype=values.dtype) + q_taken.sin()).sum().backward()
        results.append((values, q_taken, leaves[0].grad, leaves[2].grad, leaves[3].grad))
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- a tiny model and data

PROMPTS = ["What is the capital of France?", "What is two plus two?", "Say something.", "Name a fox."]


def examples(variant: int = 0) -> list[PreferenceExample]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        chosen = f"the answer is number {i} in lowercase" + " ok" * (i + variant)
        rejected = f"THE ANSWER IS {i}" + "!" * (2 * i + 1)
        out.append(PreferenceExample(prompt, chosen, rejected))
    return out


def tiny_causal_lm(tokenizer, seed=0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
               initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)
    cfg.update(config)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def tiny_qadapter(tokenizer, seed=0, **config) -> QAdapterModel:
    model = QAdapterModel(tiny_causal_lm(tokenizer, seed, **config), QAdapterConfig(lora_dropout=0.0, **KEYWORDS))
    gen = torch.Generator().manual_seed(seed + 1)  # LoRA B starts at zero: make the adapter matter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def dataset(tokenizer, variant=0, max_length=64, max_prompt_length=32):
    return PreferenceDataset(examples(variant), tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


def build(model, pairs, tokenizer, cache_dir, **kwargs):
    lines = []
    cache = base_cache.open_or_build(model, pairs, tokenizer=tokenizer, tokenization=pairs.tokenization,
                                     cache_dir=cache_dir, log=lines.append, batch_size=3, **kwargs)
    return cache, lines


def built(lines) -> bool:
    """Whether the call computed the cache (its size line is printed before a build)."""
    return any(line.startswith("base cache: ") and " GB -> " in line for line in lines)


# --------------------------------------------------------------------------- 2. the cache


def test_cache_file_is_plain_safetensors_with_the_positions_the_loss_reads(tokenizer, tmp_path):
    model = tiny_qadapter(tokenizer)
    pairs = dataset(tokenizer)
    cache, lines = build(model, pairs, tokenizer, tmp_path)
    assert built(lines) and lines[0].index("GB") < len(lines[0])
    tensors = safetensors.torch.load_file(str(cache.path))  # the reference reader accepts our streamed file
    lengths = base_cache.row_lengths(pairs)
    assert tensors["hidden"].shape == (sum(lengths), 32) and tensors["lse"].shape == (sum(lengths),)
    assert tensors["row_offsets"].tolist() == torch.tensor([0, *lengths]).cumsum(0).tolist()
    # Row 1 (pair 0, rejected) against an uncached base pass of that row alone.
    pair = pairs[0]
    ids = torch.tensor([pair.prompt_ids + pair.rejected_ids])
    with torch.no_grad(), model.peft_model.disable_adapter():
        hidden = model.final_hidden_states(ids, torch.ones_like(ids))[0]
    start, stop = base_cache.cached_span(len(pair.prompt_ids), len(pair.rejected_ids))
    got_hidden, got_lse = cache.row(1)
    torch.testing.assert_close(got_hidden, hidden[start:stop], rtol=1e-5, atol=1e-6)
    want_lse = torch.logsumexp(model.lm_head(hidden[start:stop]).double(), -1).float()
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_reused_when_nothing_changed_and_after_lora_training(tokenizer, tmp_path):
    model = tiny_qadapter(tokenizer)
    pairs = dataset(tokenizer)
    first, lines = build(model, pairs, tokenizer, tmp_path)
    assert built(lines)
    with torch.no_grad():  # training the adapter does not touch what the cache holds
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    second, lines = build(model, pairs, tokenizer, tmp_path)
    assert not built(lines) and lines == [f"base cache: reusing {first.path}"] and second.path == first.path


def _perturb_weight(model, tokenizer, pairs):
    with torch.no_grad():
        model.base_causal_lm.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    return model, pairs, tokenizer


def _other_config(model, tokenizer, pairs):
    return tiny_qadapter(tokenizer, rms_norm_eps=1e-5), pairs, tokenizer


def _other_dtype(model, tokenizer, pairs):
    return model.double(), pairs, tokenizer


def _other_data(model, tokenizer, pairs):
    return model, dataset(tokenizer, variant=1), tokenizer


def _other_max_length(model, tokenizer, pairs):
    return model, dataset(tokenizer, max_length=12, max_prompt_length=8), tokenizer


def _other_tokenizer(model, tokenizer, pairs):
    other = tiny_tokenizer(vocab_size=300)
    return model, dataset(other), other


@pytest.mark.parametrize("change", [_perturb_weight, _other_config, _other_dtype, _other_data, _other_max_length,
                                    _other_tokenizer])
def test_a_change_of_any_key_component_rebuilds(tokenizer, tmp_path, change):
    model = tiny_qadapter(tokenizer)
    pairs = dataset(tokenizer)
    first, lines = build(model, pairs, tokenizer, tmp_path)
    model, pairs, other_tokenizer = change(model, tokenizer, pairs)
    second, lines = build(model, pairs, other_tokenizer, tmp_path)
    assert built(lines), lines
    assert second.path != first.path and second.key != first.key


def test_a_file_whose_key_differs_is_rebuilt_never_reused(tokenizer, tmp_path):
    """A stale file under the right name (tampered, or a digest collision) is detected from the key it holds."""
    model = tiny_qadapter(tokenizer)
    pairs = dataset(tokenizer)
    cache, _ = build(model, pairs, tokenizer, tmp_path)
    tensors = safetensors.torch.load_file(str(cache.path))
    key = dict(cache.key, weights="0" * 40)
    safetensors.torch.save_file(tensors, str(cache.path), metadata={"format": base_cache.FORMAT,
                                                                    "key": json.dumps(key, sort_keys=True)})
    _, lines = build(model, pairs, tokenizer, tmp_path)
    assert lines[0] == f"base cache: rebuilding {cache.path} (its key differs in weights)" and built(lines)
    cache.path.write_bytes(b"not a safetensors file")
    _, lines = build(model, pairs, tokenizer, tmp_path)
    assert lines[0].startswith(f"base cache: rebuilding {cache.path} (unreadable") and built(lines)
    assert base_cache.BaseCache(cache.path).key == cache.key


def test_size_is_printed_and_the_limit_refuses_a_cache_that_does_not_fit(tokenizer, tmp_path):
    model = tiny_qadapter(tokenizer)
    pairs = dataset(tokenizer)
    positions = sum(base_cache.row_lengths(pairs))
    size = positions * 32 * 4 + positions * 4 + (2 * len(pairs) + 1) * 8
    lines = []
    with pytest.raises(base_cache.BaseCacheTooLarge, match=r"base_cache_max_gb = 1e-06 \(--cache-max-gb\)"):
        base_cache.open_or_build(model, pairs, cache_dir=tmp_path, max_gb=1e-6, log=lines.append)
    assert lines == [f"base cache: 4 pairs, {positions} positions x 32 (float32) = {size / 1e9:.3f} GB -> "
                     f"{tmp_path / lines[0].rsplit('/', 1)[-1]}"]
    assert list(tmp_path.iterdir()) == []
    for bad in (0, -1.0, "1", True):
        with pytest.raises(ValueError, match="base_cache_max_gb"):
            base_cache.open_or_build(model, pairs, cache_dir=tmp_path, max_gb=bad)


def test_an_interrupted_build_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    model = tiny_qadapter(tokenizer)
    pairs = dataset(tokenizer)
    calls = []
    original = model.final_hidden_states

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(model, "final_hidden_states", failing)
    with pytest.raises(KeyboardInterrupt):
        build(model, pairs, tokenizer, tmp_path)
    assert list(tmp_path.iterdir()) == [] and model.training


# --------------------------------------------------------------------------- 3. training


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("variant", ["bellman", "official", "advantage"])
def test_cached_step_equals_uncached_loss_and_lora_gradients(tokenizer, tmp_path, variant):
    """fp32, relative 1e-6: the loss outputs and every LoRA gradient of one step, with and without the cache."""
    model = tiny_qadapter(tokenizer)
    model.qadapter_config = QAdapterConfig(lora_dropout=0.0, variant=variant, **KEYWORDS)
    pairs = dataset(tokenizer)
    cache, _ = build(model, pairs, tokenizer, tmp_path)
    items = [base_cache.CachedBaseDataset(pairs, cache)[i] for i in (2, 0, 3)]
    batch = base_cache.CachedBaseCollator(PreferenceCollator(tokenizer.pad_token_id))(items)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora
    results = {}
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        columns = ("input_ids", "attention_mask", "loss_mask") + (("base_hidden", "base_lse") if cached else ())
        out = model(**{k: batch[k] for k in columns})
        out.loss.backward()
        results[cached] = out, [p.grad.clone() for p in lora]
    (want, want_grads), (got, got_grads) = results[False], results[True]
    for field in ("loss", "pref_loss", "reg_loss", "chosen_scores", "rejected_scores"):
        assert relative_error(getattr(got, field), getattr(want, field)) <= 1e-6, field
    for g, w in zip(got_grads, want_grads):
        assert w.abs().max() > 0 and relative_error(g, w) <= 1e-6


def test_model_needs_both_cached_columns(tokenizer):
    model = tiny_qadapter(tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset(tokenizer)[0]])
    with pytest.raises(ValueError, match="base_hidden and base_lse come together"):
        model(**batch, base_hidden=torch.zeros(*batch["input_ids"].shape, 32))


def train(tokenizer, out: Path, *, cache_dir=None, steps=2, resume=None, save_steps=None):
    model = tiny_qadapter(tokenizer)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        train_sampling_strategy="sequential", use_cpu=True, report_to=[], seed=0, disable_tqdm=True,
        remove_unused_columns=False)
    # The trainer reads these three settings (QAdapterTrainingArguments declares them).
    args.precompute_base, args.base_cache_dir, args.base_cache_max_gb = cache_dir is not None, cache_dir, None
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=dataset(tokenizer),
                              data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return lora, [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_trainer_with_cache_and_gradient_accumulation_trains_like_without(tokenizer, tmp_path, capsys):
    want, want_losses = train(tokenizer, tmp_path / "plain")
    got, got_losses = train(tokenizer, tmp_path / "cached", cache_dir=tmp_path / "cache")
    assert "base cache: 4 pairs" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_the_cache_reuses_it_and_ends_where_an_uninterrupted_run_does(tokenizer, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    want, _ = train(tokenizer, tmp_path / "whole", cache_dir=cache_dir, steps=2)
    train(tokenizer, tmp_path / "cut", cache_dir=cache_dir, steps=2, save_steps=1)
    capsys.readouterr()
    # Stands in for a run killed after its first checkpoint: resume from it.
    got, _ = train(tokenizer, tmp_path / "cut", cache_dir=cache_dir, steps=2,
                   resume=str(tmp_path / "cut" / "checkpoint-1"))
    out = capsys.readouterr().out
    assert "base cache: reusing" in out and " GB -> " not in out
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


SCRIPT = Path(__file__).resolve().parent / "distributed_train_script.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
def test_two_gloo_processes_share_one_cache_and_train_like_one_uncached_process(tmp_path):
    runs = {}
    for name, launch in (("single", [sys.executable, str(SCRIPT)]),
                         ("ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--master_port", str(free_port()), str(SCRIPT)])):
        out = tmp_path / name
        cmd = [*launch, str(out), "--batch", "2" if name == "single" else "1"]
        if name == "ddp":
            cmd += ["--cache-dir", str(tmp_path / "cache")]
        proc = subprocess.run(cmd, cwd=SCRIPT.parents[1], env=cpu_env(tmp_path), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        result = json.loads((out / "result.json").read_text())
        result["lora"] = safetensors.torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))
        result["lora_initial"] = safetensors.torch.load_file(str(out / "lora_initial.safetensors"))
        runs[name] = result, proc.stdout
    assert_same_training(runs["ddp"][0], runs["single"][0])
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one shared file, built once
    assert runs["ddp"][1].count(" GB -> ") == 1


# --------------------------------------------------------------------------- 4. the command line


def test_cli_cache_base_trains_and_a_second_run_reuses_the_cache(tmp_path, capsys):
    from qadapter_kernels.app.cli import main
    from cli_helpers import save_tiny_llama, write_pairs

    model_dir, data = tmp_path / "model", tmp_path / "pairs.jsonl"
    save_tiny_llama(model_dir)
    write_pairs(data)
    argv = ["train", "--data", str(data), "--model", str(model_dir), "--max-steps", "1", "--batch-size", "2",
            "--cache-base", "--cache-dir", str(tmp_path / "cache"), "--cache-max-gb", "1"]
    assert main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    assert "base cache: 4 pairs" in capsys.readouterr().out
    assert main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
    assert "base cache: reusing" in capsys.readouterr().out


def test_cli_cache_errors_are_one_line(tmp_path, capsys):
    from cli_helpers import run_error, save_tiny_llama, write_pairs

    model_dir, data = tmp_path / "model", tmp_path / "pairs.jsonl"
    save_tiny_llama(model_dir)
    write_pairs(data)
    argv = ["train", "--data", str(data), "--model", str(model_dir), "--max-steps", "1"]
    err = run_error(capsys, [*argv, "--output-dir", str(tmp_path / "a"), "--cache-base", "--cache-dir",
                             str(tmp_path / "cache"), "--cache-max-gb", "1e-9"])
    assert "more than base_cache_max_gb = 1e-09 (--cache-max-gb)" in err
    err = run_error(capsys, [*argv, "--output-dir", str(tmp_path / "b"), "--cache-max-gb", "2"])
    assert "--cache-max-gb and --cache-dir need --cache-base" in err
