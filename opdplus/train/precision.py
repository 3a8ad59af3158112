"""Numeric precision of the student's compute, and the CUDA matmul settings.

``run.precision``:

- ``fp32``: every op in the parameters' dtype (``student.dtype``);
- ``bf16-mixed``: sampling and the update run under ``torch.autocast(dtype=torch.bfloat16)`` (matmuls and
  attention in bfloat16) while the weights, their gradients and AdamW's state stay float32 (the master
  copy): ``student.dtype`` must be float32. Log-probs, losses and divergences are still formed in float32
  / float64 (``opdplus.ops``), so only the matmul inputs are rounded. Autocast runs on CPU too, which is
  how the tests check it.

``enable_tf32`` lets float32 matmuls and convolutions on CUDA use TF32 tensor cores (10-bit mantissa
products, float32 accumulation): the speed of reduced precision for the fp32 parts that remain.
"""

from __future__ import annotations

import typing
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["fp32", "bf16-mixed"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The context the student's compute runs in: nothing for ``fp32``, bfloat16 autocast on ``device``'s
    type for ``bf16-mixed``."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def enable_tf32(device: torch.device) -> bool:
    """TF32 for float32 matmuls and cuDNN convolutions when ``device`` is CUDA; returns whether it was set.
    A no-op elsewhere (CPU matmuls have no TF32 mode)."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
