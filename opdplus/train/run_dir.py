"""The run directory: may it be used as asked (new, ``--resume``, ``--overwrite``), preparing it, and the
run metadata (``run_meta.json``).

Order of a run: ``check_run_dir`` reads only (a writable place; ``--overwrite`` only over an opdplus run;
``--resume`` only with the checkpoint's config, see ``check_resume``); the models, teachers and tasks are
built; only then ``open_run_dir`` writes. ``--overwrite`` moves the old run aside
(``.<name>.replaced-<pid>`` next to it) and ``remove_replaced_runs`` deletes it once the new run has
written its first checkpoint (or finished), so an error before that never loses the old run.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

import opdplus.train.checkpoint as ckpt
import opdplus.train.distributed as dist_utils
from opdplus.train.config import (
    RESUME_MAY_CHANGE,
    ConfigError,
    TeacherConfig,
    TrainConfig,
    config_changes,
    load_config,
    resume_may_change,
    stored_config,
    to_yaml,
)
from opdplus.train.distributed import DistContext

RUN_META = "run_meta.json"
REPLACED = ".replaced-"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked: it exists (without --resume / --overwrite), is not a run,
    cannot be written, or cannot be resumed with this config."""


# ---------------------------------------------------------------- checks (read only)


def os_reason(err: OSError) -> str:
    """What an OSError means for the user, in words."""
    return {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded (no space left on device)",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a path component is a file, not a directory",
    }.get(err.errno or 0, err.strerror or str(err))


def check_writable(run_dir: Path) -> None:
    """RunDirError unless ``run_dir`` is (or can be created as) a directory this process may write into."""
    for path in [run_dir, *run_dir.absolute().parents]:
        if not path.exists():
            continue
        if not path.is_dir():
            raise RunDirError(f"run.dir={run_dir}: {path} is a file, not a directory; choose another run.dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(
                f"run.dir={run_dir}: cannot write into {path} (read-only file system or no permission); "
                "choose a writable run.dir"
            )
        return


def is_run_dir(path: Path) -> bool:
    """Does ``path`` hold an opdplus run (a ``config.yaml`` with a ``run:`` section)?"""
    try:
        data = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("run"), dict)


