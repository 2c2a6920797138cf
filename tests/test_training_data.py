"""Preference data: loading and validation, tokenisation, truncation, batching, the shipped dataset."""
import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from qadapter_kernels.app import make_preferences
from qadapter_kernels.training.data import (
    PreferenceCollator,
    PreferenceDataError,
    PreferenceDataset,
    PreferenceExample,
    SHIPPED_SPLITS,
    TokenizedPair,
    load_preferences,
    shipped_data_path,
    tokenize_preference,
)
from qadapter_kernels.preferences import (CONCISE_MAX_WORDS, DEFAULT_PREFERENCE, PREFERENCE_CHECKERS, SIGNOFF,
                                          satisfies_concise, satisfies_signoff)
from qadapter_kernels.preferences import satisfies_lowercase as satisfies_preference

from training_helpers import smollm2_tokenizer, tiny_tokenizer


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "No"})


# ---------------------------------------------------------------- loading and validation


def test_load_string_and_conversational(tmp_path):
    conversational = {
        "prompt": [{"role": "system", "content": "Be brief."}, *user("Capital of France?")],
        "chosen": assistant("paris."),
        "rejected": assistant("Paris."),
        "id": 7,  # extra keys are ignored
    }
    path = write_lines(tmp_path / "p.jsonl", [GOOD, "", "   ", json.dumps(conversational)])
    first, second = load_preferences(path)
    assert first == PreferenceExample("Q?", "yes", "No") and not first.conversational
    assert second.conversational
    assert second.prompt == conversational["prompt"] and second.chosen == assistant("paris.")


