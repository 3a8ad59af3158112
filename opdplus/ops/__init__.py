"""Pure tensor math: divergences, advantages, losses. Plain tensors and numbers in, tensors out."""

from opdplus.ops.advantages import advantages, discounted_returns, log_ratio_clip_fraction, masked_log_ratio
from opdplus.ops.divergences import (
    Divergence,
    divergence_from_f,
    divergence_names,
    get_divergence,
    register_divergence,
)
from opdplus.ops.exact import exact_divergence
from opdplus.ops.loss import policy_loss, ratio_clip_fraction
from opdplus.ops.signals import per_position_divergence_loss, topk_divergence

__all__ = [
    "Divergence",
    "advantages",
    "discounted_returns",
    "divergence_from_f",
    "divergence_names",
    "exact_divergence",
    "get_divergence",
    "log_ratio_clip_fraction",
    "masked_log_ratio",
    "policy_loss",
    "per_position_divergence_loss",
    "ratio_clip_fraction",
    "register_divergence",
    "topk_divergence",
]
