"""The environment interface: multi-turn tasks whose episodes alternate student turns and environment replies.

A multi-turn task gives, per item, the opening chat messages (``TaskItem.prompt``, tools in
``TaskItem.meta["tools"]``) and a fresh ``Environment`` for the episode. The rollout decodes one
assistant turn until end-of-turn, parses it into an ``AssistantTurn`` (text plus tool calls, parsed from
the model's own format by ``opdplus.tasks.bfcl_match.parse_calls``), hands it to ``Environment.step``,
appends the reply's messages to the token sequence, framed by the chat template, and continues until the
reply is ``done`` or a limit is hit; ``Environment.score`` then scores the whole episode in [0, 1].

The estimator stays exact when the environment's replies do not depend on the student's parameters given
the history (docs/derivations.md, "Multi-turn episodes"): environment tokens are never sampled by the
student and are False in ``loss_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard, runtime_checkable

from opdplus.tasks.base import Task, TaskItem

Call = dict[str, dict[str, Any]]  # {name: {argument: value}}, as opdplus.tasks.bfcl_match parses it


@dataclass(frozen=True)
class AssistantTurn:
    """One decoded assistant turn: its text (end-of-turn token excluded), the tool calls parsed from it
    (``[]`` when it has none) and ``malformed`` = it started like a call but did not parse."""

    text: str
    calls: list[Call] = field(default_factory=list)
    malformed: bool = False


@dataclass(frozen=True)
class EnvReply:
    """What comes after an assistant turn: chat messages to append (``{"role": "tool" | "user", "content": ...}``),
    and ``done`` = the episode is over (no more assistant turns). ``tool_calls`` / ``tool_errors`` count the calls
    executed and the calls answered with an error (malformed, unknown tool, bad arguments, time limit)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0


@runtime_checkable
class Environment(Protocol):
    """One episode's environment. ``step`` never raises on bad model output: it answers with an error message
    that the model sees. ``record`` returns per-episode extras for evaluation samples (e.g. executed calls)."""

    def step(self, turn: AssistantTurn) -> EnvReply: ...

    def score(self) -> float: ...

    def record(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@runtime_checkable
class MultiTurnTask(Task, Protocol):
    """A task whose items are episodes: ``items`` as for any task (opening messages as the prompt), plus a fresh
    environment per episode. ``score(item, completion)`` of a single-turn task does not apply; the episode's
    score comes from ``Environment.score``."""

    def environment(self, item: TaskItem) -> Environment: ...


def is_multi_turn(task: Task) -> TypeGuard[MultiTurnTask]:
    return isinstance(task, MultiTurnTask)
