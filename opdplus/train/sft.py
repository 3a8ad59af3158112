"""Supervised fine-tuning (SFT) of a teacher on a task's train split: TRL's ``SFTTrainer`` with LoRA (peft).

    cfg = load_sft_config("configs/smollm2_sft_math.yaml", ["run.steps=20"])
    result = sft(cfg)

Each training example is a task item's prompt, tokenized exactly as the rollout sampler tokenizes it
(``opdplus.rollout.sampler.tokenize_prompts``: ``render_prompt``, chat text with its own special tokens),
followed by the item's reference completion (``reference_completion``) and the end-of-turn token (or EOS);
the loss counts the completion tokens only. At the end the held-out items (eval split, minus any whose
prompt text is also a training prompt) are decoded greedily through the evaluation stack
(``opdplus.eval.runner.greedy_completions``) and scored by the task. The run directory holds
``config.yaml``, ``checkpoints/`` (HF Trainer checkpoints: a killed run continues from the newest),
``adapter/`` (the LoRA adapter, ``save_pretrained`` layout), ``adapter.sha256``, ``eval_samples.jsonl``
(``id``, ``completion``, ``answer``, ``correct``), ``result.json`` and, with ``run.save_merged``,
``merged/`` (the base model with the adapter merged in: a model directory for ``teacher.model``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from opdplus.tasks.base import TaskItem, get_task, render_prompt
from opdplus.train.config import (
    ConfigError,
    LoraConfig,
    Schedule,
    TinyModelConfig,
    apply_overrides,
    from_dict,
    setting,
    to_dict,
)

CompletionStyle = Literal["expression", "steps"]


@dataclass(frozen=True)
class SftRunConfig:
    """Where and how the fine-tuning runs."""

    dir: str = setting("runs/sft", "run directory: config.yaml, checkpoints/, adapter/, result.json")
    seed: int = setting(0, "seed of the data order, LoRA initialisation and dropout")
    steps: int = setting(100, "optimizer steps")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    threads: int = setting(0, "CPU threads for torch; 0 = torch's default")
    checkpoint_every: int = setting(50, "steps between Trainer checkpoints (resume point of a killed run)")
    keep_checkpoints: int = setting(1, "newest checkpoints kept")
    log_every: int = setting(10, "steps between loss lines")
    progress: bool = setting(False, "show the Trainer's progress bar")
    save_merged: bool = setting(
        False, "also write merged/: the base model with the adapter merged in (a plain HF directory, a teacher spec)"
    )


@dataclass(frozen=True)
class SftModelConfig:
    """The model being fine-tuned (loaded by ``opdplus.models.load.load_model_and_tokenizer``)."""

    model: str = setting("tiny", "a local HF model directory, gguf:<package>/<file.gguf>, or tiny (built from `tiny`)")
    tokenizer: str | None = setting(None, "a local tokenizer directory; null: the model's")
    dtype: str = setting("float32", "parameter dtype: float32, bfloat16 or float16")
    tiny: TinyModelConfig = setting(TinyModelConfig(), "shape of the model when model=tiny")


@dataclass(frozen=True)
class SftDataConfig:
    """Training and held-out items of one task."""

    task: str = setting("math", "task name (opdplus.tasks)")
    task_options: dict[str, Any] = setting({}, "keyword arguments of the task's factory")
    train_items: int = setting(2000, "train-split items (cycled when steps x batch exceeds them)")
    eval_items: int = setting(50, "held-out (eval-split) items scored at the end; 0 = no evaluation")
    eval_seed: int = setting(0, "seed of the held-out items (the train items use run.seed)")
    completion: CompletionStyle = setting(
        "expression",
        "target of a math item: expression ('8 + 6 - 1 = \\boxed{13}') or steps, a chain of + and - reduced left to "
        "right one operation at a time ('8 + 6 - 1 = 14 - 1 = \\boxed{13}')",
    )


@dataclass(frozen=True)
class SftOptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = setting(1.0e-3, "peak learning rate")
    batch_size: int = setting(8, "sequences per forward pass")
    grad_accum: int = setting(1, "forward passes per optimizer step")
    warmup_steps: int = setting(10, "linear warm-up steps")
    schedule: Schedule = setting("cosine", "constant, linear or cosine (after warm-up)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient-norm clip")


@dataclass(frozen=True)
class SftEvalConfig:
    """The held-out greedy evaluation at the end."""

    max_new_tokens: int = setting(64, "tokens generated per held-out item at most")
    batch_size: int = setting(16, "prompts per greedy decode")


@dataclass(frozen=True)
class SftConfig:
    run: SftRunConfig = setting(SftRunConfig(), "run directory, seed, steps, device, checkpoints")
    model: SftModelConfig = setting(SftModelConfig(), "the model being fine-tuned")
    lora: LoraConfig = setting(LoraConfig(enabled=True, r=16, alpha=32.0), "LoRA adapters (enabled: must be true)")
    data: SftDataConfig = setting(SftDataConfig(), "task, train and held-out items")
    optim: SftOptimConfig = setting(SftOptimConfig(), "AdamW and the learning-rate schedule")
    eval: SftEvalConfig = setting(SftEvalConfig(), "held-out greedy evaluation at the end")


def load_sft_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SftConfig:
    """YAML preset (or defaults when None) -> ``key=value`` overrides -> validated ``SftConfig``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file {str(path)!r} does not exist") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must contain a mapping at top level")
    cfg = from_dict(SftConfig, apply_overrides(data, overrides or []))
    validate_sft(cfg)
    return cfg


