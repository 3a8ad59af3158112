"""Rollouts: the student sampler, teacher scorers (local, HTTP) and the teacher server."""

from opdplus.rollout.types import RolloutBatch, Teacher

__all__ = ["RolloutBatch", "Teacher"]
