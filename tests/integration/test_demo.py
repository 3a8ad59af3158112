"""The demo pipeline end to end at a tiny budget (micro world, 2 steps per run): table, report, plot,
and the structure of the last-line JSON; plus sweep grid expansion and report aggregation."""

import json
import math
from pathlib import Path

import pytest
import torch

from opdplus.report import aggregate, find_runs, markdown_table, mean_std
from opdplus.sweep import expand_grid, parse_divergence
from opdplus.world.build import SMOKE_SPEC, ensure_world, resolve_world_models

TINY_OVERRIDES = [
    "eval.every=1",
    "eval.num_prompts=2",
    "rollout.max_new_tokens=6",
    "data.prompts_per_step=3",  # one per task
    "rollout.samples_per_prompt=1",
    "eval.max_new_tokens=6",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return ensure_world(tmp_path_factory.mktemp("world") / "w", spec=SMOKE_SPEC, log=lambda _: None)


def test_demo_smoke(world, tmp_path, capsys):
    from opdplus.commands import main

    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--steps",
            "2",
            "--eval-items",
            "3",
            "--workers",
            "1",
            "--world",
            str(world.root),
            *TINY_OVERRIDES,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])["demo"]
    assert set(summary) == {"teacher", "student_start", "runs"}
    assert set(summary["teacher"]) == {"math_acc", "tool_acc", "multiturn_acc"}
    assert set(summary["student_start"]) == {"math_acc", "tool_acc", "multiturn_acc", "reverse_kl"}
    expected = {f"{e}/{d}" for e in ("opd", "opd_plus") for d in ("reverse_kl", "forward_kl", "jsd")}
    assert set(summary["runs"]) == expected
    for run in summary["runs"].values():
        assert 0 <= run["math_acc"] <= 1 and 0 <= run["tool_acc"] <= 1 and 0 <= run["multiturn_acc"] <= 1
        assert math.isfinite(run["reverse_kl"]) and run["reverse_kl"] >= 0
        assert run["steps"] == 2
    assert (out / "report.md").is_file() and (out / "curves.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "opd_plus/forward_kl" in report and "teacher" in report
    assert len(find_runs([out])) == 6


def test_expand_grid_and_world_models(world, tmp_path):
    train = {"student": {"model": "world:student"}, "teacher": {"model": "world:teacher"}, "loss": {"alpha": 0.3}}
    resolved = resolve_world_models(train, world.root)
    assert resolved["student"]["model"] == str(world.student) and resolved["teacher"]["model"] == str(world.teacher)
    runs = expand_grid(
        resolved,
        {"estimator": ["opd", "opd_plus"], "divergence": ["jsd", "alpha:0.5"], "seed": [0, 1]},
        tmp_path,
        eval_items=5,
    )
    assert len(runs) == 8 and len({r.run_dir for r in runs}) == 8
    alpha_run = next(r for r in runs if r.divergence == "alpha:0.5")
    assert alpha_run.train["loss"]["divergence"] == "alpha" and alpha_run.train["loss"]["alpha"] == 0.5
    jsd_run = next(r for r in runs if r.divergence == "jsd")
    assert "alpha" not in jsd_run.train["loss"]
    assert [r.train["run"]["seed"] for r in runs] == [0] * 4 + [1] * 4  # every method at seed 0 first
    with pytest.raises(ValueError, match="valid"):
        expand_grid(resolved, {"lr": [1e-3]}, tmp_path, eval_items=5)


def test_world_sweep_reports_teacher_and_starting_student(world, tmp_path):
    """A world sweep evaluates the teacher and the starting student on the runs' held-out items and carries
    them into sweep.json, the report's table and summary.json (also when re-reported from the directory)."""
    from opdplus.report import write_report
    from opdplus.sweep import run_sweep
    from opdplus.world.demo import demo_train_config
    from opdplus.world.evaluate import evaluate_run, world_reference

    overrides = [*TINY_OVERRIDES, "eval.every=0", "eval.at_end=false"]
    train = resolve_world_models(demo_train_config(1, overrides), world.root)
    data = {"train": train, "grid": {"estimator": ["opd_plus"], "divergence": ["jsd"], "seed": [0]}, "eval_items": 3}
    out = tmp_path / "sweep"
    run_sweep(data, source="test", out=out, workers=1, evaluate=evaluate_run, reference=world_reference)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"teacher", "student_start", "rows", "runs"}
    for key in ("teacher", "student_start"):
        assert set(summary[key]) == {"math_acc", "tool_acc", "multiturn_acc", "reverse_kl"}
        assert 0 <= summary[key]["math_acc"] <= 1 and 0 <= summary[key]["tool_acc"] <= 1
    assert summary["teacher"]["reverse_kl"] == pytest.approx(0.0, abs=1e-9)
    assert summary["student_start"]["reverse_kl"] > 0
    assert json.loads((out / "sweep.json").read_text())["reference"] == {
        k: summary[k] for k in ("teacher", "student_start")
    }
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[1].startswith("| teacher") and table[2].startswith("| student (start)")
    # `opdplus report DIR` finds the reference in the sweep's directory
    write_report([out], tmp_path / "again")
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["teacher"] == summary["teacher"] and again["student_start"] == summary["student_start"]