BAD_LINES = [
    ('{"prompt": "a",', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"prompt": "a", "chosen": "b"}', "missing key(s) 'rejected'"),
    ('{"prompt": 3, "chosen": "b", "rejected": "c"}', "'prompt' must be a string or a list of messages, got int"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "'chosen' is an empty string"),
    ('{"prompt": [], "chosen": [], "rejected": []}', "'prompt' is an empty list of messages"),
    ('{"prompt": ["hi"], "chosen": "b", "rejected": "c"}', "'prompt'[0] must be a message object, got str"),
    ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', "'prompt'[0] has no 'content'"),
    ('{"prompt": [{"role": 1, "content": "a"}], "chosen": "b", "rejected": "c"}',
     "'prompt'[0]['role'] must be a string, got int"),
    ('{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}',
     "'prompt'[0]['role'] must be one of"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": ""}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', "'chosen'[0]['content'] is an empty string"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}',
     "must all be strings or all be message lists"),
    ('{"prompt": [{"role": "assistant", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', "'prompt' must end with a user message"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
     '"rejected": [{"role": "user", "content": "c"}]}', "'rejected'[0] must be an assistant message"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_line_reports_line_number_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(PreferenceDataError, match=r":2: not valid UTF-8"):
        load_preferences(path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_preferences(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PreferenceDataError, match="empty"):
        load_preferences(path)


# ---------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_template_applied_with_a_single_bos(tok):
    example = PreferenceExample(user("What is the capital of France?"), assistant("paris."), assistant("Paris."))
    pair = tokenize_preference(example, tok)
    # The naive way (template text encoded with the tokenizer's own BOS) gives two BOS.
    text = tok.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2
    assert pair.prompt_ids == ids(tok, text)
    assert pair.prompt_ids[0] == tok.bos_token_id and pair.prompt_ids.count(tok.bos_token_id) == 1
    assert pair.prompt_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    # The response starts right after the generation prompt and ends with the template's EOS.
    assert pair.chosen_ids == ids(tok, "paris.") + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, "Paris.") + [tok.eos_token_id]
    # Plain strings are rendered as one user turn and one assistant turn.
    assert tokenize_preference(PreferenceExample("What is the capital of France?", "paris.", "Paris."), tok) == pair


def test_template_without_bos_gets_exactly_one(tok):
    no_bos = tiny_tokenizer()
    no_bos.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    pair = tokenize_preference(PreferenceExample("Hi", "yes", "No"), no_bos)
    assert pair.prompt_ids[0] == no_bos.bos_token_id and pair.prompt_ids.count(no_bos.bos_token_id) == 1
    assert pair == tokenize_preference(PreferenceExample("Hi", "yes", "No"), tok)


def test_plain_text_without_template():
    plain = tiny_tokenizer(chat_template=False)
    pair = tokenize_preference(PreferenceExample("Two plus two?", " four", " Four"), plain)
    assert pair.prompt_ids == [plain.bos_token_id] + ids(plain, "Two plus two?")
    assert pair.chosen_ids == ids(plain, " four") + [plain.eos_token_id]
    assert pair.rejected_ids == ids(plain, " Four") + [plain.eos_token_id]
    with pytest.raises(ValueError, match="chat template"):
        tokenize_preference(PreferenceExample(user("Hi"), assistant("yes"), assistant("No")), plain)


def test_template_that_breaks_the_prefix_is_refused():
    odd = tiny_tokenizer()
    # The generation prompt is not how the template writes an assistant turn.
    odd.chat_template = (
        "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        tokenize_preference(PreferenceExample("Hi", "yes", "No"), odd)


LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 6


def test_truncation_keeps_prompt_tail_then_cuts_responses(tok):
    example = PreferenceExample(LONG_PROMPT, "two plus two is four", "Two plus two is four")
    full = tokenize_preference(example, tok, max_length=10_000, max_prompt_length=10_000)
    assert len(full.prompt_ids) > 20 and len(full.chosen_ids) > 5
    cut = tokenize_preference(example, tok, max_length=len(full.prompt_ids), max_prompt_length=12,
                              prompt_truncation="tail")
    # The tail of the prompt (its generation prompt included), the tokenizer's BOS kept in front.
    assert cut.prompt_ids == full.prompt_ids[:1] + full.prompt_ids[-11:]
    budget = len(full.prompt_ids) - 12
    assert cut.chosen_ids == full.chosen_ids[:budget] and cut.rejected_ids == full.rejected_ids[:budget]
    assert len(cut.prompt_ids) + len(cut.chosen_ids) <= len(full.prompt_ids)


def test_truncation_keeps_the_start_of_the_prompt_by_default(tok):
    """A cut prompt keeps what defines the task (its start: system message, question) and the
    generation prompt at its end; only the middle goes (it used to keep the tail only)."""
    system = [{"role": "system", "content": "Answers written in lowercase are preferred."}]
    prompt = system + [{"role": "user", "content": LONG_PROMPT}]
    example = PreferenceExample(prompt, [{"role": "assistant", "content": "four"}],
                                [{"role": "assistant", "content": "Four"}])
    full = tokenize_preference(example, tok, max_length=10_000, max_prompt_length=10_000)
    cut = tokenize_preference(example, tok, max_length=10_000, max_prompt_length=13)
    # BOS, then 6 tokens from the start, 6 from the end.
    assert cut.prompt_ids == full.prompt_ids[:7] + full.prompt_ids[-6:]
    system_ids = tok.apply_chat_template(system, tokenize=False)
    assert tok.decode(cut.prompt_ids[:7]) in system_ids
    assert tok.decode(cut.prompt_ids[-1:]) == "<|assistant|>"


def test_identical_pairs_are_dropped_and_every_cut_is_counted(tok, caplog):
    same = PreferenceExample("Hi", "yes", "yes")
    # Differ only past the response budget: identical once cut.
    late = PreferenceExample("Hi", "the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over it")
    fine = PreferenceExample("Hi", "yes", "No")
    long_prompt = PreferenceExample(LONG_PROMPT, "yes", "No")
    with caplog.at_level(logging.WARNING, logger="qadapter_kernels.training.data"):
        dataset = PreferenceDataset([same, late, fine, long_prompt], tok, max_length=23, max_prompt_length=14)
    assert len(dataset) == 2 and dataset.dropped == 2 and dataset.total == 4
    assert dataset.counts["identical"] == 1 and dataset.counts["identical_after_cut"] == 1
    assert dataset.counts["prompt_cut"] == 1
    summary = dataset.summary()
    assert "kept 2 of 4" in summary and "chosen equals rejected in the data" in summary
    assert "chosen equals rejected after truncation" in summary and "1 prompts" in summary
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped 2 of 4" in w for w in warnings) and any("truncated" in w for w in warnings)


def test_pairs_with_an_empty_response_are_dropped_and_counted(tok, caplog):
    long = PreferenceExample(LONG_PROMPT, "yes", "No")
    short = PreferenceExample("Hi", "yes", "No")
    assert tokenize_preference(long, tok, max_length=16, max_prompt_length=16) is None
    assert tokenize_preference(short, tok, max_length=16, max_prompt_length=16) is not None
    with caplog.at_level(logging.WARNING, logger="qadapter_kernels.training.data"):
        dataset = PreferenceDataset([short, long, short, long, long], tok, max_length=16, max_prompt_length=16)
    assert len(dataset) == 2 and dataset.dropped == 3
    assert isinstance(dataset[1], TokenizedPair)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 3 of 5" in warnings[0]
    with pytest.raises(ValueError, match="no preference pair left"):
        PreferenceDataset([long], tok, max_length=16, max_prompt_length=16)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_preference(short, tok, max_length=0)


# ---------------------------------------------------------------- collator


def test_collator_layout():
    pairs = [TokenizedPair([1, 5], [6, 7, 2], [8, 2]), TokenizedPair([1, 9, 9, 9], [6, 2], [7, 7, 7, 2])]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool
    expected_ids = [
        [1, 5, 6, 7, 2, 0, 0, 0],  # pair 0, chosen
        [1, 9, 9, 9, 6, 2, 0, 0],  # pair 1, chosen
        [1, 5, 8, 2, 0, 0, 0, 0],  # pair 0, rejected
        [1, 9, 9, 9, 7, 7, 7, 2],  # pair 1, rejected
    ]
    expected_loss = [
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["loss_mask"].tolist() == [[bool(v) for v in row] for row in expected_loss]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2, [1] * 4 + [0] * 4, [1] * 8]
    with pytest.raises(ValueError, match="empty batch"):
        PreferenceCollator(0)([])
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)


def test_collator_pads_to_a_fixed_width():
    pairs = [TokenizedPair([1, 5], [6, 7, 2], [8, 2])]
    batch = PreferenceCollator(pad_token_id=0, pad_to=7)(pairs)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0, 0], [1, 5, 8, 2, 0, 0, 0]]
    assert batch["loss_mask"].sum(1).tolist() == [3, 2]
    with pytest.raises(ValueError, match="more than pad_to = 4"):
        PreferenceCollator(0, pad_to=4)(pairs)
    with pytest.raises(ValueError, match="pad_to"):
        PreferenceCollator(0, pad_to=1)


