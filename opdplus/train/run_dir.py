"""The run directory: may it be used as asked (new, ``--resume``, ``--overwrite``), and preparing it."""

from __future__ import annotations

import shutil
from pathlib import Path

import opdplus.train.distributed as dist_utils
from opdplus.train.checkpoint import atomic_write_text
from opdplus.train.config import TrainConfig, to_yaml
from opdplus.train.distributed import DistContext


class RunDirError(RuntimeError):
    """The run directory exists (without --resume / --overwrite) or cannot be resumed."""


def check_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Raise RunDirError unless the run directory can be used as asked (reads only)."""
    run_dir = Path(cfg.run.dir)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"cannot resume {run_dir}: it has no config.yaml (not a run directory)")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it or --overwrite "
            "to start over (its contents are deleted)"
        )
    return run_dir


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Check it, empty it unless resuming, and write the resolved ``config.yaml``."""
    run_dir = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir


def open_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool, ctx: DistContext = DistContext()) -> Path:
    """Every process checks the run directory, then rank 0 prepares it."""
    run_dir = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    dist_utils.barrier(ctx)
    if ctx.is_main:
        prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    dist_utils.barrier(ctx)
    return run_dir
