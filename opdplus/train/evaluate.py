"""The eval hook: held-out prompts -> student samples -> teacher reverse KL and task scores.

Decoding (sampled and greedy) and scoring go through ``opdplus.eval.runner`` (the rollout sampler), the
divergences through ``opdplus.ops``.

Sampling uses its own generator, seeded from ``seed``, so evaluating never changes the training run's
random stream (and a resumed run evaluates exactly like an uninterrupted one).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch

import opdplus.train.distributed as dist_utils
from opdplus.envs.base import is_multi_turn
from opdplus.eval.runner import completion_texts, greedy_accuracy, held_out_items
from opdplus.models.forward import completion_logprobs
from opdplus.ops.advantages import masked_log_ratio
from opdplus.ops.divergences import get_divergence
from opdplus.rollout.multiturn import EpisodeLimits, EpisodeSampler
from opdplus.rollout.sampler import Sampler, SamplingSettings
from opdplus.rollout.types import RolloutBatch, Teacher
from opdplus.tasks.base import Task, TaskItem
from opdplus.train.builders import episode_limits, sampler_class
from opdplus.train.config import TrainConfig
from opdplus.train.metrics import masked_mean, timed


def sampled_kl_B_T(
    sampler_logprobs_B_T: torch.Tensor, other_logprobs_B_T: torch.Tensor, loss_mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Per-token sampled estimate of KL(sampler || other) on the sampler's own tokens, float64, 0 off the
    mask: reverse KL's f(l) = -l with l = log other - log sampler (``opdplus.ops``). On student samples
    scored by the teacher it is KL(pi || q); on teacher samples scored by the student, KL(q || pi)."""
    log_ratio_B_T = masked_log_ratio(sampler_logprobs_B_T, other_logprobs_B_T, loss_mask_B_T).double()
    return get_divergence("reverse_kl").f(log_ratio_B_T)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    teacher: Teacher,
    tasks: dict[str, Task],
    *,
    num_prompts: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    score_decoding: str = "sample",
    sampler_cls: type = Sampler,
    forward_kl: bool = False,
    limits: EpisodeLimits | None = None,
) -> dict[str, float]:
    """``eval/reverse_kl`` (per token), ``eval/reverse_kl_seq`` (per completion) and ``eval/len_mean`` on
    student samples (temperature 1) for ``num_prompts`` items per task, and task scores (``eval/<task>/score``,
    mean ``eval/score``) of those samples, or of greedy completions when ``score_decoding="greedy"``.
    With ``forward_kl``, also ``eval/forward_kl`` on teacher samples (see ``forward_kl_on_teacher_samples``).
    Items of multi-turn tasks run as episodes bounded by ``limits`` (per-turn tokens: ``max_new_tokens``); their
    score is the episode's, and the divergences count the student's tokens of the whole trajectory."""
    if score_decoding not in ("sample", "greedy"):
        raise ValueError(f"score_decoding must be sample or greedy, got {score_decoding!r}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    items_by_task = held_out_items(tasks, num_prompts, seed)
    items: list[TaskItem] = [item for task_items in items_by_task.values() for item in task_items]
    limits = replace(limits or EpisodeLimits(), max_new_tokens=max_new_tokens)
    multi_turn = [task for task in tasks.values() if is_multi_turn(task)]
    sampler = sampler_cls(model, tokenizer, settings, generator)
    batch = (EpisodeSampler(sampler, multi_turn, limits) if multi_turn else sampler).sample(items)
    batch.teacher_logprobs_B_T = teacher.score(batch)
    if score_decoding == "greedy":
        scores = greedy_accuracy(
            model,
            tokenizer,
            tasks,
            items_by_task,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            sampler_cls=sampler_cls,
            limits=limits,
        )
    else:
        scores = sampled_scores(tasks, items_by_task, tokenizer, batch, items)
    kl_B_T = sampled_kl_B_T(batch.sampler_logprobs_B_T, batch.teacher_logprobs_B_T, batch.loss_mask_B_T)
    metrics = {
        "eval/reverse_kl": masked_mean(kl_B_T, batch.loss_mask_B_T),
        "eval/reverse_kl_seq": float(kl_B_T.sum(-1).mean()),
        "eval/len_mean": float(batch.completion_lengths_B().double().mean()),
        **{f"eval/{name}/score": score for name, score in scores.items()},
        "eval/score": sum(scores.values()) / len(scores),
    }
    if forward_kl:
        metrics["eval/forward_kl"] = forward_kl_on_teacher_samples(
            model,
            tokenizer,
            teacher,
            items_by_task,
            settings,
            seed=seed,
            sampler_cls=sampler_cls,
            tasks=tasks,
            limits=limits,
        )
    return metrics


def sampled_scores(
    tasks: dict[str, Task], items_by_task: dict[str, list[TaskItem]], tokenizer: Any, batch: RolloutBatch, items: list
) -> dict[str, float]:
    """Mean score per task of the batch's rows (one per item, in order): an episode's own score (``meta["score"]``),
    else the task's score of the completion text."""
    texts = completion_texts(tokenizer, batch, items)
    scores, row = {}, 0
    for name, task_items in items_by_task.items():
        total = 0.0
        for item in task_items:
            meta = batch.meta[row] if batch.meta else {}
            total += meta["score"] if "score" in meta else tasks[name].score(item, texts[row])
            row += 1
        scores[name] = total / max(len(task_items), 1)
    return scores


def held_out_metrics(
    cfg: TrainConfig,
    policy: torch.nn.Module,
    student: torch.nn.Module,
    tokenizer: Any,
    teacher: Teacher,
    tasks: dict[str, Task],
) -> dict[str, float]:
    """``eval/...`` on held-out prompts (their own generator: training is not perturbed) and ``perf/eval_s``."""
    seconds: dict[str, float] = {}
    with timed("eval", seconds), dist_utils.gathered(policy):  # a collective under FSDP: every rank evaluates
        result = evaluate(
            student,
            tokenizer,
            teacher,
            tasks,
            num_prompts=cfg.eval.num_prompts,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            seed=cfg.eval.seed,
            batch_size=cfg.rollout.batch_size,
            score_decoding=cfg.eval.score_decoding,
            sampler_cls=sampler_class(cfg.rollout.sampler),
            forward_kl=cfg.eval.forward_kl,
            limits=episode_limits(cfg, cfg.eval.max_new_tokens),
        )
    return {**result, "perf/eval_s": seconds["eval"]}


def local_teacher_model(teacher: Teacher, task: str) -> tuple[torch.nn.Module, float]:
    """(model, temperature) of the local teacher that scores ``task`` (a ``LocalTeacher``, or the route of a
    ``RoutedTeacher``); ValueError for a served teacher, which cannot sample here."""
    routes = getattr(teacher, "teachers", None)
    local = routes[task] if routes is not None else teacher
    model = getattr(local, "model", None)
    if model is None:
        raise ValueError(f"eval.forward_kl samples from the teacher of task {task!r}, which is not a local model")
    return model, getattr(local, "temperature", 1.0)


@torch.no_grad()
def forward_kl_on_teacher_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    teacher: Teacher,
    items_by_task: dict[str, list[TaskItem]],
    settings: SamplingSettings,
    *,
    seed: int,
    sampler_cls: type = Sampler,
    tasks: dict[str, Task] | None = None,
    limits: EpisodeLimits | None = None,
) -> float:
    """Forward KL(q || pi) per token, estimated on teacher samples of the held-out prompts:
    mean over their tokens of log q - log pi. The mass-covering direction that reverse KL on student samples
    cannot see: a student that collapses onto outputs the teacher tolerates has a small reverse KL and a
    large forward KL. Items of the multi-turn tasks among ``tasks`` are teacher episodes bounded by ``limits``."""
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for task, task_items in items_by_task.items():
        teacher_model, temperature = local_teacher_model(teacher, task)
        generator = torch.Generator(device=next(teacher_model.parameters()).device).manual_seed(seed)
        with warnings.catch_warnings():  # a tempered teacher: sampling from q as scored is intended here
            warnings.simplefilter("ignore")
            sampler = sampler_cls(teacher_model, tokenizer, replace(settings, temperature=temperature), generator)
            episodic = (tasks or {}).get(task)
            if episodic is not None and is_multi_turn(episodic):
                sampler = EpisodeSampler(
                    sampler, [episodic], limits or EpisodeLimits(max_new_tokens=settings.max_new_tokens)
                )
            samples = sampler.sample(task_items)
        student_lp_B_T = completion_logprobs(
            model, samples.input_ids_B_T.to(device), samples.attention_mask_B_T.to(device), samples.prompt_len
        ).cpu()
        total += float(sampled_kl_B_T(samples.sampler_logprobs_B_T, student_lp_B_T, samples.loss_mask_B_T).sum())
        tokens += int(samples.loss_mask_B_T.sum())
    return total / max(tokens, 1)
