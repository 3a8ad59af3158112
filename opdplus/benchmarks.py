"""The benchmark runner behind `opdplus bench`: runs the scripts of the top-level ``bench/`` folder.

Each script prints a table and, as its last line, one JSON object ``{"bench": {...}}``. They run one after
another (their output streams through) and their objects are merged into one. A script that fails is
reported as ``{"<name>": {"error": ...}}``. The scripts live in the source tree, next to the package (they
are not installed with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
# Run order: cheap and independent first. Scripts not listed here are ignored (helpers such as common.py).
BENCHMARKS = ("kernels", "sampler", "flops", "loop_vs_trl")


def last_json_line(text: str) -> dict:
    """The ``{"bench": {...}}`` object on the last non-empty line of a script's output."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the benchmark printed nothing")
    value = json.loads(lines[-1])
    if not isinstance(value, dict) or not isinstance(value.get("bench"), dict):
        raise ValueError(f'the last line is not a {{"bench": {{...}}}} object: {lines[-1][:200]}')
    return value["bench"]


def merge(results: list[dict]) -> dict:
    """One ``{"bench": {...}}`` object; a later key with the same name as an earlier one is an error."""
    merged: dict = {}
    for result in results:
        clash = sorted(set(merged) & set(result))
        if clash:
            raise ValueError(f"two benchmarks report the same key(s): {', '.join(clash)}")
        merged.update(result)
    return {"bench": merged}


def run_script(path: Path, script_args: list[str]) -> dict:
    """Run one benchmark script, streaming its stdout; returns its parsed last line."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(path.parent.parent), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.Popen([sys.executable, str(path), *script_args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None  # stdout=PIPE
    captured = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        captured.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"{path.name} exited with status {proc.returncode}")
    return last_json_line("".join(captured))


def run_benchmarks(names: list[str] | tuple[str, ...], script_args: list[str]) -> tuple[dict, bool]:
    """Run the named scripts one after another; ``(merged {"bench": ...}, any failed)``. A failed script is
    reported as ``{"<name>": {"error": ...}}``."""
    results, failed = [], False
    for name in names:
        path = BENCH_DIR / f"{name}.py"
        print(f"== bench/{name}.py {' '.join(script_args)}", flush=True)
        try:
            if not path.is_file():
                raise RuntimeError(f"{path} does not exist")
            results.append(run_script(path, script_args))
        except (RuntimeError, ValueError) as err:
            results.append({name: {"error": str(err)}})
            failed = True
    return merge(results), failed
