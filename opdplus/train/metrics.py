"""Per-step metrics: reductions over loss tokens, what a step logs of its rollouts, divergences and
timings, and the writer (metrics.jsonl, progress, TB / W&B).

Keys are namespaced: ``loss/``, ``div/``, ``adv/``, ``rollout/``, ``eval/``, ``perf/``, ``teacher/``. The
reductions are small functions of local tensors, so that a distributed run can all-reduce their results
(``distributed.reduce_metrics``, weighted by loss tokens).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch

from opdplus.ops.advantages import log_ratio_clip_fraction, masked_log_ratio
from opdplus.ops.align import alignment_metrics
from opdplus.ops.divergences import Divergence
from opdplus.rollout.types import RolloutBatch, Teacher
from opdplus.train.config import TrainConfig, to_dict

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


# ---------------------------------------------------------------- what a step logs


def divergence_metrics(
    divergence: Divergence,
    student_lp_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    log_ratio_clip: float | None,
) -> dict[str, float]:
    """Sampled-token estimates (per token) of the chosen divergence D_f(q || pi) and of KL(pi || q)."""
    log_ratio_B_T = masked_log_ratio(student_lp_B_T, teacher_lp_B_T, loss_mask_B_T, log_ratio_clip).double()
    f_B_T = divergence.f(divergence.safe_log_ratio(log_ratio_B_T))
    raw_B_T = masked_log_ratio(student_lp_B_T, teacher_lp_B_T, loss_mask_B_T)
    return {
        f"div/{divergence.name}": masked_mean(f_B_T, loss_mask_B_T),
        "div/reverse_kl": masked_mean(-raw_B_T, loss_mask_B_T),
        "adv/log_ratio_clip_frac": float(
            log_ratio_clip_fraction(student_lp_B_T, teacher_lp_B_T, loss_mask_B_T, log_ratio_clip)
        ),
    }


def per_task_reverse_kl(student_lp_B_T: torch.Tensor, batch: RolloutBatch) -> dict[str, float]:
    """``div/<task>/reverse_kl`` per task tag (so each routed teacher has its own), when there are several."""
    tags = sorted(set(batch.tasks))
    if len(tags) < 2 or batch.teacher_logprobs_B_T is None:
        return {}
    out = {}
    for tag in tags:
        rows_B = torch.tensor([t == tag for t in batch.tasks])
        mask_B_T = batch.loss_mask_B_T & rows_B[:, None].to(batch.loss_mask_B_T.device)
        out[f"div/{tag}/reverse_kl"] = masked_mean(student_lp_B_T - batch.teacher_logprobs_B_T, mask_B_T)
    return out


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    lengths_B = batch.completion_lengths_B().double()
    truncated_B = (
        batch.truncated_B if batch.truncated_B is not None else torch.zeros(batch.batch_size, dtype=torch.bool)
    )
    return {
        "rollout/len_mean": float(lengths_B.mean()),
        "rollout/len_max": float(lengths_B.max()),
        "rollout/truncated_frac": float(truncated_B.double().mean()),
        "rollout/tokens": float(lengths_B.sum()),
        "rollout/sequences": float(batch.batch_size),
        **episode_metrics(batch),
    }


EPISODE_METRICS = ("turns", "tool_calls", "tool_errors", "parse_failures", "env_tokens")


def episode_metrics(batch: RolloutBatch) -> dict[str, float]:
    """``rollout/{turns,tool_calls,tool_errors,parse_failures,env_tokens}``: means over the batch's multi-turn
    episodes (rows whose meta has ``episode``, see ``opdplus.rollout.multiturn``); nothing when it has none."""
    episodes = [row["episode"] for row in batch.meta if "episode" in row]
    if not episodes:
        return {}
    return {f"rollout/{name}": sum(float(e[name]) for e in episodes) / len(episodes) for name in EPISODE_METRICS}


def teacher_usage(teacher: Teacher) -> dict[str, float]:
    """The teacher's counters for this step, ``teacher/...``: per task for a routed teacher
    (``teacher/<task>/{rows,tokens,seconds}``), requests and retries for a served one; reset each step."""
    usage = getattr(teacher, "metrics", None)
    return {} if usage is None else {f"teacher/{k}": float(v) for k, v in usage(reset=True).items()}


@contextmanager
def timed(phase: str, seconds: dict[str, float], device: torch.device | None = None) -> Iterator[None]:
    """``seconds[phase]``: the wall time of the block (waiting for the accelerator's queued work at its end)."""
    start = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[phase] = time.perf_counter() - start


def throughput_metrics(seconds: dict[str, float], tokens: float, update_passes: int) -> dict[str, float]:
    """``perf/``: loss tokens per second of the sample, score and update phases, and the step's seconds."""
    return {
        "perf/sample_tok_s": tokens / max(seconds["sample"], 1e-9),
        "perf/score_tok_s": tokens / max(seconds["score"], 1e-9),
        "perf/update_tok_s": tokens * update_passes / max(seconds["update"], 1e-9),
        "perf/step_s": seconds["sample"] + seconds["score"] + seconds["update"],
    }


# ---------------------------------------------------------------- metrics.jsonl


def metrics_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) pairs of a ``metrics.jsonl``. A last line without its newline (a run killed mid-write) is
    skipped; any other line that is not a JSON object with a ``step`` is a ValueError naming the file and line."""
    lines = Path(path).read_text().split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):  # no newline after it: cut short by a crash
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON ({err}): {line[:80]!r}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(
                f"{path}: line {number} is not a metrics record (a JSON object with a step): {line[:80]!r}"
            )
        out.append((line, record))
    return out


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``metrics_lines``)."""
    return [record for _, record in metrics_lines(path)]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl``; [] when the run has written none."""
    path = Path(run_dir) / METRICS_FILE
    return read_metrics_file(path) if path.exists() else []


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only complete lines up to ``last_step`` (a run that died after its last checkpoint wrote more)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    from opdplus.train.checkpoint import atomic_write_text

    kept = [line for line, record in metrics_lines(path) if record["step"] <= last_step]
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
            import wandb as wandb_module  # pyright: ignore[reportMissingImports]  (optional, not installed)

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


class NullWriter:
    """The metrics sink of ranks other than 0."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


