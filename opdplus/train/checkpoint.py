"""Atomic checkpoints with a checksum manifest.

Layout of ``run_dir/checkpoints/step_00000012/``:

    model/               save_pretrained (safetensors) + tokenizer; a LoRA run holds the peft adapter
    trainer_state.pt     optimizer, scheduler, step, RNG states (torch.load(weights_only=True) loads it)
    config.yaml          the resolved config of the run
    manifest.json        sha256 and size of every file above; written last

A checkpoint is written into ``.tmp-step_...`` with every file and directory fsynced, then renamed
into place, so a crash leaves either a complete checkpoint or a ``.tmp-*`` directory that is ignored.
``verify_checkpoint`` rejects a directory whose manifest is missing or whose files do not match it,
naming the checkpoint and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
PREFIX = "step_"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is partial or damaged; it is never loaded."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    write_model: Callable[[Path], None],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically; ``write_model(dir)`` saves weights and tokenizer into ``dir``.
    Keeps the newest ``keep`` checkpoints (0 = all). Returns the checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp / "model")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": 1,
        "step": step,
        "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for path in [*files, tmp / MANIFEST]:
        _fsync_path(path)
    for directory in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_path(directory)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
        stale = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, stale)
        shutil.rmtree(stale)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories (complete or not), oldest first; temp directories are skipped."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, undamaged checkpoint; else CorruptCheckpointError naming what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} is partial: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({err})") from err
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: file {rel} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CorruptCheckpointError(
                f"checkpoint {path} is corrupt: file {rel} has {file.stat().st_size} bytes, "
                f"manifest says {expected['bytes']}"
            )
        if _sha256(file) != expected["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: file {rel} does not match its sha256 checksum")
    return manifest


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint, verified; a damaged newest checkpoint raises (it is never skipped silently)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    try:
        verify_checkpoint(newest)
    except CorruptCheckpointError as err:
        older = (
            f"; the previous one is {checkpoints[-2]}, remove the damaged one to resume from it"
            if len(checkpoints) > 1
            else ""
        )
        raise CorruptCheckpointError(f"{err}{older}") from None
    return newest


def load_trainer_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path) / "trainer_state.pt", map_location=map_location, weights_only=True)


def remove_temp_dirs(run_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted saves (``.tmp-*``, ``.old-*``); returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    removed = [*root.glob(".tmp-*"), *root.glob(".old-*")] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
