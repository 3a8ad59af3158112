"""f-divergences D_f(q || pi) = E_{v~pi}[f(q(v)/pi(v))], written in log-ratio space.

Everything is a function of the log-ratio l = log q - log pi (teacher over student), u = exp(l):

* ``f(l)``        = f(u), the per-sample "cost" whose expectation under the student is D_f;
* ``u_fprime(l)`` = u f'(u) = d f(exp(l)) / dl, the term stop-gradient OPD drops;
* ``weighted(logp, logq)`` = pi f(q/pi), the perspective form used for the exact divergence over a
  vocabulary; it stays finite where pi -> 0.

The f-divergence framing of on-policy distillation is that of "OPD+: Rethinking the Advantage Design
for On-Policy Distillation" (Zhao et al. 2026, arXiv 2606.01039). Directions follow docs/derivations.md
("Setting", "The table"): ``reverse_kl`` is KL(pi||q), ``forward_kl`` is KL(q||pi), ``pearson_chi2`` is
chi2(q||pi), ``neyman_chi2`` is chi2(pi||q). All forms avoid cancellation (expm1, softplus) so they hold
from l = -50 to 50 and beyond; ``growth`` is the largest k with |f| ~ exp(k |l|), used to keep
intermediate values finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Divergence:
    """An f-divergence, f convex with f(1) = 0, given as functions of l = log q - log pi."""

    name: str
    direction: str
    f: Callable[[Tensor], Tensor]
    u_fprime: Callable[[Tensor], Tensor]
    weighted: Callable[[Tensor, Tensor], Tensor] = field(default=None)  # type: ignore[assignment]
    growth: float = 1.0
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.weighted is None:
            object.__setattr__(self, "weighted", _weighted_from_f(self.f, self.growth))

    @property
    def label(self) -> str:
        """Name with parameters, e.g. ``alpha(0.5)``."""
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{v:g}' for _, v in self.params)})"

    def perspective(self, logp: Tensor, logq: Tensor) -> Tensor:
        """pi f(q/pi) per entry from log pi and log q, safe at the edges of the domain.

        An entry where both are zero (-inf in both, a masked vocabulary entry) contributes 0 to the
        value and to the gradient; a NaN in either input gives NaN, never a number.
        """
        both_zero = (logp == -math.inf) & (logq == -math.inf)
        zero = torch.zeros_like(logp)
        value = self.weighted(torch.where(both_zero, zero, logp), torch.where(both_zero, zero, logq))
        value = torch.where(both_zero, zero, value)
        return torch.where(logp.isnan() | logq.isnan(), torch.full_like(value, math.nan), value)

    def safe_log_ratio(self, log_ratio: Tensor) -> Tensor:
        """Clamp l so that exp(growth * l) stays finite in float64 (|growth * l| <= 600).

        This only bites far beyond any meaningful value (float32 results saturate long before);
        use ``log_ratio_clip`` for a deliberate bias-variance trade-off.
        """
        if self.growth <= 0:
            return log_ratio
        bound = 600.0 / self.growth
        return log_ratio.clamp(-bound, bound)


def saturate(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` cast to ``dtype``, finite ones clamped to its finite range (inf and NaN stay)."""
    finite_max = torch.finfo(dtype).max
    return torch.where(values.isfinite(), values.clamp(-finite_max, finite_max), values).to(dtype)


