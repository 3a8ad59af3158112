"""Tables and plots from run directories (`opdplus report RUN_DIR...`).

A run directory holds ``metrics.jsonl`` (written by the training loop) and, for a sweep's runs,
``result.json`` (the final evaluation written by ``opdplus.sweep.run_one``). A plain ``opdplus train``
run without ``result.json`` is reported from its ``config.yaml`` and the last evaluation in its
``metrics.jsonl``. A directory that is not a run is searched one level down, so a sweep's output
directory can be passed as is. Runs of the same method (estimator / divergence) with different seeds
are aggregated as mean ± std (sample std, n-1).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from opdplus.train.metrics import read_metrics_file

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
COLUMNS = (
    ("math_acc", "math acc"),
    ("tool_acc", "tool-use acc"),
    ("multiturn_acc", "multi-turn acc"),
    ("reverse_kl", "held-out reverse KL"),
    ("steps", "steps"),
    ("wall_s", "wall s"),
)
CURVES = (
    ("eval/score", "held-out accuracy (eval/score, mean of tasks)"),
    ("eval/reverse_kl", "held-out reverse KL / token (eval/reverse_kl)"),
)


REFERENCE_LABELS = {"teacher": "teacher", "student_start": "student (start)"}
SWEEP_FILE = "sweep.json"  # written by `opdplus sweep` into its output directory


def saved_reference(paths: list[Path]) -> dict[str, dict[str, Any]] | None:
    """The ``reference`` (teacher, starting student) the sweeps saved in ``sweep.json`` in ``paths``, merged
    (one sweep per task: the teacher's accuracy on each)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        sweep_file = Path(path) / SWEEP_FILE
        if sweep_file.is_file():
            for role, metrics in (json.loads(sweep_file.read_text()).get("reference") or {}).items():
                merged.setdefault(role, {}).update(metrics)
    return merged or None


def is_run(path: Path) -> bool:
    return (path / RESULT_FILE).is_file() or (path / METRICS_FILE).is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among ``paths`` and their direct children, sorted, without duplicates."""
    found = []
    for path in paths:
        path = Path(path)
        if is_run(path):
            found.append(path)
        elif path.is_dir():
            found += sorted(child for child in path.iterdir() if child.is_dir() and is_run(child))
    return sorted(set(found))


def load_run(run_dir: Path) -> dict[str, Any]:
    """``result.json`` (or, without it, ``record_from_metrics``) plus the eval curve (the metrics lines
    that carry ``eval/`` keys). ValueError for a corrupt file or a run that has logged nothing."""
    metrics = run_dir / METRICS_FILE
    rows = read_metrics_file(metrics) if metrics.is_file() else []
    result = run_dir / RESULT_FILE
    if not rows and not result.is_file():
        raise ValueError(f"{metrics}: the run has logged no step yet (empty file); nothing to report")
    curve = [
        {"step": row["step"], **{k: v for k, v in row.items() if k.startswith("eval/")}}
        for row in rows
        if any(key.startswith("eval/") for key in row)
    ]
    record = _read_result(result) if result.is_file() else record_from_metrics(run_dir, rows, curve)
    return {**record, "run_dir": str(run_dir), "curve": curve}


def _read_result(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to report the run from metrics.jsonl") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object; delete it to report the run from metrics.jsonl")
    return record


def record_from_metrics(run_dir: Path, rows: list[dict[str, Any]], curve: list[dict[str, Any]]) -> dict[str, Any]:
    """A training run's row: the method from ``config.yaml``; accuracy (``eval/<task>/score``, decoded as
    ``eval.score_decoding`` says) and held-out reverse KL from the last evaluation; wall = the summed
    step and eval times."""
    import yaml

    config = run_dir / "config.yaml"
    loss = (yaml.safe_load(config.read_text()) or {}).get("loss", {}) if config.is_file() else {}
    divergence = str(loss.get("divergence", "?")) + (f":{loss['alpha']}" if loss.get("alpha") is not None else "")
    last = curve[-1] if curve else {}
    wall = sum(row.get("perf/step_s", 0.0) + row.get("perf/eval_s", 0.0) for row in rows)
    return {
        "name": run_dir.name,
        "method": f"{loss.get('estimator', '?')}/{divergence}",
        "steps": max((row["step"] for row in rows), default=0),
        "wall_s": wall if rows else None,
        "reverse_kl": last.get("eval/reverse_kl"),
        "math_acc": last.get("eval/math/score"),
        "tool_acc": last.get("eval/tool_use/score"),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, in first-seen order: ``{"method", "n", key: (mean, std) for each column}``."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    rows = []
    for method, group in by_method.items():
        row: dict[str, Any] = {"method": method, "n": len(group)}
        for key, _ in COLUMNS:
            values = [float(r[key]) for r in group if r.get(key) is not None]
            row[key] = mean_std(values) if values else None
        rows.append(row)
    return rows


def _cell(value: tuple[float, float] | None, key: str, n: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    digits = 0 if key in ("steps", "wall_s") else (4 if key == "reverse_kl" else 3)
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


# t_{0.975} with df = n - 1 degrees of freedom: the 95% interval of a mean over n seeds
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(values: list[float]) -> list[float] | None:
    """95% interval of the mean of ``values`` from the t distribution (n - 1 degrees of freedom); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean, std = mean_std(values)
    half = T_975.get(n - 1, 1.96) * std / math.sqrt(n)
    return [mean - half, mean + half]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a binomial proportion (a run's accuracy over its ``n`` items)."""
    if n < 1:
        return None
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


ACCURACY_TASKS = {"math_acc": "math", "tool_acc": "tool_use", "multiturn_acc": "lookup"}  # result key -> task name
OPTIONAL_COLUMNS = ("multiturn_acc",)  # shown only when some row has a value


def task_summaries(runs: list[dict[str, Any]], reference: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Per task with a greedy held-out accuracy in the runs' results: the teacher, the starting student and, per
    method, ``acc_mean``, ``acc_std`` (ddof = 1), ``acc_ci95`` (t interval over seeds), ``acc_seeds``, each run's
    Wilson interval over its items (``acc_run_ci95``) and the held-out KL at the start and the end (means)."""
    tasks: dict[str, Any] = {}
    for key, task in ACCURACY_TASKS.items():
        scored = [run for run in runs if run.get(key) is not None]
        if not scored:
            continue
        by_method: dict[str, list[dict]] = defaultdict(list)
        for run in sorted(scored, key=lambda r: r.get("seed", 0)):
            by_method[run["method"]].append(run)
        methods = {}
        for method, group in by_method.items():
            accuracies = [float(run[key]) for run in group]
            mean, std = mean_std(accuracies)
            entry: dict[str, Any] = {
                "acc_mean": mean,
                "acc_std": std if len(accuracies) > 1 else None,  # ddof = 1: undefined for one seed
                "acc_ci95": t_interval(accuracies),
                "acc_seeds": accuracies,
                "seeds": [run.get("seed") for run in group],
                "acc_run_ci95": [
                    wilson_interval(round(float(run[key]) * run["eval_items"]), run["eval_items"]) for run in group
                ],
            }
            for kl in ("eval/reverse_kl_start", "eval/reverse_kl_end", "eval/forward_kl_start", "eval/forward_kl_end"):
                values = [float(run[kl]) for run in group if run.get(kl) is not None]
                if values:
                    entry[kl.removeprefix("eval/")] = sum(values) / len(values)
            methods[method] = entry
        tasks[task] = {
            "n_eval": max(int(run.get("eval_items", 0)) for run in scored),
            "teacher": (reference or {}).get("teacher", {}).get(key),
            "student_start": (reference or {}).get("student_start", {}).get(key),
            "runs": methods,
        }
    return tasks


def task_table(task: str, summary: dict[str, Any]) -> str:
    """One task's markdown table: accuracy mean ± std, its 95% interval over seeds, the seeds, held-out KL."""

    def kl(entry: dict[str, Any], name: str) -> str:
        start, end = entry.get(f"{name}_start"), entry.get(f"{name}_end")
        return "–" if start is None or end is None else f"{start:.3f} → {end:.3f}"

    lines = [
        f"**{task}** (greedy, {summary['n_eval']} held-out items; teacher {_number(summary['teacher'])}, "
        f"starting student {_number(summary['student_start'])})",
        "",
        "| method | seeds | accuracy mean ± std | 95% interval (t) | per seed [95% Wilson interval over items] "
        "| reverse KL start → end "
        "| forward KL start → end |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, entry in summary["runs"].items():
        interval = entry["acc_ci95"]
        shown = "–" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
        std = "" if entry["acc_std"] is None else f" ± {entry['acc_std']:.3f}"
        seeds = ", ".join(
            f"{a:.3f}" + ("" if run_ci is None else f" [{run_ci[0]:.2f}, {run_ci[1]:.2f}]")
            for a, run_ci in zip(entry["acc_seeds"], entry["acc_run_ci95"])
        )
        lines.append(
            f"| {method} | {len(entry['acc_seeds'])} | {entry['acc_mean']:.3f}{std} | {shown} | {seeds} "
            f"| {kl(entry, 'reverse_kl')} | {kl(entry, 'forward_kl')} |"
        )
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def copy_samples(runs: list[dict[str, Any]], out_dir: Path) -> int:
    """Each run's final greedy samples (``<run>/samples/<task>.jsonl``) into
    ``out_dir/samples/<task>/<estimator>-<divergence>_seed<k>.jsonl``; the number of files copied."""
    copied = 0
    for run in runs:
        for source in sorted((Path(run["run_dir"]) / "samples").glob("*.jsonl")):
            estimator, _, divergence = run["method"].partition("/")
            target = (
                out_dir
                / "samples"
                / source.stem
                / f"{estimator}-{divergence.replace(':', '')}_seed{run.get('seed', 0)}.jsonl"
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            copied += 1
    return copied


def markdown_table(rows: list[dict[str, Any]], fixed_rows: list[dict[str, Any]] | None = None) -> str:
    """A markdown table of aggregated rows; ``fixed_rows`` (e.g. teacher, starting student) go first and
    hold plain numbers."""
    columns = [
        (k, title)
        for k, title in COLUMNS
        if k not in OPTIONAL_COLUMNS or any(row.get(k) is not None for row in [*rows, *(fixed_rows or [])])
    ]
    header = "| method | n | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for row in fixed_rows or []:
        cells = [_cell((float(row[k]), 0.0) if row.get(k) is not None else None, k, 1) for k, _ in columns]
        lines.append(f"| {row['method']} | – | " + " | ".join(cells) + " |")
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['n']} | " + " | ".join(_cell(row[k], k, row["n"]) for k, _ in columns) + " |"
        )
    return "\n".join(lines)


def mean_curves(runs: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per method, the mean over seeds of ``key`` at each eval step logged by all of its runs."""
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for point in run["curve"]:
            if point.get(key) is not None:
                by_method[run["method"]][point["step"]].append(float(point[key]))
    curves = {}
    for method, points in by_method.items():
        steps = sorted(points)
        curves[method] = (steps, [sum(points[s]) / len(points[s]) for s in steps])
    return curves


def curve_panels(runs: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(key, label, runs)`` per panel: ``CURVES`` over all runs, or, when the runs are of different tasks (one
    sweep per task), each task's held-out score and reverse KL over that task's runs."""
    tasks = sorted(
        {key.split("/")[1] for run in runs for point in run["curve"] for key in point if _is_task_score(key)}
    )
    if len(tasks) < 2:
        return [(key, label, runs) for key, label in CURVES]
    panels = []
    for task in tasks:
        task_runs = [run for run in runs if any(f"eval/{task}/score" in point for point in run["curve"])]
        panels += [
            (f"eval/{task}/score", f"{task}: held-out score of samples (eval/{task}/score)", task_runs),
            ("eval/reverse_kl", f"{task}: held-out reverse KL / token", task_runs),
        ]
    return panels


def _is_task_score(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "eval" and parts[2] == "score"


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """A PNG with one panel per curve in ``CURVES``, one line per method (colour = divergence, solid =
    OPD+, dashed = stop-gradient OPD); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = curve_panels(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    divergences = sorted({method.split("/", 1)[-1] for method in {run["method"] for run in runs}})
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(divergences)}
    for ax, (key, label, panel_runs) in zip(axes[0], panels):
        for method, (steps, values) in sorted(mean_curves(panel_runs, key).items()):
            estimator, _, divergence = method.partition("/")
            ax.plot(
                steps,
                values,
                "-" if estimator == "opd_plus" else "--",
                color=colors.get(divergence),
                marker="o" if estimator == "opd_plus" else "x",
                markersize=3,
                label=method,
            )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    run_dirs: list[Path],
    out_dir: Path,
    *,
    title: str = "Distillation report",
    command: str = "",
    reference: dict[str, dict[str, Any]] | None = None,
    notes: str = "",
) -> Path:
    """``report.md`` (table + plot + the command), ``curves.png`` and ``summary.json`` in ``out_dir``; returns
    report.md.

    ``reference``: the evaluation of the models the runs are measured against, keyed ``teacher`` and
    ``student_start`` (``opdplus.world.evaluate.world_reference``), on the same held-out items as the runs;
    without it, the ``reference`` a sweep saved in its ``sweep.json`` among ``run_dirs``, if any. It heads
    the table and is written into summary.json beside the rows."""
    runs = [load_run(d) for d in find_runs(run_dirs)]
    if not runs:
        raise ValueError(
            f"no run directories (with {METRICS_FILE} or {RESULT_FILE}) in {', '.join(map(str, run_dirs))}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(runs, out_dir / "curves.png", title)
    parts = [f"# {title}", ""]
    if command:
        parts += ["Command:", "", "```", command, "```", ""]
    if reference is None:
        reference = saved_reference(run_dirs)
    fixed_rows = [{"method": REFERENCE_LABELS.get(key, key), **metrics} for key, metrics in (reference or {}).items()]
    parts += [markdown_table(aggregate(runs), fixed_rows), ""]
    parts += [
        "Sweep runs (result.json): accuracy by greedy decoding on held-out items (per task); held-out reverse KL: "
        "exact KL(student ‖ teacher) per completion token over the vocabulary, on student samples of the "
        "held-out prompts. Plain training runs: the last `eval/` line of metrics.jsonl (accuracy decoded as "
        "eval.score_decoding says; reverse KL estimated on the sampled tokens). n = seeds; mean ± sample std.",
        "",
    ]
    tasks = task_summaries(runs, reference)
    for task, summary in tasks.items():
        parts += [task_table(task, summary), ""]
    if tasks:
        parts += [
            "Per task: the final students' greedy accuracy on the held-out items (mean ± sample std over seeds, the "
            "95% interval of the mean from the t distribution with seeds - 1 degrees of freedom); held-out KL per "
            "token from the runs' own evaluation at step 0 and at the end (reverse on student samples, forward on "
            "teacher samples). Each run's samples: `samples/<task>/<estimator>-<divergence>_seed<k>.jsonl`.",
            "",
        ]
        copy_samples(runs, out_dir)
    if plot is not None:
        parts += [f"![learning curves]({plot.name})", ""]
    if notes:
        parts += [notes, ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                **(reference or {}),
                **({"tasks": tasks} if tasks else {}),
                "rows": [{k: v for k, v in row.items()} for row in aggregate(runs)],
                "runs": [{k: v for k, v in run.items() if k != "curve"} for run in runs],
            },
            indent=2,
        )
    )
    return report
