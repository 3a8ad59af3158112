"""The code of docs/environments.md runs: its example environment and its tiny-model test."""

from __future__ import annotations

import re
from pathlib import Path

import opdplus.tasks.base as task_base

DOC = Path(__file__).resolve().parents[2] / "docs" / "environments.md"


def test_the_documented_example_and_its_test_run(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "class ShopTask" in b)
    check = next(b for b in blocks if "run_episodes(sampler" in b)
    monkeypatch.setattr(task_base, "_TASKS", dict(task_base._TASKS))  # the example registers "shop"
    namespace: dict = {}
    exec(compile(example, str(DOC), "exec"), namespace)  # our own documentation, not model output
    exec(compile(check, str(DOC), "exec"), namespace)
    assert namespace["batch"].batch_size == 4
    assert task_base.get_task("shop").name == "shop"
