"""Grids of distillation runs (`opdplus sweep --config FILE`): estimators x divergences x seeds over one
training config, run a few at a time, each evaluated when it ends.

A sweep file is YAML::

    out: runs/sweep                 # one sub-directory per run
    workers: 2                      # runs in parallel (one CPU thread each)
    eval_items: 200                 # held-out items per task for the final evaluation
    evaluation: own                 # own: each run's last eval/ metrics; greedy: greedy accuracy on eval_items
                                    # held-out items per task, one sample line per item (opdplus.eval.heldout)
    grid:
      estimator: [opd, opd_plus]
      divergence: [reverse_kl, forward_kl, jsd, "alpha:0.5"]   # "alpha:A" sets loss.alpha = A
      seed: [0, 1, 2]
    train: {...}                    # a complete `opdplus train` config (see configs/), or the path of one
                                    # relative to this file (configs/sweep.yaml: demo.yaml); the grid sets
                                    # loss.estimator, loss.divergence (and loss.alpha), run.seed, run.dir

Each run writes ``result.json`` next to its ``metrics.jsonl``: its settings, times and the evaluation of its
final student. The evaluation is a function ``evaluate(spec, cfg, checkpoint) -> dict`` given to the runner
(a module-level function, so that worker processes can receive it); without one, a run is evaluated by its own
held-out evaluation (the ``eval/`` metrics of its last step, ``eval.at_end``). The demo world
(``opdplus.world``) gives its own: greedy accuracy per task and the exact held-out reverse KL to the teacher,
for configs whose models say ``world:student`` / ``world:teacher``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

RESULT_FILE = "result.json"
# How each run's final student is evaluated: `own` = its own last held-out evaluation (eval/ metrics);
# `greedy` = greedy accuracy on `eval_items` held-out items per task, samples written (opdplus.eval.heldout).
EVALUATIONS = ("own", "greedy")
GRID_KEYS = ("estimator", "divergence", "seed")


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: where it goes and what it changes in the base train config."""

    name: str  # e.g. "opd_plus/forward_kl/seed0"
    run_dir: str
    estimator: str
    divergence: str  # "alpha:0.5" style for parametrised divergences
    seed: int
    train: dict[str, Any]  # the resolved train config dict of this run
    eval_items: int
    eval_seed: int = 0

    @property
    def method(self) -> str:
        return f"{self.estimator}/{self.divergence}"


def parse_divergence(text: str) -> dict[str, Any]:
    """``"alpha:0.5"`` -> ``{"divergence": "alpha", "alpha": 0.5}``; ``"jsd"`` -> ``{"divergence": "jsd"}``."""
    name, _, param = str(text).partition(":")
    return {"divergence": name, "alpha": float(param)} if param else {"divergence": name}


def expand_grid(train: dict[str, Any], grid: dict[str, list], out: Path, eval_items: int) -> list[RunSpec]:
    """One ``RunSpec`` per point of ``grid`` (estimator x divergence x seed), seeds outermost: a grid stopped
    part-way has every method at the first seed before any method at the second."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; valid: {', '.join(GRID_KEYS)}")
    runs = []
    for seed, divergence, estimator in itertools.product(
        grid.get("seed", [0]), grid.get("divergence", ["reverse_kl"]), grid.get("estimator", ["opd_plus"])
    ):
        name = f"{estimator}/{divergence}/seed{seed}"
        run_dir = out / f"{estimator}-{str(divergence).replace(':', '')}-seed{seed}"
        cfg = copy.deepcopy(train)
        loss = cfg.setdefault("loss", {})
        loss.pop("alpha", None)
        loss.update({"estimator": estimator, **parse_divergence(divergence)})
        cfg.setdefault("run", {}).update({"seed": int(seed), "dir": str(run_dir)})
        runs.append(
            RunSpec(
                name=name,
                run_dir=str(run_dir),
                estimator=estimator,
                divergence=str(divergence),
                seed=int(seed),
                train=cfg,
                eval_items=eval_items,
            )
        )
    return runs


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


Evaluate = Callable[[RunSpec, Any, Path], dict[str, Any]]  # (spec, TrainConfig, checkpoint dir) -> metrics
# (train config dict, held-out items per task) -> {"teacher": metrics, "student_start": metrics}
Reference = Callable[[dict[str, Any], int], dict[str, dict[str, Any]]]


def final_eval_metrics(result: Any) -> dict[str, Any]:
    """A run's own held-out evaluation: the ``eval/`` metrics of its last step."""
    return {key: value for key, value in result.metrics.items() if key.startswith("eval/")}


