"""BFCL v4 multi-turn (``multi_turn_base``, 200 episodes, ``bfcl-eval`` package data) as an environment.

An episode is a conversation of 1-7 user turns over BFCL's executable backends (``GorillaFileSystem``,
``TwitterAPI``, ``MathAPI``, ``MessageAPI``, ``TicketAPI``, ``TradingBot``, ``TravelAPI``,
``VehicleControlAPI``), loaded with the episode's initial state. The opening messages are a system prompt
with BFCL's instructions and the functions of the episode's classes (or the functions as the chat
template's tools, ``tool_prompt="template"``) and the first user turn. Within a user turn the model calls
functions step by step; each step's calls are executed in order and answered with one ``tool`` message each.
A turn without calls ends the user turn: the environment answers with the next user turn, or ends the
episode after the last one. A malformed call, a call of anything but the episode's functions, bad arguments,
an exception inside a backend or a call that runs past ``tool_timeout_s`` is answered with a tool error
message (``Error during execution: ...``) that the model sees.

Safety and limits: calls are parsed (``opdplus.tasks.bfcl_match.parse_calls``, then ``ast`` in
``opdplus.envs.bfcl_backends``) and dispatched only to public methods of the episode's backend instances that
the episode's function docs list; model text never reaches ``eval``/``exec``. The backends run in a worker
process per episode (``bfcl_backends.py`` as a script), so a call past ``tool_timeout_s`` is stopped by killing
it; the worker is restarted and the calls executed so far are replayed to restore the state. A user turn gets
at most ``max_steps_per_turn`` steps (BFCL's limit, 20): one more ends the episode, scored incorrect, as
does an episode stopped before its last user turn ended (turn or token limits, context overflow).

Scoring: BFCL's multi-turn checker (``bfcl_backends.check_episode``), run on the calls exactly as executed
(``record()["calls"]``: per user turn, per step, call strings ``name(arg=value, ...)``; malformed steps
have no entry, as in BFCL).

Split (fixed, by item id, as the single-turn BFCL task): ``eval`` iff ``split_of(id, eval_percent)`` (30 %
by default), in file order; ``train`` items are shuffled by the seed and cycled. More in docs/environments.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from typing import Any

from opdplus.envs import bfcl_backends
from opdplus.envs.base import AssistantTurn, EnvReply
from opdplus.tasks.base import TaskItem, register_task
from opdplus.tasks.bfcl import BFCL_PIP, PROMPT_FORMATS, TOOL_PROMPTS, to_tool
from opdplus.tasks.data import check_split, items_from_pool, package_file, read_jsonl, split_of

CATEGORY = "multi_turn_base"
MAX_STEPS_PER_TURN = 20  # BFCL's MAXIMUM_STEP_LIMIT
FUNC_DOC_FILES = {
    "GorillaFileSystem": "gorilla_file_system.json",
    "MathAPI": "math_api.json",
    "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json",
    "TicketAPI": "ticket_api.json",
    "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json",
    "VehicleControlAPI": "vehicle_control.json",
}

# BFCL's default system prompt for prompting models (ret_fmt=python, no tag, JSON docs, plaintext, classic)
INSTRUCTIONS = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. Based on "
    "the question, you will need to make one or more function/tool calls to achieve the purpose. If none of the "
    "functions can be used, point it out. If the given question lacks the parameters required by the function, "
    "also point it out.\n\nYou should only return the function calls in your response.\n\nIf you decide to invoke "
    "any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, "
    "params_name2=params_value2...), func_name2(params)]  You SHOULD NOT include any other text in the response."
    "\n\nAt each turn, you should try your best to complete the tasks requested by the user within the current "
    "turn. Continue to output functions to call until you have fulfilled the user's request to the best of your "
    "ability. Once you have no more functions to call, the system will consider the current turn complete and "
    "proceed to the next turn or task."
)
FUNCTIONS_HEADER = "Here is a list of functions in JSON format that you can invoke.\n"
MALFORMED = (
    bfcl_backends.ERROR_PREFIX + "the function calls could not be parsed; write them as "
    "[func_name1(param=value, ...), func_name2(param=value)]"
)


def load_episodes(category: str = CATEGORY) -> list[dict[str, Any]]:
    """BFCL v4 multi-turn records, each with its ``ground_truth`` and ``function`` docs (all functions of its
    involved classes, as BFCL's ``populate_test_cases_with_predefined_functions``)."""
    if category != CATEGORY:
        raise ValueError(f"unknown BFCL multi-turn category {category!r}; supported: {CATEGORY}")
    questions = package_file("bfcl_eval", f"data/BFCL_v4_{category}.json", BFCL_PIP, no_deps=True)
    answers = package_file("bfcl_eval", f"data/possible_answer/BFCL_v4_{category}.json", BFCL_PIP, no_deps=True)
    truth = {r["id"]: r["ground_truth"] for r in read_jsonl(answers)}
    docs: dict[str, list[dict[str, Any]]] = {}
    records = []
    for record in read_jsonl(questions):
        if record["id"] not in truth:
            raise ValueError(f"BFCL item {record['id']} has no ground truth")
        functions = []
        for class_name in record["involved_classes"]:
            if class_name not in docs:
                path = package_file("bfcl_eval", f"data/multi_turn_func_doc/{FUNC_DOC_FILES[class_name]}", BFCL_PIP)
                docs[class_name] = list(read_jsonl(path))
            functions += docs[class_name]
        records.append({**record, "ground_truth": truth[record["id"]], "function": functions})
    return records


def opening_messages(
    first_turn: list[dict[str, str]], functions: list[dict[str, Any]], tool_prompt: str, prompt_format: str
) -> str | list[dict[str, str]]:
    """System prompt (instructions, and the functions unless the template gets them as tools) and first user turn;
    ``plain``: one text ``{system}\\n\\nuser: {turn}\\n\\nassistant:`` (the framing of plain multi-turn rollouts)."""
    if tool_prompt not in TOOL_PROMPTS:
        raise ValueError(f"unknown tool_prompt {tool_prompt!r}; valid: {', '.join(TOOL_PROMPTS)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
    system = INSTRUCTIONS
    if tool_prompt == "system" or prompt_format == "plain":
        system += "\n\n" + FUNCTIONS_HEADER + json.dumps(functions) + "\n"
    if prompt_format == "plain":
        return system + "".join(f"\n\n{m['role']}: {m['content']}" for m in first_turn) + "\n\nassistant:"
    return [{"role": "system", "content": system}] + [{"role": m["role"], "content": m["content"]} for m in first_turn]


class BfclMultiTurnTask:
    """``bfcl_multi_turn_base``: items are episodes (see the module docstring); ``environment(item)`` runs one.
    ``tool_timeout_s`` bounds each call (0 = no limit), ``max_steps_per_turn`` the steps of a user turn."""

    name = "bfcl_multi_turn_base"

    def __init__(
        self,
        tool_prompt: str = "system",
        prompt_format: str = "chat",
        eval_percent: int = 30,
        tool_timeout_s: float = 10.0,
        max_steps_per_turn: int = MAX_STEPS_PER_TURN,
    ) -> None:
        opening_messages([], [], tool_prompt, prompt_format)  # validate options early
        if not tool_timeout_s >= 0:
            raise ValueError(f"tool_timeout_s must be >= 0 (0 = no limit), got {tool_timeout_s}")
        if max_steps_per_turn < 1:
            raise ValueError(f"max_steps_per_turn must be >= 1, got {max_steps_per_turn}")
        self.tool_prompt = tool_prompt
        self.prompt_format = prompt_format
        self.eval_percent = eval_percent
        self.tool_timeout_s = tool_timeout_s
        self.max_steps_per_turn = max_steps_per_turn
        self._items: dict[str, list[TaskItem]] | None = None

    def _item(self, record: dict[str, Any]) -> TaskItem:
        functions = record["function"]
        meta: dict[str, Any] = {
            "category": CATEGORY,
            "functions": functions,
            "user_turns": record["question"],
            "involved_classes": record["involved_classes"],
            "initial_config": record["initial_config"],
        }
        if self.tool_prompt == "template" and self.prompt_format == "chat":
            meta["tools"] = [to_tool(f) for f in functions]
        prompt = opening_messages(record["question"][0], functions, self.tool_prompt, self.prompt_format)
        return TaskItem(id=record["id"], task=self.name, prompt=prompt, answer=record["ground_truth"], meta=meta)

    def split_items(self, split: str) -> list[TaskItem]:
        """All items of a split, in file order."""
        check_split(split)
        if self._items is None:
            self._items = {"train": [], "eval": []}
            for record in load_episodes():
                self._items[split_of(record["id"], self.eval_percent)].append(self._item(record))
        return list(self._items[split])

    def size(self, split: str = "eval") -> int:
        return len(self.split_items(split))

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        pool = self.split_items(split)
        return items_from_pool(pool, split, n, seed, rng_key="opdplus-bfcl-multi-turn", what=self.name)

    def score(self, item: TaskItem, completion: str) -> float:
        raise TypeError(
            f"{self.name} is a multi-turn task: a single completion cannot be scored; run the episode in "
            "environment(item) and use its score()"
        )

    def environment(self, item: TaskItem) -> BfclEnvironment:
        return BfclEnvironment(item, tool_timeout_s=self.tool_timeout_s, max_steps_per_turn=self.max_steps_per_turn)


class BackendProcess:
    """A worker process running ``bfcl_backends.serve``; ``request`` answers within ``timeout_s`` seconds or
    raises ``TimeoutError`` after killing the worker (0 = no limit). A dead worker raises ``EOFError``."""

    def __init__(self) -> None:
        request_read, request_write = os.pipe()
        answer_read, answer_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, bfcl_backends.__file__, str(request_read), str(answer_write)],
                pass_fds=(request_read, answer_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(request_read)
            os.close(answer_write)
        self.requests = Connection(request_write, readable=False)
        self.answers = Connection(answer_read, writable=False)
        self._finalizer = weakref.finalize(self, _stop, self.process, self.requests, self.answers)

    def request(self, message: tuple, timeout_s: float) -> Any:
        try:
            self.requests.send(message)
            answered = not timeout_s or self.answers.poll(timeout_s)
            if answered:
                status, value = self.answers.recv()
        except OSError as err:  # a broken pipe: the worker died
            raise EOFError(f"the backend process stopped ({err})") from None
        if not answered:
            self.close()
            raise TimeoutError(f"no answer within {timeout_s:g} s")
        if status != "ok":
            raise RuntimeError(f"backend process: {value}")
        return value

    def close(self) -> None:
        self._finalizer()


def _stop(process: subprocess.Popen, requests: Connection, answers: Connection) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    requests.close()
    answers.close()


class BfclEnvironment:
    """One BFCL multi-turn episode (see the module docstring). The worker starts at the first call."""

    def __init__(self, item: TaskItem, *, tool_timeout_s: float = 10.0, max_steps_per_turn: int = MAX_STEPS_PER_TURN):
        self.item = item
        self.tool_timeout_s = tool_timeout_s
        self.max_steps_per_turn = max_steps_per_turn
        self.allowed = [f["name"] for f in item.meta["functions"]]
        self.calls: list[list[list[str]]] = [[]]  # per user turn, per step: the calls as executed
        self.turn = 0  # index of the current user turn
        self.steps = 0  # steps with calls (or malformed calls) in the current user turn
        self.finished = False  # the last user turn ended
        self.failed = ""  # why the episode ended incorrect before it finished
        self.explanation = ""
        self._score: float | None = None
        self._backend: BackendProcess | None = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ the episode

    def step(self, turn: AssistantTurn) -> EnvReply:
        if self.finished or self.failed:
            return EnvReply(done=True)
        if not turn.malformed and not turn.calls:  # the user turn is over
            self.turn += 1
            if self.turn == len(self.item.meta["user_turns"]):
                self.finished = True
                return EnvReply(done=True)
            self.steps = 0
            self.calls.append([])
            messages = [{"role": m["role"], "content": m["content"]} for m in self.item.meta["user_turns"][self.turn]]
            return EnvReply(messages=messages)
        self.steps += 1
        if self.steps > self.max_steps_per_turn:
            self.failed = f"turn {self.turn}: more than {self.max_steps_per_turn} steps"
            return EnvReply(done=True)
        if turn.malformed:
            return EnvReply(messages=[{"role": "tool", "content": MALFORMED}], tool_errors=1)
        with self._lock:
            calls = [
                (name, args if isinstance(args, dict) else {}) for call in turn.calls for name, args in call.items()
            ]
            return self._run_calls([bfcl_backends.call_string(name, args) for name, args in calls])

    def _run_calls(self, calls: list[str]) -> EnvReply:
        """Execute a step's calls in order; after a stopped call the rest of the step is not run."""
        executed: list[str] = []
        results: list[str] = []
        errors = 0
        stopped = ""
        for call in calls:
            if stopped or self.failed:
                text, is_error = f"{bfcl_backends.ERROR_PREFIX}not run: {stopped or self.failed}", True
            else:
                text, is_error, applied = self._execute(call)
                if applied:
                    executed.append(call)
                else:
                    stopped = f"the earlier call {call} was stopped"
            results.append(text)
            errors += int(is_error)
        if executed:
            self.calls[self.turn].append(executed)
        messages = [{"role": "tool", "content": text} for text in results]
        return EnvReply(messages=messages, done=bool(self.failed), tool_calls=len(calls), tool_errors=errors)

    def _execute(self, call: str) -> tuple[str, bool, bool]:
        """(result text, is_error, applied) of one call in the worker; a call past the time limit or one that kills
        the worker is not applied: the worker is restarted and the calls so far are replayed."""
        try:
            text, is_error = self._worker().request(("call", call), self.tool_timeout_s)
            return text, is_error, True
        except (TimeoutError, EOFError) as err:
            self._restart()
            reason = f"no result within {self.tool_timeout_s:g} s" if isinstance(err, TimeoutError) else str(err)
            return f"{bfcl_backends.ERROR_PREFIX}{reason}; the call was stopped and not applied", True, False

    def _worker(self) -> BackendProcess:
        if self._closed:
            raise EOFError("the environment is closed")
        if self._backend is None:
            self._backend = BackendProcess()
            init = ("init", self.item.meta["involved_classes"], self.item.meta["initial_config"], self.allowed)
            self._backend.request(init, 0)
        return self._backend

    def _restart(self) -> None:
        """A fresh worker with the state of the calls executed so far (they finished before, so they replay)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        try:
            backend = self._worker()
            for turn in self.calls:
                for step in turn:
                    for call in step:
                        backend.request(("call", call), 0)
        except (EOFError, RuntimeError) as err:
            self.failed = f"the backend could not be restored after a stopped call ({err})"

    # ------------------------------------------------------------------ results

    def score(self) -> float:
        """1.0 iff the episode ended its last user turn and BFCL's checker accepts its calls (computed once)."""
        if self._score is None:
            silent = [t for t, (truth, steps) in enumerate(zip(self.item.answer, self.calls)) if truth and not steps]
            if not self.finished or self.failed:
                self.explanation = self.failed or "the episode stopped before its last user turn ended"
                self._score = 0.0
            elif silent:  # the checker's verdict without running it
                self.explanation = f"turn {silent[0]}: no function call, expected {self.item.answer[silent[0]]}"
                self._score = 0.0
            else:
                self._score = self._check()
        return self._score

    def _check(self) -> float:
        meta = self.item.meta
        check = ("check", meta["involved_classes"], meta["initial_config"], self.allowed, self.item.answer, self.calls)
        n_calls = sum(len(step) for turn in self.calls for step in turn) + sum(len(turn) for turn in self.item.answer)
        with self._lock:
            try:  # every call finished before within the limit; bound the replay all the same
                ok, self.explanation = self._worker().request(check, self.tool_timeout_s * (n_calls + 1))
            except (TimeoutError, EOFError) as err:
                ok, self.explanation = False, f"the checker did not finish ({err})"
        return float(ok)

    def record(self) -> dict[str, Any]:
        return {"calls": [[list(step) for step in turn] for turn in self.calls]}

    def close(self) -> None:
        self._closed = True
        if self._backend is not None:
            self._backend.close()


register_task(BfclMultiTurnTask.name, BfclMultiTurnTask)
