"""``fastrit.attribute``: exact neuron Integrated Gradients at the cost of a few forward passes.

For each example:

1. One clean forward (no grad) gives every layer's site activation ``a`` at the scaled positions,
   every layer's output (or input) at positions ``>= p0`` and the key/value cache of the prefix.
2. For each layer ``l`` the IG rows (one per step, plus one at alpha = 0 for ``F(0)``) start at
   layer ``l``, not at the embeddings, and recompute only positions ``>= p0`` against the cached
   prefix (see :mod:`.sweep`).
   - Additive-MLP families: the output projection is linear, so layer ``l``'s output with the
     site at ``alpha * a`` is the clean output plus ``(alpha - 1) * W a``. The rows start at layer
     ``l + 1`` with that, and the site gradient is ``W^T`` times the gradient of layer ``l``'s output:
     ``scores = a * ((sum_k w_k g_k) @ W)``, summed over positions, without ever forming the
     per-step ``[m, P, I]`` gradients.
   - Other families (Gemma2/3): the rows start at layer ``l`` with the site replaced by
     ``alpha * a`` and the gradient is taken at the site.
3. Gradients are taken with respect to the injected tensor only; no parameter gradient is formed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchSpec, ModelArch, linear_weight, resolve_arch
from .inputs import ScoredExample, check_settings, objective_from_logits, scored_examples
from .integration import integration_points
from .result import NeuronAttribution
from .sweep import RowLayout, run_tail

__all__ = ["attribute", "resolve_layers", "model_session", "check_sequence_fits"]

# Saved activations per token and layer for the backward, in elements: a rough upper bound used to
# size the default batch (attention ~6 D, MLP ~4 I, norms and residuals ~6 D).
_ACT_ELEMS_PER_D = 12
_ACT_ELEMS_PER_I = 4
_DEFAULT_ACTIVATION_BUDGET = 2 * 1024**3  # bytes


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Normalise ``layers`` (None = all; negative indices count from the top) to a list of ints."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (int, torch.Tensor)) or not isinstance(layers, Sequence) and not isinstance(layers, range):
        raise TypeError(f"layers: expected a list of layer indices or None, got {type(layers).__name__}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers: expected int layer indices, got {type(layer).__name__}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layers: index {layer} is out of range for a model with {num_layers} layers")
        out.append(layer % num_layers)
    if not out:
        raise ValueError("layers: expected at least one layer index, got an empty list")
    if len(set(out)) != len(out):
        raise ValueError(f"layers: duplicate layer indices in {list(layers)}")
    return out


def check_sequence_fits(model: nn.Module, length: int) -> None:
    """Raise if a scored sequence of ``length`` tokens is beyond what the 4D-mask sweep reproduces exactly."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = isinstance(window, int) and ("sliding_attention" in layer_types or not layer_types)
    if sliding and getattr(config, "use_sliding_window", True) and length >= window:
        raise ValueError(
            f"input_ids/target_ids: a scored sequence of {length} tokens reaches the model's sliding attention "
            f"window ({window}); attribution over sliding-window attention is not supported yet"
        )