def spec_digest(spec: RunSpec) -> str:
    """A short hash of everything that defines a run (its train config included): a finished run is reused
    only when it is this run."""
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_result(spec: RunSpec) -> dict[str, Any] | None:
    """The ``result.json`` of a run that already finished with exactly this spec, else None."""
    try:
        record = json.loads(Path(spec.run_dir, RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("spec") == spec_digest(spec) else None


def _resumable(cfg: Any) -> bool:
    """The run directory holds a checkpoint of this very run (a grid stopped mid-run): continue it."""
    from opdplus.train.checkpoint import latest_checkpoint
    from opdplus.train.run_dir import RunDirError, check_run_dir

    run_dir = Path(cfg.run.dir)
    try:
        if not (run_dir / "config.yaml").is_file() or latest_checkpoint(run_dir) is None:
            return False
        check_run_dir(cfg, resume=True, overwrite=False)
    except (RunDirError, ValueError, OSError):
        return False
    return True


def run_one(spec: RunSpec, threads: int = 1, evaluate: Evaluate | None = None) -> dict[str, Any]:
    """Train one run, evaluate the final student, write ``result.json``. A run that stopped after a checkpoint
    continues from it; anything else in its directory is overwritten."""
    from opdplus.train.config import config_from_dict
    from opdplus.train.loop import train

    torch.set_num_threads(threads)
    cfg = config_from_dict(spec.train)
    started, cpu_started = time.perf_counter(), time.process_time()
    resume = _resumable(cfg)
    result = train(cfg, resume=resume, overwrite=not resume)
    train_seconds = time.perf_counter() - started
    if evaluate is None:
        metrics = final_eval_metrics(result)
    elif result.checkpoint is None:
        raise RuntimeError(f"{spec.name}: the run saved no checkpoint to evaluate")
    else:
        metrics = evaluate(spec, cfg, result.checkpoint)
    record = {
        "name": spec.name,
        "spec": spec_digest(spec),
        "resumed": resume,
        "method": spec.method,
        "estimator": spec.estimator,
        "divergence": spec.divergence,
        "seed": spec.seed,
        "steps": result.step,
        "wall_s": round(time.perf_counter() - started, 1),
        "train_s": round(train_seconds, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "eval_items": spec.eval_items,
        "evaluation": sorted(metrics),
        **metrics,
    }
    Path(spec.run_dir, RESULT_FILE).write_text(json.dumps(record, indent=2))
    return record


def _progress_of(spec: RunSpec) -> int:
    """The last step logged by a running run (0 before its first step)."""
    path = Path(spec.run_dir) / "metrics.jsonl"
    try:
        last = path.read_text().strip().rsplit("\n", 1)[-1]
        return int(json.loads(last)["step"]) if last else 0
    except (OSError, ValueError, KeyError):
        return 0


def _print(text: str) -> None:
    print(text, flush=True)


def run_grid(
    runs: list[RunSpec],
    workers: int = 2,
    log: Callable[[str], None] = _print,
    poll_seconds: float = 10.0,
    evaluate: Evaluate | None = None,
) -> list[dict[str, Any]]:
    """Run ``runs`` on ``workers`` processes (one torch thread each), each evaluated with ``evaluate``; results
    in ``runs`` order. Prints one line per finished run and, every ``poll_seconds``, the steps of the running
    ones."""
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for spec in runs:  # finished before (a grid run again after a stop): reused, not rerun
        earlier = finished_result(spec)
        if earlier is not None:
            results[spec.name] = earlier
            log(f"[{len(results)}/{len(runs)}] {spec.name}: finished earlier ({Path(spec.run_dir, RESULT_FILE)})")
    todo = [spec for spec in runs if spec.name not in results]
    total_steps = {spec.name: int(spec.train.get("run", {}).get("steps", 0)) for spec in runs}
    if workers <= 1 or len(todo) <= 1:
        for spec in todo:
            log(f"[{len(results) + 1}/{len(runs)}] {spec.name} ...")
            results[spec.name] = run_one(spec, threads=max(workers, 1) if len(todo) == 1 else 1, evaluate=evaluate)
            log(_done_line(results[spec.name], len(results), len(runs), started))
        return [results[spec.name] for spec in runs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(run_one, spec, 1, evaluate): spec for spec in todo}
        while pending:
            done, _ = wait(pending, timeout=poll_seconds, return_when=FIRST_COMPLETED)
            for future in done:
                spec = pending.pop(future)
                results[spec.name] = future.result()
                log(_done_line(results[spec.name], len(results), len(runs), started))
            running = [spec for spec in pending.values() if 0 < _progress_of(spec)]
            if not done and running:
                log(
                    f"  {time.perf_counter() - started:4.0f}s  "
                    + "  ".join(f"{spec.name} step {_progress_of(spec)}/{total_steps[spec.name]}" for spec in running)
                )
    return [results[spec.name] for spec in runs]


def _done_line(record: dict, done: int, total: int, started: float) -> str:
    shown = "  ".join(f"{key} {record[key]:.4g}" for key in record["evaluation"] if isinstance(record[key], float))
    return (
        f"[{done}/{total}] {record['name']}: {shown}  "
        f"({record['wall_s']:.0f}s; {time.perf_counter() - started:.0f}s total)"
    )


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"out", "workers", "eval_items", "evaluation", "grid", "train"}
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; valid: out, workers, eval_items, evaluation, grid, train"
        )
    if data.get("evaluation", "own") not in EVALUATIONS:
        raise ValueError(f"{path}: evaluation must be one of {', '.join(EVALUATIONS)}, got {data['evaluation']!r}")
    if "train" not in data or "grid" not in data:
        raise ValueError(f"{path}: needs `grid` and `train` sections")
    if isinstance(data["train"], str):  # a training preset, relative to the sweep file
        data["train"] = yaml.safe_load((Path(path).parent / data["train"]).read_text())
    return data


def _saved_reference(out: Path, specs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The reference measured by an earlier start of the same grid (same runs, same configs), if any."""
    from opdplus.report import SWEEP_FILE

    try:
        saved = json.loads((out / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return saved.get("reference") if isinstance(saved, dict) and saved.get("runs") == specs else None


def run_sweep(
    data: dict[str, Any],
    *,
    source: str | Path,
    out: str | Path | None = None,
    workers: int | None = None,
    report: bool = True,
    evaluate: Evaluate | None = None,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """Run a sweep (``data`` as ``load_sweep_file`` returns it, read from ``source``): its grid into ``out``
    (default: the file's ``out``), ``workers`` runs at a time (default: the file's ``workers``, else 2), each
    evaluated with ``evaluate``; then ``report.md``. ``reference`` evaluates the teacher and the starting
    student on the runs' held-out items first; its result goes into ``sweep.json``, the report's table and
    ``summary.json``."""
    from opdplus.report import SWEEP_FILE, write_report

    out = Path(out or data.get("out", "runs/sweep"))
    out.mkdir(parents=True, exist_ok=True)
    eval_items = int(data.get("eval_items", 200))
    runs = expand_grid(data["train"], data["grid"], out, eval_items)
    specs = [asdict(r) for r in runs]
    measured = _saved_reference(out, specs) if reference is not None else None
    if reference is not None and measured is None:
        measured = reference(data["train"], eval_items)
    record = {"config": str(source), "reference": measured, "runs": specs}
    (out / SWEEP_FILE).write_text(json.dumps(record, indent=2))
    print(f"sweep: {len(runs)} runs into {out}")
    results = run_grid(runs, workers=workers or int(data.get("workers", 2)), evaluate=evaluate)
    if report:
        path = write_report(
            [Path(r.run_dir) for r in runs],
            out,
            title=f"Sweep {source}",
            command=f"opdplus sweep --config {source}",
            reference=measured,
        )
        print(f"report: {path}")
    return {"out": str(out), "runs": len(results)}
