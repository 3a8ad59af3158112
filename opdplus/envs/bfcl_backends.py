"""BFCL's executable multi-turn backends behind an allow-list, and BFCL's multi-turn checker rules.

This module needs only the standard library and ``bfcl_eval``: it runs in-process (tests, the checker) and as the
script of the backend worker process (``python bfcl_backends.py READ_FD WRITE_FD``) that
``opdplus.envs.bfcl_multi_turn`` starts per episode, so that a tool time limit can stop a backend by killing it.

A call is a string in BFCL's form ``name(arg=value, ...)`` (``call_string``). It is parsed with ``ast`` and its
arguments with ``ast.literal_eval`` (``parse_call_string``; positional arguments are accepted, as in BFCL's
ground truth), then dispatched to a bound method of the episode's backend instances whose name is on the
allow-list (the functions documented for the episode). Nothing is passed to ``eval``/``exec``. Results are
converted as BFCL does (``str`` as is, ``dict`` as JSON, anything else ``str()``); an unknown function, a call
that does not parse, bad arguments or an exception inside the backend give ``"Error during execution: ..."``.

Checker (``check_episode``, BFCL's ``multi_turn_checker``): the model's calls (one list per user turn, of one
list per assistant step) and the ground truth's are executed in two fresh sets of instances, turn by turn. An
episode is correct iff it has one entry per user turn and, at every turn whose ground truth is not empty, the
model made at least one call in that turn, every involved instance's public attributes equal the ground truth
instance's, and every ground-truth call result of the turn is among the model's results so far (all turns,
as a multiset, in any order).
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

BACKEND_MODULE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
CLASS_MODULES = {  # BFCL's CLASS_FILE_PATH_MAPPING for the multi-turn classes
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
STATELESS_CLASSES = ("MathAPI",)  # no scenario to load
ERROR_PREFIX = "Error during execution: "


def call_string(name: str, args: dict[str, Any]) -> str:
    """A parsed call in BFCL's form: ``name(a=repr(value), b=...)``."""
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in args.items())})"


def parse_call_string(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """(name, positional arguments, keyword arguments) of one call string; ValueError when it is not a single
    call of a plain name with literal arguments."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"not a function call: {err}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError("not a call of a function name")
    if any(kw.arg is None for kw in node.keywords):
        raise ValueError("** arguments are not allowed")
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError("arguments must be literal values (numbers, strings, lists, dicts, True/False/None)") from None
    return node.func.id, args, kwargs


def result_text(result: Any) -> str:
    """A backend result as BFCL feeds it back: strings as is, dicts as JSON (``str`` if not serialisable)."""
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


class Backends:
    """One episode's backend instances, loaded with the episode's initial configuration as BFCL does; only
    public methods named in ``allowed`` can be called."""

    def __init__(self, involved_classes: Sequence[str], initial_config: dict[str, Any], allowed: Sequence[str]) -> None:
        self.instances: dict[str, Any] = {}
        self.methods: dict[str, Any] = {}
        allowed_names = set(allowed)
        for class_name in involved_classes:
            if class_name not in CLASS_MODULES:
                raise ValueError(f"unknown BFCL backend class {class_name!r}; known: {', '.join(CLASS_MODULES)}")
            module = importlib.import_module(f"{BACKEND_MODULE}.{CLASS_MODULES[class_name]}")
            instance = getattr(module, class_name)()
            if class_name not in STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(initial_config.get(class_name, {})), long_context=False)
            self.instances[class_name] = instance
            for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_") and name in allowed_names:
                    self.methods[name] = method

    def execute(self, call: str) -> tuple[str, bool]:
        """(result text, is_error) of one call string."""
        try:
            name, args, kwargs = parse_call_string(call)
        except ValueError as err:
            return f"{ERROR_PREFIX}{call!r} is not a valid call: {err}", True
        method = self.methods.get(name)
        if method is None:
            return f"{ERROR_PREFIX}{name!r} is not one of the available functions", True
        try:
            return result_text(method(*args, **kwargs)), False
        except (Exception, SystemExit) as err:  # bad arguments (TypeError) or a failure inside the backend
            return f"{ERROR_PREFIX}{err}", True

    def state(self) -> dict[str, dict[str, Any]]:
        """Public attributes of every instance (what BFCL's state check compares)."""
        return {
            class_name: {key: value for key, value in vars(instance).items() if not key.startswith("_")}
            for class_name, instance in self.instances.items()
        }


def _state_differences(model: Backends, truth: Backends) -> list[str]:
    """``Class.attribute`` for every public attribute of a ground-truth instance that the model's differs in."""
    out = []
    for class_name, truth_instance in truth.instances.items():
        model_instance = model.instances[class_name]
        for key, value in vars(truth_instance).items():
            if not key.startswith("_") and getattr(model_instance, key, None) != value:
                out.append(f"{class_name}.{key}")
    return out


def _missing(expected: list[str], available: list[str]) -> list[str]:
    """Items of ``expected`` not in ``available`` (as multisets, any order)."""
    left = Counter(available)
    missing = []
    for item in expected:
        if left[item] > 0:
            left[item] -= 1
        else:
            missing.append(item)
    return missing


def check_episode(
    involved_classes: Sequence[str],
    initial_config: dict[str, Any],
    allowed: Sequence[str],
    ground_truth: list[list[str]],
    calls: list[list[list[str]]],
) -> tuple[bool, str]:
    """(correct, reason) of an episode's executed calls against the ground truth (see the module docstring)."""
    if len(calls) != len(ground_truth):
        return False, f"the episode has {len(calls)} user turns, expected {len(ground_truth)} (stopped early)"
    model = Backends(involved_classes, initial_config, allowed)
    truth = Backends(involved_classes, initial_config, allowed)
    model_results: list[str] = []
    for turn, (truth_calls, model_steps) in enumerate(zip(ground_truth, calls)):
        steps = [step for step in model_steps if step]
        for step in steps:
            model_results += [model.execute(call)[0] for call in step]
        truth_results = [truth.execute(call)[0] for call in truth_calls]
        if not truth_calls:
            continue
        if not steps:
            return False, f"turn {turn}: no function call, expected {truth_calls}"
        differences = _state_differences(model, truth)
        if differences:
            return False, f"turn {turn}: state differs from the ground truth's in {', '.join(differences)}"
        missing = _missing(truth_results, model_results)
        if missing:
            return False, f"turn {turn}: ground-truth results missing from the model's: {missing}"
    return True, ""


# --------------------------------------------------------------------------------------------- worker process


def serve(read_fd: int, write_fd: int) -> None:
    """The worker loop: requests ``("init", classes, config, allowed)``, ``("call", call_string)``,
    ``("check", classes, config, allowed, ground_truth, calls)`` and ``("exit",)``, answered in order."""
    from multiprocessing.connection import Connection

    requests, answers = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    backends: Backends | None = None
    while True:
        try:
            request = requests.recv()
        except EOFError:
            return
        kind = request[0]
        try:
            if kind == "exit":
                return
            if kind == "init":
                backends = Backends(*request[1:])
                answers.send(("ok", ""))
            elif kind == "call":
                if backends is None:
                    raise RuntimeError("call before init")
                answers.send(("ok", backends.execute(request[1])))
            elif kind == "check":
                answers.send(("ok", check_episode(*request[1:])))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as err:  # reported to the parent, which raises it there
            answers.send(("error", f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # no sibling module shadows a stdlib one
    serve(int(sys.argv[1]), int(sys.argv[2]))
