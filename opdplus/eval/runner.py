"""The evaluation driver: batched greedy generation over a task's eval items, scored by the task.

Greedy completions come from the rollout sampler with ``greedy=True`` (``greedy_completions``): the same
decode loop and end-of-sequence rule as training rollouts. Decoded text is cut at the item's first stop
string (``meta["stop"]``) before it is scored or recorded (``completion_texts``).

Prompts are rendered exactly as in training (``render_prompt``; chat-rendered text carries its own
special tokens, plain text gets the tokenizer's). A model without a chat template gets the tasks'
plain prompt format; a chat template that renders tools gets the BFCL functions as tools, any other
gets them in the system message (see ``opdplus.tasks.bfcl``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import torch

from opdplus.envs.base import MultiTurnTask, is_multi_turn
from opdplus.rollout.fast_sampler import FastSampler
from opdplus.rollout.multiturn import EpisodeLimits, EpisodeResult, run_episodes
from opdplus.rollout.sampler import Sampler, SamplingSettings
from opdplus.rollout.types import RolloutBatch
from opdplus.tasks.base import Task, TaskItem, get_task, render_prompt
from opdplus.tasks.math import cut_at_stop

# eval task -> (registered task, its options, default max_new_tokens)
EVAL_TASKS: dict[str, tuple[str, dict[str, Any], int]] = {
    "gsm8k": ("gsm8k", {}, 256),
    "aime25": ("aime25", {}, 512),
    "math_heldout": ("math", {}, 256),
    "bfcl_simple": ("tool_use", {"categories": ["simple_python"]}, 128),
    "bfcl_multiple": ("tool_use", {"categories": ["multiple"]}, 128),
    "bfcl_parallel": ("tool_use", {"categories": ["parallel"]}, 256),
    "bfcl_parallel_multiple": ("tool_use", {"categories": ["parallel_multiple"]}, 256),
    "bfcl_live_simple": ("tool_use", {"categories": ["live_simple"]}, 128),
    "bfcl_multi_turn_base": ("bfcl_multi_turn_base", {}, 64),  # tokens per assistant turn
}
# multi-turn eval task -> its episodes' bounds (``max_new_tokens`` per turn comes from EVAL_TASKS or the caller)
EVAL_EPISODE_LIMITS: dict[str, EpisodeLimits] = {
    "bfcl_multi_turn_base": EpisodeLimits(max_turns=32, max_episode_tokens=2048, tool_timeout_s=60.0),
}
MATH_HELDOUT_SIZE = 500  # the math_heldout set: the first 500 eval items of the math task, seed 0


@dataclass
class EvalResult:
    task: str
    n: int
    accuracy: float
    samples: list[dict[str, Any]] = field(default_factory=list)


def task_options(eval_task: str, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """Registered task name and options for an eval task, adapted to the tokenizer's prompt style."""
    if eval_task not in EVAL_TASKS:
        raise ValueError(f"unknown eval task {eval_task!r}; valid: {', '.join(EVAL_TASKS)}")
    name, options, _ = EVAL_TASKS[eval_task]
    options = dict(options)
    template = getattr(tokenizer, "chat_template", None) or ""
    options["prompt_format"] = "chat" if template else "plain"
    if name in ("tool_use", "bfcl_multi_turn_base"):
        options["tool_prompt"] = "template" if "tools" in template else "system"
    return name, options


def load_eval_items(eval_task: str, tokenizer: Any, limit: int | None = None) -> tuple[Any, list[TaskItem]]:
    """(task, items): the first ``limit`` items of the eval task's fixed evaluation set."""
    name, options = task_options(eval_task, tokenizer)
    task = get_task(name, **options)
    size = getattr(task, "size", None)
    if name != "math" and size is None:
        raise ValueError(f"eval task {eval_task!r}: task {name!r} has no fixed evaluation set (no size())")
    total = MATH_HELDOUT_SIZE if name == "math" or size is None else size()
    n = total if limit is None else min(limit, total)
    return task, task.items("eval", n, seed=0)


def completion_texts(tokenizer: Any, batch: RolloutBatch, items: list[TaskItem]) -> list[str]:
    """The decoded completion of each row (special tokens such as EOS dropped), cut at its item's first
    stop string (``meta["stop"]``, ``cut_at_stop``): the text that is scored. One row per item."""
    if batch.batch_size != len(items):
        raise ValueError(f"{batch.batch_size} completions for {len(items)} items; expected one per item")
    completion_B_C = batch.input_ids_B_T[:, batch.prompt_len :]
    mask_B_C = batch.loss_mask_B_T[:, batch.prompt_len :]
    return [
        cut_at_stop(tokenizer.decode(row[keep].tolist(), skip_special_tokens=True), item.meta.get("stop"))
        for row, keep, item in zip(completion_B_C, mask_B_C, items)
    ]


def greedy_completions(
    model: Any,
    tokenizer: Any,
    items: list[TaskItem],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    sampler_cls: type = Sampler,
) -> list[str]:
    """Greedy completion texts of ``items``: the rollout sampler with ``greedy=True``, ``batch_size``
    prompts per decode, then ``completion_texts``."""
    device = next(model.parameters()).device
    settings = SamplingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=True)
    batch = sampler_cls(model, tokenizer, settings, torch.Generator(device=device)).sample(items)
    return completion_texts(tokenizer, batch, items)


