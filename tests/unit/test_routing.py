"""RoutedTeacher: each row scored by its task's teacher, clear errors, per-teacher metrics."""

from __future__ import annotations

import pytest
import torch

from opdplus.rollout.routing import MissingTeacherError, RoutedTeacher
from opdplus.rollout.types import RolloutBatch


class ConstantTeacher:
    """Scores every loss token with ``value``; records the sub-batches it saw."""

    def __init__(self, value: float):
        self.value = value
        self.seen: list[RolloutBatch] = []

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        self.seen.append(batch)
        return torch.where(batch.loss_mask_B_T, torch.full(batch.input_ids_B_T.shape, self.value), 0.0)


def make_batch(tasks: list[str]) -> RolloutBatch:
    b, t = len(tasks), 6
    ids = torch.arange(b * t).reshape(b, t)
    attn = torch.ones(b, t, dtype=torch.bool)
    loss = torch.zeros(b, t, dtype=torch.bool)
    loss[:, 3:] = True
    loss[0, 5] = False
    return RolloutBatch(
        ids, attn, loss, torch.zeros(b, t), prompt_len=3, tasks=tasks, meta=[{"row": i} for i in range(b)]
    )


@pytest.mark.parametrize("concurrent", [False, True])
def test_rows_go_to_their_task_teacher(concurrent: bool) -> None:
    math, tools = ConstantTeacher(-1.0), ConstantTeacher(-2.0)
    routed = RoutedTeacher({"math": math, "tools": tools}, concurrent=concurrent)
    batch = make_batch(["tools", "math", "tools", "math", "math"])
    got = routed.score(batch)
    want_per_row = torch.tensor([-2.0, -1.0, -2.0, -1.0, -1.0])[:, None].expand(5, 6)
    torch.testing.assert_close(got, torch.where(batch.loss_mask_B_T, want_per_row, 0.0))
    assert [m["row"] for m in math.seen[0].meta] == [1, 3, 4]
    assert [m["row"] for m in tools.seen[0].meta] == [0, 2]
    assert math.seen[0].tasks == ["math"] * 3


def test_metrics_per_teacher() -> None:
    routed = RoutedTeacher({"math": ConstantTeacher(-1.0), "tools": ConstantTeacher(-2.0)})
    routed.score(make_batch(["tools", "math", "math"]))
    metrics = routed.metrics(reset=True)
    assert metrics["math/rows"] == 2 and metrics["math/tokens"] == 6
    assert metrics["tools/rows"] == 1 and metrics["tools/tokens"] == 2  # row 0 has 2 loss tokens
    assert metrics["math/seconds"] >= 0
    assert routed.metrics()["math/rows"] == 0


def test_a_task_without_teacher_is_a_clear_error() -> None:
    routed = RoutedTeacher({"math": ConstantTeacher(-1.0)})
    with pytest.raises(MissingTeacherError, match=r"no teacher for task\(s\) \['chess'\].*\['math'\]"):
        routed.score(make_batch(["math", "chess"]))


def test_rows_without_task_tags_are_rejected() -> None:
    routed = RoutedTeacher({"math": ConstantTeacher(-1.0)})
    batch = make_batch(["math", "math"])
    batch.tasks = []
    with pytest.raises(ValueError, match="one task tag per row: batch.tasks has 0 entries for 2 rows"):
        routed.score(batch)


def test_wrong_shape_from_a_teacher_is_reported() -> None:
    class Broken:
        def score(self, batch: RolloutBatch) -> torch.Tensor:
            return torch.zeros(1, 1)

    with pytest.raises(ValueError, match="teacher for task 'math' returned shape"):
        RoutedTeacher({"math": Broken()}).score(make_batch(["math"]))
