"""What the forgetting benchmark and the forgetting study share: the models they train and how a method is trained.

- ``quick_model_and_tokenizer``: a tiny random Llama with a tokenizer trained on the shipped text (``--quick``);
- ``FreshModels``: a fresh copy of the base model per run;
- ``train_policy``: one method (base, SFT, DPO or Q-Adapter) under one ``TrainingBudget``, timed;
- ``linear_module_names``: the names of a model's linear layers (LoRA "on all linear layers").
"""
from __future__ import annotations

import copy
import time

import torch


def quick_model_and_tokenizer(texts: list[str]):
    """A tiny random Llama and a byte-level BPE tokenizer trained on ``texts``, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + "
                               "eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return model, tokenizer


class FreshModels:
    """Hands out fresh copies of the base model (each method injects its own LoRA into the one it gets)."""

    def __init__(self, model):
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # a GGUF-loaded model's marker; the weights are fp32 already
            del config.quantization_config
        self._config, self._cls = config, type(model)
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def get(self):
        model = self._cls(self._config)
        model.load_state_dict(self._state)
        return model.eval()


def linear_module_names(causal_lm) -> tuple[str, ...]:
    """The distinct names of the decoder's ``nn.Linear`` layers (the output head left out)."""
    names = {name.rsplit(".", 1)[-1] for name, module in causal_lm.named_modules()
             if isinstance(module, torch.nn.Linear) and "lm_head" not in name}
    return tuple(sorted(names))


def train_policy(method: str, settings: dict, fresh: FreshModels, tokenizer, examples, budget,
                 target_modules: tuple[str, ...] | None = None):
    """(the trained policy as a ``QAdapterModel``, wall seconds of training) of one method on a fresh base model.

    ``method``: ``base`` (no training), ``sft``, ``dpo`` (``settings["beta"]``) or ``qadapter`` (``settings``
    are ``QAdapterConfig`` fields). ``target_modules``: the LoRA's layers (None: ``QAdapterConfig``'s).
    """
    from qadapter_kernels.baselines import train_baseline, train_qadapter
    from qadapter_kernels.training import QAdapterConfig, QAdapterModel

    causal_lm = fresh.get()
    if method == "base":
        return QAdapterModel(causal_lm, QAdapterConfig()), 0.0
    lora = {} if target_modules is None else {"target_modules": tuple(target_modules)}
    start = time.perf_counter()  # training only: building the model copy is not part of a method's cost
    if method == "qadapter":
        model = train_qadapter(causal_lm, tokenizer, examples, QAdapterConfig(**settings, **lora), budget)
    else:
        model = train_baseline(method, causal_lm, tokenizer, examples, lora=QAdapterConfig(**lora), budget=budget,
                               dpo_beta=settings.get("beta", 0.1))
    return model, time.perf_counter() - start
