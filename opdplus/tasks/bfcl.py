"""Tool use on BFCL v4 (``bfcl-eval`` package data): prompts with function schemas, AST-match scoring.

Categories: ``simple_python``, ``multiple``, ``parallel``, ``parallel_multiple``, ``live_simple``
(single-turn, Python). Scoring parses the completion into calls and matches them against BFCL's
``possible_answer`` with ``opdplus.tasks.bfcl_match`` (our implementation of BFCL's AST rules).

Split (fixed, by item id): an item is in ``eval`` iff ``split_of(item_id, eval_percent)`` says so
(sha256 of the id, 30 % by default; see ``opdplus.tasks.data``). ``eval`` items keep file order;
``train`` items are shuffled by the seed and cycled (reshuffled each pass) when more are asked for.

Prompt (``tool_prompt`` option):

* ``system`` (default; works with every chat template): a system message with the instructions
  below and the functions as JSON, then the user turn(s).
* ``template``: the functions go to the model's own chat template as tools
  (``TaskItem.meta["tools"]``, OpenAI JSON-schema format), the system message keeps only the
  instructions. Use it for templates that render tools (``"tools"`` appears in them); the SmolLM2
  and Gemma-3 templates do not, so they would never see the functions.

``prompt_format="plain"`` (base models without a chat template) gives one text:
``"{instructions + functions}\\n\\nQuestion: {user turn}\\nAnswer:"``, generation cut at ``"\\nQuestion:"``.
"""

from __future__ import annotations

import json
from typing import Any

from opdplus.tasks.base import TaskItem, register_task
from opdplus.tasks.bfcl_match import format_calls, match_calls, parse_calls, reference_calls
from opdplus.tasks.data import check_split, items_from_pool, package_file, read_jsonl, split_of
from opdplus.tasks.math import PLAIN_STOP, cut_at_stop

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple")
TOOL_PROMPTS = ("system", "template")
PROMPT_FORMATS = ("chat", "plain")
BFCL_PIP = "bfcl-eval"

INSTRUCTIONS = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, make one or more function calls to achieve the purpose.\n"
    "Answer with the function calls only, in the format "
    "[func_name1(param1=value1, param2=value2), func_name2(param=value)], and no other text."
)
FUNCTIONS_HEADER = "Here is a list of functions in JSON format that you can invoke:\n"

_OPENAI_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def to_json_schema(schema: Any) -> Any:
    """BFCL parameter schema -> JSON schema (``dict`` -> ``object``, ``float`` -> ``number``, ...)."""
    if isinstance(schema, dict):
        out = {k: to_json_schema(v) for k, v in schema.items()}
        if isinstance(schema.get("type"), str):
            out["type"] = _OPENAI_TYPES.get(schema["type"], schema["type"])
        return out
    if isinstance(schema, list):
        return [to_json_schema(v) for v in schema]
    return schema


def to_tool(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function as an OpenAI-style tool for ``apply_chat_template(tools=...)``."""
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description", ""),
            "parameters": to_json_schema(function.get("parameters", {})),
        },
    }


def build_prompt(
    messages: list[dict[str, str]], functions: list[dict[str, Any]], tool_prompt: str, prompt_format: str
) -> str | list[dict[str, str]]:
    """The prompt for one BFCL question (see the module docstring for the formats)."""
    if tool_prompt not in TOOL_PROMPTS:
        raise ValueError(f"unknown tool_prompt {tool_prompt!r}; valid: {', '.join(TOOL_PROMPTS)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
    system = INSTRUCTIONS
    if tool_prompt == "system" or prompt_format == "plain":
        system += "\n\n" + FUNCTIONS_HEADER + json.dumps(functions, indent=None)
    extra_system = [m["content"] for m in messages if m["role"] == "system"]
    if extra_system:
        system += "\n\n" + "\n\n".join(extra_system)
    turns = [m for m in messages if m["role"] != "system"]
    if prompt_format == "plain":
        question = "\n".join(m["content"] for m in turns)
        return f"{system}\n\nQuestion: {question}\nAnswer:"
    return [{"role": "system", "content": system}] + [{"role": m["role"], "content": m["content"]} for m in turns]


def load_category(category: str) -> list[dict[str, Any]]:
    """BFCL v4 records of a category, each with its ``ground_truth`` attached."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; valid: {', '.join(CATEGORIES)}")
    questions = package_file("bfcl_eval", f"data/BFCL_v4_{category}.json", BFCL_PIP, no_deps=True)
    answers = package_file("bfcl_eval", f"data/possible_answer/BFCL_v4_{category}.json", BFCL_PIP, no_deps=True)
    truth = {r["id"]: r["ground_truth"] for r in read_jsonl(answers)}
    records = []
    for record in read_jsonl(questions):
        if record["id"] not in truth:
            raise ValueError(f"BFCL item {record['id']} has no possible answer")
        if len(record["question"]) != 1:
            continue  # multi-turn items are out of scope here
        records.append({**record, "ground_truth": truth[record["id"]], "category": category})
    return records


class ToolUseTask:
    name = "tool_use"

    def __init__(
        self,
        categories: tuple[str, ...] | list[str] = CATEGORIES,
        tool_prompt: str = "system",
        prompt_format: str = "chat",
        eval_percent: int = 30,
    ) -> None:
        build_prompt([], [], tool_prompt, prompt_format)  # validate options early
        self.categories = tuple(categories)
        self.tool_prompt = tool_prompt
        self.prompt_format = prompt_format
        self.eval_percent = eval_percent
        self._records: dict[str, list[TaskItem]] | None = None

    def _item(self, record: dict[str, Any]) -> TaskItem:
        functions = record["function"]
        meta: dict[str, Any] = {
            "category": record["category"],
            "functions": functions,
            "stop": list(PLAIN_STOP) if self.prompt_format == "plain" else [],
            "solution": format_calls(reference_calls(record["ground_truth"])),  # a target for fine-tuning
        }
        if self.tool_prompt == "template" and self.prompt_format == "chat":
            meta["tools"] = [to_tool(f) for f in functions]
        return TaskItem(
            id=record["id"],
            task=self.name,
            prompt=build_prompt(record["question"][0], functions, self.tool_prompt, self.prompt_format),
            answer=record["ground_truth"],
            meta=meta,
        )

    def split_items(self, split: str) -> list[TaskItem]:
        """All items of a split, in file order (categories in the order given)."""
        check_split(split)
        if self._records is None:
            self._records = {"train": [], "eval": []}
            for category in self.categories:
                for record in load_category(category):
                    self._records[split_of(record["id"], self.eval_percent)].append(self._item(record))
        return list(self._records[split])

    def size(self, split: str = "eval") -> int:
        return len(self.split_items(split))

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        what = f"tool_use {self.categories}"
        return items_from_pool(self.split_items(split), split, n, seed, rng_key="opdplus-tool-use", what=what)

    def parse(self, item: TaskItem, completion: str) -> list[dict[str, Any]] | None:
        return parse_calls(cut_at_stop(completion, item.meta.get("stop")))

    def score(self, item: TaskItem, completion: str) -> float:
        calls = self.parse(item, completion)
        ok, _ = match_calls(item.meta["functions"], calls, item.answer, item.meta["category"])
        return float(ok)

    def explain(self, item: TaskItem, completion: str) -> str:
        """Why a completion scores 0 (empty string when correct)."""
        return match_calls(item.meta["functions"], self.parse(item, completion), item.answer, item.meta["category"])[1]


register_task("tool_use", ToolUseTask)
