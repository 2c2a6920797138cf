"""The profiling CI's regression gate: a ratio worse than its baseline by more than the noise
margin fails, within it passes, and a gated ratio the run did not measure fails."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import regression_gate as gate  # noqa: E402

CONFIG = {"B": 16, "V": 4096}


def write_run(folder: Path, value: float, threads: int = gate.THREADS) -> Path:
    folder.mkdir()
    result = {"provider": "qadapter_kernels", "config": CONFIG, "dtype": "float32", "device": "cpu",
              "extra": {"x hf": value}}
    (folder / "sampling_quick.json").write_text(json.dumps({"machine": {"cpu_threads": threads},
                                                            "results": [result]}))
    return folder


@pytest.fixture
def baseline(tmp_path, monkeypatch):
    path = tmp_path / "quick_baseline.json"
    monkeypatch.setattr(gate, "BASELINE", path)
    return path


def run_gate(monkeypatch, *argv) -> int:
    monkeypatch.setattr(sys, "argv", ["regression_gate.py", *map(str, argv)])
    return gate.main()


def test_update_records_the_median_then_the_margin_decides(tmp_path, baseline, monkeypatch, capsys):
    runs = [write_run(tmp_path / f"run{i}", v) for i, v in enumerate([0.02, 0.01, 0.5])]
    assert run_gate(monkeypatch, *runs, "--update") == 0
    assert list(json.loads(baseline.read_text()).values()) == [0.02]
    within = write_run(tmp_path / "within", 0.02 * gate.NOISE_MARGIN * 0.99)
    assert run_gate(monkeypatch, within) == 0
    beyond = write_run(tmp_path / "beyond", 0.02 * gate.NOISE_MARGIN * 1.01)
    assert run_gate(monkeypatch, beyond) == 1
    assert "FAIL gate: sampling_quick|qadapter_kernels|x hf" in capsys.readouterr().out


def test_a_gated_ratio_missing_from_the_run_fails(tmp_path, baseline, monkeypatch, capsys):
    assert run_gate(monkeypatch, write_run(tmp_path / "run", 0.02), "--update") == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_gate(monkeypatch, empty) == 1
    assert "not measured" in capsys.readouterr().out


def test_the_committed_baseline_only_holds_gated_ratios():
    directions = {(n, p, m) for n, p, m, _ in gate.GATED}
    for key in json.loads(gate.BASELINE.read_text()):
        assert tuple(key.split("|", 3)[:3]) in directions, key


def test_a_run_with_other_threads_is_not_compared(tmp_path, baseline, monkeypatch, capsys):
    """Ratios of a run with another thread count than the baseline's fail as not measured."""
    assert run_gate(monkeypatch, write_run(tmp_path / "run", 0.02), "--update") == 0
    assert run_gate(monkeypatch, write_run(tmp_path / "other", 0.02, threads=gate.THREADS + 1)) == 1
    out = capsys.readouterr().out
    assert "threads" in out and "not measured" in out
