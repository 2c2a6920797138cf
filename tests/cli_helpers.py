"""What the command-line tests share: a tiny random Llama saved to disk with the locally trained
tokenizer, a small preference file, and the check of a one-line error."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels.app.cli import main
from training_helpers import tiny_tokenizer

PAIRS = [
    ("What is the capital of France?", "the capital of france is paris.", "The capital of France is Paris."),
    ("What is two plus two?", "two plus two is four.", "Two plus two is four."),
    ("Name a fast animal.", "the quick brown fox.", "The quick brown fox."),
    ("Describe the dog.", "the lazy dog sleeps.", "The lazy dog sleeps."),
]


def save_tiny_llama(folder, hidden_size: int = 64, seed: int = 0) -> None:
    """A 2-layer random Llama plus the locally trained tokenizer, saved with save_pretrained."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_pairs(path, pairs=PAIRS) -> None:
    lines = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def run_error(capsys, argv) -> str:
    """Runs ``qadapter ARGV``, which must fail as a user error: exit 2, one line ``qadapter CMD: error: ...``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"qadapter {argv[0]}: error: "), err
    return lines[0]
