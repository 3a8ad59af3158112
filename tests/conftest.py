"""Shared fixtures: tiny models and tokenizers built locally (no downloads), tiny training configs."""

from __future__ import annotations

from pathlib import Path

import pytest

# Overrides that make a training run take well under a second per step on one CPU thread.
TINY_RUN = [
    "run.threads=1",
    "run.progress=none",
    "run.steps=3",
    "data.prompts_per_step=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "update.micro_batch_size=2",
    "optim.lr=0.01",
    "optim.warmup_steps=0",
    "eval.at_end=false",
    "eval.num_prompts=2",
    "student.tiny.hidden_size=32",
    "student.tiny.intermediate_size=64",
    "teacher.tiny.hidden_size=32",
    "teacher.tiny.intermediate_size=64",
    "teacher.tiny.num_layers=2",
]


def _tiny_train_config(run_dir: str | Path, *overrides: str):
    from opdplus.train.config import load_config

    return load_config(None, [*TINY_RUN, f"run.dir={run_dir}", *overrides])


@pytest.fixture
def tiny_train_config():
    """``tiny_train_config(run_dir, *overrides)`` -> a validated ``TrainConfig`` for a tiny random
    student/teacher pair writing into ``run_dir``."""
    return _tiny_train_config


@pytest.fixture
def tiny_run_overrides() -> list[str]:
    """The ``key=value`` overrides behind ``tiny_train_config`` (for configs written to YAML files)."""
    return list(TINY_RUN)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + character tokenizer (with chat template) saved as an HF directory."""
    from opdplus.models.tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="session")
def char_tokenizer():
    from opdplus.models.tiny import build_char_tokenizer

    return build_char_tokenizer()