def _weighted_from_f(f: Callable[[Tensor], Tensor], growth: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Default perspective form pi f(q/pi) with l = log q - log pi clamped like ``safe_log_ratio``.

    Written from the larger side, pi f(u) where q <= pi and q f(u) / u where q > pi, so it saturates
    (never 0 * inf) where either probability is 0. Both zero is left to ``Divergence.perspective``.
    """
    bound = 600.0 / max(growth, 1.0)  # f is evaluated at u = exp(l), which must stay finite

    def weighted(logp: Tensor, logq: Tensor) -> Tensor:
        log_ratio = (logq - logp).clamp(-bound, bound)
        return torch.where(log_ratio > 0, logq - log_ratio, logp).exp() * f(log_ratio)

    return weighted


def _x_log_x_over_y(logx: Tensor, logy: Tensor) -> Tensor:
    """x log(x / y) from log x and log y: 0 with gradient 0 where x = 0, +inf where only y = 0."""
    positive = logx > -math.inf
    zero = torch.zeros_like(logx)
    logx, logy = torch.where(positive, logx, zero), torch.where(positive, logy, zero)  # no 0 * inf in backward
    return torch.where(positive, logx.exp() * (logx - logy), zero)


# --- the built-in divergences -------------------------------------------------------------------


def _reverse_kl() -> Divergence:
    # f(u) = -log u; u f'(u) = -1; pi f(q/pi) = pi (log pi - log q).
    return Divergence(
        name="reverse_kl",
        direction="KL(pi || q)",
        f=lambda l: -l,
        u_fprime=lambda l: -torch.ones_like(l),
        weighted=lambda logp, logq: _x_log_x_over_y(logp, logq),
        growth=0.0,
    )


def _forward_kl() -> Divergence:
    # f(u) = u log u; u f'(u) = u (log u + 1); pi f(q/pi) = q (log q - log pi).
    return Divergence(
        name="forward_kl",
        direction="KL(q || pi)",
        f=lambda l: l.exp() * l,
        u_fprime=lambda l: l.exp() * (l + 1),
        weighted=lambda logp, logq: _x_log_x_over_y(logq, logp),
    )


def _jsd_weighted(logp: Tensor, logq: Tensor) -> Tensor:
    # pi f(q/pi) = 1/2 [q log(q/m) + pi log(pi/m)], m = (pi + q) / 2.
    logm = torch.logaddexp(logp, logq) - LOG2
    return 0.5 * (_x_log_x_over_y(logq, logm) + _x_log_x_over_y(logp, logm))


def _jsd() -> Divergence:
    # f(u) = 1/2 [u l - (1+u) log((1+u)/2)] = 1/2 [u (log 2 - softplus(-l)) + log 2 - softplus(l)]
    # u f'(u) = 1/2 u [l - log((1+u)/2)]    = 1/2 u (log 2 - softplus(-l))
    return Divergence(
        name="jsd",
        direction="JS(pi, q), symmetric",
        f=lambda l: 0.5 * (l.exp() * (LOG2 - F.softplus(-l)) + LOG2 - F.softplus(l)),
        u_fprime=lambda l: 0.5 * l.exp() * (LOG2 - F.softplus(-l)),
        weighted=_jsd_weighted,
    )


def _total_variation() -> Divergence:
    # f(u) = 1/2 |u - 1|; u f'(u) = 1/2 u sign(u - 1); pi f(q/pi) = 1/2 |q - pi|.
    return Divergence(
        name="total_variation",
        direction="TV(pi, q), symmetric",
        f=lambda l: 0.5 * torch.expm1(l).abs(),
        u_fprime=lambda l: 0.5 * l.exp() * torch.sign(l),
        weighted=lambda logp, logq: 0.5 * (logq.exp() - logp.exp()).abs(),
    )


def _hellinger() -> Divergence:
    # f(u) = (sqrt(u) - 1)^2; u f'(u) = u - sqrt(u); pi f(q/pi) = (sqrt(q) - sqrt(pi))^2.
    return Divergence(
        name="hellinger",
        direction="squared Hellinger H^2(pi, q), symmetric",
        f=lambda l: torch.expm1(0.5 * l).square(),
        u_fprime=lambda l: (0.5 * l).exp() * torch.expm1(0.5 * l),
        weighted=lambda logp, logq: ((0.5 * logq).exp() - (0.5 * logp).exp()).square(),
    )


def _chi2_weighted(log_base: Tensor, log_other: Tensor) -> Tensor:
    """(other - base)^2 / base = (other / sqrt(base) - sqrt(base))^2: no cancellation, and +inf
    (never NaN) where base -> 0 while other > 0; 0 where both are 0."""
    value = ((log_other - 0.5 * log_base).exp() - (0.5 * log_base).exp()).square()
    both_zero = (log_base == -math.inf) & (log_other == -math.inf)
    return torch.where(both_zero, torch.zeros_like(value), value)


def _pearson_chi2() -> Divergence:
    # f(u) = (u - 1)^2; u f'(u) = 2 u (u - 1); pi f(q/pi) = (q - pi)^2 / pi.
    return Divergence(
        name="pearson_chi2",
        direction="chi2(q || pi) (Pearson)",
        f=lambda l: torch.expm1(l).square(),
        u_fprime=lambda l: 2 * l.exp() * torch.expm1(l),
        weighted=lambda logp, logq: _chi2_weighted(logp, logq),
        growth=2.0,
    )


def _neyman_chi2() -> Divergence:
    # f(u) = (1 - u)^2 / u = -expm1(l) expm1(-l); u f'(u) = u - 1/u; pi f(q/pi) = (pi - q)^2 / q.
    return Divergence(
        name="neyman_chi2",
        direction="chi2(pi || q) (Neyman)",
        f=lambda l: -torch.expm1(l) * torch.expm1(-l),
        u_fprime=lambda l: torch.expm1(l) - torch.expm1(-l),
        weighted=lambda logp, logq: _chi2_weighted(logq, logp),
        growth=1.0,
    )


def _alpha(alpha: float | None = None) -> Divergence:
    # f(u) = (u^a - a u - (1 - a)) / (a (a - 1)) = (expm1(a l) - a expm1(l)) / (a (a - 1))
    # u f'(u) = (u^a - u) / (a - 1) = (expm1(a l) - expm1(l)) / (a - 1)
    # pi f(q/pi) = (pi^(1-a) q^a - a q - (1 - a) pi) / (a (a - 1))
    if alpha is None:
        raise ValueError("divergence 'alpha' needs a parameter: get_divergence('alpha', alpha=0.5)")
    a = float(alpha)
    if not math.isfinite(a):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    if a == 0.0:
        raise ValueError("alpha = 0 is the limit reverse_kl (KL(pi || q)); use divergence 'reverse_kl'")
    if a == 1.0:
        raise ValueError("alpha = 1 is the limit forward_kl (KL(q || pi)); use divergence 'forward_kl'")
    denom = a * (a - 1.0)

    def weighted(logp: Tensor, logq: Tensor) -> Tensor:
        positive = (logp > -math.inf) & (logq > -math.inf)
        zero = torch.zeros_like(logp)
        mixed_log = (1 - a) * torch.where(positive, logp, zero) + a * torch.where(positive, logq, zero)
        both = torch.where(positive, mixed_log.exp(), zero)  # pi^(1-a) q^a; both sides finite, no NaN in backward
        if a < 0:  # q = 0 with pi > 0 makes q^a infinite
            both = torch.where((logq == -math.inf) & (logp > -math.inf), torch.full_like(logp, math.inf), both)
        if a > 1:  # pi = 0 with q > 0 makes pi^(1-a) infinite
            both = torch.where((logp == -math.inf) & (logq > -math.inf), torch.full_like(logp, math.inf), both)
        return (both - a * logq.exp() - (1 - a) * logp.exp()) / denom

    return Divergence(
        name="alpha",
        direction=f"Amari alpha-divergence, alpha={a:g} (-> KL(pi || q) as alpha -> 0, KL(q || pi) as alpha -> 1)",
        f=lambda l: (torch.expm1(a * l) - a * torch.expm1(l)) / denom,
        u_fprime=lambda l: (torch.expm1(a * l) - torch.expm1(l)) / (a - 1.0),
        weighted=weighted,
        growth=max(abs(a), 1.0),
        params=(("alpha", a),),
    )


def _jeffreys() -> Divergence:
    # f(u) = (u - 1) log u; u f'(u) = u l + u - 1; pi f(q/pi) = (q - pi)(log q - log pi).
    return Divergence(
        name="jeffreys",
        direction="KL(pi || q) + KL(q || pi)",
        f=lambda l: torch.expm1(l) * l,
        u_fprime=lambda l: l.exp() * l + torch.expm1(l),
        weighted=lambda logp, logq: _x_log_x_over_y(logq, logp) + _x_log_x_over_y(logp, logq),
    )


_REGISTRY: dict[str, Callable[..., Divergence]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "jsd": _jsd,
    "total_variation": _total_variation,
    "hellinger": _hellinger,
    "pearson_chi2": _pearson_chi2,
    "neyman_chi2": _neyman_chi2,
    "alpha": _alpha,
    "jeffreys": _jeffreys,
}


def divergence_names() -> list[str]:
    """Registered names, built-ins first."""
    return list(_REGISTRY)


def get_divergence(name: str | Divergence, **params: float) -> Divergence:
    """Look up a divergence by registry name (``alpha`` takes ``alpha=...``).

    A ``Divergence`` object is returned as is. Unknown names raise ValueError listing the valid ones.
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError(f"parameters {sorted(params)} given together with a Divergence object")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid divergences: {', '.join(_REGISTRY)}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as err:
        raise ValueError(f"divergence {name!r} does not take parameters {sorted(params)}: {err}") from None


GROWTH_PROBE = (20.0, 40.0)  # |l| between which the growth of a custom f is measured


def measured_growth(f: Callable[[Tensor], Tensor], u_fprime: Callable[[Tensor], Tensor]) -> float:
    """The k with |f|, |u f'| ~ exp(k |l|): the slope of log(1 + |f| + |u f'|) between |l| = 20 and 40
    on the steeper side, at least 1 (f of u = exp(l) needs exp(l) finite), so that a custom divergence
    saturates like the built-ins (k = 2 for f(u) = (u - 1)^2, as for ``pearson_chi2``)."""
    near, far = GROWTH_PROBE
    log_ratio = torch.tensor([near, -near, far, -far], dtype=torch.float64)
    size = torch.log1p(f(log_ratio).abs() + u_fprime(log_ratio).abs())
    if not torch.isfinite(size).all():
        raise ValueError(
            f"f(u) or u f'(u) is not finite at u = exp(+-{far:g}): it grows faster than exp({709 / far:.0f} |log u|) "
            "or is undefined there; pass growth=k with |f(u)| <= C exp(k |log u|)"
        )
    slope = ((size[2:] - size[:2]) / (far - near)).max().item()
    return max(1.0, round(slope, 6))


def divergence_from_f(
    name: str, f_of_u: Callable[[Tensor], Tensor], *, direction: str = "custom", growth: float | None = None
) -> Divergence:
    """A divergence from f(u) alone (f convex, f(1) = 0); u f'(u) = d f(exp(l)) / dl by autograd.

    ``f_of_u`` must be written with torch operations. ``growth`` is the k with |f(u)| <= C exp(k|l|),
    measured from f when not given (``measured_growth``).
    """

    def f(l: Tensor) -> Tensor:
        return f_of_u(l.exp())

    def u_fprime(l: Tensor) -> Tensor:
        with torch.enable_grad():
            l_leaf = l.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(f(l_leaf).sum(), l_leaf, create_graph=l.requires_grad)
        return grad

    if growth is None:
        growth = measured_growth(f, u_fprime)
    return Divergence(name=name, direction=direction, f=f, u_fprime=u_fprime, growth=growth)


def register_divergence(
    name: str,
    f_of_u: Callable[[Tensor], Tensor] | None = None,
    *,
    factory: Callable[..., Divergence] | None = None,
    direction: str = "custom",
    growth: float | None = None,
    overwrite: bool = False,
) -> None:
    """Register a divergence by name: from f(u) alone, or a ``factory(**params) -> Divergence``."""
    if (f_of_u is None) == (factory is None):
        raise ValueError("register_divergence needs exactly one of f_of_u or factory")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"divergence {name!r} is already registered; pass overwrite=True to replace it")
    if factory is None:
        divergence = divergence_from_f(name, f_of_u, direction=direction, growth=growth)  # type: ignore[arg-type]
        factory = lambda: divergence  # noqa: E731
    _REGISTRY[name] = factory


def unregister_divergence(name: str) -> None:
    _REGISTRY.pop(name, None)
