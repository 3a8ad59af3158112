"""The demo world's evaluation of a distilled student: greedy accuracy per task on held-out items and the
exact held-out reverse KL to the teacher (what the demo's table and the synthetic sweep report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opdplus.rollout.multiturn import EpisodeLimits
from opdplus.sweep import RunSpec

# result keys of the world's tasks (the report's columns, opdplus.report.COLUMNS); another task: <task>_acc
ACCURACY_KEYS = {"synthetic_math": "math_acc", "synthetic_tool_use": "tool_acc", "synthetic_lookup": "multiturn_acc"}


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
    limits: EpisodeLimits | None = None,
) -> dict[str, float]:
    """``math_acc`` / ``tool_acc`` / ``multiturn_acc`` (greedy, ``items`` held-out items per task; a multi-turn
    task's greedy episodes bounded by ``limits``, default ``WORLD_LIMITS``, with ``max_new_tokens`` per turn) and
    ``reverse_kl`` (exact, per student token, on one temperature-1 sample of the student per held-out item: a
    completion, or a whole episode)."""
    from dataclasses import replace

    from opdplus.envs.base import is_multi_turn
    from opdplus.eval.runner import greedy_accuracy, held_out_items
    from opdplus.rollout.multiturn import EpisodeSampler
    from opdplus.rollout.sampler import Sampler, SamplingSettings
    from opdplus.tasks.base import get_task
    from opdplus.world.build import WORLD_LIMITS, WORLD_TASKS

    limits = replace(limits or WORLD_LIMITS, max_new_tokens=max_new_tokens)
    by_name = {name: get_task(name) for name in tasks or WORLD_TASKS}
    items_by_task = held_out_items(by_name, items, seed)
    accuracy = greedy_accuracy(student, tokenizer, by_name, items_by_task, max_new_tokens=max_new_tokens, limits=limits)
    held_out = [item for task_items in items_by_task.values() for item in task_items]
    generator = torch.Generator().manual_seed(seed)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, batch_size=256)
    sampler = Sampler(student, tokenizer, settings, generator)
    multi_turn = [task for task in by_name.values() if is_multi_turn(task)]
    if multi_turn:
        sampler = EpisodeSampler(sampler, multi_turn, limits)
    kls, weights = [], []
    for start in range(0, len(held_out), 256):
        batch = sampler.sample(held_out[start : start + 256])
        kls.append(exact_reverse_kl(student, teacher, batch))
        weights.append(float(batch.loss_mask_B_T.sum()))
    result = {ACCURACY_KEYS.get(name, f"{name}_acc"): round(acc, 4) for name, acc in accuracy.items()}
    result["reverse_kl"] = round(sum(k * w for k, w in zip(kls, weights)) / max(sum(weights), 1.0), 5)
    return result


def run_eval_settings(cfg: Any) -> dict[str, Any]:
    """``evaluate_student``'s decoding settings for runs of ``cfg``: tokens per completion (or turn), the tasks
    and the episode bounds, as its training evaluates them."""
    from opdplus.train.builders import episode_limits

    return {
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        "tasks": tuple(cfg.data.tasks),
        "limits": episode_limits(cfg),
    }


def evaluate_run(spec: RunSpec, cfg: Any, checkpoint: Path) -> dict[str, Any]:
    """The sweep runner's evaluation hook for world runs: the final student of ``checkpoint`` against
    ``cfg``'s teacher on ``spec.eval_items`` held-out items per task."""
    from opdplus.models.load import load_model_and_tokenizer

    student, tokenizer = load_model_and_tokenizer(str(checkpoint / "model"))
    teacher, _ = load_model_and_tokenizer(cfg.teacher.model)
    return evaluate_student(
        student, teacher, tokenizer, items=spec.eval_items, seed=spec.eval_seed, **run_eval_settings(cfg)
    )


def world_reference(train: dict[str, Any], items: int) -> dict[str, dict[str, float]]:
    """What a sweep of ``train`` (models resolved to directories) is measured against: the teacher's and the
    starting student's evaluation on the same ``items`` held-out items per task as its runs
    (``evaluate_run``), ``{"teacher": ..., "student_start": ...}``."""
    import copy

    from opdplus.models.load import load_model_and_tokenizer
    from opdplus.train.config import config_from_dict

    cfg = config_from_dict(copy.deepcopy(train))
    student, tokenizer = load_model_and_tokenizer(cfg.student.model)
    teacher, _ = load_model_and_tokenizer(cfg.teacher.model)
    settings = {"items": items, **run_eval_settings(cfg)}
    return {
        "teacher": evaluate_student(teacher, teacher, tokenizer, **settings),
        "student_start": evaluate_student(student, teacher, tokenizer, **settings),
    }
