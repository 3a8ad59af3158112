"""Greedy held-out evaluation of a sweep's runs on real tasks, with one sample record per item.

``evaluate_heldout_run`` is the sweep's ``evaluation: greedy`` hook (``opdplus.sweep``): the final student of a
run, greedy, on ``eval_items`` held-out items of each of the run's tasks, each completion written to
``<run dir>/samples/<task>.jsonl`` (``id``, ``completion``, ``answer``, ``correct``, and ``parsed`` when the task
parses its completions, e.g. tool calls as ``[{name: {arg: value}}]``) so anyone can re-score them; beside the
accuracies it returns the run's own held-out divergences (``eval/...`` of its first and last evaluation, see
``opdplus.train.evaluate``). ``heldout_reference`` scores the teacher and the starting student the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opdplus.eval.runner import greedy_completions, held_out_items, parsed_completion
from opdplus.tasks.base import Task, get_task

SAMPLES_DIR = "samples"
ACCURACY_KEYS = {"tool_use": "tool_acc"}  # the report's column names (opdplus.report.COLUMNS); else <task>_acc


def accuracy_key(task: str) -> str:
    return ACCURACY_KEYS.get(task, f"{task}_acc")


def greedy_heldout(
    model: Any,
    tokenizer: Any,
    tasks: dict[str, Task],
    *,
    items: int,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 50,
    samples_dir: Path | None = None,
) -> dict[str, float]:
    """``{accuracy_key(task): mean score}`` of greedy completions on ``items`` held-out items per task; with
    ``samples_dir``, one JSON line per item in ``samples_dir/<task>.jsonl``."""
    accuracy = {}
    for name, task_items in held_out_items(tasks, items, seed).items():
        texts = greedy_completions(model, tokenizer, task_items, max_new_tokens=max_new_tokens, batch_size=batch_size)
        records = [
            {
                "id": item.id,
                "completion": text,
                "answer": item.answer,
                "correct": tasks[name].score(item, text) == 1.0,
                **({"parsed": parsed_completion(tasks[name], item, text)} if hasattr(tasks[name], "parse") else {}),
            }
            for item, text in zip(task_items, texts)
        ]
        accuracy[accuracy_key(name)] = sum(r["correct"] for r in records) / max(len(records), 1)
        if samples_dir is not None:
            samples_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(record, default=repr) + "\n" for record in records)
            (samples_dir / f"{name}.jsonl").write_text(lines)
    return accuracy


def _tasks(data: dict[str, Any]) -> dict[str, Task]:
    return {name: get_task(name, **data.get("task_options", {}).get(name, {})) for name in data["tasks"]}


def _max_new_tokens(train: dict[str, Any]) -> int:
    return train.get("eval", {}).get("max_new_tokens") or train["rollout"]["max_new_tokens"]


def held_out_divergences(metrics_path: Path) -> dict[str, float]:
    """``eval/reverse_kl`` and ``eval/forward_kl`` of a run's first and last held-out evaluation, as
    ``<key>_start`` / ``<key>_end``; the curves stay in its ``metrics.jsonl``."""
    from opdplus.train.metrics import read_metrics_file

    rows = [row for row in read_metrics_file(metrics_path) if "eval/reverse_kl" in row]
    out: dict[str, float] = {}
    for key in ("eval/reverse_kl", "eval/forward_kl"):
        values = [row[key] for row in rows if key in row]
        if values:
            out[f"{key}_start"], out[f"{key}_end"] = values[0], values[-1]
    return out


def evaluate_heldout_run(spec: Any, cfg: Any, checkpoint: Path) -> dict[str, Any]:
    """The sweep's ``evaluation: greedy`` hook (see the module docstring)."""
    from dataclasses import asdict

    from opdplus.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(checkpoint / "model"))
    train = asdict(cfg)
    accuracy = greedy_heldout(
        model,
        tokenizer,
        _tasks(train["data"]),
        items=spec.eval_items,
        seed=spec.eval_seed,
        max_new_tokens=_max_new_tokens(train),
        samples_dir=Path(spec.run_dir) / SAMPLES_DIR,
    )
    return {**accuracy, **held_out_divergences(Path(spec.run_dir) / "metrics.jsonl")}


def heldout_reference(train: dict[str, Any], items: int) -> dict[str, dict[str, float]]:
    """The teacher's and the starting student's greedy accuracy on the runs' held-out items."""
    from opdplus.models.load import load_model_and_tokenizer

    tasks, max_new_tokens = _tasks(train["data"]), _max_new_tokens(train)
    out = {}
    for role, name in (("teacher", "teacher"), ("student_start", "student")):
        spec = train[name]
        model, tokenizer = load_model_and_tokenizer(
            spec["model"], tokenizer=spec.get("tokenizer"), tiny=spec.get("tiny")
        )
        out[role] = greedy_heldout(model, tokenizer, tasks, items=items, seed=0, max_new_tokens=max_new_tokens)
    return out
