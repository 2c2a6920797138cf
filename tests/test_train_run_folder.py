"""``qadapter train`` and its output folder: runs are never mixed, a finished run is not
trained again, saves are whole or absent, the folder is checked before any compute, Ctrl-C saves a
resumable checkpoint, checkpoints are few and small."""
import os
import shutil
import signal

import pytest
import safetensors.torch
import torch

from qadapter_kernels.app.cli import build_parser, main
from qadapter_kernels.training import checkpoints
from qadapter_kernels.training.trainer import QAdapterTrainer

from cli_helpers import PAIRS, run_error, write_pairs


def train_argv(model_dir, data_file, out, *extra):
    return ["train", "--data", str(data_file), "--output-dir", str(out), "--model", str(model_dir),
            "--batch-size", "2", "--max-length", "64", "--logging-steps", "100", "--lr", "1e-2", *extra]


def adapter(folder):
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def same_adapter(a, b) -> bool:
    x, y = adapter(a), adapter(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def checkpoint_names(folder):
    return sorted(p.name for p in folder.iterdir() if checkpoints.checkpoint_step(p) is not None)


# ----------------------------------------------------------------------------- a reused folder


def test_a_folder_holding_another_run_is_refused(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "out"
    assert main(train_argv(model_dir, data_file, out, "--max-steps", "4", "--save-steps", "2")) == 0
    first = adapter(out)
    other = train_argv(model_dir, data_file, out, "--max-steps", "2", "--save-steps", "2", "--lr", "5e-3")
    for extra in ([], ["--resume-from-checkpoint"]):
        err = run_error(capsys, other + extra)
        assert "holds another run (differs in training.lr)" in err and "--overwrite" in err
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    assert all(torch.equal(v, adapter(out)[k]) for k, v in first.items())  # the old run is untouched
    # Other data: refused too.
    changed = tmp_path / "changed.jsonl"
    write_pairs(changed, PAIRS[:3])
    err = run_error(capsys, train_argv(model_dir, changed, out, "--max-steps", "2", "--resume-from-checkpoint"))
    assert "differs in data_sha256" in err
    # The same run again without --resume: refused, nothing overwritten.
    err = run_error(capsys, train_argv(model_dir, data_file, out, "--max-steps", "4", "--save-steps", "2"))
    assert "already holds this run" in err
    # --overwrite starts over: the old checkpoints go, the new run's are the only ones.
    assert main(other + ["--overwrite"]) == 0
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert "trained 2 steps" in capsys.readouterr().out


def test_a_folder_of_another_tool_is_refused_and_kept(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # not a whole checkpoint of ours: not ours to delete
    (out / "checkpoint-3" / "weights.bin").write_bytes(b"someone's work")
    err = run_error(capsys, train_argv(model_dir, data_file, out, "--max-steps", "2"))
    assert "holds another run (no qadapter run record)" in err
    assert (out / "checkpoint-3" / "weights.bin").read_bytes() == b"someone's work"


def test_resume_takes_only_checkpoints_of_the_same_run(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "out"
    assert main(train_argv(model_dir, data_file, out, "--max-steps", "2", "--save-steps", "2")) == 0
    # A checkpoint of another run copied in (say, by hand): complete, but not this run's.
    foreign = tmp_path / "foreign"
    assert main(train_argv(model_dir, data_file, foreign, "--max-steps", "4", "--save-steps", "4",
                           "--lr", "5e-3")) == 0
    shutil.copytree(foreign / "checkpoint-4", out / "checkpoint-4")
    capsys.readouterr()
    assert main(train_argv(model_dir, data_file, out, "--max-steps", "3", "--save-steps", "2",
                           "--resume-from-checkpoint")) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert "trained 1 step (resumed at step 2, now at step 3)" in printed


# ----------------------------------------------------------------------------- a finished run


def test_resuming_a_finished_run_has_nothing_to_do(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "out"
    argv = train_argv(model_dir, data_file, out, "--max-steps", "4", "--save-steps", "2", "--lr-scheduler", "constant")
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(argv + ["--resume-from-checkpoint"]) == 0
    assert "nothing to do: this run finished at step 4" in capsys.readouterr().out
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]  # no checkpoint-5
    assert before["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- a kill inside a save


def test_an_interrupted_checkpoint_save_leaves_no_checkpoint(tmp_path, model_dir, data_file, monkeypatch, capsys):
    """A save that dies half-way (here: the optimizer state) leaves no folder with a checkpoint's name."""
    out = tmp_path / "out"
    real = QAdapterTrainer._save_optimizer_and_scheduler

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            open(os.path.join(output_dir, "optimizer.pt"), "wb").close()  # 0 bytes, as a kill leaves it
            raise KeyboardInterrupt
        return real(self, output_dir)

    monkeypatch.setattr(QAdapterTrainer, "_save_optimizer_and_scheduler", dies_at_step_4)
    argv = train_argv(model_dir, data_file, out, "--max-steps", "6", "--save-steps", "2")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 130
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert checkpoints.leftovers(out)  # the staging folder, found as a leftover
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv + ["--resume-from-checkpoint"]) == 0
    printed = capsys.readouterr().out
    assert "removed what interrupted saves left: .saving-checkpoint-4" in printed
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert "trained 4 steps (resumed at step 2, now at step 6)" in printed  # the steps this command ran
    assert checkpoints.leftovers(out) == []


def test_resume_skips_an_incomplete_checkpoint_and_cleans_up(tmp_path, model_dir, data_file, capsys):
    """The state once found after a kill: checkpoint-N with a 0-byte optimizer.pt and no trainer state,
    and a staging folder; the resume takes the newest COMPLETE checkpoint, says so, removes the rest."""
    out = tmp_path / "out"
    argv = train_argv(model_dir, data_file, out, "--max-steps", "2", "--save-steps", "2")
    assert main(argv) == 0
    broken = out / "checkpoint-4"
    shutil.copytree(out / "checkpoint-2", broken)
    (broken / "trainer_state.json").unlink()
    (broken / "optimizer.pt").write_bytes(b"")
    (out / ".checkpoint-4.saving-0123456789ab").mkdir()
    capsys.readouterr()
    argv[argv.index("--max-steps") + 1] = "4"
    assert main(argv + ["--resume-from-checkpoint"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert "trained 2 steps (resumed at step 2, now at step 4)" in printed
    assert checkpoints.leftovers(out) == [] and checkpoints.is_complete(out / "checkpoint-4")


# ----------------------------------------------------------------------------- checked before compute


def test_an_unwritable_output_folder_fails_before_training(tmp_path, model_dir, data_file, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setattr(QAdapterTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    err = run_error(capsys, train_argv(model_dir, data_file, a_file / "out", "--max-steps", "2"))
    assert f"cannot write in --output-dir {a_file / 'out'}" in err


def test_too_little_free_space_fails_before_training(tmp_path, model_dir, data_file, capsys, monkeypatch):
    monkeypatch.setattr(QAdapterTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    err = run_error(capsys, train_argv(model_dir, data_file, tmp_path / "out", "--max-steps", "2"))
    assert "MiB free; a checkpoint of this run takes" in err
    assert not (tmp_path / "out").exists()  # the folder it created for the check is gone


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_a_resumable_checkpoint_and_prints_the_command(tmp_path, model_dir, data_file, capsys,
                                                                     monkeypatch):
    reference = tmp_path / "reference"
    argv = train_argv(model_dir, data_file, reference, "--max-steps", "5", "--save-steps", "100")
    assert main(argv) == 0
    out = tmp_path / "out"
    argv = train_argv(model_dir, data_file, out, "--max-steps", "5", "--save-steps", "100")
    real = QAdapterTrainer.training_step
    calls = []

    def interrupted_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QAdapterTrainer, "training_step", interrupted_at_step_3)
    capsys.readouterr()
    assert main(argv) == 128 + signal.SIGINT
    printed = capsys.readouterr().out
    assert "stopped by signal 2 at step 3" in printed
    assert "qadapter " + " ".join(argv) + " --resume-from-checkpoint" in printed
    assert checkpoint_names(out) == ["checkpoint-3"]
    monkeypatch.undo()
    assert main(argv + ["--resume-from-checkpoint"]) == 0
    assert same_adapter(out, reference)


def test_a_second_ctrl_c_aborts(tmp_path, model_dir, data_file, capsys, monkeypatch):
    real = QAdapterTrainer.training_step

    def two_signals(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QAdapterTrainer, "training_step", two_signals)
    # What was installed before: Python's default handler, or SIG_IGN where the shell that started the
    # tests ignores SIGINT (a background job without job control).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as info:
        main(train_argv(model_dir, data_file, tmp_path / "out", "--max-steps", "3"))
    assert info.value.code == 130
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert "qadapter train: interrupted. Resume with: qadapter train " in err and "--resume-from-checkpoint" in err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# ----------------------------------------------------------------------------- disk


def test_checkpoints_are_few_and_hold_no_tokenizer(tmp_path, model_dir, data_file):
    out = tmp_path / "out"
    assert main(train_argv(model_dir, data_file, out, "--max-steps", "4", "--save-steps", "1")) == 0
    assert checkpoint_names(out) == ["checkpoint-3", "checkpoint-4"]  # --save-total-limit 2 by default
    assert not any(p.name.startswith("tokenizer") for p in (out / "checkpoint-4").iterdir())
    assert (out / "tokenizer_config.json").is_file()  # once, beside the final adapter


def test_help_states_the_defaults():
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--save-total-limit SAVE_TOTAL_LIMIT" in train_help and "(default: 2)" in train_help
    for flag, default in (("--alpha-0", "0.01"), ("--beta", "0.1"), ("--lora-r", "8"),
                          ("--target-modules", "q_proj,v_proj"), ("--variant", "advantage"),
                          ("--length-norm", "response"), ("--lr", "0.001")):
        block = train_help[train_help.index("\n  " + flag + " ") + 1:]
        assert f"(default: {default})" in " ".join(block.split("\n  -")[0].split()), flag
    assert "DESIGN.md" not in train_help
