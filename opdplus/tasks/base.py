"""The task interface: where prompts come from and how a completion is scored.

A task yields ``TaskItem``s (prompt plus whatever its scorer needs) for a split and scores a
completion string with a number in [0, 1]. Scorers never raise on malformed model output: they
score it 0. Tasks are registered by name; ``get_task(name, **options)`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class TaskItem:
    id: str
    task: str  # task tag, used to route rollouts to a teacher and to name metrics
    prompt: str | list[dict[str, Any]]  # plain text, or chat messages [{"role": ..., "content": ...}]
    answer: Any = None  # what the scorer needs (reference answer, possible answers, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. tool schemas for a chat template

    @property
    def prompt_text(self) -> str:
        """The prompt of a plain-text item; raises ValueError for chat messages (use ``render_prompt``)."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"item {self.id!r} of task {self.task!r} has chat messages, not a plain-text prompt")
        return self.prompt


@runtime_checkable
class Task(Protocol):
    name: str

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        """``n`` items of ``split`` ("train" or "eval"); deterministic for a seed."""
        ...

    def score(self, item: TaskItem, completion: str) -> float:
        """1.0 = correct, 0.0 = wrong (partial credit allowed); never raises on bad output."""
        ...


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    _TASKS[name] = factory


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def get_task(name: str, **options: Any) -> Task:
    _load_builtin_tasks()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name](**options)


def _load_builtin_tasks() -> None:
    """Import the modules that register built-in tasks (each calls ``register_task``)."""
    import importlib

    for module in _BUILTIN_TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a module of an optional extra that is not installed
            if err.name and err.name.startswith("opdplus"):
                raise


# Modules that register tasks when imported; each task module appends itself here.
_BUILTIN_TASK_MODULES: list[str] = [
    "opdplus.tasks.trivial",
    "opdplus.tasks.synthetic",
    "opdplus.tasks.math",
    "opdplus.tasks.bfcl",
    "opdplus.envs.bfcl_multi_turn",
    "opdplus.envs.scripted",
    "opdplus.envs.synthetic_lookup",
]


def render_prompt(tokenizer: Any, item: TaskItem) -> str:
    """The prompt text fed to the model: chat messages go through the tokenizer's chat template
    (with tools from ``item.meta["tools"]`` when present); plain text is used as is."""
    if isinstance(item.prompt, str):
        return item.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"task {item.task!r} gives chat messages but the tokenizer has no chat template; "
            "use a chat model, set a chat template, or use the task's plain prompt format"
        )
    kwargs = {"tools": item.meta["tools"]} if item.meta.get("tools") else {}
    return tokenizer.apply_chat_template(item.prompt, tokenize=False, add_generation_prompt=True, **kwargs)
