"""What a run is built from, each from its config section: the student, the teacher(s), the tasks, the
divergence, the sampler, and each step's prompts."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opdplus.models.load import apply_lora, check_same_vocabulary, load_model_and_tokenizer, resolve_device
from opdplus.ops.divergences import Divergence, get_divergence
from opdplus.rollout.sampler import Sampler, SamplingSettings, tokenize_prompts
from opdplus.rollout.teacher import LocalTeacher
from opdplus.rollout.types import Teacher
from opdplus.tasks.base import Task, TaskItem, get_task
from opdplus.train.config import ConfigError, LossConfig, SamplerName, TeacherConfig, TrainConfig, divergence_kwargs


def build_student(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The student model (LoRA-wrapped when enabled) and its tokenizer."""
    s = cfg.student
    model, tokenizer = load_model_and_tokenizer(
        s.model, tokenizer=s.tokenizer, dtype=s.dtype, device=device, tiny=dataclasses.asdict(s.tiny)
    )
    if s.gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(f"student.gradient_checkpointing: {type(model).__name__} does not support it")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.lora.enabled:
        model = apply_lora(
            model, r=s.lora.r, alpha=s.lora.alpha, dropout=s.lora.dropout, target_modules=s.lora.target_modules
        )
    return model, tokenizer


def build_teacher(
    cfg: TrainConfig, student_tokenizer: Any, student_model: torch.nn.Module, device: torch.device
) -> Teacher:
    """The teacher that scores rollouts: ``teacher`` (a local HF model, or a served one when
    ``teacher.url`` is set), or with a ``teachers:`` list one teacher per task tag, routed by row."""
    if not cfg.teachers:
        return build_one_teacher(cfg.teacher, cfg, student_tokenizer, student_model, device)
    from opdplus.rollout.routing import RoutedTeacher

    return RoutedTeacher(
        {
            route.task: build_one_teacher(route.teacher, cfg, student_tokenizer, student_model, device)
            for route in cfg.teachers
        }
    )


def build_one_teacher(
    t: TeacherConfig, cfg: TrainConfig, student_tokenizer: Any, student_model: torch.nn.Module, device: torch.device
) -> Teacher:
    """A ``LocalTeacher`` (vocabulary checked against the student) or an ``HTTPTeacher`` for ``t.url``."""
    if t.url is not None:
        import os

        from opdplus.rollout.http_teacher import HTTPTeacher

        return HTTPTeacher(
            t.url,
            api_key=os.environ.get(t.api_key_env),
            model=t.model_name,
            timeout_s=t.timeout_s,
            max_retries=t.max_retries,
            max_concurrency=t.max_concurrency,
            rows_per_request=t.rows_per_request,
        )
    model, tokenizer = load_model_and_tokenizer(
        t.model,
        tokenizer=t.tokenizer,
        dtype=t.dtype,
        device=resolve_device(t.device) if t.device else device,
        tiny=dataclasses.asdict(t.tiny),
    )
    try:
        check_same_vocabulary(student_tokenizer, tokenizer, student_model, model)
    except ValueError as err:
        raise ConfigError(f"student.model={cfg.student.model!r}, teacher.model={t.model!r}: {err}") from None
    return LocalTeacher(model, batch_size=t.batch_size, chunk_size=cfg.update.logprob_chunk_size)


def build_tasks(cfg: TrainConfig, tokenizer: Any) -> dict[str, Task]:
    """Tasks by name; renders one prompt of each so a missing chat template fails before training, and
    with a ``teachers:`` list checks that every task's tag has a teacher."""
    tasks = {}
    routed = {route.task for route in cfg.teachers}
    for name in cfg.data.tasks:
        try:
            tasks[name] = get_task(name, **cfg.data.task_options.get(name, {}))
            (item,) = tasks[name].items("train", 1, seed=cfg.run.seed)
            tokenize_prompts(tokenizer, [item])
        except ValueError as err:
            raise ConfigError(f"data.tasks: task {name!r}: {err}") from None
        if routed and item.task not in routed:
            raise ConfigError(
                f"data.tasks: task {name!r} makes rollouts tagged {item.task!r}, but teachers: has "
                f"entries only for {sorted(routed)}; add {{task: {item.task}, teacher: ...}}"
            )
    return tasks


def build_divergence(loss: LossConfig) -> Divergence:
    return get_divergence(loss.divergence, **divergence_kwargs(loss))


def sampling_settings(cfg: TrainConfig) -> SamplingSettings:
    r = cfg.rollout
    return SamplingSettings(
        max_new_tokens=r.max_new_tokens,
        samples_per_prompt=r.samples_per_prompt,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        batch_size=r.batch_size,
    )


def sampler_class(name: SamplerName) -> type:
    """``hf``: HF ``generate`` (the reference); ``fast``: our decode loop. Both give the same ``RolloutBatch``."""
    if name == "fast":
        from opdplus.rollout.fast_sampler import FastSampler

        return FastSampler
    return Sampler


def prompts_for_step(tasks: dict[str, Task], prompts_per_step: int, seed: int, step: int) -> list[TaskItem]:
    """This step's training items, a pure function of (seed, step): resuming needs no data state.
    Prompts are shared evenly between tasks."""
    names = list(tasks)
    shares = [prompts_per_step // len(names) + (i < prompts_per_step % len(names)) for i in range(len(names))]
    return [
        item
        for i, (name, share) in enumerate(zip(names, shares))
        if share
        for item in tasks[name].items("train", share, seed=(seed * 1_000_003 + step) * 1_009 + i)
    ]


def check_prompt_share(prompts_per_step: int, world_size: int) -> None:
    if prompts_per_step % world_size:
        raise ConfigError(
            f"data.prompts_per_step={prompts_per_step} must be divisible by the number of "
            f"processes ({world_size}) so that every process gets the same share"
        )
