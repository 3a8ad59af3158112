"""``synthetic_lookup``: the demo world's multi-turn task, a word problem whose amount only a tool knows.

Each item draws a table of 3 boxes (keys from ``BOX_KEYS``, amounts 1..5) that the prompt never shows; the
question names one box. The model must call the tool, read its answer and do the arithmetic::

    Q: Ann has 5 pens. Ann finds the pens in box c. How many pens does Ann have?
    A: lookup(box="c")</s>
    tool: 4
    assistant: 5 + 4 = 9. #### 9</s>

(the framing ``\\n\\ntool: ...\\n\\nassistant:`` is ``opdplus.rollout.multiturn.plain_framing``; ``</s>`` ends a
turn). The environment answers every turn with calls: ``lookup(box=K)`` gets the table's amount, anything else a
tool error; a malformed call a tool error. The first turn without calls is the final answer and ends the episode.
It scores 1 when that answer's number after ``####`` is right and the asked box was looked up, so a model that
guesses without the tool, or misreads its answer, fails. Plain-text prompts (no chat template), seeded and
unlimited; train and eval are disjoint by a hash of the prompt, as for ``opdplus.tasks.synthetic``.
"""

from __future__ import annotations

import random
from typing import Any

from opdplus.envs.base import AssistantTurn, EnvReply
from opdplus.tasks.base import TaskItem, register_task
from opdplus.tasks.synthetic import (
    MATH_GAIN_VERBS,
    MATH_NAMES,
    MATH_OBJECTS,
    MAX_AMOUNT,
    MAX_VALUE,
    _stream,
    _take,
    score_math,
)

BOX_KEYS = "abcdef"
BOXES_PER_ITEM = 3
LOSS_VERBS = ("loses", "uses")  # "loses as many pens as are in box c"


def make_lookup_problem(rng: random.Random) -> TaskItem:
    """One problem: a start value, one step of + or - by the amount in a box, and the per-item table."""
    name, obj = rng.choice(MATH_NAMES), rng.choice(MATH_OBJECTS)
    value = rng.randint(1, 9)
    gain = value + 1 <= MAX_VALUE and rng.random() < 0.5
    most = min(MAX_AMOUNT, MAX_VALUE - value) if gain else min(MAX_AMOUNT, value)
    keys = rng.sample(BOX_KEYS, BOXES_PER_ITEM)
    table = {key: rng.randint(1, most) for key in keys}
    key = rng.choice(keys)
    amount = table[key]
    if gain:
        step = f"{name} {rng.choice(MATH_GAIN_VERBS)} the {obj} in box {key}."
        work, answer = f"{value} + {amount} = {value + amount}.", value + amount
    else:
        step = f"{name} {rng.choice(LOSS_VERBS)} as many {obj} as are in box {key}."
        work, answer = f"{value} - {amount} = {value - amount}.", value - amount
    prompt = f"Q: {name} has {value} {obj}. {step} How many {obj} does {name} have?\nA:"
    turns = [f' lookup(box="{key}")', f" {work} #### {answer}"]
    return TaskItem(
        id="", task="lookup", prompt=prompt, answer=answer, meta={"table": table, "key": key, "turns": turns}
    )


def lookup_reply(calls: list[dict[str, dict[str, Any]]], table: dict[str, int]) -> tuple[list[str], int]:
    """(one tool message per call, errors): ``lookup(box=K)`` answers ``table[K]``; anything else an error text."""
    out, errors = [], 0
    for call in calls:
        ((name, args),) = call.items()
        if name != "lookup":
            out.append(f"error: unknown tool {name}; call lookup(box=...)")
        elif set(args) != {"box"} or str(args["box"]) not in table:
            out.append(f"error: no such box; boxes: {' '.join(sorted(table))}")
        else:
            out.append(str(table[str(args["box"])]))
            continue
        errors += 1
    return out, errors


class LookupEnvironment:
    """Answers every turn with calls; the first turn without calls ends the episode (see the module docstring)."""

    def __init__(self, table: dict[str, int], key: str, answer: int) -> None:
        self.table = table
        self.key = key
        self.answer = answer
        self.looked_up: set[str] = set()
        self.calls: list[list[str]] = []
        self.final: str | None = None

    def step(self, turn: AssistantTurn) -> EnvReply:
        if turn.malformed:
            return EnvReply(messages=[{"role": "tool", "content": 'error: write lookup(box="...")'}], tool_errors=1)
        if not turn.calls:
            self.final = turn.text
            return EnvReply(done=True)
        self.calls.append([f"{name}({args})" for call in turn.calls for name, args in call.items()])
        results, errors = lookup_reply(turn.calls, self.table)
        for call in turn.calls:
            ((name, args),) = call.items()
            if name == "lookup" and set(args) == {"box"}:
                self.looked_up.add(str(args["box"]))
        return EnvReply(
            messages=[{"role": "tool", "content": text} for text in results],
            tool_calls=len(turn.calls),
            tool_errors=errors,
        )

    def score(self) -> float:
        if self.final is None or self.key not in self.looked_up:
            return 0.0
        return score_math(self.answer, self.final)

    def record(self) -> dict[str, Any]:
        return {"calls": self.calls, "final": self.final}

    def close(self) -> None:
        pass


class SyntheticLookupTask:
    """The demo world's multi-turn task (see the module docstring); items are tagged ``lookup``."""

    name = "synthetic_lookup"

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        return _take(_stream(split, seed, self.name, make_lookup_problem), n, split, seed)

    def score(self, item: TaskItem, completion: str) -> float:
        """A whole transcript's score without an environment: the last ``####`` answer (episodes are scored by
        ``LookupEnvironment.score``)."""
        tail = completion.rsplit("####", 1)
        return score_math(item.answer, "####" + tail[1]) if len(tail) == 2 else 0.0

    def environment(self, item: TaskItem) -> LookupEnvironment:
        return LookupEnvironment(dict(item.meta["table"]), item.meta["key"], item.answer)


register_task("synthetic_lookup", SyntheticLookupTask)
