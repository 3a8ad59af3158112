"""Final-answer extraction from a math completion, and checking it with ``math-verify``.

Extraction takes, in this order of precedence, the first rule that matches:

1. the last ``\\boxed{...}`` (balanced braces);
2. the text after the last ``####`` (GSM8K style), up to the end of that line;
3. the text after the last "answer is" / "answer:" (case-insensitive), up to the end of that sentence;
4. the last number in the completion (integers, decimals, fractions ``a/b``, thousands separators).

The extracted string is then compared to the reference with ``math_verify.verify`` (symbolic and
numeric equality: ``18`` = ``18.00`` = ``$18``, ``1/2`` = ``0.5``). Nothing here raises on bad
model output: no answer means wrong.
"""

from __future__ import annotations

import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1].replace(" ", "") if matches else None


def extract_answer(completion: str) -> str | None:
    """The final answer string of a completion (see the module docstring for the rules), or None."""
    boxed = last_boxed(completion)
    if boxed:
        return boxed
    hashes = _HASHES_RE.findall(completion)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    said = _ANSWER_IS_RE.findall(completion)
    if said:
        number = last_number(said[-1])
        return number if number is not None else said[-1].strip()
    return last_number(completion)


def gsm8k_reference(solution: str) -> str:
    """The reference answer of a GSM8K solution: the text after ``####``, without thousands commas."""
    match = _HASHES_RE.findall(solution)
    if not match:
        raise ValueError(f"GSM8K solution without '####': {solution[-80:]!r}")
    return match[-1].strip().replace(",", "")


def _strip_number(text: str) -> str:
    """``$1,000.`` -> ``1000``: plain numbers lose currency, commas and a trailing period."""
    plain = text.strip().strip("$").rstrip(".").strip()
    return plain.replace(",", "") if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", plain) else text


def answers_match(reference: str, predicted: str | None) -> bool:
    """True if ``predicted`` equals ``reference`` per math-verify; never raises."""
    if predicted is None or not predicted.strip():
        return False
    parse, verify = _math_verify()
    try:
        gold = parse(_wrap(_strip_number(str(reference))))
        pred = parse(_wrap(_strip_number(predicted)))
        return bool(gold) and bool(pred) and bool(verify(gold, pred))
    except Exception:  # math-verify parse/timeout errors on garbage: wrong, not a crash
        return False


def _math_verify():
    try:
        from math_verify import parse, verify
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("math answers are checked with math-verify: pip install math-verify") from err
    return parse, verify


def _wrap(text: str) -> str:
    """math-verify's LaTeX extractor wants math delimiters; plain numbers work as is."""
    return text if "$" in text or "\\" not in text else f"${text}$"
