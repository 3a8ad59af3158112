"""Per-step metrics: reductions over loss tokens, and the writer (metrics.jsonl, progress, TB / W&B).

Keys are namespaced: ``loss/``, ``div/``, ``adv/``, ``rollout/``, ``eval/``, ``perf/``. The reductions
are small functions of local tensors returning sums and counts, so that a distributed run can
all-reduce them before dividing.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------- reductions (local sums -> scalars)


def count_loss_tokens(loss_mask_B_T: torch.Tensor) -> int:
    """Loss tokens in a batch: the global normalizer of the optimizer step (all-reduce in DDP)."""
    return int(loss_mask_B_T.sum())


def masked_stats(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> dict[str, float]:
    """mean, std, min, max of ``values`` over mask positions (float64; zeros when nothing counts)."""
    picked = values_B_T.detach().double()[mask_B_T]
    if picked.numel() == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": float(picked.mean()),
        "std": float(picked.std(unbiased=False)),
        "min": float(picked.min()),
        "max": float(picked.max()),
    }


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> float:
    total = torch.where(mask_B_T, values_B_T.detach().double(), 0.0).sum()
    return float(total / max(count_loss_tokens(mask_B_T), 1))


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- metrics.jsonl


def _parse_lines(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) pairs; a line cut short by a crash (not valid JSON) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            continue
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [record for _, record in _parse_lines(path.read_text())] if path.exists() else []


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only complete lines up to ``last_step`` (a run that died after its last checkpoint wrote more)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    from opdplus.train.checkpoint import atomic_write_text

    kept = [line for line, record in _parse_lines(path.read_text()) if record.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them visible
    return value


# Key numbers shown on the progress bar / plain lines, when present.
HEADLINE = {
    "loss/policy": "loss",
    "div/reverse_kl": "rkl",
    "adv/mean": "adv",
    "rollout/len_mean": "len",
    "eval/reverse_kl": "eval_rkl",
    "eval/score": "eval_score",
    "perf/step_s": "s/step",
}


class MetricsWriter:
    """Appends one JSON line per step and shows progress (a bar on a TTY, plain lines otherwise)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        progress: str = "auto",
        log_every: int = 1,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "opdplus",
        config: dict[str, Any] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.stream = stream or sys.stderr
        self.log_every = log_every
        self.total_steps = total_steps
        self.mode = progress if progress != "auto" else ("bar" if self.stream.isatty() else "plain")
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", file=self.stream, dynamic_ncols=True)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.wandb = None
        if wandb:
            import wandb as wandb_module

            self.wandb = wandb_module.init(
                project=wandb_project, dir=str(run_dir), config=config, name=Path(run_dir).name, resume="allow"
            )
        self._file = open(self.path, "a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)
        shown = {short: numeric[key] for key, short in HEADLINE.items() if key in numeric}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1 if step > 0 else 0)  # step 0 is the evaluation before training
        elif self.mode == "plain" and (step % self.log_every == 0 or step == self.total_steps):
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"step {step}/{self.total_steps} {text}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line for the user (shown in every progress mode)."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
