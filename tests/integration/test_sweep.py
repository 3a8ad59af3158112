"""The grid runner on tiny random models: each run trains, is evaluated (its own held-out eval by default, or a
given evaluation), and writes result.json; the sweep command reports them."""

from __future__ import annotations

import json
from pathlib import Path

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