def greedy_episodes(
    model: Any,
    tokenizer: Any,
    task: MultiTurnTask,
    items: list[TaskItem],
    *,
    limits: EpisodeLimits,
    batch_size: int = 64,
    sampler_cls: type = Sampler,
) -> list[EpisodeResult]:
    """One greedy episode per item of a multi-turn task (``run_episodes``; ``limits.max_new_tokens`` per turn).
    An episode longer than the model's context (``max_position_embeddings``) scores 0 (``stop="context"``)."""
    device = next(model.parameters()).device
    settings = SamplingSettings(max_new_tokens=limits.max_new_tokens, batch_size=batch_size, greedy=True)
    sampler = sampler_cls(model, tokenizer, settings, torch.Generator(device=device))
    batch, results = run_episodes(sampler, task, items, limits)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for result, overflows in zip(results, context_overflows(batch, context)):
        if overflows:
            result.score, result.truncated, result.stop = 0.0, True, "context"
    return results


def context_overflows(batch: RolloutBatch, context: int | None) -> list[bool]:
    """Per episode row: its opening prompt plus its tokens are more than ``context`` tokens (None = no limit)."""
    length_B = batch.attention_mask_B_T.sum(-1)
    return [bool(context) and int(n) > int(context or 0) for n in length_B]


def held_out_items(tasks: dict[str, Task], n: int, seed: int) -> dict[str, list[TaskItem]]:
    """The first ``n`` eval-split items of every task, drawn with ``seed``."""
    return {name: task.items("eval", n, seed=seed) for name, task in tasks.items()}


def mean_score(task: Task, items: list[TaskItem], texts: list[str]) -> float:
    """Mean ``task.score`` of ``texts`` (aligned with ``items``)."""
    return sum(task.score(item, text) for item, text in zip(items, texts)) / max(len(items), 1)


def mean_scores(tasks: dict[str, Task], items_by_task: dict[str, list[TaskItem]], texts: list[str]) -> dict[str, float]:
    """``mean_score`` per task of ``texts`` (aligned with the items, task by task)."""
    scores, offset = {}, 0
    for name, task_items in items_by_task.items():
        scores[name] = mean_score(tasks[name], task_items, texts[offset : offset + len(task_items)])
        offset += len(task_items)
    return scores


def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    tasks: dict[str, Task],
    items_by_task: dict[str, list[TaskItem]],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
    sampler_cls: type = Sampler,
    limits: EpisodeLimits | None = None,
) -> dict[str, float]:
    """Mean score of greedy completions per task; one decode per task, so a task's number does not
    depend on the other tasks' prompts. A multi-turn task's score is its mean greedy episode score (episodes
    bounded by ``limits``, per-turn tokens ``max_new_tokens``)."""
    scores = {}
    for name, task_items in items_by_task.items():
        task = tasks[name]
        if is_multi_turn(task):
            episode_limits = replace(limits or EpisodeLimits(), max_new_tokens=max_new_tokens)
            results = greedy_episodes(
                model,
                tokenizer,
                task,
                task_items,
                limits=episode_limits,
                batch_size=batch_size,
                sampler_cls=sampler_cls,
            )
            scores[name] = sum(r.score for r in results) / max(len(results), 1)
            continue
        texts = greedy_completions(
            model, tokenizer, task_items, max_new_tokens=max_new_tokens, batch_size=batch_size, sampler_cls=sampler_cls
        )
        scores[name] = mean_score(tasks[name], task_items, texts)
    return scores


def parsed_completion(task: Any, item: TaskItem, completion: str) -> Any:
    parse = getattr(task, "parse", None)
    return parse(item, completion) if parse else None


def evaluate(
    model: Any,
    tokenizer: Any,
    eval_task: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    samples_out: TextIO | None = None,
    progress: Callable[[int], object] | None = None,
    task_and_items: tuple[Any, list[TaskItem]] | None = None,
    limits: EpisodeLimits | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on ``eval_task``; one sample record per item (written to ``samples_out``).
    ``task_and_items`` reuses what ``load_eval_items`` returned. A multi-turn task runs one greedy episode per
    item (bounded by ``limits``, per-turn tokens ``max_new_tokens``): accuracy is the mean episode score, and a
    record is ``id``, ``correct`` (score 1) and the environment's ``record()``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task, items = task_and_items or load_eval_items(eval_task, tokenizer, limit)
    max_new = max_new_tokens or EVAL_TASKS[eval_task][2]
    samples = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        if is_multi_turn(task):
            episode_limits = replace(
                limits or EVAL_EPISODE_LIMITS.get(eval_task, EpisodeLimits()), max_new_tokens=max_new
            )
            results = greedy_episodes(
                model, tokenizer, task, batch, limits=episode_limits, batch_size=batch_size, sampler_cls=FastSampler
            )
            for result in results:
                record: dict[str, Any] = {"id": result.item_id, "correct": result.score == 1.0, "score": result.score}
                record.update({k: v for k, v in result.record.items() if k not in record})
                samples.append(record)
                if samples_out is not None:
                    samples_out.write(json.dumps(record, default=repr) + "\n")
                    samples_out.flush()
            if progress is not None:
                progress(len(batch))
            continue
        completions = greedy_completions(model, tokenizer, batch, max_new_tokens=max_new, batch_size=batch_size)
        for item, completion in zip(batch, completions):
            record = {
                "id": item.id,
                "prompt": render_prompt(tokenizer, item),
                "completion": completion,
                "parsed": parsed_completion(task, item, completion),
                "correct": task.score(item, completion) == 1.0,
            }
            samples.append(record)
            if samples_out is not None:
                samples_out.write(json.dumps(record, default=repr) + "\n")
                samples_out.flush()
        if progress is not None:
            progress(len(batch))
    accuracy = sum(s.get("score", s["correct"]) for s in samples) / len(samples) if samples else 0.0
    return EvalResult(task=eval_task, n=len(samples), accuracy=accuracy, samples=samples)
