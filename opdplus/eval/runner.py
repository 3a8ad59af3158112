"""The evaluation driver: batched greedy generation over a task's eval items, scored by the task.

Prompts are rendered exactly as in training (``render_prompt``; chat-rendered text carries its own
special tokens, plain text gets the tokenizer's). A model without a chat template gets the tasks'
plain prompt format; a chat template that renders tools gets the BFCL functions as tools, any other
gets them in the system message (see ``opdplus.tasks.bfcl``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from opdplus.rollout.sampler import eos_token_ids
from opdplus.tasks.base import TaskItem, get_task, render_prompt

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
    if name == "tool_use":
        options["tool_prompt"] = "template" if "tools" in template else "system"
    return name, options


def load_eval_items(eval_task: str, tokenizer: Any, limit: int | None = None) -> tuple[Any, list[TaskItem]]:
    """(task, items): the first ``limit`` items of the eval task's fixed evaluation set."""
    name, options = task_options(eval_task, tokenizer)
    task = get_task(name, **options)
    total = MATH_HELDOUT_SIZE if name == "math" else task.size()
    n = total if limit is None else min(limit, total)
    return task, task.items("eval", n, seed=0)


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    add_special_tokens: bool,
    max_new_tokens: int,
    stop_strings: list[str] | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batch); special tokens removed."""
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=eos_token_ids(tokenizer, model),
        **extra,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _parsed(task: Any, item: TaskItem, completion: str) -> Any:
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
    progress: Callable[[int], None] | None = None,
    task_and_items: tuple[Any, list[TaskItem]] | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on ``eval_task``; one sample record per item (written to ``samples_out``).
    ``task_and_items`` reuses what ``load_eval_items`` returned."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task, items = task_and_items or load_eval_items(eval_task, tokenizer, limit)
    max_new = max_new_tokens or EVAL_TASKS[eval_task][2]
    model.eval()
    samples = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [render_prompt(tokenizer, item) for item in batch]
        stops = sorted({s for item in batch for s in item.meta.get("stop", [])})
        completions = generate_batch(model, tokenizer, prompts, isinstance(batch[0].prompt, str), max_new, stops)
        for item, prompt, completion in zip(batch, prompts, completions):
            record = {
                "id": item.id,
                "prompt": prompt,
                "completion": completion,
                "parsed": _parsed(task, item, completion),
                "correct": task.score(item, completion) == 1.0,
            }
            samples.append(record)
            if samples_out is not None:
                samples_out.write(json.dumps(record, default=repr) + "\n")
                samples_out.flush()
        if progress is not None:
            progress(len(batch))
    accuracy = sum(s["correct"] for s in samples) / len(samples) if samples else 0.0
    return EvalResult(task=eval_task, n=len(samples), accuracy=accuracy, samples=samples)
