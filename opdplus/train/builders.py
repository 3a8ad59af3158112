"""What a run is built from, each from its config section: the student, the teacher(s), the tasks, the
divergence, the sampler, and each step's prompts."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from opdplus.envs.base import is_multi_turn
from opdplus.models.load import (
    DeviceError,
    apply_lora,
    check_same_tokenizer,
    check_same_vocabulary,
    decoded_tokens,
    first_token_difference,
    load_model_and_tokenizer,
    load_tokenizer,
    probe_token_ids,
    resolve_device,
)
from opdplus.ops.divergences import Divergence, get_divergence
from opdplus.rollout.sampler import Sampler, SamplingSettings, tokenize_prompts
from opdplus.rollout.teacher import LocalTeacher
from opdplus.rollout.types import Teacher
from opdplus.tasks.base import Task, TaskItem, get_task
from opdplus.train.config import ConfigError, LossConfig, SamplerName, TeacherConfig, TrainConfig, divergence_kwargs
from opdplus.train.precision import enable_tf32

if TYPE_CHECKING:
    from opdplus.rollout.http_teacher import HTTPTeacher
    from opdplus.rollout.multiturn import EpisodeLimits, EpisodeSampler


def build_student(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The student model (LoRA-wrapped when enabled) and its tokenizer; on CUDA, float32 matmuls use TF32."""
    s = cfg.student
    enable_tf32(device)
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
            route.task: build_one_teacher(
                route.teacher, cfg, student_tokenizer, student_model, device, key=f"teachers[{i}].teacher"
            )
            for i, route in enumerate(cfg.teachers)
        }
    )


def build_one_teacher(
    t: TeacherConfig,
    cfg: TrainConfig,
    student_tokenizer: Any,
    student_model: torch.nn.Module,
    device: torch.device,
    key: str = "teacher",
) -> Teacher:
    """A ``LocalTeacher`` or an ``HTTPTeacher`` for ``t.url``, its vocabulary checked against the student's
    (``key`` is the config section, for error messages)."""
    if t.url is not None:
        return build_served_teacher(t, cfg, student_tokenizer, key)
    try:
        teacher_device = resolve_device(t.device) if t.device else device
    except DeviceError as err:
        raise ConfigError(f"{key}.device: {err}") from None
    model, tokenizer = load_model_and_tokenizer(
        t.model,
        tokenizer=t.tokenizer,
        dtype=t.dtype,
        device=teacher_device,
        tiny=dataclasses.asdict(t.tiny),
    )
    local = LocalTeacher(model, batch_size=t.batch_size, chunk_size=cfg.update.logprob_chunk_size)
    if use_span_path(t, cfg, student_tokenizer, tokenizer, key):
        from opdplus.rollout.cross_tokenizer import CrossTokenizerTeacher

        return CrossTokenizerTeacher(local, student_tokenizer, tokenizer)
    try:
        check_same_vocabulary(student_tokenizer, tokenizer, student_model, model)
    except ValueError as err:
        raise ConfigError(f"student.model={cfg.student.model!r}, teacher.model={t.model!r}: {err}") from None
    return local


def use_span_path(t: TeacherConfig, cfg: TrainConfig, student_tokenizer: Any, teacher_tokenizer: Any, key: str) -> bool:
    """Whether the teacher scores spans (docs/derivations.md, "A teacher with another tokenizer"): always with
    ``cross_tokenizer=true``; with ``auto`` when the tokenizer fingerprints differ (said in one line); with
    ``false`` never (the vocabulary check then names the difference). Different tokenizers need
    ``loss.teacher_signal=sampled``."""
    import sys

    from opdplus.models.fingerprint import tokenizer_fingerprint

    differ = tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(teacher_tokenizer)
    if differ and t.cross_tokenizer is not False and cfg.loss.teacher_signal != "sampled":
        raise ConfigError(
            f"{key}: the teacher's tokenizer differs from the student's, so loss.teacher_signal="
            f"{cfg.loss.teacher_signal} (over one vocabulary) cannot be used; set loss.teacher_signal=sampled "
            f"(or {key}.cross_tokenizer=false to require one tokenizer)"
        )
    span_path = t.cross_tokenizer is True or (t.cross_tokenizer == "auto" and differ)
    if span_path and cfg.eval.forward_kl:
        raise ConfigError(
            f"eval.forward_kl=true samples from the teacher with the student's tokenizer, but {key} scores across "
            f"tokenizers; set eval.forward_kl=false (or {key}.cross_tokenizer=false with one tokenizer)"
        )
    if t.cross_tokenizer == "auto" and differ:
        print(
            f"note: {key}'s tokenizer differs from the student's ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens): scoring spans of text across tokenizers ({key}.cross_tokenizer=auto)",
            file=sys.stderr,
        )
    return span_path