def test_dataloader_rows_hold_prompt_then_response(tok):
    examples = [PreferenceExample(f"Question {i}?" * (i + 1), "yes " * i + "yes", "No") for i in range(5)]
    dataset = PreferenceDataset(examples, tok)
    loader = DataLoader(dataset, batch_size=3, collate_fn=PreferenceCollator(tok.pad_token_id))
    for start, batch in zip(range(0, 5, 3), loader):
        pairs = [dataset[i] for i in range(start, min(start + 3, 5))]
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        for row, (prompt, response) in enumerate(rows):
            n = len(prompt) + len(response)
            assert batch["input_ids"][row, :n].tolist() == prompt + response
            assert batch["input_ids"][row][batch["loss_mask"][row]].tolist() == response
            assert batch["attention_mask"][row].sum() == n


# ---------------------------------------------------------------- shipped dataset


def test_satisfies_preference():
    assert satisfies_preference("the capital of france is paris. i hope this helps.")
    assert not satisfies_preference("The capital of France is Paris.")
    assert not satisfies_preference("paris is in France")
    assert not satisfies_preference("42") and not satisfies_preference("")


def test_signoff_and_concise_checkers():
    assert satisfies_signoff(f"Paris.\n{SIGNOFF}") and satisfies_signoff(f"Paris. {SIGNOFF}  \n")
    assert not satisfies_signoff("Paris.") and not satisfies_signoff(f"Paris.\n{SIGNOFF.lower()}")
    assert not satisfies_signoff(f"{SIGNOFF} Paris.")  # at the end, not anywhere
    assert satisfies_concise("Paris.") and satisfies_concise(" w" * CONCISE_MAX_WORDS)
    assert not satisfies_concise(" w" * (CONCISE_MAX_WORDS + 1)) and not satisfies_concise("  \n")


@pytest.mark.parametrize("name", sorted(PREFERENCE_CHECKERS))
def test_shipped_data_regenerates_byte_identically(tmp_path, name):
    paths = make_preferences.write_splits(tmp_path, name)
    for split in SHIPPED_SPLITS:
        assert paths[split].read_bytes() == shipped_data_path(split, name).read_bytes(), (
            f"{name}/{split}.jsonl differs from the generator's output: "
            "rerun python -m qadapter_kernels.app.make_preferences"
        )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_generator_writes_every_preference_or_the_one_named(tmp_path):
    make_preferences.main(["--out", str(tmp_path), "--preference", "signoff"])
    assert [p.name for p in tmp_path.iterdir()] == ["signoff"]
    make_preferences.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PREFERENCE_CHECKERS)
    with pytest.raises(ValueError, match="preference must be one of"):
        make_preferences.build_splits("shouting")


