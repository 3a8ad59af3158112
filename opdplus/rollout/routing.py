"""``RoutedTeacher``: several teachers, each row scored by the teacher of its task tag (``batch.tasks``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from opdplus.rollout.types import RolloutBatch, Teacher

if TYPE_CHECKING:
    from opdplus.rollout.cross_tokenizer import SpanScores


class MissingTeacherError(KeyError):
    """A row's task has no teacher."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass
class TeacherUsage:
    rows: int = 0
    tokens: int = 0  # loss tokens scored
    seconds: float = 0.0
    calls: int = 0


class RoutedTeacher:
    """A Teacher that routes each row of a batch to ``teachers[batch.tasks[row]]``.

    Rows of one task go to their teacher as one sub-batch (``batch.select``). With
    ``concurrent=True`` the teachers score at the same time, one thread each (for remote teachers;
    local teachers on one GPU would add up their peak memory). ``metrics()`` reports rows, loss
    tokens and seconds per teacher.
    """

    def __init__(self, teachers: Mapping[str, Teacher], *, concurrent: bool = False):
        if not teachers:
            raise ValueError("RoutedTeacher needs at least one {task: teacher} entry")
        for task, teacher in teachers.items():
            if not callable(getattr(teacher, "score", None)):
                raise TypeError(f"teacher for task {task!r} ({type(teacher).__name__}) has no score(batch) method")
        self.teachers = dict(teachers)
        self.concurrent = concurrent
        self.usage = {task: TeacherUsage() for task in self.teachers}

    def __repr__(self) -> str:
        return f"RoutedTeacher({self.teachers!r})"

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """``teacher_logprobs_B_T`` for the whole batch, each row from its task's teacher."""
        groups = self._rows_by_task(batch)
        out_B_T = torch.zeros(batch.input_ids_B_T.shape, dtype=torch.float32, device=batch.input_ids_B_T.device)
        if self.concurrent and len(groups) > 1:
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="opdplus-routed") as pool:
                scored = list(pool.map(lambda item: self._score_group(batch, *item), groups.items()))
        else:
            scored = [self._score_group(batch, task, rows) for task, rows in groups.items()]
        for rows, sub_B_T in scored:
            index = torch.tensor(rows, dtype=torch.long, device=out_B_T.device)
            out_B_T[index] = sub_B_T.to(out_B_T.device, torch.float32)
        return out_B_T

    @property
    def cross_tokenizer(self) -> bool:
        """Whether a teacher scores spans across tokenizers (``opdplus.rollout.cross_tokenizer``)."""
        return any(getattr(teacher, "cross_tokenizer", False) for teacher in self.teachers.values())

    def score_spans(self, batch: RolloutBatch) -> SpanScores:
        """``SpanScores`` for the whole batch: a cross-tokenizer teacher's spans for its rows, one-token spans
        for the rows of a teacher with the student's tokenizer."""
        from opdplus.rollout.cross_tokenizer import SpanScores, token_span_scores

        device = batch.input_ids_B_T.device
        out = SpanScores(
            torch.zeros(batch.input_ids_B_T.shape, dtype=torch.float32, device=device),
            torch.full(batch.input_ids_B_T.shape, -1, dtype=torch.long, device=device),
            torch.full(batch.input_ids_B_T.shape, -1, dtype=torch.long, device=device),
            batch.loss_mask_B_T.clone(),
        )
        for task, rows in self._rows_by_task(batch).items():
            sub, teacher = batch.select(rows), self.teachers[task]
            start = time.perf_counter()
            spans = teacher.score_spans(sub) if getattr(teacher, "cross_tokenizer", False) else None  # pyright: ignore[reportAttributeAccessIssue]
            scores = spans if spans is not None else token_span_scores(teacher, sub)
            self._record(task, len(rows), int(sub.loss_mask_B_T.sum()), time.perf_counter() - start)
            index = torch.tensor(rows, dtype=torch.long, device=device)
            out.teacher_logprobs_B_T[index] = scores.teacher_logprobs_B_T.to(device, torch.float32)
            out.span_end_B_T[index] = scores.span_end_B_T.to(device)
            out.return_from_B_T[index] = scores.return_from_B_T.to(device)
            out.loss_mask_B_T[index] = scores.loss_mask_B_T.to(device)
        return out

    def _score_group(self, batch: RolloutBatch, task: str, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        sub = batch.select(rows)
        start = time.perf_counter()
        sub_B_T = self.teachers[task].score(sub)
        elapsed = time.perf_counter() - start
        if tuple(sub_B_T.shape) != tuple(sub.input_ids_B_T.shape):
            raise ValueError(
                f"teacher for task {task!r} returned shape {tuple(sub_B_T.shape)}, "
                f"expected {tuple(sub.input_ids_B_T.shape)}"
            )
        self._record(task, len(rows), int(sub.loss_mask_B_T.sum()), elapsed)
        return rows, sub_B_T

    def _rows_by_task(self, batch: RolloutBatch) -> dict[str, list[int]]:
        if len(batch.tasks) != batch.batch_size:
            raise ValueError(
                f"RoutedTeacher needs one task tag per row: batch.tasks has {len(batch.tasks)} "
                f"entries for {batch.batch_size} rows"
            )
        groups: dict[str, list[int]] = {}
        for row, task in enumerate(batch.tasks):
            groups.setdefault(task, []).append(row)
        missing = sorted(set(groups) - set(self.teachers))
        if missing:
            raise MissingTeacherError(
                f"no teacher for task(s) {missing}; teachers are configured for {sorted(self.teachers)}"
            )
        return groups

    def _record(self, task: str, rows: int, tokens: int, seconds: float) -> None:
        usage = self.usage[task]
        usage.rows += rows
        usage.tokens += tokens
        usage.seconds += seconds
        usage.calls += 1

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """``<task>/{rows,tokens,seconds}`` since construction (or the last reset)."""
        out: dict[str, float] = {}
        for task, usage in self.usage.items():
            out[f"{task}/rows"] = usage.rows
            out[f"{task}/tokens"] = usage.tokens
            out[f"{task}/seconds"] = usage.seconds
        if reset:
            self.usage = {task: TeacherUsage() for task in self.teachers}
        return out
