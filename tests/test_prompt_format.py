"""The prompt format travels with the adapter: training records how its prompts were encoded, and
decoding writes a user's prompt the same way by default, warning when a prompt is in another format."""
import importlib
import json
import warnings

import pytest

from qadapter_kernels.app.cli import main
from qadapter_kernels.prompts import (HH_ASSISTANT_MARKER, HH_HUMAN_MARKER, chat_template_sha256, encode_prompt,
                                      in_trained_format)
from training_helpers import tiny_tokenizer

QUESTION = "What is the capital of France?"
HH_PAIRS = [(f"{HH_HUMAN_MARKER}{q}{HH_ASSISTANT_MARKER}", f" {c}", f" {r}") for q, c, r in [
    (QUESTION, "the capital of france is paris.", "The capital of France is Paris."),
    ("What is two plus two?", "two plus two is four.", "Two plus two is four."),
]]


def write_rows(path, pairs) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))


def train(tmp_path, model_dir, data, name: str):
    out = tmp_path / name
    assert main(["train", "--data", str(data), "--model", str(model_dir), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "64"]) == 0
    return out, json.loads((out / "qadapter_config.json").read_text())


def test_a_bare_question_is_written_in_the_trained_format():
    tok = tiny_tokenizer()
    assert in_trained_format(QUESTION, tok, None) == QUESTION
    assert in_trained_format(QUESTION, tok, "hh_dialogue") == f"{HH_HUMAN_MARKER}{QUESTION}{HH_ASSISTANT_MARKER}"
    plain = encode_prompt(in_trained_format(QUESTION, tok, "plain_text"), tok)
    assert plain == [tok.bos_token_id, *tok(QUESTION, add_special_tokens=False)["input_ids"]]
    assert plain != encode_prompt(QUESTION, tok)  # which goes through the chat template
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert in_trained_format(QUESTION, tok, "chat_template", chat_template_sha256(tok)) == QUESTION


def test_a_prompt_in_another_format_is_kept_with_a_warning_naming_both():
    tok = tiny_tokenizer()
    conversation = [{"role": "user", "content": QUESTION}]
    with pytest.warns(UserWarning, match="trained on prompts in the hh_dialogue format, this prompt is in the "
                                         "chat_template format"):
        assert in_trained_format(conversation, tok, "hh_dialogue") == conversation
    dialogue = f"{HH_HUMAN_MARKER}{QUESTION}{HH_ASSISTANT_MARKER}"
    with pytest.warns(UserWarning, match="chat_template format, this prompt is in the hh_dialogue format"):
        in_trained_format(dialogue, tok, "chat_template")
    with pytest.warns(UserWarning, match="chat template of SHA-256 0123456789ab"):
        in_trained_format(QUESTION, tok, "chat_template", "0123456789ab" + "0" * 52)


def test_training_records_the_format_and_generate_uses_it_by_default(tmp_path, model_dir, data_file, monkeypatch,
                                                                    capsys):
    hh_data = tmp_path / "hh.jsonl"
    write_rows(hh_data, HH_PAIRS)
    hh_adapter, hh_config = train(tmp_path, model_dir, hh_data, "hh")
    assert (hh_config["prompt_format"], hh_config["chat_template_sha256"]) == ("hh_dialogue", None)
    _, chat_config = train(tmp_path, model_dir, data_file, "chat")  # conversations: the chat template
    assert chat_config["prompt_format"] == "chat_template"
    assert chat_config["chat_template_sha256"] == chat_template_sha256(tiny_tokenizer())

    # The module, not the function of the same name that the decoding package exports.
    decoding = importlib.import_module("qadapter_kernels.decoding.generate")
    prompts_seen = []

    def recording_generate(model, input_ids, attention_mask, **kwargs):
        prompts_seen.append([i for i, m in zip(input_ids[0].tolist(), attention_mask[0].tolist()) if m])
        return input_ids

    monkeypatch.setattr(decoding, "generate", recording_generate)
    argv = ["generate", "--adapter", str(hh_adapter), "--model", str(model_dir), "--prompt", QUESTION, "--no-stream"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default needs no warning
        assert main(argv) == 0
    tok = tiny_tokenizer()
    hh_ids = encode_prompt(f"{HH_HUMAN_MARKER}{QUESTION}{HH_ASSISTANT_MARKER}", tok)
    assert prompts_seen == [hh_ids] and hh_ids != encode_prompt(QUESTION, tok)
    assert main([*argv, "--prompt-format", "chat_template"]) == 0  # the flag overrides the record
    assert prompts_seen[-1] == encode_prompt(QUESTION, tok)


def test_lm_eval_and_serving_write_conversations_in_the_trained_format(tmp_path, model_dir):
    hh_data = tmp_path / "hh.jsonl"
    write_rows(hh_data, HH_PAIRS)
    hh_adapter, _ = train(tmp_path, model_dir, hh_data, "hh")
    conversation = [{"role": "user", "content": QUESTION}]

    from qadapter_kernels.evaluation.lm_eval_model import QAdapterLM

    lm = QAdapterLM(adapter=str(hh_adapter))
    assert lm.apply_chat_template(conversation) == f"{HH_HUMAN_MARKER}{QUESTION}{HH_ASSISTANT_MARKER}"
    model = lm.scorer.model
    assert model.encode_prompt(lm.tokenizer, QUESTION) == encode_prompt(
        f"{HH_HUMAN_MARKER}{QUESTION}{HH_ASSISTANT_MARKER}", lm.tokenizer)

    from qadapter_kernels.prompts import FORMAT_CHAT_TEMPLATES
    from qadapter_kernels.serving.__main__ import build_parser, server_command

    args, vllm_args = build_parser().parse_known_args(["--adapter", str(hh_adapter), "--base-model", str(model_dir)])
    command = server_command(args, vllm_args, cuda=True)
    assert command[command.index("--chat-template") + 1] == FORMAT_CHAT_TEMPLATES["hh_dialogue"]
    own = server_command(args, ["--chat-template", "mine.jinja"], cuda=True)  # a template the caller names wins
    assert own.count("--chat-template") == 1 and own[-1] == "mine.jinja"
