"""Install the carried wheels (``bench/wheels``) that this Python does not have yet, with ``--no-deps``.

The device machine has torch, transformers and peft but no ``datasets`` (which TRL imports) and no network;
``bench/wheels`` carries trl, datasets and their dependencies as Python 3.12 wheels. A wheel whose
distribution is already installed (any version) is skipped, so nothing the machine has is replaced.

    python bench/install_wheels.py [bench/wheels]
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path


def distribution(wheel: Path) -> str:
    """The distribution name of a wheel file (``pandas-3.1.1-cp312-...whl`` -> ``pandas``)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def missing_wheels(folder: Path) -> tuple[list[Path], list[str]]:
    """(wheels to install, names already installed)."""
    todo, present = [], []
    for wheel in sorted(folder.glob("*.whl")):
        name = distribution(wheel)
        try:
            present.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            todo.append(wheel)
    return todo, present


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else Path(__file__).resolve().parent / "wheels")
    if not folder.is_dir():
        print(f"no wheel folder {folder}; TRL will be skipped if it cannot be imported", file=sys.stderr)
        return 0
    todo, present = missing_wheels(folder)
    print(f"already installed: {', '.join(present) or 'none'}", flush=True)
    if not todo:
        return 0
    print(f"installing: {', '.join(w.name for w in todo)}", flush=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *map(str, todo)]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
