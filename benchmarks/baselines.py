"""The ways attribution is done without fastrit, for the benchmarks and the tests.

- the knowledge-neurons-style loop: :func:`fastrit.attribute_reference` (full forward + backward of
  the whole prompt per layer and step batch; knowledge-neurons batches 10 steps per forward);
- Captum: ``IntegratedGradients`` on the neuron site of one layer at a time, zero baseline, with a
  forward function that runs the whole model on the scaled site.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrit.arch import ModelArch
from fastrit.attribution.inputs import ScoredExample, objective_from_logits

__all__ = ["captum_site_ig", "KN_STEPS_PER_BATCH"]

#: steps per forward in the knowledge-neurons package (its ``batch_size`` default)
KN_STEPS_PER_BATCH = 10


def _clean_site(model: nn.Module, mlp_out: nn.Module, example: ScoredExample) -> torch.Tensor:
    captured = {}

    def capture(module: nn.Module, args: tuple) -> None:
        captured["site"] = args[0].detach()

    handle = mlp_out.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            model(input_ids=example.ids[None])
    finally:
        handle.remove()
    return captured["site"]


def captum_site_ig(
    model: nn.Module,
    arch: ModelArch,
    example: ScoredExample,
    layer: int,
    objective: str,
    method: str,
    steps: int,
    with_delta: bool = True,
) -> tuple[torch.Tensor, float | None]:
    """Captum IG over every position of one layer's site: ``([I] scores summed over positions, delta)``."""
    from captum.attr import IntegratedGradients

    mlp_out = arch.mlp_out[layer]
    site = _clean_site(model, mlp_out, example)  # [1, S, I]

    def forward(scaled: torch.Tensor) -> torch.Tensor:  # [R, S, I] -> [R]
        handle = mlp_out.register_forward_pre_hook(lambda module, args: (scaled,))
        try:
            logits = model(input_ids=example.ids[None].expand(scaled.shape[0], -1)).logits
        finally:
            handle.remove()
        return objective_from_logits(logits[:, example.answer_positions], example.answer, objective)

    ig = IntegratedGradients(forward)
    if with_delta:
        attributions, delta = ig.attribute(
            site, baselines=0.0, n_steps=steps, method=method, return_convergence_delta=True
        )
        return attributions[0].sum(0), float(delta[0])
    attributions = ig.attribute(site, baselines=0.0, n_steps=steps, method=method)
    return attributions[0].sum(0), None
