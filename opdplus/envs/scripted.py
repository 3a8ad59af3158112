"""``scripted_tools``: a small scripted multi-turn task (no downloads), for tests and ``configs/tiny_multiturn.yaml``.

Each item asks for the value of a key in a table drawn per item, through the tool ``lookup(key=...)``. The
environment answers the first ``replies`` assistant turns, whatever they hold: a well-formed ``lookup`` call gets
the table's value, a call to another tool or with bad arguments a tool error, a malformed call a tool error, and a
turn without calls a scripted user message asking for the tool. The next turn ends the episode; it scores 1 when
that final turn contains the value.
"""

from __future__ import annotations

import random
from typing import Any

from opdplus.envs.base import AssistantTurn, EnvReply
from opdplus.tasks.base import TaskItem, register_task

LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "The value stored under a key.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
    },
}
NUDGE = "Call lookup(key=...) first."


def lookup_results(calls: list[dict[str, dict[str, Any]]], table: dict[str, int]) -> tuple[list[str], int]:
    """(one tool message per call, errors): ``lookup(key=K)`` answers ``table[K]``; anything else an error text."""
    out, errors = [], 0
    for call in calls:
        ((name, args),) = call.items()
        if name != "lookup":
            out.append(f"error: unknown tool {name!r}; the only tool is lookup(key=...)")
        elif set(args) != {"key"} or str(args["key"]) not in table:
            out.append(f"error: lookup takes one argument key, one of {sorted(table)}; got {args!r}")
        else:
            out.append(str(table[str(args["key"])]))
            continue
        errors += 1
    return out, errors


class ScriptedEnvironment:
    """Answers ``replies`` assistant turns (see the module docstring), then ends the episode at the next one."""

    def __init__(self, table: dict[str, int], answer: int, replies: int = 2) -> None:
        self.table = table
        self.answer = answer
        self.replies = replies
        self.turns: list[AssistantTurn] = []
        self.calls: list[list[str]] = []

    def step(self, turn: AssistantTurn) -> EnvReply:
        self.turns.append(turn)
        if len(self.turns) > self.replies:
            return EnvReply(done=True)
        if turn.malformed:
            message = "error: the tool call did not parse; write <tool_call>" + '{"name": "lookup", "arguments": '
            return EnvReply(
                messages=[{"role": "tool", "content": message + '{"key": "..."}}</tool_call>'}], tool_errors=1
            )
        if not turn.calls:
            return EnvReply(messages=[{"role": "user", "content": NUDGE}])
        self.calls.append([f"{name}({args})" for call in turn.calls for name, args in call.items()])
        results, errors = lookup_results(turn.calls, self.table)
        messages = [{"role": "tool", "content": text} for text in results]
        return EnvReply(messages=messages, tool_calls=len(turn.calls), tool_errors=errors)

    def score(self) -> float:
        return float(bool(self.turns) and str(self.answer) in self.turns[-1].text)

    def record(self) -> dict[str, Any]:
        return {"calls": self.calls, "turns": [t.text for t in self.turns]}

    def close(self) -> None:
        pass


class ScriptedToolsTask:
    """Items: "what is stored under K?" with a per-item table of 3 keys; tool ``lookup`` (``LOOKUP_TOOL``).
    ``prompt_format``: ``chat`` (messages + tools) or ``plain`` (text, for models without a chat template)."""

    name = "scripted_tools"

    def __init__(self, replies: int = 2, prompt_format: str = "chat") -> None:
        if prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be chat or plain, got {prompt_format!r}")
        self.replies = replies
        self.prompt_format = prompt_format

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        rng = random.Random(f"scripted-{split}-{seed}")
        out = []
        for i in range(n):
            keys = rng.sample("abcdefgh", 3)
            table = {k: rng.randint(10, 99) for k in keys}
            key = rng.choice(keys)
            question = f"What is stored under {key}? Use lookup."
            prompt: Any = [{"role": "user", "content": question}] if self.prompt_format == "chat" else question
            meta = {"tools": [LOOKUP_TOOL], "table": table} if self.prompt_format == "chat" else {"table": table}
            out.append(TaskItem(id=f"{split}-{seed}-{i}", task=self.name, prompt=prompt, answer=table[key], meta=meta))
        return out

    def score(self, item: TaskItem, completion: str) -> float:
        return float(str(item.answer) in completion)

    def environment(self, item: TaskItem) -> ScriptedEnvironment:
        return ScriptedEnvironment(dict(item.meta["table"]), item.answer, replies=self.replies)


register_task("scripted_tools", ScriptedToolsTask)
