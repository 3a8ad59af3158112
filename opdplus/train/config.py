"""Training configuration: frozen dataclasses, loaded from a YAML preset plus ``key=value`` overrides.

    cfg = load_config("configs/tiny.yaml", ["loss.divergence=alpha", "loss.alpha=0.5"])

Every field has a default and a help text (``opdplus train --help-config`` lists them all); a preset names
only what it changes. Choices are ``Literal`` types defined once, next to the code that uses them. Unknown
keys are errors that list the valid keys of their section; values are type-checked (an int is accepted
where a float is expected). Keys renamed since an earlier version (``RENAMED_KEYS``) still load, with one
warning line each on stderr, in presets, overrides and the stored config of a resumed run. ``validate``
checks values and combinations; ``to_yaml`` writes the resolved config (``run_dir/config.yaml``), and
``from_dict(to_dict(cfg)) == cfg``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opdplus.ops.advantages import Estimator
from opdplus.train.distributed import ParallelMode
from opdplus.train.precision import Precision

Dtype = Literal["float32", "bfloat16", "float16"]  # parameter dtype
SamplerName = Literal["hf", "fast"]  # hf: transformers generate (the reference) | fast: own decode loop
TeacherSignalName = Literal["sampled", "topk", "exact"]
Schedule = Literal["constant", "linear", "cosine"]
Progress = Literal["auto", "bar", "plain", "none"]
ScoreDecoding = Literal["sample", "greedy"]
Normalizer = Literal["tokens", "constant"]  # the loss's denominator: sampled tokens of the step | a fixed number
CrossTokenizer = bool | Literal["auto"]  # true | false | auto (docs/derivations.md, "A teacher with another tokenizer")

# old dotted key -> its current name; presets, overrides and stored configs of resumed runs are translated
RENAMED_KEYS: dict[str, str] = {
    "train.parallelism": "parallel.mode",
    "loss.micro_batch_size": "update.micro_batch_size",
    "loss.logprob_chunk_size": "update.logprob_chunk_size",
    "loss.ppo_epochs": "update.ppo_epochs",
}


class ConfigError(ValueError):
    """A bad configuration; the message says which key and what is allowed."""


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text (and e.g. ``choices``: a function listing the valid values);
    mutable defaults (lists, dicts, sections) are copied for every instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _divergence_choices() -> list[str]:
    from opdplus.ops.divergences import divergence_names

    return divergence_names()


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny random Llama model (``model: tiny``), built locally with the character tokenizer."""

    hidden_size: int = setting(64, "hidden size")
    num_layers: int = setting(2, "decoder layers")
    num_heads: int = setting(4, "attention heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = setting(128, "MLP inner size")
    initializer_range: float = setting(0.1, "std of the random initial weights")
    seed: int = setting(0, "seed of the random initial weights")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the student (needs the `lora` extra); only the adapters are trained and saved."""

    enabled: bool = setting(False, "train LoRA adapters instead of all weights")
    r: int = setting(8, "adapter rank")
    alpha: float = setting(16.0, "adapter scale numerator (scale = alpha / r)")
    dropout: float = setting(0.0, "dropout on the adapter input, in [0, 1)")
    target_modules: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")


@dataclass(frozen=True)
class StudentConfig:
    """The policy being trained."""

    model: str = setting("tiny", "a local HF model directory, gguf:<package>/<file.gguf>, or tiny (built from `tiny`)")
    tokenizer: str | None = setting(None, "a local tokenizer directory; null: the model's")
    dtype: Dtype = setting("float32", "parameter dtype")
    tiny: TinyModelConfig = setting(TinyModelConfig(), "shape of the model when model=tiny")
    lora: LoraConfig = setting(LoraConfig(), "LoRA adapters")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen model that scores the student's samples: local, or served over HTTP (``url``)."""

    model: str = setting("tiny", "a local HF model directory, gguf:<package>/<file.gguf>, or tiny (built from `tiny`)")
    tokenizer: str | None = setting(
        None, "a local tokenizer directory (or tiny-merges); null: the model's. A served teacher's tokenizer"
    )
    cross_tokenizer: CrossTokenizer = setting(
        "auto",
        "auto: score by spans when the teacher's tokenizer differs from the student's (a local teacher, or "
        "teacher.tokenizer); true: always by spans; false: a different tokenizer is an error",
        choices=lambda: ["auto", "true", "false"],
    )
    dtype: Dtype = setting("float32", "parameter dtype")
    tiny: TinyModelConfig = setting(
        TinyModelConfig(hidden_size=96, num_layers=3, seed=1), "shape of the model when model=tiny"
    )
    batch_size: int = setting(16, "rows per scoring forward pass")
    device: str | None = setting(None, "e.g. cuda:1 to keep the teacher off the student's GPU; null: run.device")
    url: str | None = setting(
        None, "a served teacher (opdplus serve-teacher or vllm serve), e.g. http://127.0.0.1:8000; model is not loaded"
    )
    api_key_env: str = setting("OPDPLUS_TEACHER_API_KEY", "environment variable holding the served teacher's API key")
    model_name: str | None = setting(None, "the served model's name; null: the server's only model")
    timeout_s: float = setting(120.0, "seconds per HTTP request")
    max_retries: int = setting(4, "retries with exponential backoff on 5xx and connection errors")
    max_concurrency: int = setting(4, "HTTP requests in flight")
    rows_per_request: int = setting(8, "rollout rows per HTTP request")


@dataclass(frozen=True)
class TeacherRoute:
    """One teacher of several: scores the rollouts whose task tag (TaskItem.task) is ``task``."""

    task: str = setting("", "the task tag whose rollouts this teacher scores")
    teacher: TeacherConfig = setting(TeacherConfig(), "the teacher (same keys as the teacher section)")


@dataclass(frozen=True)
class ParallelConfig:
    """Several processes (``opdplus train --nproc N`` or torchrun)."""

    mode: ParallelMode = setting("ddp", "ddp, or fsdp (FSDP2 fully_shard); used when launched with several processes")


@dataclass(frozen=True)
class DataConfig:
    """Training prompts."""

    tasks: list[str] = setting(["contains"], "task names; each step's prompts are split evenly between them")
    task_options: dict[str, dict[str, Any]] = setting({}, "task name -> keyword arguments of its factory")
    prompts_per_step: int = setting(4, "prompts per training step (over all processes)")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling the student's completions."""

    max_new_tokens: int = setting(
        32, "tokens generated per completion at most (per assistant turn in multi-turn tasks)"
    )
    samples_per_prompt: int = setting(2, "completions per prompt")
    temperature: float = setting(1.0, "sampling temperature; != 1 makes rollouts off-policy (a warning is printed)")
    top_k: int = setting(0, "sample from the k most likely tokens; 0 = off")
    top_p: float = setting(1.0, "nucleus sampling mass; 1 = off")
    batch_size: int = setting(64, "rows per generate call")
    sampler: SamplerName = setting(
        "hf", "hf: transformers generate (the reference); fast: own decode loop, same output"
    )
    max_turns: int = setting(4, "multi-turn tasks: assistant turns per episode at most")
    max_episode_tokens: int = setting(
        1024, "multi-turn tasks: tokens after the opening prompt (student + environment) per episode at most"
    )
    tool_timeout_s: float = setting(
        30.0, "multi-turn tasks: seconds an environment step may take; a slower one ends the episode (0 = no limit)"
    )


@dataclass(frozen=True)
class LossConfig:
    """What the student minimises: the divergence to the teacher, its estimator and teacher signal."""

    divergence: str = setting(
        "reverse_kl", "a registered divergence (opdplus.ops.divergences)", choices=_divergence_choices
    )
    alpha: float | None = setting(None, "parameter of divergence alpha (required for it, rejected for others)")
    estimator: Estimator = setting("opd_plus", "opd: stop-gradient advantages; opd_plus: unbiased (OPD+)")
    gamma: float = setting(0.0, "horizon discount in [0, 1] of the divergences of later tokens")
    log_ratio_clip: float | None = setting(None, "bound |log q - log pi| (trades bias for variance); null = off")
    clip_eps: float | None = setting(0.2, "PPO ratio clip (matters when update.ppo_epochs > 1); null = off")
    teacher_signal: TeacherSignalName = setting(
        "sampled", "sampled: log-ratio of the sampled token; topk: teacher's top-k + tail; exact: full vocabulary"
    )
    topk: int = setting(20, "teacher_signal=topk: the teacher's top-k tokens plus one tail bucket")
    normalizer: Normalizer = setting(
        "tokens",
        "tokens: divide the step's loss by its sampled tokens (a ratio estimator: O(1/N) bias, long rollouts weigh "
        "less per token); constant: by rollouts x rollout.max_new_tokens (unbiased, fixed scale)",
    )


@dataclass(frozen=True)
class UpdateConfig:
    """The update step: optimizer steps per rollout batch and how the batch is cut to fit in memory."""

    ppo_epochs: int = setting(1, "optimizer steps per rollout batch")
    micro_batch_size: int = setting(8, "rows per forward/backward; gradients accumulate over the batch")
    logprob_chunk_size: int = setting(
        256, "tokens (sequences x positions) per block of logits; memory grows with this x vocabulary"
    )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = setting(1e-4, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    betas: list[float] = setting([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    eps: float = setting(1e-8, "AdamW epsilon")
    warmup_steps: int = setting(0, "optimizer steps of linear warmup")
    schedule: Schedule = setting("constant", "after warmup: constant, or linear / cosine decay to min_lr_ratio * lr")
    min_lr_ratio: float = setting(0.0, "the decayed schedules' final learning rate over lr, in [0, 1]")
    max_grad_norm: float | None = setting(1.0, "clip the gradient norm to this; null = no clipping")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation during training (logged as eval/...)."""

    every: int = setting(0, "steps between evaluations; 0 = only at the end (if at_end)")
    at_end: bool = setting(True, "evaluate after the last step")
    at_start: bool = setting(False, "evaluate the starting policy too (step 0); with run.steps=0 only that")
    num_prompts: int = setting(8, "held-out prompts per task")
    max_new_tokens: int | None = setting(None, "tokens per completion at most; null: rollout.max_new_tokens")
    seed: int = setting(1234, "seed of eval sampling (its own generator: it never perturbs training)")
    score_decoding: ScoreDecoding = setting(
        "sample", "task scores of the temperature-1 samples (sample) or of greedy completions (greedy)"
    )
    forward_kl: bool = setting(False, "also eval/forward_kl, KL(teacher || student) on teacher samples (local teacher)")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run runs: directory, seed, length, device, checkpoints, logging."""

    dir: str = setting("runs/tiny", "run directory: config.yaml, metrics.jsonl, checkpoints/")
    seed: int = setting(0, "seed of sampling, data and initialisation")
    steps: int = setting(10, "training steps")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N, mps or xpu")
    threads: int = setting(0, "CPU threads for torch; 0 = torch's default (tiny models run fastest with 1)")
    precision: Precision = setting(
        "fp32", "fp32, or bf16-mixed: bfloat16 autocast for sampling and the update over float32 weights and AdamW"
    )
    checkpoint_every: int = setting(0, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = setting(2, "newest checkpoints kept; 0 = keep all")
    progress: Progress = setting("auto", "auto (a bar on a TTY, plain lines otherwise), bar, plain or none")
    log_every: int = setting(1, "steps between plain progress lines")
    tensorboard: bool = setting(False, "also log to TensorBoard (needs the `log` extra)")
    wandb: bool = setting(False, "also log to Weights & Biases (needs wandb)")
    wandb_project: str = setting("opdplus", "the W&B project")


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = setting(RunConfig(), "run directory, seed, steps, device, checkpoints, logging")
    student: StudentConfig = setting(StudentConfig(), "the student model")
    teacher: TeacherConfig = setting(TeacherConfig(), "the teacher model (when teachers is empty)")
    teachers: list[TeacherRoute] = setting([], "several teachers routed by task tag: [{task: TAG, teacher: {...}}]")
    data: DataConfig = setting(DataConfig(), "training prompts")
    rollout: RolloutConfig = setting(RolloutConfig(), "sampling the student's completions")
    loss: LossConfig = setting(LossConfig(), "divergence, estimator, teacher signal")
    update: UpdateConfig = setting(UpdateConfig(), "optimizer steps per batch, micro-batches, logits chunks")
    optim: OptimConfig = setting(OptimConfig(), "AdamW and the learning-rate schedule")
    eval: EvalConfig = setting(EvalConfig(), "held-out evaluation during training")
    parallel: ParallelConfig = setting(ParallelConfig(), "several processes: ddp or fsdp")


# ---------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:  # e.g. bool | Literal["auto"]
        return " | ".join(_type_name(option) for option in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
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
    if origin is Literal:
        _one_of(value, typing.get_args(tp), key)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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


# ---------------------------------------------------------------- renamed keys


def _section(data: dict[str, Any], parts: list[str], *, create: bool = False) -> dict[str, Any] | None:
    """The nested mapping at ``parts`` (created when asked), or None where there is none."""
    node = data
    for part in parts:
        child = node.setdefault(part, {}) if create else node.get(part)
        if not isinstance(child, dict):
            return None
        node = child
    return node


def renamed_key(key: str, warned: set[str], where: str = "") -> str:
    """The current name of dotted ``key``; an old name prints one warning line on stderr (once per ``warned``)."""
    new = RENAMED_KEYS.get(key)
    if new is None:
        return key
    if key not in warned:
        warned.add(key)
        print(f"warning: config key {key} is now {new}{where}; see CHANGELOG.md", file=sys.stderr)
    return new


def translate_renamed(data: dict[str, Any], warned: set[str] | None = None, where: str = "") -> dict[str, Any]:
    """A copy of the nested config dict ``data`` with every old key (``RENAMED_KEYS``) moved to its new name."""
    out = copy.deepcopy(data)
    warned = set() if warned is None else warned
    for old, new in RENAMED_KEYS.items():
        *old_sections, old_leaf = old.split(".")
        parent = _section(out, old_sections)
        if parent is None or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        if not parent:  # e.g. `train:` held only the renamed key
            grandparent = _section(out, old_sections[:-1])
            assert grandparent is not None
            grandparent.pop(old_sections[-1])
        *new_sections, new_leaf = renamed_key(old, warned, where).split(".")
        target = _section(out, new_sections, create=True)
        if target is None:
            raise ConfigError(f"{'.'.join(new_sections)} must be a section (it receives {old}, now {new})")
        if new_leaf in target:
            raise ConfigError(f"{old} is the old name of {new} and both are set; keep only {new}")
        target[new_leaf] = value
    return out


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


def apply_overrides(data: dict[str, Any], overrides: list[str], warned: set[str] | None = None) -> dict[str, Any]:
    """A copy of the nested dict ``data`` with each ``key=value`` applied (keys are checked later; old key
    names are translated, with one warning each)."""
    out = copy.deepcopy(data)
    warned = set() if warned is None else warned
    for text in overrides:
        path, value = parse_override(text)
        path = renamed_key(".".join(path), warned, " (override)").split(".")
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
        except IsADirectoryError as err:
            raise ConfigError(
                f"config file {str(path)!r} is a directory; give a YAML file such as configs/tiny.yaml"
            ) from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not a text file ({err.reason}); give a YAML file") from err
        except PermissionError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read: permission denied") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must contain a mapping at top level")
    warned: set[str] = set()
    data = translate_renamed(data, warned, f" (in {path})")
    return config_from_dict(apply_overrides(data, overrides or [], warned), warned)


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A validated copy of ``cfg`` with ``key=value`` overrides applied (handy in tests and sweeps)."""
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))


def config_from_dict(data: dict[str, Any], warned: set[str] | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from a nested dict (old key names translated)."""
    cfg = from_dict(TrainConfig, translate_renamed(data, warned))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- resume: what may change

# keys a resumed run may change (a trailing ``.*``: the whole section); anything else would make it another run.
# run.steps may change but not below the checkpoint's step; teachers[i].teacher.* follow teacher.*
RESUME_MAY_CHANGE = (
    "run.dir",
    "run.steps",
    "run.log_every",
    "run.progress",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.threads",
    "run.tensorboard",
    "run.wandb",
    "run.wandb_project",
    "eval.*",
    "teacher.url",
    "teacher.timeout_s",
    "teacher.max_retries",
    "teacher.api_key_env",
)


def resume_may_change(key: str) -> bool:
    """May dotted ``key`` (as ``config_changes`` names it) differ from the checkpoint's config on resume?"""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "teachers" and parts[2] == "teacher":
        key = ".".join(["teacher", *parts[3:]])
    return any(
        key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1])) for allowed in RESUME_MAY_CHANGE
    )


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(child, f"{prefix}{key}.", out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out[prefix + "len"] = len(value)
        for i, child in enumerate(value):
            _flatten(child, f"{prefix}{i}.", out)
    else:
        out[prefix.rstrip(".")] = value
    return out


def config_changes(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs (list entries by index)."""
    before, after = _flatten(to_dict(old), "", {}), _flatten(to_dict(new), "", {})
    return [
        (k, before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)
    ]


def stored_config(text: str, where: str) -> TrainConfig:
    """The config a run was trained with, from its stored YAML: old key names translated, keys it lacks
    (written by an older version) at their defaults. Not re-validated (it ran)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must contain a mapping at top level")
    return from_dict(TrainConfig, translate_renamed(data, where=f" (in {where})"))


# ---------------------------------------------------------------- reference (opdplus train --help-config)


def _type_label(tp: Any, spec: dataclasses.Field[Any]) -> str:
    if "choices" in spec.metadata:
        return "{" + ",".join(spec.metadata["choices"]()) + "}"
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if typing.get_origin(tp) in (list, dict):
        return str(tp).replace("typing.", "").replace(f"{__name__}.", "")
    return _type_name(tp).replace("NoneType", "None")


def _yaml_value(value: Any) -> str:
    data = dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
    text = yaml.safe_dump(data, width=10**6, default_flow_style=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def config_reference(node: Any = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every key of the config dataclass ``node`` (default: ``TrainConfig()``),
    in declaration order; a section's keys are listed under it, those of a list of sections as ``name[].key``."""
    node = TrainConfig() if node is None else node
    hints = typing.get_type_hints(type(node))
    rows = []
    for spec in dataclasses.fields(node):
        key, tp, value = prefix + spec.name, hints[spec.name], getattr(node, spec.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(config_reference(value, f"{key}."))
            continue
        rows.append((key, _type_label(tp, spec), _yaml_value(value), spec.metadata["help"]))
        item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if isinstance(item_tp, type) and dataclasses.is_dataclass(item_tp):
            rows.extend(config_reference(item_tp(), f"{key}[]."))
    return rows


# ---------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every number under the config dataclass ``node`` is finite (inf and nan are never meaningful settings:
    an unbounded option is ``null``)."""
    for spec in dataclasses.fields(node):
        value, key = getattr(node, spec.name), prefix + spec.name
        named = [(f"{key}[{i}]", item) for i, item in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for where, item in named:
            if dataclasses.is_dataclass(item):
                _check_finite(item, f"{where}.")
            elif isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{where}={item} must be a finite number")


def _one_of(value: Any, options: tuple[Any, ...], key: str) -> None:
    _check(value in options, f"{key}={value!r} is not one of: {', '.join(map(str, options))}")


def _check_choices(node: Any, prefix: str = "") -> None:
    """Every ``Literal`` field under the config dataclass ``node`` holds one of its choices (also for a
    config built without ``from_dict``)."""
    hints = typing.get_type_hints(type(node))
    for spec in dataclasses.fields(node):
        value, tp, key = getattr(node, spec.name), hints[spec.name], prefix + spec.name
        if typing.get_origin(tp) is Literal:
            _one_of(value, typing.get_args(tp), key)
        elif dataclasses.is_dataclass(value):
            _check_choices(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{key}[{i}].")


def divergence_kwargs(loss: LossConfig) -> dict[str, Any]:
    """Keyword parameters for ``get_divergence(loss.divergence, **kwargs)``."""
    return {} if loss.alpha is None else {"alpha": loss.alpha}


def validate(cfg: TrainConfig) -> None:
    """Value and combination checks that need no model; raises ConfigError."""
    run, loss, optim, rollout, update = cfg.run, cfg.loss, cfg.optim, cfg.rollout, cfg.update
    _check_choices(cfg)
    _check_finite(cfg)
    _check(
        cfg.student.dtype != "float16",
        "student.dtype=float16 cannot be trained: AdamW keeps its second moment in the parameters' dtype, where "
        "(1 - beta2) * grad^2 underflows to 0 for gradients below ~8e-3, so the updates grow until the logits are "
        "inf/NaN (within 3 steps of configs/tiny.yaml); use student.dtype=bfloat16 (same memory, float32's range) "
        "or float32 (a float16 teacher is fine)",
    )
    _check(
        run.precision != "bf16-mixed" or cfg.student.dtype == "float32",
        f"run.precision=bf16-mixed keeps float32 master weights and optimizer state, so it needs "
        f"student.dtype=float32 (got {cfg.student.dtype}); student.dtype=bfloat16 with run.precision=fp32 trains "
        "in bfloat16 throughout",
    )
    _check(
        run.steps >= 1 or (run.steps == 0 and cfg.eval.at_start),
        f"run.steps must be >= 1 (or 0 with eval.at_start=true, to evaluate the starting policy only), got {run.steps}",
    )
    _check(bool(run.dir), "run.dir must be a directory path")
    _check(run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = only at the end)")
    _check(run.keep_checkpoints >= 0, "run.keep_checkpoints must be >= 0 (0 = keep all)")
    _check(run.log_every >= 1, "run.log_every must be >= 1")
    _check(run.threads >= 0, "run.threads must be >= 0 (0 = torch's default)")
    for key, device in (("run.device", run.device), ("teacher.device", cfg.teacher.device)):
        _check(
            device is None or device == "auto" or device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"),
            f"{key}={device!r} is not auto, cpu, cuda, cuda:N, mps or xpu",
        )
    for side in ("student", "teacher"):
        _check(bool(getattr(cfg, side).model), f"{side}.model must name a local model directory or 'tiny'")
    lora = cfg.student.lora
    if lora.enabled:
        _check(lora.r >= 1, f"student.lora.r must be >= 1, got {lora.r}")
        _check(0.0 <= lora.dropout < 1.0, f"student.lora.dropout must be in [0, 1), got {lora.dropout}")
        _check(len(lora.target_modules) > 0, "student.lora.target_modules must name at least one module")
    _check(cfg.teacher.batch_size >= 1, "teacher.batch_size must be >= 1")
    _validate_teachers(cfg)
    _check(loss.topk >= 1, f"loss.topk must be >= 1, got {loss.topk}")
    _check(
        not (cfg.parallel.mode == "fsdp" and cfg.student.lora.enabled),
        "parallel.mode=fsdp does not support student.lora.enabled=true; use parallel.mode=ddp with LoRA",
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
    _check(rollout.max_turns >= 1, f"rollout.max_turns must be >= 1, got {rollout.max_turns}")
    _check(
        rollout.max_episode_tokens >= 1, f"rollout.max_episode_tokens must be >= 1, got {rollout.max_episode_tokens}"
    )
    _check(
        rollout.tool_timeout_s >= 0, f"rollout.tool_timeout_s must be >= 0 (0 = no limit), got {rollout.tool_timeout_s}"
    )
    _check(0.0 <= loss.gamma <= 1.0, f"loss.gamma must be in [0, 1], got {loss.gamma}")
    _check(loss.log_ratio_clip is None or loss.log_ratio_clip > 0, "loss.log_ratio_clip must be > 0 or null")
    _check(
        loss.clip_eps is None or 0 < loss.clip_eps < 1, f"loss.clip_eps must be in (0, 1) or null, got {loss.clip_eps}"
    )
    _check(update.ppo_epochs >= 1, "update.ppo_epochs must be >= 1")
    _check(update.micro_batch_size >= 1, "update.micro_batch_size must be >= 1")
    _check(update.logprob_chunk_size >= 1, "update.logprob_chunk_size must be >= 1")
    _check(
        loss.alpha is None or loss.divergence == "alpha",
        f"loss.alpha is only used by loss.divergence=alpha (got divergence {loss.divergence!r})",
    )
    _validate_divergence(loss)
    _check(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    _check(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _check(optim.eps > 0, f"optim.eps must be > 0, got {optim.eps}")
    _check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas must be two numbers in [0, 1)")
    _check(optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _check(0.0 <= optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    _check(optim.max_grad_norm is None or optim.max_grad_norm > 0, "optim.max_grad_norm must be > 0 or null")
    _check(cfg.eval.every >= 0, "eval.every must be >= 0 (0 = only at the end)")
    _check(cfg.eval.num_prompts >= 1, "eval.num_prompts must be >= 1")
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
            t.cross_tokenizer is not True or cfg.loss.teacher_signal == "sampled",
            f"{key}.cross_tokenizer=true scores spans of text, so the teacher's top-k and full logits (over another "
            f"vocabulary) cannot be used; set loss.teacher_signal=sampled (got {cfg.loss.teacher_signal})",
        )
        _check(
            not (t.cross_tokenizer is True and t.url is not None and t.tokenizer is None),
            f"{key}.cross_tokenizer=true with a served teacher needs its tokenizer: set {key}.tokenizer to a local "
            "directory with the teacher's tokenizer (the trainer tokenizes and sends ids)",
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
        not (cfg.teachers and cfg.loss.teacher_signal in ("exact", "topk")),
        f"loss.teacher_signal={cfg.loss.teacher_signal} works with one teacher, not with a teachers: list "
        "(routed teachers give sampled-token scores only)",
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