def validate_sft(cfg: SftConfig) -> None:
    checks = [
        (cfg.lora.enabled, "lora.enabled must be true: opdplus sft trains LoRA adapters only"),
        (cfg.run.steps >= 1, f"run.steps must be >= 1, got {cfg.run.steps}"),
        (cfg.run.checkpoint_every >= 1, f"run.checkpoint_every must be >= 1, got {cfg.run.checkpoint_every}"),
        (cfg.run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {cfg.run.keep_checkpoints}"),
        (cfg.data.train_items >= 1, f"data.train_items must be >= 1, got {cfg.data.train_items}"),
        (cfg.data.eval_items >= 0, f"data.eval_items must be >= 0, got {cfg.data.eval_items}"),
        (cfg.optim.batch_size >= 1, f"optim.batch_size must be >= 1, got {cfg.optim.batch_size}"),
        (cfg.optim.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {cfg.optim.grad_accum}"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.lora.r >= 1, f"lora.r must be >= 1, got {cfg.lora.r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ---------------------------------------------------------------- data


def reference_completion(item: TaskItem, style: CompletionStyle = "expression") -> str:
    """The target completion of an item: ``meta["solution"]`` when the task gives one; for math items a
    short worked answer, ``"{expression} = \\boxed{answer}"`` (``meta["expression"]``, reasoning-gym's; with
    ``style="steps"`` a chain of + and - is reduced one operation at a time, ``chain_steps``), or
    ``"\\boxed{answer}"``, which the math scorer parses (``opdplus.tasks.answers``)."""
    solution = item.meta.get("solution")
    if solution:
        return str(solution)
    if item.answer is None:
        raise ValueError(
            f"item {item.id!r} of task {item.task!r} has neither meta['solution'] nor an answer: no target to train on"
        )
    expression = item.meta.get("expression")
    boxed = f"\\boxed{{{item.answer}}}"
    if not expression:
        return boxed
    steps = chain_steps(expression) if style == "steps" else None
    if steps is None:
        return f"{expression} = {boxed}"
    if steps[-1] != str(item.answer).strip():
        raise ValueError(f"item {item.id!r}: {expression!r} reduces to {steps[-1]}, but its answer is {item.answer!r}")
    return " = ".join([expression, *steps[:-1], boxed])


def chain_steps(expression: str) -> list[str] | None:
    """The left-to-right reduction of a chain of integers joined by + and - (``"8 + 6 - 1"`` ->
    ``["14 - 1", "13"]``: each entry has one operation fewer); ``None`` for anything else."""
    parts = expression.split()
    if len(parts) < 3 or len(parts) % 2 == 0 or any(op not in ("+", "-") for op in parts[1::2]):
        return None
    try:
        values = [int(term) for term in parts[0::2]]
    except ValueError:
        return None
    steps, total = [], values[0]
    for i, value in enumerate(values[1:]):
        total = total + value if parts[2 * i + 1] == "+" else total - value
        steps.append(" ".join([str(total), *parts[2 * i + 3 :]]))
    return steps


def end_token_id(tokenizer: Any) -> int:
    """The token that ends a target completion: the chat template's end-of-turn token, else EOS."""
    from opdplus.rollout.sampler import end_of_turn_id

    token = end_of_turn_id(tokenizer)
    token = tokenizer.eos_token_id if token is None else token
    if token is None:
        raise ValueError("the tokenizer has no end-of-turn or EOS token: a fine-tuned model could never stop")
    return int(token)


def sft_examples(
    tokenizer: Any, items: list[TaskItem], style: CompletionStyle = "expression"
) -> list[dict[str, list[int]]]:
    """``{"input_ids", "completion_mask"}`` per item: the prompt ids exactly as the rollout sampler makes
    them, then the reference completion's ids and the end token (``completion_mask`` 1 = counts in the loss)."""
    from opdplus.rollout.sampler import tokenize_prompts

    end = end_token_id(tokenizer)
    out = []
    for item, prompt_ids in zip(items, tokenize_prompts(tokenizer, items)):
        completion_ids = [*tokenizer(reference_completion(item, style), add_special_tokens=False).input_ids, end]
        out.append(
            {
                "input_ids": [*prompt_ids, *completion_ids],
                "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
            }
        )
    return out


def held_out_without_train(tokenizer: Any, train: list[TaskItem], held_out: list[TaskItem]) -> list[TaskItem]:
    """``held_out`` minus the items whose rendered prompt text is also a training prompt."""
    seen = {render_prompt(tokenizer, item) for item in train}
    return [item for item in held_out if render_prompt(tokenizer, item) not in seen]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class SftResult:
    run_dir: Path
    adapter_dir: Path
    adapter_sha256: str
    train_loss: list[float]  # the logged training losses, in order
    eval_accuracy: float | None  # None when data.eval_items = 0
    eval_n: int
    seconds: dict[str, float]  # wall and CPU (``*_cpu``: all threads, load-independent) seconds per phase


def _trainer_args(cfg: SftConfig, checkpoints: Path) -> Any:
    from trl.trainer.sft_config import SFTConfig as TrlSFTConfig

    return TrlSFTConfig(
        output_dir=str(checkpoints),
        max_steps=cfg.run.steps,
        per_device_train_batch_size=cfg.optim.batch_size,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type=cfg.optim.schedule if cfg.optim.schedule != "constant" else "constant_with_warmup",
        warmup_steps=cfg.optim.warmup_steps,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm,
        logging_steps=cfg.run.log_every,
        save_strategy="steps",
        save_steps=cfg.run.checkpoint_every,
        save_total_limit=cfg.run.keep_checkpoints,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        report_to=[],
        use_cpu=cfg.run.device == "cpu",
        bf16=False,
        fp16=False,
        optim="adamw_torch",
        max_length=None,
        packing=False,
        completion_only_loss=True,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.run.progress,
        remove_unused_columns=True,
    )


def _evaluate(model: Any, tokenizer: Any, task: Any, items: list[TaskItem], cfg: SftConfig, out: Path) -> float:
    """Greedy accuracy on ``items`` through the evaluation stack; one JSON line per item in ``out``."""
    from opdplus.eval.runner import greedy_completions

    model.eval()
    texts = greedy_completions(
        model, tokenizer, items, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size
    )
    correct = [task.score(item, text) == 1.0 for item, text in zip(items, texts)]
    with out.open("w", encoding="utf-8") as f:
        for item, text, ok in zip(items, texts, correct):
            f.write(json.dumps({"id": item.id, "completion": text, "answer": item.answer, "correct": ok}) + "\n")
    return sum(correct) / max(len(items), 1)


# run keys a resumed run may change (anything else would make it another run)
RESUME_MAY_CHANGE = ("steps", "threads", "log_every", "progress", "checkpoint_every", "keep_checkpoints", "save_merged")


def _same_run(stored: dict[str, Any], new: dict[str, Any]) -> bool:
    """True if two config dicts describe the same run up to ``RESUME_MAY_CHANGE`` and ``eval``."""

    def core(data: dict[str, Any]) -> dict[str, Any]:
        run = {k: v for k, v in data.get("run", {}).items() if k not in RESUME_MAY_CHANGE}
        return {**{k: v for k, v in data.items() if k != "eval"}, "run": run}

    return core(stored) == core(new)


def sft(cfg: SftConfig) -> SftResult:
    """Fine-tune LoRA adapters on ``cfg.data.task``'s train split with TRL's ``SFTTrainer``; continues from
    the newest checkpoint in ``run.dir/checkpoints`` when there is one (same config); then evaluate."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    try:
        from datasets import Dataset
        from trl.trainer.sft_trainer import SFTTrainer
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"opdplus sft needs trl (and its datasets): pip install 'opdplus[bench,lora]' ({err})"
        ) from err

    from opdplus.models.load import apply_lora, load_model_and_tokenizer

    run_dir = Path(cfg.run.dir)
    checkpoints = run_dir / "checkpoints"
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    stored = run_dir / "config.yaml"
    resuming = checkpoints.is_dir() and any(checkpoints.iterdir())
    if resuming and not _same_run(yaml.safe_load(stored.read_text()) if stored.exists() else {}, to_dict(cfg)):
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with another config ({stored}); use another run.dir "
            "or delete that directory to start over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    stored.write_text(config_text)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        cfg.model.model,
        tokenizer=cfg.model.tokenizer,
        dtype=cfg.model.dtype,
        device=cfg.run.device,
        tiny=to_dict(cfg.model.tiny),
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = apply_lora(
        model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules
    )
    task = get_task(cfg.data.task, **cfg.data.task_options)
    train_items = task.items("train", cfg.data.train_items, seed=cfg.run.seed)
    dataset = Dataset.from_list(sft_examples(tokenizer, train_items, cfg.data.completion))
    seconds["setup"] = time.perf_counter() - start

    trainer = SFTTrainer(
        model=model,
        args=_trainer_args(cfg, checkpoints),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is not None:
        print(f"resuming from {last}")
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train(resume_from_checkpoint=last)
    seconds["train"], seconds["train_cpu"] = time.perf_counter() - start, time.process_time() - cpu_start
    losses = [float(row["loss"]) for row in trainer.state.log_history if "loss" in row]

    adapter_dir = run_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    adapter_sha256 = file_sha256(adapter_dir / "adapter_model.safetensors")
    (run_dir / "adapter.sha256").write_text(f"{adapter_sha256}  adapter/adapter_model.safetensors\n")

    accuracy, held_out = None, []
    if cfg.data.eval_items:
        held_out = held_out_without_train(
            tokenizer, train_items, task.items("eval", cfg.data.eval_items, seed=cfg.data.eval_seed)
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            accuracy = _evaluate(model, tokenizer, task, held_out, cfg, run_dir / "eval_samples.jsonl")
        seconds["eval"], seconds["eval_cpu"] = time.perf_counter() - start, time.process_time() - cpu_start
    if cfg.run.save_merged:  # after the evaluation: merging replaces the LoRA layers in place
        merged = model.merge_and_unload()
        merged.save_pretrained(str(run_dir / "merged"))
        tokenizer.save_pretrained(str(run_dir / "merged"))
    result = SftResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        adapter_sha256=adapter_sha256,
        train_loss=losses,
        eval_accuracy=accuracy,
        eval_n=len(held_out),
        seconds=seconds,
    )
    summary = {
        "adapter_sha256": adapter_sha256,
        "steps": trainer.state.global_step,
        "train_loss": losses,
        "eval": {"task": cfg.data.task, "n": len(held_out), "accuracy": accuracy},
        "seconds": seconds,
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result
