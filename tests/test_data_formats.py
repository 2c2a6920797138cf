"""Preference data in every form a TRL user has: files, saved and cached datasets, Python objects,
explicit and implicit prompts, strings and conversations; errors that name the row; laziness."""
import gc
import gzip
import json
import shutil
import tracemalloc
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qadapter_kernels.app.common import UserError, build_dataset, resolve_data_path
from qadapter_kernels.app.run_folder import data_sha256, file_sha256
from qadapter_kernels.training.data import (
    PreferenceCollator,
    PreferenceDataError,
    PreferenceDataset,
    PreferenceExample,
    PreferenceStream,
    as_preference_dataset,
    encode_prompt,
    load_preferences,
    tokenize_preference,
)
from qadapter_kernels.training.examples import split_implicit_prompt
from qadapter_kernels.training.sources import PreferenceRows, open_preferences

from training_helpers import tiny_tokenizer

HOW, FINE, HATE = "\n\nHuman: How are you?\n\nAssistant:", " I am fine", " I hate you"
STRING_ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "paris.", "rejected": "Paris."},
    {"prompt": "Two plus two?", "chosen": "four", "rejected": "Four", "id": 3},  # extra keys are ignored
]
STRING_EXAMPLES = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in STRING_ROWS]


def msg(role, content):
    return {"role": role, "content": content}


# A system message and a multi-turn prompt, in TRL's explicit conversational format.
CONVERSATION_ROWS = [
    {"prompt": [msg("system", "Be brief."), msg("user", "Capital of France?")],
     "chosen": [msg("assistant", "paris.")], "rejected": [msg("assistant", "Paris.")]},
    {"prompt": [msg("user", "Hi"), msg("assistant", "hello"), msg("user", "Two plus two?")],
     "chosen": [msg("assistant", "four")], "rejected": [msg("assistant", "Four")]},
]
CONVERSATION_EXAMPLES = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in CONVERSATION_ROWS]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return tiny_tokenizer(chat_template=False)


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def write_csv(path, rows, bom=False):
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["prompt", "chosen", "rejected"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.getvalue().encode("utf-8"))


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


FILE_WRITERS = {
    "jsonl": lambda p, rows: p.write_bytes(jsonl_bytes(rows)),
    "jsonl.gz": lambda p, rows: p.write_bytes(gzip.compress(jsonl_bytes(rows))),
    "jsonl-bom": lambda p, rows: p.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(rows)),
    "json": lambda p, rows: p.write_text(json.dumps(rows, indent=1), encoding="utf-8"),
    "json-bom": lambda p, rows: p.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode()),
    "json-lines": lambda p, rows: p.write_bytes(jsonl_bytes(rows)),
    "json.gz": lambda p, rows: p.write_bytes(gzip.compress(json.dumps(rows).encode())),
    "parquet": write_parquet,
}
SUFFIX = {"jsonl-bom": "jsonl", "json-bom": "json", "json-lines": "json"}


@pytest.mark.parametrize("kind", sorted(FILE_WRITERS))
@pytest.mark.parametrize("rows, expected", [(STRING_ROWS, STRING_EXAMPLES),
                                            (CONVERSATION_ROWS, CONVERSATION_EXAMPLES)], ids=["strings", "chats"])
def test_every_file_format_loads_the_same_pairs(tmp_path, tok, kind, rows, expected):
    path = tmp_path / f"pairs.{SUFFIX.get(kind, kind)}"
    FILE_WRITERS[kind](path, rows)
    assert load_preferences(path) == expected
    dataset = as_preference_dataset(path, tok)
    assert isinstance(dataset, PreferenceDataset) and len(dataset) == len(expected)
    assert [dataset[i] for i in range(len(dataset))] == [tokenize_preference(e, tok) for e in expected]


@pytest.mark.parametrize("bom", [False, True])
def test_csv_reads_every_cell_as_text(tmp_path, bom):
    rows = [*STRING_ROWS, {"prompt": "Six times seven?", "chosen": "42", "rejected": "forty-two"}]
    path = tmp_path / "pairs.csv"
    write_csv(path, rows, bom=bom)
    assert load_preferences(path) == [*STRING_EXAMPLES, PreferenceExample("Six times seven?", "42", "forty-two")]


