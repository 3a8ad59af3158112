"""Grids of distillation runs on the demo world (`opdplus sweep --config FILE`), and the per-run
evaluation the demo and the report read.

A sweep file is YAML::

    out: runs/sweep                 # one sub-directory per run
    workers: 2                      # runs in parallel (one CPU thread each)
    eval_items: 200                 # held-out items per task for the final evaluation
    grid:
      estimator: [opd, opd_plus]
      divergence: [reverse_kl, forward_kl, jsd, "alpha:0.5"]   # "alpha:A" sets loss.alpha = A
      seed: [0, 1, 2]
    train: {...}                    # a complete `opdplus train` config (see configs/), or the path of one
                                    # relative to this file (configs/sweep.yaml: demo.yaml); the grid sets
                                    # loss.estimator, loss.divergence (and loss.alpha), run.seed, run.dir

``student.model`` / ``teacher.model`` may say ``world:student`` / ``world:teacher``: the cached demo
world's models (built first when missing). Each run writes ``result.json`` next to its
``metrics.jsonl``: greedy accuracy per task and the exact held-out reverse KL to the teacher.
"""

from __future__ import annotations

import copy
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
WORLD_PREFIX = "world:"
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


def resolve_world_models(train: dict[str, Any], world_root: Path | None = None) -> dict[str, Any]:
    """Replace ``world:teacher`` / ``world:student`` model names by the cached world's directories."""
    train = copy.deepcopy(train)
    roles = [
        role for role in ("student", "teacher") if str(train.get(role, {}).get("model", "")).startswith(WORLD_PREFIX)
    ]
    if roles:
        from opdplus.world.build import ensure_world

        paths = ensure_world(world_root)
        for role in roles:
            train[role]["model"] = str(getattr(paths, train[role]["model"][len(WORLD_PREFIX) :]))
    return train


