"""Atomic checkpoints with a checksum manifest.

Layout of ``run_dir/checkpoints/step_00000012/``:

    model/               save_pretrained (safetensors) + tokenizer; a LoRA run holds the peft adapter
    trainer_state.pt     optimizer, scheduler, step, RNG states (torch.load(weights_only=True) loads it)
    config.yaml          the resolved config the run was trained with (resume compares against it)
    run_meta.json        package versions, commit, tokenizer fingerprints, teacher identity (run_dir.py)
    manifest.json        sha256 and size of every file above; written last

A checkpoint is written into ``.tmp-step_...`` with every file and directory fsynced, then renamed
into place, so a crash leaves either a complete checkpoint or a ``.tmp-*`` directory that is ignored.
``verify_checkpoint`` rejects a directory whose manifest is missing or whose files do not match it,
naming the checkpoint and the file. A failed write (e.g. a full disk) removes the temp directory and
keeps every older checkpoint; no space left raises ``CheckpointWriteError`` saying so.
"""

from __future__ import annotations

import errno
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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left on device); the older ones are intact."""


def is_no_space(err: BaseException) -> bool:
    """Is ``err`` (or what caused it) a full disk? torch and safetensors wrap the OSError in their own errors."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    write_model: Callable[[Path], None],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int = 0,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; ``write_model(dir)`` saves weights and tokenizer into ``dir``;
    ``extra_files`` are more text files (name -> text). Keeps the newest ``keep`` checkpoints (0 = all).
    Returns the checkpoint directory; CheckpointWriteError when the disk is full."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write_model(tmp / "model")
        with open(tmp / "trainer_state.pt", "wb") as fh:  # a Python file: a full disk raises OSError(ENOSPC)
            torch.save(trainer_state, fh)
        for name, text in {"config.yaml": config_yaml, **(extra_files or {})}.items():
            (tmp / name).write_text(text)
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
    except Exception as err:  # an interrupt (as a kill) leaves the temp dir for remove_temp_dirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_no_space(err):
            raise
        kept = list_checkpoints(run_dir)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: no space left on device; the temp directory was removed and "
            f"{'the last good checkpoint ' + str(kept[-1]) + ' is intact' if kept else 'there is no older checkpoint'}"
            f"; free space, then continue with opdplus train --resume {run_dir}"
        ) from None
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