def test_a_folder_written_by_save_to_disk(tmp_path, tok):
    datasets.Dataset.from_list(CONVERSATION_ROWS).save_to_disk(tmp_path / "one")
    assert load_preferences(tmp_path / "one") == CONVERSATION_EXAMPLES
    datasets.DatasetDict({"train": datasets.Dataset.from_list(STRING_ROWS),
                          "test": datasets.Dataset.from_list(STRING_ROWS[:1])}).save_to_disk(tmp_path / "dict")
    assert load_preferences(tmp_path / "dict") == STRING_EXAMPLES  # "train" when no split is named
    assert load_preferences(tmp_path / "dict", split="test") == STRING_EXAMPLES[:1]
    (tmp_path / "plain").mkdir()
    with pytest.raises(PreferenceDataError, match="not one written by Dataset.save_to_disk"):
        load_preferences(tmp_path / "plain")


def cache_dataset_as(name: str, rows: list[dict], cache: Path) -> None:
    """Writes ``rows`` into the datasets cache ``cache`` where a download of Hub dataset ``name``
    (owner/short) would have put them: owner___short/default/0.0.0/<hash>/short-train.arrow."""
    from datasets.packaged_modules.json.json import Json

    source = cache / "source.jsonl"
    source.write_bytes(jsonl_bytes(rows))
    owner, short = name.split("/")
    builder = Json(cache_dir=str(cache), dataset_name=f"{owner}___{short}", hash="0123abcd",
                   data_files={"train": str(source)})
    builder.download_and_prepare()
    final = cache / f"{owner}___{short}" / "default" / "0.0.0" / "0123abcd"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, final)
    (final / f"{owner}___{short}-train.arrow").rename(final / f"{short}-train.arrow")


def test_a_dataset_in_the_local_hugging_face_cache_offline(tmp_path, monkeypatch, tok):
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hh = [{"chosen": HOW + FINE, "rejected": HOW + HATE}, *STRING_ROWS]
    cache_dataset_as("tester/hh-prefs", hh, cache)
    expected = [PreferenceExample(HOW, FINE, HATE), *STRING_EXAMPLES]
    assert load_preferences("tester/hh-prefs") == expected
    assert load_preferences("tester/hh-prefs", split="train") == expected
    with pytest.raises(PreferenceDataError, match="no split 'test'"):
        load_preferences("tester/hh-prefs", split="test")
    with pytest.raises(FileNotFoundError, match="nor a dataset in the local Hugging Face cache"):
        load_preferences("tester/not-cached")
    # The command line takes NAME[:SPLIT] too, and hashes the cached files for its run record.
    assert resolve_data_path("tester/hh-prefs:train") == "tester/hh-prefs:train"
    assert len(build_dataset("tester/hh-prefs:train", tok, 64, 32)) == 3
    assert data_sha256("tester/hh-prefs") == data_sha256("tester/hh-prefs:train") != data_sha256(tmp_path)


def test_a_file_keeps_its_own_hash_in_the_run_record(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(STRING_ROWS))
    assert data_sha256(path) == file_sha256(path)
    datasets.Dataset.from_list(STRING_ROWS).save_to_disk(tmp_path / "saved")
    before = data_sha256(tmp_path / "saved")
    datasets.Dataset.from_list(STRING_ROWS[:1]).save_to_disk(tmp_path / "saved")
    assert data_sha256(tmp_path / "saved") != before


# ---------------------------------------------------------------- Python objects


def test_a_list_of_dicts(tok):
    # Used to fail with AttributeError: 'dict' object has no attribute 'chosen'.
    dataset = PreferenceDataset(STRING_ROWS, tok)
    assert [dataset[i] for i in range(2)] == [tokenize_preference(e, tok) for e in STRING_EXAMPLES]
    assert load_preferences(CONVERSATION_ROWS) == CONVERSATION_EXAMPLES


