"""The grid runner on tiny random models: each run trains, is evaluated (its own held-out eval by default, or a
given evaluation), and writes result.json; the sweep command reports them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opdplus.sweep import RunSpec, expand_grid, run_grid
from opdplus.train.config import to_dict


def _grid(tiny_train_config, tmp_path: Path) -> list[RunSpec]:
    train = to_dict(tiny_train_config(tmp_path / "unused", "run.steps=2", "eval.at_end=true"))
    return expand_grid(train, {"estimator": ["opd", "opd_plus"], "seed": [0]}, tmp_path / "sweep", eval_items=2)


def checkpoint_evaluation(spec: RunSpec, cfg, checkpoint: Path) -> dict:
    return {"checkpoint_exists": float((checkpoint / "model").is_dir()), "seed_seen": float(cfg.run.seed)}


def test_runs_are_evaluated_by_their_own_held_out_eval_by_default(tiny_train_config, tmp_path):
    lines: list[str] = []
    records = run_grid(_grid(tiny_train_config, tmp_path), workers=1, log=lines.append)
    assert [r["method"] for r in records] == ["opd/reverse_kl", "opd_plus/reverse_kl"]
    for record in records:
        assert record["steps"] == 2 and "eval/reverse_kl" in record["evaluation"]
    saved = sorted((tmp_path / "sweep").glob("*/result.json"))
    assert len(saved) == 2 and json.loads(saved[0].read_text())["eval/reverse_kl"] == records[0]["eval/reverse_kl"]
    assert any("eval/reverse_kl" in line for line in lines)


def test_a_given_evaluation_sees_the_final_checkpoint(tiny_train_config, tmp_path):
    records = run_grid(
        _grid(tiny_train_config, tmp_path), workers=1, log=lambda _: None, evaluate=checkpoint_evaluation
    )
    assert all(r["checkpoint_exists"] == 1.0 and r["evaluation"] == ["checkpoint_exists", "seed_seen"] for r in records)


def test_sweep_command_without_world_models(tiny_train_config, tmp_path, capsys):
    from opdplus.commands import main

    train = to_dict(tiny_train_config(tmp_path / "unused", "run.steps=1", "eval.at_end=true"))
    sweep = {"out": str(tmp_path / "out"), "workers": 1, "grid": {"estimator": ["opd_plus"]}, "train": train}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "sweep": {"out": str(tmp_path / "out"), "runs": 1}
    }
    assert (tmp_path / "out" / "report.md").is_file()


def test_a_grid_run_again_reuses_finished_runs_and_continues_a_stopped_one(tiny_train_config, tmp_path):
    from opdplus.train.config import config_from_dict
    from opdplus.train.loop import train

    runs = expand_grid(
        to_dict(tiny_train_config(tmp_path / "unused", "run.steps=2", "run.checkpoint_every=1", "eval.at_end=true")),
        {"estimator": ["opd", "opd_plus"], "seed": [0]},
        tmp_path / "sweep",
        eval_items=2,
    )
    first, stopped = runs
    run_grid([first], workers=1, log=lambda _: None)
    # the second run was stopped after its first checkpoint
    train(config_from_dict({**stopped.train, "run": {**stopped.train["run"], "steps": 1}}))
    metrics_before = Path(first.run_dir, "metrics.jsonl").read_text()
    lines: list[str] = []
    records = run_grid(runs, workers=2, log=lines.append)
    assert any("opd/reverse_kl/seed0: finished earlier" in line for line in lines)
    assert Path(first.run_dir, "metrics.jsonl").read_text() == metrics_before  # not trained again
    assert records[0]["resumed"] is False and records[1]["resumed"] is True and records[1]["steps"] == 2
    steps = [json.loads(line)["step"] for line in Path(stopped.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # another config under the same name is another run: trained again, not reused
    changed = expand_grid(
        {**first.train, "optim": {**first.train["optim"], "lr": 0.02}}, {"estimator": ["opd"]}, tmp_path / "sweep", 2
    )
    assert run_grid(changed, workers=1, log=lambda _: None)[0]["spec"] != records[0]["spec"]


def test_greedy_evaluation_writes_one_sample_per_held_out_item(tiny_train_config, tmp_path, capsys):
    from opdplus.commands import main
    from opdplus.eval.heldout import accuracy_key

    train = to_dict(tiny_train_config(tmp_path / "unused", "run.steps=1", "eval.at_start=true", "eval.at_end=true"))
    sweep = {
        "out": str(tmp_path / "out"),
        "workers": 1,
        "eval_items": 3,
        "evaluation": "greedy",
        "grid": {"estimator": ["opd_plus"]},
        "train": train,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 0
    (task,) = train["data"]["tasks"]
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    samples = [json.loads(line) for line in (run_dir / "samples" / f"{task}.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all({"id", "completion", "answer", "correct"} <= set(s) for s in samples)
    result = json.loads((run_dir / "result.json").read_text())
    assert result[accuracy_key(task)] == sum(s["correct"] for s in samples) / 3
    assert {"eval/reverse_kl_start", "eval/reverse_kl_end"} <= set(result)
    reference = json.loads((tmp_path / "out" / "sweep.json").read_text())["reference"]
    assert set(reference) == {"teacher", "student_start"} and accuracy_key(task) in reference["teacher"]


def test_unknown_evaluation_is_named(tmp_path):
    from opdplus.sweep import load_sweep_file

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"evaluation": "best", "grid": {}, "train": {}}))
    with pytest.raises(ValueError, match="evaluation must be one of own, greedy, got 'best'"):
        load_sweep_file(tmp_path / "s.yaml")
