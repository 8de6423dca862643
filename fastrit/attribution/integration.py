"""Integration points (alpha_k) and weights (w_k) of the IG path integral, exactly Captum's.

IG with a zero baseline approximates  a * integral_0^1 dF/ds(alpha * a) d alpha  by
a * sum_k w_k dF/ds(alpha_k * a). The five rules and their values match
``captum.attr._utils.approximation_methods`` number for number (Riemann points come from a
float32 ``torch.linspace``, as Captum's do); they are written here so that attribution does
not depend on Captum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import _args

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")

__all__ = ["AUTO_STEPS", "DEFAULT_DELTA_TOL", "METHODS", "IntegrationRule", "integration_points", "integration_rule",
           "min_steps"]

#: ``steps="auto"``: the Gauss-Legendre sizes tried per layer, in order; a layer stops at the first whose
#: completeness error is within tolerance, or at the last.
AUTO_STEPS = (4, 8, 16, 32, 64)
#: ``steps="auto"``: the default tolerance, as a fraction of ``|F(a) - F(0)|``.
DEFAULT_DELTA_TOL = 0.005


def min_steps(method: str) -> int:
    """The fewest steps a rule accepts (the trapezoid needs both end points)."""
    return 2 if method == "riemann_trapezoid" else 1


def integration_points(method: str, steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)``, each a list of ``steps`` floats, for one of :data:`METHODS`.

    Raises:
        ValueError: unknown ``method`` or ``steps`` below :func:`min_steps`.
    """
    _args.one_of("method", method, METHODS, what=f"one of {', '.join(METHODS)}")
    _args.integer("steps", steps, what="an int or 'auto'", type_error=True)
    if steps < min_steps(method):
        raise ValueError(f"steps: {method} needs at least {min_steps(method)} steps, got {steps}")
    n = steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1.0 + nodes)).tolist(), (0.5 * weights).tolist()
    weights = [1.0 / n] * n
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:
        alphas = torch.linspace(1 / n, 1, n)
    return alphas.tolist(), weights


@dataclass(frozen=True)
class IntegrationRule:
    """How the IG integral is approximated: a fixed rule (``delta_tol`` None, one round of ``alphas``/``weights``),
    or ``steps="auto"``: Gauss-Legendre rounds of :data:`AUTO_STEPS` points, each layer stopping at the first round
    whose ``|delta| <= delta_tol * |F(a) - F(0)|``.

    Attributes:
        steps: the number of points, or ``"auto"``.
        method: one of :data:`METHODS` (``"gausslegendre"`` for ``"auto"``).
        delta_tol: the relative completeness tolerance of ``"auto"``; None for a fixed rule.
    """

    steps: int | str
    method: str
    delta_tol: float | None = None

    @property
    def adaptive(self) -> bool:
        return self.delta_tol is not None

    def rounds(self) -> list[tuple[list[float], list[float]]]:
        """``(alphas, weights)`` of each round: one for a fixed rule, one per :data:`AUTO_STEPS` size for ``"auto"``."""
        if not self.adaptive:
            return [integration_points(self.method, self.steps)]
        return [integration_points("gausslegendre", size) for size in AUTO_STEPS]


def integration_rule(steps: int | str, method: str | None, delta_tol: float | None) -> IntegrationRule:
    """Check and resolve ``attribute``'s ``steps``, ``method`` and ``delta_tol`` (ValueError/TypeError naming the
    argument). ``method=None`` is ``"riemann_right"`` for an integer ``steps`` and ``"gausslegendre"`` for
    ``"auto"``; ``delta_tol=None`` is :data:`DEFAULT_DELTA_TOL` with ``"auto"``."""
    if isinstance(steps, str):
        if steps != "auto":
            raise ValueError(f"steps: expected an int or 'auto', got {steps!r}")
        if method not in (None, "gausslegendre"):
            raise ValueError(f"method: steps='auto' grows Gauss-Legendre rules; got method={method!r}")
        if delta_tol is None:
            delta_tol = DEFAULT_DELTA_TOL
        _args.number("delta_tol", delta_tol, low=0, high=1, high_open=True)
        return IntegrationRule("auto", "gausslegendre", float(delta_tol))
    if delta_tol is not None:
        raise ValueError(f"delta_tol: only used with steps='auto', got steps={steps!r}")
    method = "riemann_right" if method is None else method
    integration_points(method, steps)  # raises for an unknown method or too few steps
    return IntegrationRule(steps, method)