def describe_contents(path: Path, limit: int = 5) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def check_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Raise RunDirError unless the run directory can be used as asked (reads only)."""
    run_dir = Path(cfg.run.dir)
    check_writable(run_dir)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"cannot resume {run_dir}: it has no config.yaml (not a run directory)")
        check_resume(cfg, run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it or --overwrite "
                "to start over (its contents are deleted)"
            )
        if not is_run_dir(run_dir):
            raise RunDirError(
                f"--overwrite refuses {run_dir}: it is not an opdplus run directory (no config.yaml of a run) "
                f"and holds {describe_contents(run_dir)}; choose another run.dir, or delete it yourself"
            )
    return run_dir


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """The resumed run is the checkpoint's run: ``cfg`` may differ from the config stored in the newest
    checkpoint only in ``RESUME_MAY_CHANGE``, and not have fewer steps than the checkpoint."""
    checkpoint = ckpt.latest_checkpoint(run_dir)  # verified; a damaged one raises before anything is written
    if checkpoint is None or not (checkpoint / "config.yaml").is_file():
        return
    step = int(checkpoint.name[len(ckpt.PREFIX) :])
    if cfg.run.steps < step:
        raise RunDirError(
            f"cannot resume {run_dir} with run.steps={cfg.run.steps}: its newest checkpoint is at step {step}; "
            f"pass run.steps={step} or more"
        )
    try:
        stored = stored_config((checkpoint / "config.yaml").read_text(), str(checkpoint / "config.yaml"))
    except ConfigError as err:
        raise RunDirError(f"cannot resume {run_dir}: {err}") from None
    for key, old, new in config_changes(stored, cfg):
        if not resume_may_change(key):
            raise RunDirError(
                f"cannot change {key} when resuming {run_dir}: its checkpoint {checkpoint.name} was trained with "
                f"{old!r}, now {new!r} (edited config.yaml or an override); undo it or start a new run "
                f"(may change: {', '.join(RESUME_MAY_CHANGE)})"
            )


def resume_config(run_dir: str | Path, overrides: list[str]) -> TrainConfig:
    """The config to resume ``run_dir`` with: its ``config.yaml`` plus ``overrides`` (``check_run_dir``
    then compares it with the checkpoint's)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"cannot resume {run_dir}: no config.yaml there (is it a run directory?)")
    return load_config(saved, [*overrides, f"run.dir={run_dir}"])


# ---------------------------------------------------------------- run metadata


def git_commit() -> str | None:
    """The commit of the opdplus source tree when it is a git checkout (None otherwise)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def teacher_identity(t: TeacherConfig) -> dict[str, Any]:
    """A served teacher: its url and model name; a local one: its model and tokenizer fingerprint."""
    from opdplus.models.fingerprint import tokenizer_fingerprint

    if t.url is not None:
        return {"url": t.url, "model_name": t.model_name}
    from opdplus.models.load import TINY, load_tokenizer
    from opdplus.models.tiny import build_char_tokenizer

    if t.model == TINY:
        tokenizer = load_tokenizer(t.tokenizer) if t.tokenizer else build_char_tokenizer()
    else:
        from opdplus.models.sources import resolve_model

        tokenizer = load_tokenizer(t.tokenizer or str(resolve_model(t.model)))
    return {"model": t.model, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}


def run_metadata(cfg: TrainConfig, student_tokenizer: Any) -> dict[str, Any]:
    """What a run was made with: package versions, the source commit, tokenizer fingerprints, teachers."""
    from opdplus.models.fingerprint import tokenizer_fingerprint

    teachers = (
        [teacher_identity(cfg.teacher)] if not cfg.teachers else [teacher_identity(r.teacher) for r in cfg.teachers]
    )
    return {
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("opdplus", "torch", "transformers", "peft")},
        },
        "commit": git_commit(),
        "student_tokenizer_fingerprint": tokenizer_fingerprint(student_tokenizer),
        "teachers": teachers,
    }


def check_metadata(run_dir: Path, meta: dict[str, Any]) -> None:
    """On resume: the student's tokenizer and every teacher (its tokenizer, or a served one's model name)
    must be the ones the newest checkpoint was trained with (older checkpoints without metadata pass)."""
    checkpoint = ckpt.latest_checkpoint(run_dir)
    stored_path = None if checkpoint is None else checkpoint / RUN_META
    if stored_path is None or not stored_path.is_file():
        return
    stored = json.loads(stored_path.read_text())
    pairs = [("student tokenizer", stored.get("student_tokenizer_fingerprint"), meta["student_tokenizer_fingerprint"])]
    for i, (old, new) in enumerate(zip(stored.get("teachers", []), meta["teachers"])):
        for key in ("tokenizer_fingerprint", "model_name"):
            pairs.append((f"teacher {i} {key.replace('_', ' ')}", old.get(key), new.get(key)))
    for what, old, new in pairs:
        if old != new:
            raise RunDirError(
                f"cannot resume {run_dir}: the {what} differs from the checkpoint's ({old} before, {new} now); "
                "resume with the models the run was trained with"
            )


# ---------------------------------------------------------------- writing


def _replaced_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.absolute().parent.glob(f".{run_dir.name}{REPLACED}*"))


def remove_replaced_runs(run_dir: Path) -> None:
    """Delete the old runs that ``--overwrite`` moved aside (the new run has a checkpoint now)."""
    for old in _replaced_runs(Path(run_dir)):
        shutil.rmtree(old, ignore_errors=True)


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, meta: dict[str, Any]) -> Path:
    """Move an old run aside unless resuming, and write the resolved ``config.yaml`` and ``run_meta.json``."""
    run_dir = Path(cfg.run.dir)
    try:
        if not resume and run_dir.exists() and any(run_dir.iterdir()):  # --overwrite, checked by check_run_dir
            os.rename(run_dir, run_dir.absolute().parent / f".{run_dir.name}{REPLACED}{os.getpid()}")
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        ckpt.atomic_write_text(run_dir / RUN_META, json.dumps(meta, indent=1))
    except OSError as err:
        raise RunDirError(
            f"cannot write run.dir={run_dir}: {os_reason(err)} ({err.filename or run_dir}); "
            "free space or choose a writable run.dir"
        ) from None
    return run_dir


def open_run_dir(
    cfg: TrainConfig, *, resume: bool, student_tokenizer: Any, ctx: DistContext = DistContext()
) -> tuple[Path, dict[str, Any]]:
    """After the models are built: the run metadata (checked against the checkpoint's on resume); then
    rank 0 prepares the directory. Returns it and the metadata (stored with every checkpoint)."""
    run_dir = Path(cfg.run.dir)
    meta = run_metadata(cfg, student_tokenizer)
    if resume:
        check_metadata(run_dir, meta)
    dist_utils.barrier(ctx)
    if ctx.is_main:
        prepare_run_dir(cfg, resume=resume, meta=meta)
    dist_utils.barrier(ctx)
    return run_dir, meta
