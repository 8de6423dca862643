"""Integration points (alpha_k) and weights (w_k) of the IG path integral, exactly Captum's.

IG with a zero baseline approximates  a * integral_0^1 dF/ds(alpha * a) d alpha  by
a * sum_k w_k dF/ds(alpha_k * a). The five rules and their values match
``captum.attr._utils.approximation_methods`` number for number (Riemann points come from a
float32 ``torch.linspace``, as Captum's do); they are written here so that attribution does
not depend on Captum.
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")

__all__ = ["METHODS", "integration_points", "min_steps"]


def min_steps(method: str) -> int:
    """The fewest steps a rule accepts (the trapezoid needs both end points)."""
    return 2 if method == "riemann_trapezoid" else 1


def integration_points(method: str, steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)``, each a list of ``steps`` floats, for one of :data:`METHODS`.

    Raises:
        ValueError: unknown ``method`` or ``steps`` below :func:`min_steps`.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
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