def expand_grid(train: dict[str, Any], grid: dict[str, list], out: Path, eval_items: int) -> list[RunSpec]:
    """One ``RunSpec`` per point of ``grid`` (estimator x divergence x seed), seeds innermost."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; valid: {', '.join(GRID_KEYS)}")
    runs = []
    for divergence, estimator, seed in itertools.product(
        grid.get("divergence", ["reverse_kl"]), grid.get("estimator", ["opd_plus"]), grid.get("seed", [0])
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
# Evaluation of a trained student
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def exact_reverse_kl(student, teacher, batch) -> float:
    """Held-out KL(pi || q) per completion token, exact over the vocabulary at every position of the
    student's own samples (``opdplus.ops.exact_divergence``, float64): the mean over loss tokens of
    sum_v pi(v|c) (log pi(v|c) - log q(v|c))."""
    from opdplus.ops.exact import exact_divergence

    mask_B_T = batch.loss_mask_B_T[:, 1:]
    kwargs = {
        "input_ids": batch.input_ids_B_T,
        "attention_mask": batch.attention_mask_B_T.long(),
        "position_ids": batch.position_ids_B_T,
    }
    student_logits_B_T_V = student(**kwargs).logits[:, :-1].double()
    teacher_logits_B_T_V = teacher(**kwargs).logits[:, :-1].double()
    kl_B_T = exact_divergence(student_logits_B_T_V, teacher_logits_B_T_V, "reverse_kl")
    kl_B_T = torch.where(mask_B_T, kl_B_T, torch.zeros_like(kl_B_T))
    return float(kl_B_T.sum() / mask_B_T.sum().clamp(min=1))


def evaluate_student(
    student,
    teacher,
    tokenizer,
    *,
    items: int,
    seed: int = 0,
    max_new_tokens: int = 48,
    tasks: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """``math_acc`` / ``tool_acc`` (greedy, ``items`` held-out items per task) and ``reverse_kl`` (exact,
    per token, on one temperature-1 sample of the student per held-out item)."""
    from opdplus.eval.runner import greedy_accuracy, held_out_items
    from opdplus.rollout.sampler import Sampler, SamplingSettings
    from opdplus.tasks.base import get_task
    from opdplus.world.build import WORLD_TASKS

    by_name = {name: get_task(name) for name in tasks or WORLD_TASKS}
    items_by_task = held_out_items(by_name, items, seed)
    accuracy = greedy_accuracy(student, tokenizer, by_name, items_by_task, max_new_tokens=max_new_tokens)
    held_out = [item for task_items in items_by_task.values() for item in task_items]
    generator = torch.Generator().manual_seed(seed)
    sampler = Sampler(student, tokenizer, SamplingSettings(max_new_tokens=max_new_tokens, batch_size=256), generator)
    kls, weights = [], []
    for start in range(0, len(held_out), 256):
        batch = sampler.sample(held_out[start : start + 256])
        kls.append(exact_reverse_kl(student, teacher, batch))
        weights.append(float(batch.loss_mask_B_T.sum()))
    short = {"synthetic_math": "math_acc", "synthetic_tool_use": "tool_acc"}
    result = {short.get(name, f"{name}_acc"): round(acc, 4) for name, acc in accuracy.items()}
    result["reverse_kl"] = round(sum(k * w for k, w in zip(kls, weights)) / max(sum(weights), 1.0), 5)
    return result


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def run_one(spec: RunSpec, threads: int = 1) -> dict[str, Any]:
    """Train one run (overwriting its directory), evaluate the final student, write ``result.json``."""
    from opdplus.models.load import load_model_and_tokenizer
    from opdplus.train.config import config_from_dict
    from opdplus.train.loop import train

    torch.set_num_threads(threads)
    cfg = config_from_dict(spec.train)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(cfg, overwrite=True)
    train_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{spec.name}: the run saved no checkpoint to evaluate")
    student, tokenizer = load_model_and_tokenizer(str(result.checkpoint / "model"))
    teacher, _ = load_model_and_tokenizer(cfg.teacher.model)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    metrics = evaluate_student(
        student,
        teacher,
        tokenizer,
        items=spec.eval_items,
        seed=spec.eval_seed,
        max_new_tokens=max_new,
        tasks=tuple(cfg.data.tasks),
    )
    record = {
        "name": spec.name,
        "method": spec.method,
        "estimator": spec.estimator,
        "divergence": spec.divergence,
        "seed": spec.seed,
        "steps": result.step,
        "wall_s": round(time.perf_counter() - started, 1),
        "train_s": round(train_seconds, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "eval_items": spec.eval_items,
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
    runs: list[RunSpec], workers: int = 2, log: Callable[[str], None] = _print, poll_seconds: float = 10.0
) -> list[dict[str, Any]]:
    """Run ``runs`` on ``workers`` processes (one torch thread each); results in ``runs`` order.
    Prints one line per finished run and, every ``poll_seconds``, the steps of the running ones."""
    results: dict[str, dict] = {}
    started = time.perf_counter()
    total_steps = {spec.name: int(spec.train.get("run", {}).get("steps", 0)) for spec in runs}
    if workers <= 1:
        for i, spec in enumerate(runs, 1):
            log(f"[{i}/{len(runs)}] {spec.name} ...")
            results[spec.name] = run_one(spec)
            log(_done_line(results[spec.name], i, len(runs), started))
        return [results[spec.name] for spec in runs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(run_one, spec): spec for spec in runs}
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
    return (
        f"[{done}/{total}] {record['name']}: math {record['math_acc']:.3f}  tool {record['tool_acc']:.3f}  "
        f"reverse KL {record['reverse_kl']:.4f}  ({record['wall_s']:.0f}s; {time.perf_counter() - started:.0f}s total)"
    )


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"out", "workers", "eval_items", "grid", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: out, workers, eval_items, grid, train")
    if "train" not in data or "grid" not in data:
        raise ValueError(f"{path}: needs `grid` and `train` sections")
    if isinstance(data["train"], str):  # a training preset, relative to the sweep file
        data["train"] = yaml.safe_load((Path(path).parent / data["train"]).read_text())
    return data


def run_sweep(
    config: str | Path, *, out: str | Path | None = None, workers: int | None = None, report: bool = True
) -> dict[str, Any]:
    """Run the sweep file ``config`` (see the module docstring): its grid into ``out`` (default: the file's
    ``out``), ``workers`` runs at a time (default: the file's ``workers``, else 2), then ``report.md``."""
    from opdplus.report import write_report

    data = load_sweep_file(config)
    out = Path(out or data.get("out", "runs/sweep"))
    out.mkdir(parents=True, exist_ok=True)
    train = resolve_world_models(data["train"])
    runs = expand_grid(train, data["grid"], out, int(data.get("eval_items", 200)))
    (out / "sweep.json").write_text(json.dumps({"config": str(config), "runs": [asdict(r) for r in runs]}, indent=2))
    print(f"sweep: {len(runs)} runs into {out}")
    results = run_grid(runs, workers=workers or int(data.get("workers", 2)))
    if report:
        path = write_report(
            [Path(r.run_dir) for r in runs], out, title=f"Sweep {config}", command=f"opdplus sweep --config {config}"
        )
        print(f"report: {path}")
    return {"out": str(out), "runs": len(results)}
