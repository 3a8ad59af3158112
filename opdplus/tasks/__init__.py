"""Prompt sources and scorers. See ``opdplus.tasks.base`` for the interface."""

from opdplus.tasks.base import Task, TaskItem, get_task, register_task, render_prompt, task_names

__all__ = ["Task", "TaskItem", "get_task", "register_task", "render_prompt", "task_names"]
