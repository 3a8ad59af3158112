"""A trivial task for tests: continue a fixed prompt; scored by whether the completion contains a
target substring."""

from __future__ import annotations

import random

from opdplus.tasks.base import TaskItem, register_task


class ContainsTask:
    name = "contains"

    def __init__(self, target: str = "a", prompts: tuple[str, ...] = ("hello", "count: 1 2 3", "abc")) -> None:
        self.target = target
        self.prompts = prompts

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        rng = random.Random(f"{split}-{seed}")
        return [
            TaskItem(id=f"{split}-{i}", task=self.name, prompt=rng.choice(self.prompts), answer=self.target)
            for i in range(n)
        ]

    def score(self, item: TaskItem, completion: str) -> float:
        return float(str(item.answer) in completion)


register_task("contains", ContainsTask)