def check_single_turn_teacher(teacher: Teacher, tasks: dict[str, Task]) -> None:
    """ConfigError when a task is multi-turn and ``teacher`` (or a routed one) scores across tokenizers: multi-turn
    rollouts put tool tokens between the student's turns, and span alignment scores single-turn completions only."""
    multi_turn = sorted(name for name, task in tasks.items() if is_multi_turn(task))
    routes = getattr(teacher, "teachers", None)
    parts = routes.values() if isinstance(routes, dict) else [teacher]
    if multi_turn and any(getattr(part, "cross_tokenizer", False) for part in parts):
        raise ConfigError(
            f"data.tasks: the multi-turn task(s) {', '.join(multi_turn)} cannot be scored by a teacher with another "
            "tokenizer (span alignment is single-turn); use a teacher with the student's tokenizer, or set "
            "teacher.cross_tokenizer=false to make a tokenizer difference an error"
        )


def build_served_teacher(t: TeacherConfig, cfg: TrainConfig, student_tokenizer: Any, key: str) -> Teacher:
    """An ``HTTPTeacher`` for ``t.url`` whose vocabulary is the student's: the server decodes a fixed probe of
    token ids (``probe_token_ids``) and every token must equal the student's. With ``t.tokenizer`` set, that
    tokenizer is compared with the student's instead (no probe). A refused probe (wrong API key, unknown
    model) is a ConfigError that says which key to fix."""
    import os

    from opdplus.rollout.http_teacher import HTTPTeacher

    teacher = HTTPTeacher(
        t.url or "",
        api_key=os.environ.get(t.api_key_env),
        model=t.model_name,
        timeout_s=t.timeout_s,
        max_retries=t.max_retries,
        max_concurrency=t.max_concurrency,
        rows_per_request=t.rows_per_request,
    )
    if t.tokenizer is not None:
        teacher_tokenizer = load_tokenizer(t.tokenizer)
        if use_span_path(t, cfg, student_tokenizer, teacher_tokenizer, key):
            from opdplus.rollout.cross_tokenizer import CrossTokenizerTeacher

            return CrossTokenizerTeacher(teacher, student_tokenizer, teacher_tokenizer)
    try:
        check_served_vocabulary(teacher, t, cfg, student_tokenizer, key)
    except ConfigError:
        teacher.close()
        raise
    return teacher


