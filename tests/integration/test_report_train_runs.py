"""`opdplus report` on plain training runs (metrics.jsonl + config.yaml, no result.json)."""

from __future__ import annotations

import argparse
import json

import pytest

from opdplus.commands.report import run as report_run
from opdplus.report import find_runs, load_run, write_report
from opdplus.train import train
from opdplus.train.metrics import read_metrics


def test_report_of_two_training_runs(tiny_train_config, tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, overrides in {"a": ["loss.estimator=opd"], "b": ["loss.divergence=alpha", "loss.alpha=0.5"]}.items():
        train(tiny_train_config(runs / name, *overrides, "run.steps=2", "eval.every=1"))
    (runs / "not_a_run").mkdir()
    assert [p.name for p in find_runs([runs])] == ["a", "b"]
    run_a = load_run(runs / "a")
    last = read_metrics(runs / "a")[-1]
    assert run_a["method"] == "opd/reverse_kl" and run_a["steps"] == 2
    assert run_a["reverse_kl"] == last["eval/reverse_kl"] and run_a["wall_s"] > 0
    assert [p["step"] for p in run_a["curve"]] == [1, 2]
    assert load_run(runs / "b")["method"] == "opd_plus/alpha:0.5"

    notes = tmp_path / "notes.md"
    notes.write_text("## What the runs show\n\nA narrative kept across regenerations.\n")
    assert report_run(argparse.Namespace(run_dirs=[runs], out=tmp_path / "out", title="two runs", notes=notes)) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| opd/reverse_kl | 1 |" in text and "| opd_plus/alpha:0.5 | 1 |" in text
    assert text.rstrip().endswith("A narrative kept across regenerations.")
    missing = argparse.Namespace(run_dirs=[runs], out=tmp_path / "out2", title="x", notes=tmp_path / "absent.md")
    assert report_run(missing) == 2
    assert "cannot read --notes" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {row["method"] for row in summary["rows"]} == {"opd/reverse_kl", "opd_plus/alpha:0.5"}
    with pytest.raises(ValueError, match="no run directories"):
        write_report([runs / "not_a_run"], tmp_path / "none")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", r"metrics.jsonl: line 1 is not valid JSON"),
        ('{"step": 1, "loss/total": 0.5}\n[1, 2]\n{"step": 3}\n', r"metrics.jsonl: line 2 is not a metrics record"),
        ("", r"metrics.jsonl: the run has logged no step yet"),
    ],
)
def test_report_names_the_file_and_line_of_a_corrupt_or_empty_metrics_file(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_run(run)

    assert report_run(argparse.Namespace(run_dirs=[run], out=tmp_path / "out", title="corrupt", notes=None)) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.md").exists()


def test_report_skips_a_last_line_cut_short_by_a_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "eval/reverse_kl": 0.5}\n{"step": 2, "eval/rev')
    assert load_run(run)["curve"] == [{"step": 1, "eval/reverse_kl": 0.5}]
