"""The per-task summary of real-task sweeps: mean ± std over seeds, t and Wilson intervals, samples copied."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opdplus.report import t_interval, wilson_interval, write_report


def test_t_interval_uses_n_minus_1_degrees_of_freedom():
    interval = t_interval([0.1, 0.2, 0.3])
    assert interval is not None
    lo, hi = interval  # mean 0.2, std 0.1, t(2) = 4.303
    assert (lo + hi) / 2 == pytest.approx(0.2)
    assert (hi - lo) / 2 == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)
    assert t_interval([0.5]) is None


def test_wilson_interval():
    half, none = wilson_interval(50, 100), wilson_interval(0, 200)
    assert half is not None and none is not None
    assert half[0] == pytest.approx(0.4038, abs=1e-4) and half[1] == pytest.approx(0.5962, abs=1e-4)
    assert none[0] == 0.0 and 0 < none[1] < 0.02


def _sweep(root: Path, task: str, key: str, accuracies: dict[str, list[float]], teacher: float) -> Path:
    out = root / task
    for method, values in accuracies.items():
        estimator, divergence = method.split("/")
        for seed, acc in enumerate(values):
            run = out / f"{estimator}-{divergence}-seed{seed}"
            (run / "samples").mkdir(parents=True)
            (run / "samples" / f"{task}.jsonl").write_text(json.dumps({"id": "x", "correct": True}) + "\n")
            rows = [
                {"step": 0, f"eval/{task}/score": 0.1, "eval/reverse_kl": 2.0},
                {"step": 10, f"eval/{task}/score": acc},
            ]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            result = {"method": method, "seed": seed, "eval_items": 200, key: acc, "evaluation": [key]}
            result |= {"eval/reverse_kl_start": 2.0, "eval/reverse_kl_end": 1.0 + seed}
            (run / "result.json").write_text(json.dumps(result))
    reference = {"teacher": {key: teacher}, "student_start": {key: 0.1}}
    (out / "sweep.json").write_text(json.dumps({"reference": reference, "runs": []}))
    return out


def test_report_of_two_task_sweeps(tmp_path):
    math_sweep = _sweep(
        tmp_path, "math", "math_acc", {"opd/jsd": [0.1, 0.2, 0.3], "opd_plus/jsd": [0.5, 0.6, 0.7]}, 0.8
    )
    tool_sweep = _sweep(tmp_path, "tool_use", "tool_acc", {"opd_plus/jsd": [0.4, 0.4, 0.5]}, 0.45)
    report = write_report([math_sweep, tool_sweep], tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["tasks"]
    assert set(summary) == {"math", "tool_use"}
    math_plus = summary["math"]["runs"]["opd_plus/jsd"]
    assert summary["math"]["teacher"] == 0.8 and summary["math"]["student_start"] == 0.1
    assert summary["math"]["n_eval"] == 200 and summary["tool_use"]["teacher"] == 0.45
    assert math_plus["acc_mean"] == pytest.approx(0.6) and math_plus["acc_std"] == pytest.approx(0.1)
    assert math_plus["acc_seeds"] == [0.5, 0.6, 0.7] and len(math_plus["acc_run_ci95"]) == 3
    assert math_plus["reverse_kl_start"] == 2.0 and math_plus["reverse_kl_end"] == pytest.approx(2.0)
    assert set(summary["tool_use"]["runs"]) == {"opd_plus/jsd"}
    copied = sorted(p.relative_to(tmp_path / "report").as_posix() for p in (tmp_path / "report").rglob("*.jsonl"))
    assert "samples/math/opd_plus-jsd_seed2.jsonl" in copied and "samples/tool_use/opd_plus-jsd_seed0.jsonl" in copied
    assert len(copied) == 9
    text = report.read_text()
    assert "| opd_plus/jsd | 3 | 0.600 ± 0.100 |" in text and "**tool_use**" in text
    lo, hi = math_plus["acc_run_ci95"][0]
    assert f"0.500 [{lo:.2f}, {hi:.2f}]" in text  # each seed with its own interval over the items


def test_one_seed_has_no_standard_deviation(tmp_path):
    sweep = _sweep(tmp_path, "math", "math_acc", {"opd/jsd": [0.25]}, 0.8)
    report = write_report([sweep], tmp_path / "report")
    entry = json.loads((tmp_path / "report" / "summary.json").read_text())["tasks"]["math"]["runs"]["opd/jsd"]
    assert entry["acc_std"] is None and entry["acc_ci95"] is None and entry["acc_run_ci95"][0] is not None
    assert "| opd/jsd | 1 | 0.250 | – | 0.250 [" in report.read_text()
