"""The lm-evaluation-harness model ``qadapter``: a Q-Adapter's customised policy, or its base model alone.

    lm_eval run --model qadapter --model_args adapter=DIR --tasks qadapter_retention
    lm_eval run --model qadapter --model_args base_model=PATH --tasks qadapter_retention   # base only

lm-eval 0.4.13 discovers no plug-ins: importing this module registers the class (that is what
``python3 -m qadapter_kernels.evaluation.lm_eval_cli`` does before running lm-eval's own command
line). From Python, pass an instance: ``lm_eval.simple_evaluate(model=QAdapterLM(model=m, tokenizer=t))``.
Log-likelihoods and greedy generations come from ``PolicyScorer`` (one mixed-batch forward, one
head product; the fused combined-policy sampler for generation).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..loading import load_model_and_tokenizer, load_tokenizer
from ..prompts import FORMAT_CHAT_TEMPLATES
from .policy_scoring import PolicyScorer

__all__ = ["QAdapterLM"]

eval_logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


def _as_bool(name: str, value) -> bool:
    # lm-eval's --model_args parser turns "true"/"false" into bools, but a dict from Python may carry strings.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _as_int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _load_qadapter(adapter: str | None, base_model: str | None):
    """(QAdapterModel, tokenizer) from an adapter folder, or a fresh (unused) adapter on ``base_model``."""
    from ..training import QAdapterConfig, QAdapterModel

    if adapter is not None:
        model = QAdapterModel.from_pretrained(adapter, base_model=base_model)
        has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
        return model, load_tokenizer(Path(adapter) if has_tokenizer else Path(model.qadapter_config.base_model))
    # Base only: the LoRA B of a fresh adapter is zero and the scorer runs with the adapter off anyway.
    causal_lm, tokenizer = load_model_and_tokenizer(base_model)
    return QAdapterModel(causal_lm, QAdapterConfig(base_model=str(base_model))), tokenizer


@register_model("qadapter")
class QAdapterLM(TemplateLM):
    """lm-eval model over a ``QAdapterModel``.

    ``--model_args``: ``adapter=DIR`` (a folder of ``QAdapterModel.save_pretrained``; its base model
    is the recorded one unless ``base_model=PATH``), or ``base_model=PATH`` alone for the base model
    (adapter off), or ``adapter=DIR,use_adapter=false`` for the base model under that adapter's folder.
    ``batch_size`` (rows per forward), ``max_length`` (tokens; the context is cut on the left),
    ``max_gen_toks`` (default for generation). From Python: ``model=`` a ``QAdapterModel`` and
    ``tokenizer=``.
    """

    def __init__(self, adapter: str | None = None, base_model: str | None = None, *, model=None, tokenizer=None,
                 use_adapter: bool | str = True, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: str | None = None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"unknown qadapter model_args: {sorted(unused)}")
        use_adapter = _as_bool("use_adapter", use_adapter)
        if model is not None:
            if adapter is not None or base_model is not None:
                raise ValueError("pass either model= (with tokenizer=) or adapter=/base_model=, not both")
            if tokenizer is None:
                raise ValueError("model= needs tokenizer=")
        elif adapter is None and base_model is None:
            raise ValueError("qadapter needs adapter=DIR (a saved Q-Adapter) or base_model=PATH (base model only)")
        else:
            if adapter is None:
                use_adapter = False
            model, tokenizer = _load_qadapter(adapter, base_model)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda by default; its own HF model falls back the same way.
            eval_logger.warning("qadapter: CUDA is not available, evaluating on the CPU")
        elif device is not None:
            model.to(device)
        if batch_size == "auto" or isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 8  # no memory probing on CPU; lm-eval's "auto" means "pick one"
        if max_length is None:
            max_length = int(getattr(model.base_causal_lm.config, "max_position_embeddings", 2048))
        self.tokenizer = tokenizer
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.scorer = PolicyScorer(model, tokenizer, adapter=use_adapter, batch_size=_as_int("batch_size", batch_size),
                                   max_length=_as_int("max_length", max_length))
        self._device = self.scorer.device

    # ------------------------------------------------------------------ tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is conditioned on BOS where the tokenizer has one (as lm-eval's HF model does).
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "qadapter")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # A chat-templated context already starts with the BOS text: do not add a second one.
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # In the prompt format the adapter was trained on (HH dialogue, plain text), else the tokenizer's template.
        trained = getattr(self.scorer.model.qadapter_config, "prompt_format", None)
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  chat_template=FORMAT_CHAT_TEMPLATES.get(trained),
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.scorer.continuation_logprobs([(context, continuation) for _, context, continuation in requests])
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood (perplexity tasks), in windows of ``max_length`` tokens."""
        pairs, owners = [], []
        window = self.scorer.max_length
        for i, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            # Each window is scored given everything before it within max_length, starting from the prefix token.
            for start in range(0, len(tokens), window):
                context = ([self.prefix_token_id] + tokens)[max(0, start + 1 - window):start + 1]
                pairs.append((context, tokens[start:start + window]))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.scorer.continuation_logprobs(pairs)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers (the only decoding lm-eval's scored tasks ask for); ``do_sample=True`` is refused."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.pop("do_sample", False) or float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError("the qadapter model decodes greedily only: set do_sample: false, temperature: 0")
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            settings.append((context, until))
            groups.setdefault((tuple(until), max_toks), []).append(i)
        outputs: list[str | None] = [None] * len(requests)
        for (until, max_toks), members in groups.items():
            prompts = [self.tok_encode(settings[i][0]) for i in members]
            for i, text in zip(members, self.scorer.greedy(prompts, max_new_tokens=max_toks, stop_strings=until)):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs
