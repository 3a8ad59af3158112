"""Training configuration: frozen dataclasses, loaded from a YAML preset plus ``key=value`` overrides.

    cfg = load_config("configs/tiny.yaml", ["loss.divergence=alpha", "loss.alpha=0.5"])

Every field has a default; a preset names only what it changes. Unknown keys are errors that list the
valid keys of their section; values are type-checked (an int is accepted where a float is expected).
``validate`` checks values and combinations; ``to_yaml`` writes the resolved config (``run_dir/config.yaml``),
and ``from_dict(to_dict(cfg)) == cfg``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SamplerName = Literal["hf", "fast"]  # hf: transformers generate (the reference) | fast: own decode loop
TeacherSignalName = Literal["sampled", "topk", "exact"]


class ConfigError(ValueError):
    """A bad configuration; the message says which key and what is allowed."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny random Llama model (``model: tiny``), built locally with the character tokenizer."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    initializer_range: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class StudentConfig:
    model: str = "tiny"  # a local HF model directory, or "tiny" (built from `tiny`)
    tokenizer: str | None = None  # a local tokenizer directory; default: the model's
    dtype: str = "float32"  # float32 | bfloat16 | float16 (parameter dtype)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "tiny"
    tokenizer: str | None = None
    dtype: str = "float32"
    tiny: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(hidden_size=96, num_layers=3, seed=1))
    batch_size: int = 16  # rows per scoring forward pass
    device: str | None = None  # e.g. cuda:1 to keep the teacher off the student's GPU; default: run.device
    # A served teacher (`opdplus serve-teacher` or `vllm serve`) instead of a local model:
    url: str | None = None  # e.g. http://127.0.0.1:8000; when set, `model` is not loaded here
    api_key_env: str = "OPDPLUS_TEACHER_API_KEY"  # environment variable holding the API key, if any
    model_name: str | None = None  # the served model's name; default: the server's only model
    timeout_s: float = 120.0
    max_retries: int = 4  # retries with exponential backoff on 5xx and connection errors
    max_concurrency: int = 4  # requests in flight
    rows_per_request: int = 8


@dataclass(frozen=True)
class TeacherRoute:
    """One teacher of several: scores the rollouts whose task tag (TaskItem.task) is ``task``."""

    task: str = ""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass(frozen=True)
class ParallelConfig:
    parallelism: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard); used when launched with several processes


@dataclass(frozen=True)
class DataConfig:
    tasks: list[str] = field(default_factory=lambda: ["contains"])  # prompts are split evenly between tasks
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # task name -> factory kwargs
    prompts_per_step: int = 4


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 32
    samples_per_prompt: int = 2
    temperature: float = 1.0  # != 1 makes rollouts off-policy (a warning is printed)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    batch_size: int = 64  # rows per generate call
    sampler: str = "hf"  # hf (transformers generate, the reference) | fast (own decode loop, same output layout)


@dataclass(frozen=True)
class LossConfig:
    divergence: str = "reverse_kl"  # a registered divergence name (opdplus.ops.divergences)
    alpha: float | None = None  # parameter of divergence "alpha" (required for it, rejected for others)
    estimator: str = "opd_plus"  # opd (stop-gradient) | opd_plus (unbiased)
    gamma: float = 0.0  # horizon discount in [0, 1]
    log_ratio_clip: float | None = None  # bound |log q - log pi|; trades bias for variance
    clip_eps: float | None = 0.2  # PPO ratio clip (only matters when ppo_epochs > 1); null = off
    ppo_epochs: int = 1  # optimizer steps per rollout batch
    micro_batch_size: int = 8  # rows per forward/backward; gradients accumulate over the batch
    logprob_chunk_size: int = 256  # tokens (sequences x positions) per block of logits; memory ~ this x vocab
    teacher_signal: str = "sampled"  # sampled (log-ratio of the sampled token) | topk | exact (full vocabulary)
    topk: int = 20  # teacher_signal=topk: the teacher's top-k plus one tail bucket


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (after warmup, decays to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # null = no clipping


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 = only at the end (if at_end)
    at_end: bool = True
    at_start: bool = False  # evaluate the starting policy too (logged as step 0); with run.steps=0 only that
    num_prompts: int = 8  # held-out items per task
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens
    seed: int = 1234  # eval sampling has its own generator: it never perturbs training
    score_decoding: str = "sample"  # task scores of the temperature-1 samples (sample) or of greedy completions
    forward_kl: bool = False  # also eval/forward_kl: KL(teacher || student) on teacher samples (needs a local teacher)


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/tiny"
    seed: int = 0
    steps: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 = torch's default (tiny models run fastest with 1)
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2  # newest kept; 0 = keep all
    progress: str = "auto"  # auto (bar on a TTY, plain lines otherwise) | bar | plain | none
    log_every: int = 1  # plain-line interval
    tensorboard: bool = False  # needs the `log` extra
    wandb: bool = False
    wandb_project: str = "opdplus"


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[TeacherRoute] = field(default_factory=list)  # several teachers routed by task tag
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: ParallelConfig = field(default_factory=ParallelConfig)


DTYPES = ("float32", "bfloat16", "float16")
ESTIMATORS = ("opd", "opd_plus")
SCHEDULES = ("constant", "linear", "cosine")
PROGRESS = ("auto", "bar", "plain", "none")
SAMPLERS = typing.get_args(SamplerName)
TEACHER_SIGNALS = typing.get_args(TeacherSignalName)
PARALLELISMS = ("ddp", "fsdp")


# ---------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp``; raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}"
            )
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a nested dict over ``base`` (default: ``cls()``); a partial nested
    section keeps the other values of its field's default. Unknown keys raise ConfigError listing valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        section = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys at {section}: {', '.join(names)}")
    base = cls() if base is None else base
    values = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            values[key] = from_dict(hints[key], value, prefix=f"{prefix}{key}.", base=getattr(base, key))
        else:
            values[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return dataclasses.replace(base, **values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- overrides and loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"loss.alpha=0.5"`` -> (["loss", "alpha"], 0.5); the value is parsed as YAML (``null``, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the nested dict ``data`` with each ``key=value`` applied (keys are checked later)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML preset (or defaults when None) -> overrides -> validated ``TrainConfig``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file {str(path)!r} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must contain a mapping at top level")
    cfg = from_dict(TrainConfig, apply_overrides(data, overrides or []))
    validate(cfg)
    return cfg


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A validated copy of ``cfg`` with ``key=value`` overrides applied (handy in tests and sweeps)."""
    new = from_dict(TrainConfig, apply_overrides(to_dict(cfg), overrides))
    validate(new)
    return new


# ---------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(value: str, options: tuple[str, ...], key: str) -> None:
    _check(value in options, f"{key}={value!r} is not one of: {', '.join(options)}")


def divergence_kwargs(loss: LossConfig) -> dict[str, Any]:
    """Keyword parameters for ``get_divergence(loss.divergence, **kwargs)``."""
    return {} if loss.alpha is None else {"alpha": loss.alpha}


def validate(cfg: TrainConfig) -> None:
    """Value and combination checks that need no model; raises ConfigError."""
    run, loss, optim, rollout = cfg.run, cfg.loss, cfg.optim, cfg.rollout
    _check(
        run.steps >= 1 or (run.steps == 0 and cfg.eval.at_start),
        f"run.steps must be >= 1 (or 0 with eval.at_start=true, to evaluate the starting policy only), got {run.steps}",
    )
    _check(bool(run.dir), "run.dir must be a directory path")
    _check(run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = only at the end)")
    _check(run.keep_checkpoints >= 0, "run.keep_checkpoints must be >= 0 (0 = keep all)")
    _check(run.log_every >= 1, "run.log_every must be >= 1")
    _check(run.threads >= 0, "run.threads must be >= 0 (0 = torch's default)")
    _one_of(run.progress, PROGRESS, "run.progress")
    for key, device in (("run.device", run.device), ("teacher.device", cfg.teacher.device)):
        _check(
            device is None or device == "auto" or device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"),
            f"{key}={device!r} is not auto, cpu, cuda, cuda:N, mps or xpu",
        )
    for side in ("student", "teacher"):
        _one_of(getattr(cfg, side).dtype, DTYPES, f"{side}.dtype")
        _check(bool(getattr(cfg, side).model), f"{side}.model must name a local model directory or 'tiny'")
    lora = cfg.student.lora
    if lora.enabled:
        _check(lora.r >= 1, f"student.lora.r must be >= 1, got {lora.r}")
        _check(0.0 <= lora.dropout < 1.0, f"student.lora.dropout must be in [0, 1), got {lora.dropout}")
        _check(len(lora.target_modules) > 0, "student.lora.target_modules must name at least one module")
    _check(cfg.teacher.batch_size >= 1, "teacher.batch_size must be >= 1")
    _validate_teachers(cfg)
    _one_of(loss.teacher_signal, TEACHER_SIGNALS, "loss.teacher_signal")
    _check(loss.topk >= 1, f"loss.topk must be >= 1, got {loss.topk}")
    _one_of(cfg.train.parallelism, PARALLELISMS, "train.parallelism")
    _check(
        not (cfg.train.parallelism == "fsdp" and cfg.student.lora.enabled),
        "train.parallelism=fsdp does not support student.lora.enabled=true; use train.parallelism=ddp with LoRA",
    )
    _check(len(cfg.data.tasks) >= 1, "data.tasks must name at least one task")
    _check(
        cfg.data.prompts_per_step >= len(cfg.data.tasks),
        f"data.prompts_per_step ({cfg.data.prompts_per_step}) must be >= the number of tasks ({len(cfg.data.tasks)})",
    )
    unknown_options = sorted(set(cfg.data.task_options) - set(cfg.data.tasks))
    _check(not unknown_options, f"data.task_options names tasks not in data.tasks: {', '.join(unknown_options)}")
    _check(rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    _check(rollout.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1")
    _check(rollout.temperature > 0, f"rollout.temperature must be > 0, got {rollout.temperature}")
    _check(rollout.top_k >= 0, "rollout.top_k must be >= 0 (0 = off)")
    _check(0.0 < rollout.top_p <= 1.0, f"rollout.top_p must be in (0, 1], got {rollout.top_p}")
    _check(rollout.batch_size >= 1, "rollout.batch_size must be >= 1")
    _one_of(rollout.sampler, SAMPLERS, "rollout.sampler")
    _one_of(loss.estimator, ESTIMATORS, "loss.estimator")
    _check(0.0 <= loss.gamma <= 1.0, f"loss.gamma must be in [0, 1], got {loss.gamma}")
    _check(loss.log_ratio_clip is None or loss.log_ratio_clip > 0, "loss.log_ratio_clip must be > 0 or null")
    _check(
        loss.clip_eps is None or 0 < loss.clip_eps < 1, f"loss.clip_eps must be in (0, 1) or null, got {loss.clip_eps}"
    )
    _check(loss.ppo_epochs >= 1, "loss.ppo_epochs must be >= 1")
    _check(loss.micro_batch_size >= 1, "loss.micro_batch_size must be >= 1")
    _check(loss.logprob_chunk_size >= 1, "loss.logprob_chunk_size must be >= 1")
    _check(
        loss.alpha is None or loss.divergence == "alpha",
        f"loss.alpha is only used by loss.divergence=alpha (got divergence {loss.divergence!r})",
    )
    _validate_divergence(loss)
    _check(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    _check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas must be two numbers in [0, 1)")
    _check(optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _one_of(optim.schedule, SCHEDULES, "optim.schedule")
    _check(0.0 <= optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    _check(optim.max_grad_norm is None or optim.max_grad_norm > 0, "optim.max_grad_norm must be > 0 or null")
    _check(cfg.eval.every >= 0, "eval.every must be >= 0 (0 = only at the end)")
    _check(cfg.eval.num_prompts >= 1, "eval.num_prompts must be >= 1")
    _one_of(cfg.eval.score_decoding, ("sample", "greedy"), "eval.score_decoding")
    _check(cfg.eval.max_new_tokens is None or cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1 or null")
    if run.tensorboard:
        _check(
            _installed("torch.utils.tensorboard") and _installed("tensorboard"),
            "run.tensorboard=true needs tensorboard: pip install 'opdplus[log]'",
        )
    if run.wandb:
        _check(_installed("wandb"), "run.wandb=true needs wandb: pip install wandb")


def _validate_teachers(cfg: TrainConfig) -> None:
    """A served teacher needs a URL and sane client limits; routed teachers need distinct task tags;
    the exact signal needs the teacher's logits, so a local (not served) teacher."""
    routes = [(f"teachers[{i}].teacher", r.teacher) for i, r in enumerate(cfg.teachers)] or [("teacher", cfg.teacher)]
    for key, t in routes:
        if t.url is not None:
            _check(
                t.url.startswith(("http://", "https://")),
                f"{key}.url must start with http:// or https://, got {t.url!r}",
            )
            _check(
                t.timeout_s > 0 and t.max_retries >= 0 and t.max_concurrency >= 1 and t.rows_per_request >= 1,
                f"{key}: timeout_s > 0, max_retries >= 0, max_concurrency >= 1 and rows_per_request >= 1 required",
            )
        _check(
            not (cfg.loss.teacher_signal == "exact" and t.url is not None),
            f"loss.teacher_signal=exact needs the teacher's full logits, so a local teacher ({key}.url is set); "
            "use loss.teacher_signal=topk with a served teacher",
        )
    _check(
        not (cfg.eval.forward_kl and any(t.url is not None for _, t in routes)),
        "eval.forward_kl=true samples from the teacher, so it needs local teacher models (a teacher has a url)",
    )
    tags = [r.task for r in cfg.teachers]
    _check(all(tags), "every entry of teachers needs a task tag: teachers: [{task: math, teacher: {...}}, ...]")
    _check(len(set(tags)) == len(tags), f"teachers: task tags must be distinct, got {tags}")
    _check(
        not (cfg.teachers and cfg.loss.teacher_signal == "exact"),
        "loss.teacher_signal=exact works with one local teacher, not with a teachers: list",
    )


def _validate_divergence(loss: LossConfig) -> None:
    from opdplus.ops.divergences import divergence_names, get_divergence

    names = divergence_names()
    _check(
        loss.divergence in names,
        f"loss.divergence={loss.divergence!r} is unknown; valid divergences: {', '.join(names)}",
    )
    if loss.divergence == "alpha":
        _check(loss.alpha is not None, "loss.divergence=alpha needs loss.alpha (any real number except 0 and 1)")
    try:
        get_divergence(loss.divergence, **divergence_kwargs(loss))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"loss.divergence={loss.divergence!r}: {err}") from err


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
