"""Evaluation over real benchmarks: ``opdplus eval --model MODEL --task TASK``."""

from opdplus.eval.runner import EVAL_TASKS, EvalResult, evaluate, load_eval_items

__all__ = ["EVAL_TASKS", "EvalResult", "evaluate", "load_eval_items"]