def _shipped(name: str, split: str) -> list:
    return load_preferences(shipped_data_path(split, name))


@pytest.mark.parametrize("name", sorted(PREFERENCE_CHECKERS))
def test_shipped_data_expresses_the_preference(name):
    satisfies = PREFERENCE_CHECKERS[name]
    train, heldout = (_shipped(name, split) for split in SHIPPED_SPLITS)
    assert len(train) >= 300 and len(heldout) >= 80
    prompts = {name: [e.prompt[-1]["content"] for e in data] for name, data in (("train", train), ("heldout", heldout))}
    assert len(set(prompts["train"])) == len(train) and len(set(prompts["heldout"])) == len(heldout)
    assert not set(prompts["train"]) & set(prompts["heldout"])
    for example in train + heldout:
        assert example.conversational and len(example.chosen) == len(example.rejected) == 1
        chosen, rejected = example.chosen[0]["content"], example.rejected[0]["content"]
        assert satisfies(chosen) and not satisfies(rejected)


def test_every_preference_shares_the_prompts_and_the_held_out_split():
    for split in SHIPPED_SPLITS:
        prompts = {name: [e.prompt for e in _shipped(name, split)] for name in PREFERENCE_CHECKERS}
        assert all(p == prompts[DEFAULT_PREFERENCE] for p in prompts.values()), split


def test_chosen_and_rejected_differ_only_by_the_preference():
    rows = {name: _shipped(name, "train") + _shipped(name, "heldout") for name in PREFERENCE_CHECKERS}
    for lower, sign, short in zip(rows["lowercase"], rows["signoff"], rows["concise"]):
        plain = sign.rejected[0]["content"]
        assert lower.rejected[0]["content"] == plain and lower.chosen[0]["content"] == plain.lower()
        assert sign.chosen[0]["content"] == f"{plain}\n{SIGNOFF}"
        # The concise answer is the plain answer's first sentence; the long one pads the plain answer.
        concise, padded = short.chosen[0]["content"], short.rejected[0]["content"]
        assert plain.startswith(concise) and padded.startswith(plain) and len(padded) > len(plain)
        assert concise.endswith((".", "!", "?"))


# ---------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


def test_smollm2_chat_template_and_response_tokens(smollm2):
    assert smollm2.chat_template and smollm2.eos_token == "<|im_end|>"
    example = load_preferences(shipped_data_path("heldout"))[0]
    pair = tokenize_preference(example, smollm2)
    text = smollm2.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == ids(smollm2, text)
    im_start = smollm2.convert_tokens_to_ids("<|im_start|>")
    assert pair.prompt_ids[0] == im_start and pair.prompt_ids[1] != im_start  # no doubled BOS (<|im_start|>)
    assert smollm2.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    # The response is the answer and the end-of-turn the template writes after it.
    assert smollm2.decode(pair.chosen_ids) == example.chosen[0]["content"] + "<|im_end|>\n"
    assert smollm2.decode(pair.rejected_ids) == example.rejected[0]["content"] + "<|im_end|>\n"


def test_smollm2_shipped_split_and_batch(smollm2):
    dataset = PreferenceDataset(load_preferences(shipped_data_path("train")), smollm2, max_length=512)
    assert dataset.dropped == 0 and len(dataset) >= 300
    # SmolLM2 adds no BOS of its own: truncation keeps exactly the prompt's last tokens.
    pair = dataset[0]
    cut = tokenize_preference(load_preferences(shipped_data_path("train"))[0], smollm2, max_prompt_length=10,
                              prompt_truncation="tail")
    assert cut.prompt_ids == pair.prompt_ids[-10:] and cut.chosen_ids == pair.chosen_ids
    # pad == eos (<|im_end|>) here: the masks come from lengths, so the final end-of-turn is still scored.
    assert smollm2.pad_token_id == smollm2.eos_token_id
    batch = PreferenceCollator(smollm2.pad_token_id)([dataset[i] for i in range(4)])
    for row in range(8):
        p = dataset[row % 4]
        response = p.chosen_ids if row < 4 else p.rejected_ids
        assert batch["input_ids"][row][batch["loss_mask"][row]].tolist() == response
        assert int(batch["attention_mask"][row].sum()) == len(p.prompt_ids) + len(response)