@contextmanager
def model_session(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration of the block; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _CleanPass:
    """What one clean forward of a scored sequence yields (all detached).

    Attributes:
        site: per attributed layer, ``[P, I]`` site activations at the scaled positions.
        entry_hidden: per attributed layer, ``[n, D]`` hidden states at positions ``>= p0`` where the
            IG rows enter: layer ``l``'s output (additive MLP) or its input (otherwise).
        prefix_kv: per model layer, keys/values of positions ``< p0``; None when ``p0 == 0``.
        objective: ``F(a)``, float.
    """

    def __init__(self, arch: ModelArch, example: ScoredExample, layers: list[int], objective: str) -> None:
        p0, positions = example.first_position, example.positions
        self.site: dict[int, torch.Tensor] = {}
        self.entry_hidden: dict[int, torch.Tensor] = {}
        handles = []

        def capture_site(layer: int):
            def hook(module: nn.Module, args: tuple) -> None:
                self.site[layer] = args[0][0, positions].detach()

            return hook

        def capture_output(layer: int):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                self.entry_hidden[layer] = hidden[0, p0:].detach()

            return hook

        def capture_input(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.entry_hidden[layer] = hidden[0, p0:].detach()

            return hook

        try:
            for layer in layers:
                handles.append(arch.mlp_out[layer].register_forward_pre_hook(capture_site(layer)))
                if arch.spec.additive_mlp:
                    handles.append(arch.layers[layer].register_forward_hook(capture_output(layer)))
                else:
                    handles.append(arch.layers[layer].register_forward_pre_hook(capture_input(layer), with_kwargs=True))
            with torch.no_grad():
                out = arch.base(input_ids=example.ids[None], use_cache=p0 > 0)
                final = out.last_hidden_state[0, example.answer_positions]
                self.objective = float(objective_from_logits(arch.logits(final)[None], example.answer, objective)[0])
        finally:
            for handle in handles:
                handle.remove()
        self.prefix_kv = None
        if p0 > 0:
            cache = out.past_key_values
            self.prefix_kv = [(lay.keys[:, :, :p0], lay.values[:, :, :p0]) for lay in cache.layers]


def _default_batch_size(arch: ModelArch, n_tokens: int, rows_per_layer: int, elem_bytes: int) -> int:
    hidden = arch.model.config.hidden_size
    per_token = arch.num_layers * (_ACT_ELEMS_PER_D * hidden + _ACT_ELEMS_PER_I * arch.intermediate_size)
    per_row = max(1, n_tokens * per_token * elem_bytes)
    return max(1, min(rows_per_layer, _DEFAULT_ACTIVATION_BUDGET // per_row))


def _layer_scores(
    arch: ModelArch,
    example: ScoredExample,
    clean: _CleanPass,
    layer: int,
    alphas: list[float],
    weights: list[float],
    objective: str,
    batch_size: int,
) -> tuple[torch.Tensor, float]:
    """IG scores ``[I]`` (float32) of one layer and ``F(0)`` for one example."""
    p0, n = example.first_position, example.length - example.first_position
    local = example.positions - p0  # scaled positions within the recomputed window
    answer_local = example.answer_positions - p0
    site = clean.site[layer].float()  # [P, I]
    base_hidden = clean.entry_hidden[layer]  # [n, D]
    dtype = base_hidden.dtype
    additive = arch.spec.additive_mlp
    if additive:
        weight = linear_weight(arch.mlp_out[layer]).to(site.device)  # [D, I]
        site_out = site @ weight.t()  # [P, D]: W a
        entry = layer + 1
    else:
        entry = layer
    row_alphas = list(alphas) + [0.0]  # last row: the zero baseline, for F(0)
    row_weights = list(weights) + [0.0]
    accum = None  # sum_k w_k * gradient at the scaled positions: [P, D] (additive) or [P, I]
    baseline_value = None
    for start in range(0, len(row_alphas), batch_size):
        chunk_alphas = row_alphas[start : start + batch_size]
        layout = RowLayout.for_prefix(len(chunk_alphas), n, p0)
        # filler slots repeat the clean point (alpha = 1) and are dropped after the forward
        slot_alphas = torch.tensor(chunk_alphas + [1.0] * (layout.slots - layout.rows), device=site.device)
        with torch.enable_grad():
            if additive:
                hidden = base_hidden.float().expand(layout.slots, -1, -1).clone()
                hidden[:, local] += (slot_alphas - 1.0).view(-1, 1, 1) * site_out
                leaf = hidden.to(dtype).requires_grad_(True)
                final = run_tail(arch, entry, leaf, layout, p0, clean.prefix_kv)
            else:
                leaf = (slot_alphas.view(-1, 1, 1) * site).to(dtype).requires_grad_(True)  # [slots, P, I]
                hidden = base_hidden.expand(layout.slots, -1, -1)
                with _site_replaced(arch.mlp_out[layer], leaf, layout, local):
                    final = run_tail(arch, entry, hidden, layout, p0, clean.prefix_kv)
            values = objective_from_logits(arch.logits(final[:, answer_local]), example.answer, objective)
            (grad,) = torch.autograd.grad(values.sum(), leaf)
        grad = grad[: layout.rows].float()
        if additive:
            grad = grad[:, local]
        chunk_weights = torch.tensor(row_weights[start : start + batch_size], device=site.device)
        contribution = torch.einsum("r,rpd->pd", chunk_weights, grad)
        accum = contribution if accum is None else accum + contribution
        if start + batch_size >= len(row_alphas):
            baseline_value = float(values[-1].detach())
    site_grad = accum @ weight if additive else accum  # [P, I]
    return (site * site_grad).sum(dim=0), baseline_value


@contextmanager
def _site_replaced(module: nn.Module, value: torch.Tensor, layout: RowLayout, local: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module``'s input (the site, packed ``[batch, g*n, I]``) at ``local`` is ``value``."""

    def hook(mod: nn.Module, args: tuple) -> tuple:
        site = args[0]
        per_row = site.reshape(layout.slots, layout.n, site.shape[-1])
        replaced = per_row.index_copy(1, local, value.to(site.dtype))
        return (replaced.reshape(site.shape), *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def attribute(
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
    batch_size: int | None = None,
    progress: bool = False,
    spec: ArchSpec | None = None,
) -> NeuronAttribution:
    """Integrated Gradients of every MLP neuron of every chosen layer, zero baseline.

    Args:
        model: a transformers causal LM (fp32, bf16, fp16, or 4-bit bitsandbytes). Never modified:
            nothing stays hooked and its training flag is restored, also when an error is raised.
        input_ids: ``[B, T]`` prompts, padded on the left or the right.
        attention_mask: ``[B, T]``, 1 for real tokens; None = all real.
        target_ids: ``[B, K]`` answer tokens, padded with -100.
        objective: ``"logprob"`` = sum_j log p(answer_j | prompt, answer_<j);
            ``"prob"`` = p(answer_0 | prompt).
        positions: ``"last"`` (last prompt token), ``"answer"`` (positions that predict answer
            tokens) or ``"all"`` (every position of prompt + answer[:-1]).
        steps: number of integration points.
        method: ``riemann_left``, ``riemann_right``, ``riemann_middle``, ``riemann_trapezoid`` or
            ``gausslegendre`` (Captum's points and weights).
        layers: layer indices (negative count from the top); None = all layers.
        batch_size: the most IG rows (each of ``n`` recomputed tokens) in any internal forward;
            default: as many as fit a 2 GiB activation budget, at most ``steps + 1``.
        progress: show a tqdm bar over examples x layers.
        spec: where the layers and MLP output projections are, for a family fastrit does not know.

    Returns:
        :class:`NeuronAttribution` with ``scores [B, len(layers), I]`` and ``delta [B, len(layers)]``
        (float32, on the CPU).
    """
    arch = resolve_arch(model, spec)
    check_settings(objective, positions, method, steps, batch_size)
    layer_list = resolve_layers(layers, arch.num_layers)
    device = arch.base.get_input_embeddings().weight.device
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.to(device)
    examples = scored_examples(input_ids, attention_mask, target_ids, positions, arch.max_positions)
    for example in examples:
        check_sequence_fits(model, example.length)
    alphas, weights = integration_points(method, steps)

    scores = torch.zeros(len(examples), len(layer_list), arch.intermediate_size)
    delta = torch.zeros(len(examples), len(layer_list))
    bar = tqdm(total=len(examples) * len(layer_list), desc="fastrit.attribute", disable=not progress)
    try:
        with model_session(model):
            for b, example in enumerate(examples):
                clean = _CleanPass(arch, example, layer_list, objective)
                n = example.length - example.first_position
                elem_bytes = clean.entry_hidden[layer_list[0]].element_size()
                rows = batch_size or _default_batch_size(arch, n, steps + 1, elem_bytes)
                for j, layer in enumerate(layer_list):
                    layer_scores, baseline = _layer_scores(
                        arch, example, clean, layer, alphas, weights, objective, rows
                    )
                    scores[b, j] = layer_scores.cpu()
                    delta[b, j] = layer_scores.sum().item() - (clean.objective - baseline)
                    bar.update(1)
    finally:
        bar.close()
    settings = {
        "objective": objective,
        "positions": positions,
        "steps": steps,
        "method": method,
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
    }
    return NeuronAttribution(scores=scores, delta=delta, layers=layer_list, settings=settings)