def test_parse_divergence():
    assert parse_divergence("jsd") == {"divergence": "jsd"}
    assert parse_divergence("alpha:0.5") == {"divergence": "alpha", "alpha": 0.5}


def test_aggregate_mean_std(tmp_path):
    def write(name, method, acc):
        d = Path(tmp_path, name)
        d.mkdir()
        (d / "result.json").write_text(
            json.dumps(
                {"method": method, "math_acc": acc, "tool_acc": 1.0, "reverse_kl": 0.1, "steps": 10, "wall_s": 5.0}
            )
        )
        (d / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/score": acc}) + "\n")

    write("a0", "opd/jsd", 0.2)
    write("a1", "opd/jsd", 0.4)
    write("b0", "opd_plus/jsd", 0.9)
    from opdplus.report import load_run

    rows = aggregate([load_run(d) for d in find_runs([tmp_path])])
    by_method = {r["method"]: r for r in rows}
    mean, std = by_method["opd/jsd"]["math_acc"]
    assert mean == pytest.approx(0.3) and std == pytest.approx(math.sqrt(0.02))
    assert by_method["opd_plus/jsd"]["n"] == 1 and by_method["opd_plus/jsd"]["math_acc"][1] == 0.0
    table = markdown_table(rows, [{"method": "teacher", "math_acc": 1.0, "tool_acc": 1.0, "reverse_kl": 0.0}])
    assert "0.300 ± 0.141" in table and table.splitlines()[2].startswith("| teacher")
    assert mean_std([1.0]) == (1.0, 0.0)


def test_sweep_preset_trains_with_the_demo_preset_and_validates():
    import yaml

    from opdplus.sweep import load_sweep_file
    from opdplus.train.config import TrainConfig, from_dict, validate
    from opdplus.world.demo import DEMO_PRESET, demo_train_config

    preset = Path(__file__).resolve().parents[2] / "configs" / "sweep.yaml"
    data = load_sweep_file(preset)
    assert DEMO_PRESET == preset.parent / "demo.yaml"
    assert data["train"] == yaml.safe_load(DEMO_PRESET.read_text()) == demo_train_config()  # one budget
    assert demo_train_config(7, ["optim.lr=0.5"])["run"]["steps"] == 7
    validate(from_dict(TrainConfig, {**data["train"], "student": {"model": "x"}, "teacher": {"model": "y"}}))
    assert set(data["grid"]["divergence"]) >= {
        "reverse_kl",
        "forward_kl",
        "jsd",
        "total_variation",
        "hellinger",
        "alpha:0.5",
    }


def test_exact_reverse_kl_zero_for_same_model_positive_otherwise(world):
    from opdplus.models.load import load_model_and_tokenizer
    from opdplus.rollout.sampler import Sampler, SamplingSettings
    from opdplus.tasks import get_task
    from opdplus.world.evaluate import exact_reverse_kl

    student, tok = load_model_and_tokenizer(str(world.student))
    teacher, _ = load_model_and_tokenizer(str(world.teacher))
    items = get_task("synthetic_math").items("eval", 3) + get_task("synthetic_tool_use").items("eval", 3)
    batch = Sampler(student, tok, SamplingSettings(max_new_tokens=5), torch.Generator().manual_seed(0)).sample(items)
    assert exact_reverse_kl(student, student, batch) == pytest.approx(0.0, abs=1e-9)
    kl = exact_reverse_kl(student, teacher, batch)
    assert kl > 0 and math.isfinite(kl)
    # by hand for the first completion token of row 0
    col = batch.prompt_len
    kwargs = {
        "input_ids": batch.input_ids_B_T[:1, :col],
        "attention_mask": batch.attention_mask_B_T[:1, :col].long(),
        "position_ids": batch.position_ids_B_T[:1, :col],
    }
    with torch.no_grad():
        p = torch.log_softmax(student(**kwargs).logits[0, -1].double(), -1)
        q = torch.log_softmax(teacher(**kwargs).logits[0, -1].double(), -1)
    one = batch.select([0])
    one.loss_mask_B_T[:, col + 1 :] = False
    assert exact_reverse_kl(student, teacher, one) == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-6)
