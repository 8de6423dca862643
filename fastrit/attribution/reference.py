"""The slow, obvious attribution loop: the oracle that ``fastrit.attribute`` is tested against.

Knowledge-neurons style: for each example, each layer and each batch of integration steps, one
full forward of the whole scored sequence through the model's own ``forward`` (logits included),
with a hook that replaces the site at the scaled positions by ``alpha_k * a``, then one backward to
that replacement. ``F(a)`` and ``F(0)`` come from two more full forwards per layer. Nothing is
cached or reused, and nothing of :mod:`.sweep` or the additive-MLP shortcut is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchSpec, ModelArch
from .engine import model_session
from .inputs import ScoredExample, check_optional_count, objective_from_logits, prepare_call
from .result import NeuronAttribution

__all__ = ["attribute_reference"]


def _hook_site(arch: ModelArch, layer: int, edit: Callable[[torch.Tensor], torch.Tensor | None]):
    """Hook layer ``layer``'s site (the input of its ``mlp_out``, or the output of its ``site_out``) with ``edit``,
    which returns the replacement or None to keep it; returns the handle."""
    if arch.site_out is None:

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            out = edit(args[0])
            return None if out is None else (out, *args[1:])

        return arch.mlp_out[layer].register_forward_pre_hook(pre_hook)
    return arch.site_out[layer].register_forward_hook(lambda module, args, output: edit(output))


def _objective_with_site(
    arch: ModelArch, layer: int, example: ScoredExample, objective: str, site_at_positions: torch.Tensor
) -> torch.Tensor:
    """``[R]`` objective of the full model, the site at the scaled positions set to ``site_at_positions [R, P, I]``."""
    rows = site_at_positions.shape[0]

    def replace(site: torch.Tensor) -> torch.Tensor:
        site = site.clone()
        site[:, example.positions] = site_at_positions.to(site.dtype)
        return site

    handle = _hook_site(arch, layer, replace)
    try:
        logits = arch.model(input_ids=example.ids[None].expand(rows, -1), use_cache=False).logits
    finally:
        handle.remove()
    return objective_from_logits(logits[:, example.answer_positions], example.answer, objective)


def _clean_site(arch: ModelArch, layer: int, example: ScoredExample) -> torch.Tensor:
    captured = {}

    def keep(site: torch.Tensor) -> None:
        captured["site"] = site[0, example.positions].detach()

    handle = _hook_site(arch, layer, keep)
    try:
        with torch.no_grad():
            arch.model(input_ids=example.ids[None], use_cache=False)
    finally:
        handle.remove()
    return captured["site"]


def attribute_reference(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    target_ids: torch.Tensor,
    objective: str = "logprob",
    positions: str = "last",
    steps: int = 20,
    method: str = "riemann_right",
    layers: Sequence[int] | None = None,
    steps_per_batch: int | None = None,
    progress: bool = False,
    spec: ArchSpec | None = None,
) -> NeuronAttribution:
    """Same contract and result as :func:`fastrit.attribute`, computed the slow way.

    ``steps_per_batch`` integration points share one forward/backward (default: all ``steps``);
    the knowledge-neurons package batches them the same way.
    """
    if isinstance(steps, str):
        raise ValueError(f"steps: the reference loop takes a number of integration points, got {steps!r}")
    call = prepare_call(model, input_ids, attention_mask, target_ids, objective, positions, steps, method, layers, spec)
    check_optional_count("steps_per_batch", steps_per_batch)
    arch, examples, layer_list, alphas, weights = call.arch, call.examples, call.layers, call.alphas, call.weights
    per_batch = steps_per_batch or steps

    scores = torch.zeros(len(examples), len(layer_list), arch.intermediate_size)
    delta = torch.zeros(len(examples), len(layer_list))
    bar = tqdm(total=len(examples) * len(layer_list), desc="reference IG", disable=not progress)
    try:
        with model_session(model):
            for b, example in enumerate(examples):
                for j, layer in enumerate(layer_list):
                    site = _clean_site(arch, layer, example)  # [P, I]
                    total_grad = torch.zeros(site.shape, dtype=torch.float32, device=site.device)
                    for start in range(0, steps, per_batch):
                        batch_alphas = torch.tensor(alphas[start : start + per_batch], device=site.device)
                        batch_weights = torch.tensor(weights[start : start + per_batch], device=site.device)
                        scaled = (batch_alphas.view(-1, 1, 1) * site.float()).to(site.dtype).requires_grad_(True)
                        with torch.enable_grad():
                            values = _objective_with_site(arch, layer, example, objective, scaled)
                            (grad,) = torch.autograd.grad(values.sum(), scaled)
                        total_grad += torch.einsum("k,kpi->pi", batch_weights, grad.float())
                    layer_scores = (site.float() * total_grad).sum(dim=0)
                    with torch.no_grad():
                        ends = torch.stack([site, torch.zeros_like(site)])
                        f_clean, f_zero = _objective_with_site(arch, layer, example, objective, ends).tolist()
                    scores[b, j] = layer_scores.cpu()
                    delta[b, j] = layer_scores.sum().item() - (f_clean - f_zero)
                    bar.update(1)
    finally:
        bar.close()
    settings = {**call.settings, "reference": True}
    steps_used = torch.full(delta.shape, steps, dtype=torch.int32)
    return NeuronAttribution(scores=scores, delta=delta, layers=layer_list, settings=settings, steps_used=steps_used)
