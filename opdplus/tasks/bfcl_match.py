"""Function-call parsing and BFCL-style AST matching (our own implementation of BFCL's rules).

A call is ``{name: {param: value}}``; a model output parses to a list of calls. Two syntaxes:

* python: ``[f(a=1, b="x"), pkg.g(c=[1, 2])]`` or a bare ``f(a=1)`` (keyword arguments only;
  a non-literal argument such as a variable name is kept as its source text, like BFCL does);
* JSON: ``[{"name": "f", "arguments": {...}}]`` (also ``"parameters"``, ``"function"`` for the
  name, a JSON-string ``arguments``, a single object, or ``{"f": {...}}``), optionally inside
  ```` ```json ```` fences or ``<tool_call>...</tool_call>`` / ``<TOOLCALL>...</TOOLCALL>`` tags.

Matching a parsed output against BFCL's ``possible_answer`` (for Python categories):

* count: ``simple`` and ``multiple`` need exactly one call; ``parallel*`` exactly as many calls as
  answers (no extra, no missing calls);
* order: parallel calls match in any order (a perfect matching of calls to answers is searched,
  so the result does not depend on the order in which candidates are tried);
* function name must equal the expected one; for ``multiple`` the schema is the expected function's;
* parameters: every required parameter present, no parameter outside the schema or the answer,
  and every answer parameter that is absent must be optional there (``""`` among its values);
* types: the value's Python type must be the schema type (``integer`` int, ``float`` float with
  ints accepted, ``boolean`` bool, ``string``/``any`` str, ``array``/``tuple`` list (tuples become
  lists), ``dict`` dict); array items are checked one level deep. As in BFCL, a value whose type is
  that of the answer's values instead counts as a variable reference and is compared as such;
* values: a value must equal one of the acceptable values. Strings compare after normalisation
  (lower case, without spaces and ``,./-_*^``, ``'`` as ``"``); lists compare element-wise with
  strings normalised; dicts key by key against each acceptable dict (absent keys must be optional);
  lists of dicts element by element.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

Call = dict[str, dict[str, Any]]

TYPE_MAP: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
NESTED_TYPES = ("array", "tuple")

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```(?:json|python|tool_code|py)?\s*(.*?)```", re.DOTALL)
_TAG_RE = re.compile(r"<(tool_call|TOOLCALL|toolcall)>\s*(.*?)\s*(?:</\1>|$)", re.DOTALL)


def parse_calls(text: str) -> list[Call] | None:
    """Function calls in a model output; ``None`` for output that starts like a call (``[``, ``{``,
    ``name(``, a call tag) but does not parse (malformed); ``[]`` for prose without calls."""
    text = text.strip().replace("<|python_tag|>", "")
    tagged = _TAG_RE.findall(text)
    if tagged:
        calls: list[Call] = []
        for _, body in tagged:
            parsed = _parse_block(body)
            if parsed is None:
                return None
            calls += parsed
        return calls
    fenced = _FENCE_RE.findall(text)
    if fenced:
        text = fenced[0].strip()
    parsed = _parse_block(text)
    if parsed is not None:
        return parsed
    for opener in ("[", "{"):  # prose before the calls: try from the first bracket
        start = text.find(opener)
        if start > 0:
            parsed = _parse_block(text[start:])
            if parsed is not None:
                return parsed
    return None if re.match(r"\s*(?:[\[{]|[\w.]+\s*\()", text) else []  # an attempted call, or prose


def format_calls(calls: list[Call]) -> str:
    """Calls in the python syntax that ``parse_calls`` reads back: ``[f(a=1, b='x'), g()]``."""
    return "[" + ", ".join(format_call(call) for call in calls) + "]"


def format_call(call: Call) -> str:
    """One call as BFCL writes it, ``name(arg=value, ...)`` with Python literals."""
    ((name, arguments),) = call.items()
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def reference_calls(answer: list[Call]) -> list[Call]:
    """One correct output for BFCL's ``possible_answer``: each argument's first acceptable value, arguments
    whose first acceptable value is ``""`` (optional, may be left out) left out."""
    return [{name: _first_values(arguments)} for call in answer for name, arguments in call.items()]


def _first_values(acceptable: dict[str, list[Any]]) -> dict[str, Any]:
    """Each key's first acceptable value (dicts inside, whose values are candidate lists too, likewise)."""
    return {key: _one_value(values[0]) for key, values in acceptable.items() if values and values[0] != ""}


def _one_value(value: Any) -> Any:
    if isinstance(value, dict):
        return _first_values(value)
    if isinstance(value, list):
        return [_first_values(v) if isinstance(v, dict) else v for v in value]
    return value


def _parse_block(text: str) -> list[Call] | None:
    text = text.strip()
    if not text:
        return []
    for parse in (_parse_json, _parse_python):
        calls = parse(text)
        if calls is not None:
            return calls
    return None


def _parse_json(text: str) -> list[Call] | None:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        try:
            data, _ = json.JSONDecoder().raw_decode(text)
        except (json.JSONDecodeError, ValueError):
            return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for obj in items:
        call = _json_call(obj)
        if call is None:
            return None
        calls.append(call)
    return calls


def _json_call(obj: Any) -> Call | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name", obj.get("function"))
    if isinstance(name, dict):  # OpenAI: {"function": {"name": ..., "arguments": ...}}
        return _json_call(name)
    if isinstance(name, str):
        args = obj.get("arguments", obj.get("parameters", obj.get("args", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return {name: args} if isinstance(args, dict) else None
    if len(obj) == 1:  # {"f": {...}}
        ((fname, args),) = obj.items()
        return {fname: args} if isinstance(args, dict) else None
    return None


def _parse_python(text: str) -> list[Call] | None:
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None or any(kw.arg is None for kw in node.keywords):
            return None
        calls.append({name: {kw.arg: _literal(kw.value) for kw in node.keywords}})
    return calls


def _dotted_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.AST) -> Any:
    """A keyword value: a Python literal, or (like BFCL) the source text of anything else."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return ast.unparse(node)
    return _tuples_to_lists(value)


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def normalize_string(text: str) -> str:
    """BFCL's string normalisation: no spaces or ``,./-_*^``, lower case, ``'`` -> ``"``."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _norm(value: Any) -> Any:
    return normalize_string(value) if isinstance(value, str) else value


def _answer_type(candidates: list[Any]) -> type | None:
    for candidate in candidates:
        if candidate != "":
            return type(candidate)
    return None


def _same(value: Any, candidate: Any) -> bool:
    """Equality where bool and numbers never mix (``True != 1`` here, unlike Python)."""
    if isinstance(value, bool) or isinstance(candidate, bool):
        return type(value) is type(candidate) and value == candidate
    if isinstance(value, list) and isinstance(candidate, list):
        return len(value) == len(candidate) and all(_same(a, b) for a, b in zip(value, candidate))
    return value == candidate


def check_type(value: Any, schema: dict[str, Any], candidates: list[Any]) -> tuple[bool, bool]:
    """(valid, is_variable) for a parameter value against its schema and acceptable values."""
    type_name = schema.get("type", "any")
    expected = TYPE_MAP.get(type_name, str)
    answer_type = _answer_type(candidates)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if type_name in NESTED_TYPES:
            item_type = TYPE_MAP.get(schema.get("items", {}).get("type", "any"), str)

            def items_fit(candidate: Any) -> bool:  # one level deep; a non-list candidate ("") fits
                if not isinstance(candidate, list):
                    return True
                candidate_type = _answer_type(candidate)
                return all(type(v) is item_type or type(v) is candidate_type for v in value)

            if not any(items_fit(c) for c in candidates):
                return False, False
        return True, is_variable
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, False


def _dict_matches(value: dict, acceptable: dict) -> bool:
    for key, v in value.items():
        if key not in acceptable or not any(_same(_norm(v), _norm(c)) for c in acceptable[key]):
            return False
    return all(key in value or "" in options for key, options in acceptable.items())


def check_value(value: Any, schema: dict[str, Any], candidates: list[Any], is_variable: bool) -> bool:
    """Whether ``value`` equals one of the acceptable ``candidates`` under BFCL's comparison rules."""
    expected = TYPE_MAP.get(schema.get("type", "any"), str)
    if not is_variable:
        if expected is dict:
            return any(isinstance(c, dict) and _dict_matches(value, c) for c in candidates)
        item_type = TYPE_MAP.get(schema.get("items", {}).get("type", "any"), str)
        if expected is list and item_type is dict:
            return any(
                isinstance(c, list)
                and len(c) == len(value)
                and all(isinstance(v, dict) and isinstance(a, dict) and _dict_matches(v, a) for v, a in zip(value, c))
                for c in candidates
            )
        if expected is str:
            return normalize_string(value) in [normalize_string(c) for c in candidates if isinstance(c, str)]
        if expected is list:
            norm_value = [_norm(v) for v in value]
            return any(isinstance(c, list) and _same(norm_value, [_norm(x) for x in c]) for c in candidates)
    return any(_same(value, c) for c in candidates)


def match_call(function: dict[str, Any], call: Call, answer: Call) -> tuple[bool, str]:
    """Match one parsed call against one possible answer ``{name: {param: [acceptable values]}}``
    using the function's schema. Returns (ok, reason)."""
    ((expected_name, acceptable),) = answer.items()
    if len(call) != 1:
        return False, "malformed call"
    ((name, params),) = call.items()
    if name != expected_name:
        return False, f"wrong function {name!r}, expected {expected_name!r}"
    if not isinstance(params, dict):
        return False, "arguments are not a mapping"
    schema = function.get("parameters", {})
    properties = schema.get("properties", {})
    for required in schema.get("required", []):
        if required not in params:
            return False, f"missing required parameter {required!r}"
    for param, value in params.items():
        if param not in properties or param not in acceptable:
            return False, f"unexpected parameter {param!r}"
        prop = properties[param]
        if prop.get("type") == "float" and type(value) is int:
            value = float(value)
        valid, is_variable = check_type(value, prop, acceptable[param])
        if not valid:
            return False, f"wrong type for {param!r}: {type(value).__name__}, expected {prop.get('type')}"
        if not check_value(value, prop, acceptable[param], is_variable):
            return False, f"wrong value for {param!r}: {value!r}, expected one of {acceptable[param]!r}"
    for param, options in acceptable.items():
        if param not in params and "" not in options:
            return False, f"missing parameter {param!r}"
    return True, ""


def _find_function(functions: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for function in functions:
        if function["name"] == name:
            return function
    raise KeyError(f"possible answer names {name!r}, which is not among the item's functions")


def match_calls(
    functions: list[dict[str, Any]], calls: list[Call] | None, answers: list[Call], category: str
) -> tuple[bool, str]:
    """Score a parsed output (``parse_calls``) against BFCL ``ground_truth`` for a category
    (``simple*``, ``multiple``, ``parallel``, ``parallel_multiple``, ``live_*``)."""
    if calls is None:
        return False, "malformed output"
    if not calls:
        return False, "no function call"
    if len(calls) != len(answers):
        return False, f"wrong number of calls: {len(calls)}, expected {len(answers)}"
    if "parallel" not in category:
        expected_name = next(iter(answers[0]))
        return match_call(_find_function(functions, expected_name), calls[0], answers[0])
    ok_table = [
        [match_call(_find_function(functions, next(iter(answer))), call, answer)[0] for call in calls]
        for answer in answers
    ]
    if _perfect_matching(ok_table):
        return True, ""
    return False, "no order-free assignment of calls to expected calls"


def _perfect_matching(ok: list[list[bool]]) -> bool:
    """Whether every row (answer) can be assigned a distinct column (call) with ok[row][col]."""
    owner: dict[int, int] = {}

    def assign(row: int, seen: set[int]) -> bool:
        for col, fits in enumerate(ok[row]):
            if fits and col not in seen:
                seen.add(col)
                if col not in owner or assign(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    return all(assign(row, set()) for row in range(len(ok)))
