"""opdplus: on-policy distillation with unbiased f-divergence advantages (OPD+)."""

from opdplus.ops import (
    Divergence,
    advantages,
    divergence_from_f,
    divergence_names,
    exact_divergence,
    get_divergence,
    policy_loss,
    register_divergence,
)

__version__ = "0.1.0"
__all__ = [
    "Divergence",
    "advantages",
    "divergence_from_f",
    "divergence_names",
    "exact_divergence",
    "get_divergence",
    "policy_loss",
    "register_divergence",
    "__version__",
]
