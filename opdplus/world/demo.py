"""`opdplus demo`: OPD vs OPD+ on the synthetic math, tool-use and multi-turn world, in minutes on a CPU.

1. Builds (or loads) the cached demo world: a teacher at >= 95% and a pruned student well below it, on three
   tasks: math word problems, one JSON tool call, and multi-turn lookups (call a tool, read its answer, compute).
2. Distils the same starting student with ``opd`` and ``opd_plus`` for reverse KL, forward KL and
   JSD: same seed, same budget, two runs at a time (one CPU thread each).
3. Evaluates every final student on held-out problems (greedy accuracy per task, by greedy episodes for
   the multi-turn task; exact reverse KL to the teacher), prints a table, writes ``report.md`` and
   ``curves.png`` into the run directory and prints, as its last line, one JSON object ``{"demo": {...}}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opdplus.ops.advantages import ESTIMATORS

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
ACCURACIES = ("math_acc", "tool_acc", "multiturn_acc")  # greedy held-out accuracy per world task

# The distillation config of every demo run (a complete `opdplus train` config; models are filled in). It lives
# in the source tree, next to the package, like bench/.
DEMO_PRESET = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_train_config(steps: int | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``configs/demo.yaml`` with ``steps`` (default: its run.steps) and ``key=value`` overrides (as for
    `opdplus train`)."""
    import yaml

    from opdplus.train.config import ConfigError, apply_overrides

    if not DEMO_PRESET.is_file():
        raise ConfigError(
            f"the demo's training preset {DEMO_PRESET} is missing; it is part of the source tree (configs/), so "
            "run the demo from a checkout of the repository installed with `pip install -e .` (as `make demo` does)"
        )
    train = yaml.safe_load(DEMO_PRESET.read_text())
    if steps is not None:
        train["run"]["steps"] = steps
    return apply_overrides(train, list(overrides))


def teacher_accuracy(info: dict, teacher, tokenizer, eval_items: int) -> dict[str, float]:
    """The teacher's greedy held-out accuracy: from ``world.json`` when it was measured on the same
    items, else measured now."""
    from opdplus.eval.runner import greedy_accuracy, held_out_items
    from opdplus.tasks.base import get_task
    from opdplus.world.build import WORLD_LIMITS
    from opdplus.world.evaluate import ACCURACY_KEYS

    accuracy = info["teacher"]["eval_accuracy"]
    if info["spec"]["eval_items"] != eval_items:
        tasks = {name: get_task(name) for name in accuracy}
        items = held_out_items(tasks, eval_items, 0)
        accuracy = greedy_accuracy(teacher, tokenizer, tasks, items, max_new_tokens=48, limits=WORLD_LIMITS)
    return {ACCURACY_KEYS[name]: round(acc, 4) for name, acc in accuracy.items()}


def demo_summary(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The last-line JSON: teacher, starting student and one entry per run."""
    keep = (*ACCURACIES, "reverse_kl")
    teacher, start = rows
    return {
        "demo": {
            "teacher": {k: teacher[k] for k in ACCURACIES},
            "student_start": {k: start[k] for k in keep},
            "runs": {
                r["method"]: {**{k: r[k] for k in keep}, "steps": r["steps"], "wall_s": r["wall_s"]} for r in results
            },
        }
    }


def print_table(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    print(
        f"{'method':22s} {'math acc':>9s} {'tool acc':>9s} {'mt acc':>9s} {'rev. KL':>9s} {'steps':>6s} {'wall s':>7s}"
    )
    for r in [*rows, *results]:
        steps, wall = (f"{r['steps']:6d}", f"{r['wall_s']:7.0f}") if "steps" in r else ("", "")
        accuracies = " ".join(f"{r[k]:9.3f}" for k in ACCURACIES)
        print(f"{r['method']:22s} {accuracies} {r['reverse_kl']:9.4f} {steps:>6s} {wall:>7s}")


def run_demo(
    out: Path,
    *,
    steps: int | None,
    eval_items: int,
    workers: int,
    overrides: Sequence[str] = (),
    world_root: Path | None = None,
) -> dict[str, Any]:
    """The whole demo; returns the summary printed as the last line."""
    import torch

    from opdplus.models.load import load_model_and_tokenizer
    from opdplus.report import write_report
    from opdplus.sweep import expand_grid, run_grid
    from opdplus.world.build import ensure_world, load_world_info, resolve_world_models
    from opdplus.world.evaluate import evaluate_run, evaluate_student

    started = time.perf_counter()
    torch.set_num_threads(1)
    paths = ensure_world(world_root)
    info = load_world_info(paths)
    print(f"world: teacher {paths.teacher}\n       student {paths.student}")
    out.mkdir(parents=True, exist_ok=True)
    student, tokenizer = load_model_and_tokenizer(str(paths.student))
    teacher, _ = load_model_and_tokenizer(str(paths.teacher))
    start = evaluate_student(student, teacher, tokenizer, items=eval_items)
    # the teacher's reverse KL to itself is 0
    rows = [
        {"method": "teacher", **teacher_accuracy(info, teacher, tokenizer, eval_items), "reverse_kl": 0.0},
        {"method": "student (start)", **start},
    ]
    print(
        f"starting student: math {start['math_acc']:.3f}  tool {start['tool_acc']:.3f}  "
        f"multi-turn {start['multiturn_acc']:.3f}  reverse KL {start['reverse_kl']:.4f}"
    )
    train = resolve_world_models(demo_train_config(steps, overrides), world_root)
    steps = train["run"]["steps"]
    runs = expand_grid(
        train, {"estimator": list(ESTIMATORS), "divergence": list(DIVERGENCES), "seed": [0]}, out, eval_items
    )
    print(f"distilling: {len(runs)} runs x {steps} steps, {workers} at a time")
    results = run_grid(runs, workers=workers, evaluate=evaluate_run)
    print()
    print_table(rows, results)
    report = write_report(
        [Path(r.run_dir) for r in runs],
        out,
        title="opdplus demo: OPD vs OPD+ on the synthetic world",
        command="opdplus demo",
        reference={"teacher": {k: v for k, v in rows[0].items() if k != "method"}, "student_start": start},
        notes=f"Teacher and student: `{paths.root}`. Total wall time {time.perf_counter() - started:.0f}s.",
    )
    print(f"\nreport: {report}\nplot:   {out / 'curves.png'}")
    summary = demo_summary(rows, results)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