def check_served_vocabulary(
    teacher: HTTPTeacher, t: TeacherConfig, cfg: TrainConfig, student_tokenizer: Any, key: str
) -> None:
    """ConfigError unless the served ``teacher`` decodes the probe ids as the student's tokenizer does (or
    ``t.tokenizer`` is the student's vocabulary); see ``build_served_teacher``."""
    import sys

    from opdplus.rollout.http_teacher import TeacherRequestError

    student = f"student.model={cfg.student.model!r} ({len(student_tokenizer)} tokens)"
    if t.tokenizer is not None:
        try:
            check_same_tokenizer(student_tokenizer, load_tokenizer(t.tokenizer))
        except ValueError as err:
            raise ConfigError(
                f"{key}.tokenizer={t.tokenizer!r} is not the student's vocabulary ({err}); set "
                f"{key}.cross_tokenizer=auto or true to score across tokenizers"
            ) from None
        print(
            f"note: {key}.tokenizer is set and equals the student's vocabulary; the served teacher's tokens are "
            "not probed",
            file=sys.stderr,
        )
        return
    ids = probe_token_ids(student_tokenizer)
    try:
        served = teacher.decoded_tokens(ids)
    except TeacherRequestError as err:
        raise ConfigError(f"{key}.url={t.url}: {err}{served_teacher_fix(err.status, t, key)}") from None
    if served is None:
        print(f"note: {key}.url={t.url} writes tokens as ids, so its vocabulary cannot be checked", file=sys.stderr)
        return
    difference = first_token_difference(ids, decoded_tokens(student_tokenizer, ids), served)
    if difference is not None:
        size = teacher.vocabulary_size(at_least=len(student_tokenizer))
        theirs = f"the teacher's model takes {size} token ids" if size else "the teacher's size is unknown"
        raise ConfigError(
            f"{key}.url={t.url}: the served teacher does not use the student's vocabulary: {student}, {theirs}, "
            f"and {difference}"
            f"; serve a teacher with the student's tokenizer (if it has it and only decodes differently, set "
            f"{key}.tokenizer to that tokenizer's directory)"
        )


def served_teacher_fix(status: int | None, t: TeacherConfig, key: str) -> str:
    """How to fix a served teacher's refusal, by HTTP status ('' when there is nothing specific to say)."""
    import os

    if status in (401, 403):
        state = "is not set" if os.environ.get(t.api_key_env) is None else "holds a key the server refused"
        return (
            f"; put the server's API key in the environment variable {t.api_key_env} (named by {key}.api_key_env; "
            f"it {state})"
        )
    if status == 404:
        return (
            f"; set {key}.model_name to the model the server serves (null: its only model; {key}.model_name is "
            f"{t.model_name!r}), and check that {key}.url is an OpenAI-compatible server"
        )
    return ""


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


def episode_limits(cfg: TrainConfig, max_new_tokens: int | None = None) -> EpisodeLimits:
    """The bounds of a multi-turn episode from ``rollout``; ``max_new_tokens`` per turn overrides its own."""
    from opdplus.rollout.multiturn import EpisodeLimits

    r = cfg.rollout
    return EpisodeLimits(
        max_turns=r.max_turns,
        max_new_tokens=max_new_tokens or r.max_new_tokens,
        max_episode_tokens=r.max_episode_tokens,
        tool_timeout_s=r.tool_timeout_s,
    )


def build_sampler(
    cfg: TrainConfig,
    tasks: dict[str, Task],
    student: torch.nn.Module,
    tokenizer: Any,
    settings: SamplingSettings,
    generator: torch.Generator,
) -> Sampler | EpisodeSampler:
    """The rollout sampler of ``rollout.sampler``; wrapped in an ``EpisodeSampler`` when a task is multi-turn
    (its items run as episodes with ``episode_limits``)."""
    sampler = sampler_class(cfg.rollout.sampler)(student, tokenizer, settings, generator)
    multi_turn = {name: task for name, task in tasks.items() if is_multi_turn(task)}
    if not multi_turn:
        return sampler
    from opdplus.rollout.multiturn import EpisodeSampler

    return EpisodeSampler(sampler, list(multi_turn.values()), episode_limits(cfg))


def loss_tokens_per_row(cfg: TrainConfig, tasks: dict[str, Task]) -> int | None:
    """``loss.normalizer: constant``: the most sampled tokens a rollout can have (the loss is divided by the step's
    rows times this); None for ``tokens`` (divided by the step's sampled tokens)."""
    if cfg.loss.normalizer == "tokens":
        return None
    r = cfg.rollout
    if any(is_multi_turn(task) for task in tasks.values()):
        return min(r.max_turns * r.max_new_tokens, r.max_episode_tokens)
    return r.max_new_tokens


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