def open_metrics_writer(
    cfg: TrainConfig, run_dir: Path, start_step: int, *, is_main: bool
) -> MetricsWriter | NullWriter:
    """The run's writer on rank 0, a ``NullWriter`` elsewhere."""
    if not is_main:
        return NullWriter()
    return MetricsWriter(
        run_dir,
        total_steps=cfg.run.steps,
        start_step=start_step,
        progress=cfg.run.progress,
        log_every=cfg.run.log_every,
        tensorboard=cfg.run.tensorboard,
        wandb=cfg.run.wandb,
        wandb_project=cfg.run.wandb_project,
        config=to_dict(cfg),
    )


def step_metrics(
    update: dict[str, float],
    batch: RolloutBatch,
    rollout_student_lp_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    *,
    divergence: Divergence,
    log_ratio_clip: float | None,
    teacher: Teacher,
    seconds: dict[str, float],
    update_passes: int,
    device: torch.device,
) -> dict[str, float]:
    """What a training step logs (this process's values, before averaging over processes): the update's
    ``loss/``, ``div/`` estimates, ``adv/`` statistics, ``rollout/`` lengths, teacher usage and ``perf/``."""
    if batch.teacher_logprobs_B_T is None:
        raise ValueError("step_metrics needs the teacher's scores: set batch.teacher_logprobs_B_T first")
    tokens = float(count_loss_tokens(batch.loss_mask_B_T))
    return {
        **update,
        **divergence_metrics(
            divergence, rollout_student_lp_B_T, batch.teacher_logprobs_B_T, batch.loss_mask_B_T, log_ratio_clip
        ),
        **per_task_reverse_kl(rollout_student_lp_B_T, batch),
        **({} if batch.span_end_B_T is None else alignment_metrics(batch.span_end_B_T, batch.loss_mask_B_T)),
        **{f"adv/{k}": v for k, v in masked_stats(advantages_B_T, batch.loss_mask_B_T).items()},
        **rollout_metrics(batch),
        **{f"perf/{k}": v for k, v in teacher_usage(teacher).items()},
        **throughput_metrics(seconds, tokens, update_passes),
        "perf/peak_mem_mb": peak_memory_mb(device),
    }