def test_datasets_objects(tok):
    data = datasets.Dataset.from_list(CONVERSATION_ROWS)
    assert load_preferences(data) == CONVERSATION_EXAMPLES
    assert load_preferences(data.with_format("torch")) == CONVERSATION_EXAMPLES  # a user's format is ignored
    splits = datasets.DatasetDict({"dev": data, "test": data.select([1])})
    assert load_preferences(splits["test"]) == CONVERSATION_EXAMPLES[1:]
    assert load_preferences(splits, split="test") == CONVERSATION_EXAMPLES[1:]
    with pytest.raises(PreferenceDataError, match="has the splits dev, test: name one"):
        load_preferences(splits)
    stream = as_preference_dataset(data.to_iterable_dataset(), tok)
    assert isinstance(stream, PreferenceStream) and isinstance(stream, torch.utils.data.IterableDataset)
    assert list(stream) == [tokenize_preference(e, tok) for e in CONVERSATION_EXAMPLES]
    assert stream.summary() == "kept 2 of 2; dropped none; truncated none"


def test_a_pandas_dataframe():
    import pandas

    frame = pandas.DataFrame([*STRING_ROWS, {"prompt": "Hi", "chosen": "yes", "rejected": " "}])
    assert load_preferences(frame.iloc[:2]) == STRING_EXAMPLES
    with pytest.raises(PreferenceDataError, match="^DataFrame: row 2: 'rejected' is an empty string"):
        load_preferences(frame)


def test_already_tokenized_datasets_pass_through(tok):
    dataset = as_preference_dataset(STRING_ROWS, tok)
    assert as_preference_dataset(dataset, tok) is dataset


def test_the_stream_and_the_dataset_give_the_same_batches(tok):
    rows = [*STRING_ROWS, {"prompt": "Hi", "chosen": "same", "rejected": "same"}]
    dataset, stream = as_preference_dataset(rows, tok), as_preference_dataset(rows, tok, streaming=True)
    assert list(stream) == [dataset[i] for i in range(len(dataset))] and len(dataset) == 2
    assert stream.summary() == dataset.summary() == "kept 2 of 3; dropped 1 (chosen equals rejected in the data); " \
                                                    "truncated none"
    collate = PreferenceCollator.for_tokenizer(tok)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=collate)
    (batch,) = list(loader)
    assert torch.equal(batch["input_ids"], collate([dataset[0], dataset[1]])["input_ids"])


def test_stream_workers_share_the_rows_without_repeats(plain_tok):
    rows = [{"prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"No {i}"} for i in range(9)]
    stream = as_preference_dataset(iter(rows), plain_tok)  # a one-pass iterable streams
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = sorted(tuple(pair.prompt_ids) for pair in loader)
    assert got == sorted(tuple(tokenize_preference(PreferenceExample(**r), plain_tok).prompt_ids) for r in rows)


def test_the_collator_pads_with_eos_when_the_tokenizer_has_no_pad(tok):
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    assert PreferenceCollator.for_tokenizer(tok).pad_token_id == tok.pad_token_id
    assert PreferenceCollator.for_tokenizer(no_pad).pad_token_id == no_pad.eos_token_id


# ---------------------------------------------------------------- TRL's formats and the implicit prompt


def test_implicit_hh_strings_split_at_the_turn_boundary():
    # TRL's extract_prompt gives prompt HOW + " I", chosen " am fine", rejected " hate you".
    assert split_implicit_prompt(HOW + FINE, HOW + HATE) == (HOW, FINE, HATE)
    (example,) = load_preferences([{"chosen": HOW + FINE, "rejected": HOW + HATE}])
    assert example == PreferenceExample(HOW, FINE, HATE)
    assert example.prompt == "\n\nHuman: How are you?\n\nAssistant:" and example.preformatted


def test_implicit_hh_multi_turn_splits_at_the_last_shared_assistant_turn():
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert split_implicit_prompt(history + " Good.", history + " Go away.") == (history, " Good.", " Go away.")
    # Histories that part before the last turn: the prompt is what both share, up to a turn boundary.
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Thanks\n\nAssistant: You are welcome."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye."
    assert split_implicit_prompt(chosen, rejected) == (
        "\n\nHuman: Hi\n\nAssistant:", " Hello.\n\nHuman: Thanks\n\nAssistant: You are welcome.",
        " Hello.\n\nHuman: Bye\n\nAssistant: Bye.")


def test_implicit_conversations_split_before_the_final_assistant_turn():
    prompt = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Capital?")]
    row = {"chosen": [*prompt, msg("assistant", "paris.")], "rejected": [*prompt, msg("assistant", "Paris.")]}
    assert load_preferences([row]) == [PreferenceExample(prompt, [msg("assistant", "paris.")],
                                                         [msg("assistant", "Paris.")])]


IMPLICIT_ERRORS = [
    ({"chosen": "I am fine", "rejected": "I hate you"}, "share no '\\\\n\\\\nAssistant:' turn marker"),
    ({"chosen": HOW + FINE, "rejected": HOW}, "'rejected' is an empty string"),
    ({"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "x"), msg("assistant", "c")]},
     "differ before their final assistant turn"),
    ({"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("assistant", "c"), msg("user", "a")]},
     "'rejected' must end with an assistant message"),
    ({"chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]}, "no message before its final"),
    ({"chosen": HOW + FINE, "rejected": [msg("user", "a"), msg("assistant", "c")]}, "both be strings or both"),
    ({"prompt": "a", "rejected": "c"}, "missing key(s) 'chosen'"),
]


@pytest.mark.parametrize("row, message", IMPLICIT_ERRORS)
def test_bad_rows_name_the_row_and_the_field(row, message):
    with pytest.raises(PreferenceDataError, match=r"^row 2: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_preferences([*STRING_ROWS, row])


def test_bad_rows_name_the_row_in_every_source(tmp_path, tok):
    rows = [*STRING_ROWS, {"prompt": "Hi", "chosen": "", "rejected": "No"}]
    write_parquet(tmp_path / "bad.parquet", rows)
    write_csv(tmp_path / "bad.csv", rows)
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    (tmp_path / "bad.jsonl").write_bytes(b"\n" + jsonl_bytes(rows))
    for source, where in [(tmp_path / "bad.parquet", f"{tmp_path / 'bad.parquet'}: row 2"),
                          (tmp_path / "bad.csv", f"{tmp_path / 'bad.csv'}: row 2"),
                          (tmp_path / "bad.json", f"{tmp_path / 'bad.json'}: row 2"),
                          (tmp_path / "bad.jsonl", f"{tmp_path / 'bad.jsonl'}:4"),  # a line number
                          (datasets.Dataset.from_list(rows), "Dataset: row 2")]:
        with pytest.raises(PreferenceDataError) as info:
            as_preference_dataset(source, tok)
        assert str(info.value) == f"{where}: 'chosen' is an empty string"
    stream = as_preference_dataset(datasets.Dataset.from_list(rows).to_iterable_dataset(), tok)
    with pytest.raises(PreferenceDataError, match="^IterableDataset: row 2: 'chosen' is an empty string"):
        list(stream)
    with pytest.raises(UserError, match="bad.csv: row 2: 'chosen' is an empty string"):
        build_dataset(str(tmp_path / "bad.csv"), tok, 64, 32)


def test_bad_sources(tmp_path):
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(PreferenceDataError, match=r"unknown data file type '\.txt'"):
        load_preferences(tmp_path / "pairs.txt")
    (tmp_path / "broken.json").write_text('[{"prompt": ')
    with pytest.raises(PreferenceDataError, match="not a valid JSON array"):
        load_preferences(tmp_path / "broken.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(PreferenceDataError, match="not a readable Parquet file"):
        load_preferences(tmp_path / "broken.parquet")
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        load_preferences(tmp_path / "nowhere.parquet")
    with pytest.raises(PreferenceDataError, match="empty"):
        load_preferences([])
    with pytest.raises(TypeError, match="data must be"):
        load_preferences(42)
    with pytest.raises(UserError, match="data file not found"):
        resolve_data_path(str(tmp_path / "nowhere.parquet"))


# ---------------------------------------------------------------- HH text with a chat template


def test_hh_text_stays_plain_text_under_a_chat_template(tok, plain_tok):
    """HH strings already hold their dialogue format: no chat template is wrapped around them."""
    (pair,) = as_preference_dataset([{"chosen": HOW + FINE, "rejected": HOW + HATE}], tok)
    ids = tok(HOW, add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids == [tok.bos_token_id, *ids] == encode_prompt(HOW, tok)
    assert pair.chosen_ids == [*tok(FINE, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert pair == tokenize_preference(PreferenceExample(HOW, FINE, HATE), plain_tok)
    # A plain question still becomes a user turn of the template.
    assert encode_prompt("How are you?", tok) != encode_prompt("How are you?", plain_tok)


# ---------------------------------------------------------------- large data stays lazy


def python_size(pairs) -> int:
    """Bytes the pairs would take as Python lists of ints (what the dataset avoids holding)."""
    import sys

    return sum(sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)
               for pair in pairs for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_large_file_is_not_held_as_python_objects(tmp_path, plain_tok, kind):
    n = 200_000
    path = tmp_path / f"big.{kind}"
    columns = {"prompt": [f"Question {i}?" for i in range(n)], "chosen": [f"yes {i}" for i in range(n)],
               "rejected": [f"No {i}" for i in range(n)]}
    if kind == "parquet":
        pq.write_table(pa.table(columns), path)
    else:
        path.write_bytes(jsonl_bytes(dict(zip(columns, values)) for values in zip(*columns.values())))
    del columns
    open_preferences(path)  # the first call imports what reading needs
    gc.collect()
    tracemalloc.start()
    try:
        rows = open_preferences(path)
        assert isinstance(rows, PreferenceRows) and len(rows) == n
        assert rows[n - 1] == PreferenceExample(f"Question {n - 1}?", f"yes {n - 1}", f"No {n - 1}")
        stream = iter(as_preference_dataset(path, plain_tok, streaming=True))
        first = [next(stream) for _ in range(100)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first[99] == tokenize_preference(PreferenceExample("Question 99?", "yes 99", "No 99"), plain_tok)
    # 200k PreferenceExamples would take ~100 MB (3 strings and a dataclass each); 8 MB is a bound
    # that only rows read when used meet (a JSONL index is 16 bytes a line).
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_tokenized_pairs_are_stored_compactly(tmp_path, plain_tok):
    n = 2000
    rows = [{"prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"No {i}"} for i in range(n)]
    write_parquet(tmp_path / "pairs.parquet", rows)
    gc.collect()
    tracemalloc.start()
    try:
        dataset = as_preference_dataset(tmp_path / "pairs.parquet", plain_tok)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pairs = [dataset[i] for i in range(n)]
    assert pairs[n - 1] == tokenize_preference(PreferenceExample(*rows[-1].values()), plain_tok)
    assert held < python_size(pairs) / 4, (held, python_size(pairs))


# ---------------------------------------------------------------- with the Trainer


@pytest.mark.parametrize("streaming", [False, True])
def test_the_trainer_trains_on_any_source(tmp_path, tok, streaming):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from qadapter_kernels.training import QAdapterConfig, QAdapterModel, QAdapterTrainer

    rows = [{"chosen": f"{HOW} I am fine {i}", "rejected": f"{HOW} I hate you {i}"} for i in range(4)]
    write_parquet(tmp_path / "hh.parquet", rows)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=tok.pad_token_id))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = QAdapterTrainer(model=QAdapterModel(base, QAdapterConfig()), args=args,
                              train_dataset=as_preference_dataset(tmp_path / "hh.parquet", tok, streaming=streaming),
                              data_collator=PreferenceCollator.for_tokenizer(tok))
    trainer.train()
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
