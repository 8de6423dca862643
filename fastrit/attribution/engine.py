"""``fastrit.attribute``: exact neuron Integrated Gradients at the cost of a few forward passes.

For each example:

1. One clean forward (no grad) gives every layer's site activation ``a`` at the scaled positions,
   every layer's output (or input) at positions ``>= p0`` and the key/value cache of the prefix.
2. The IG rows (per layer, one per step plus one at alpha = 0 for ``F(0)``) of all layers travel
   up the network together, in chunks of at most ``batch_size`` rows: a row of layer ``l`` enters
   at layer ``l`` (or ``l + 1``), not at the embeddings, and only positions ``>= p0`` are recomputed,
   against the cached prefix (see :mod:`.sweep`). Each chunk is one forward and one backward.
   - Additive-MLP families: the output projection is linear, so layer ``l``'s output with the
     site at ``alpha * a`` is the clean output plus ``(alpha - 1) * W a``. The rows start at layer
     ``l + 1`` with that, and the site gradient is ``W^T`` times the gradient of layer ``l``'s output:
     ``scores = a * ((sum_k w_k g_k) @ W)``, summed over positions, without ever forming the
     per-step ``[m, P, I]`` gradients.
   - Other families (Gemma2/3), other sites (:attr:`ArchSpec.site`) and encoders: the rows start at
     layer ``l`` with the site replaced by ``alpha * a`` and the gradient is taken at the site.
     In an encoder (:attr:`ArchSpec.bidirectional`) every position is recomputed from layer ``l`` up.
3. Gradients are taken with respect to the injected tensor only; no parameter gradient is formed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..arch import ArchSpec, ModelArch, linear_weight
from .inputs import (
    AttributionCall,
    ScoredExample,
    check_optional_count,
    check_sequence_fits,
    objective_from_logits,
    prepare_call,
)
from .result import NeuronAttribution
from .sweep import RowLayout, run_tail

__all__ = ["attribute", "attribute_call", "model_session"]

# Saved activations per token and layer for the backward, in elements: a rough upper bound used to
# size the default batch (attention ~6 D, MLP ~4 I, norms and residuals ~6 D).
_ACT_ELEMS_PER_D = 12
_ACT_ELEMS_PER_I = 4
_DEFAULT_ACTIVATION_BUDGET = 2 * 1024**3  # bytes
# Rows of several layers share a chunk (run in segments, see sweep.run_tail) only while one layer's rows recompute
# fewer tokens than this: sharing saves per-forward overhead on short rows; on long rows it saves nothing and costs
# time (larger batches; in Gemma-style families rows joining the carried ones share their entry layer's backward).
_MIX_LAYERS_BELOW_TOKENS = 512
# attention implementations that apply an arbitrary additive 4D mask, as the sweep needs
_MASKABLE_ATTENTION = ("eager", "sdpa")


@contextmanager
def model_session(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter requiring grad, and an attention implementation that takes 4D masks, for the duration
    of the block.

    The model's training flag, its parameters' requires_grad and its attention implementation are restored
    afterwards, also on error.
    Kernels such as flash-attention and flex-attention ignore custom 4D masks; such models run PyTorch's
    scaled_dot_product_attention here (transformers' "sdpa", fused kernels on a GPU), or eager attention for a
    model class without sdpa support.
    """
    was_training = model.training
    config = model.config
    attention = getattr(config, "_attn_implementation", None)
    switch = isinstance(attention, str) and attention not in _MASKABLE_ATTENTION
    # gradients are taken with respect to injected tensors only: parameters that require grad would make autograd
    # save every projection's input for weight gradients never formed (a quarter to a third of the saved activations)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for param in trainable:
            param.requires_grad_(False)
        if switch:
            config._attn_implementation = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
        yield
    finally:
        if switch:
            config._attn_implementation = attention
        for param in trainable:
            param.requires_grad_(True)
        model.train(was_training)


class _CleanPass:
    """What one clean forward of a scored sequence yields (all detached).

    Attributes:
        site: per attributed layer, ``[P, I]`` site activations at the scaled positions.
        entry_hidden: per attributed layer, ``[n, D]`` hidden states at positions ``>= p0`` where the
            IG rows enter: layer ``l``'s output (additive MLP) or its input (otherwise).
        prefix_kv: per model layer, keys/values of positions ``< p0``; None when ``p0 == 0``.
        objective: ``F(a)``, float.
        dtype: the dtype of the model's hidden states.
    """

    def __init__(self, arch: ModelArch, example: ScoredExample, layers: list[int], objective: str) -> None:
        p0, positions = example.first_position, example.positions
        self.site: dict[int, torch.Tensor] = {}
        self.entry_hidden: dict[int, torch.Tensor] = {}
        handles = []

        def capture_site(layer: int):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
                site = args[0] if output is None else output
                self.site[layer] = site[0, positions].detach()

            return hook

        def capture_output(layer: int):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                self.entry_hidden[layer] = hidden[0, p0:].detach().clone()  # not a view keeping all [S, D]

            return hook

        def capture_input(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.entry_hidden[layer] = hidden[0, p0:].detach().clone()

            return hook

        try:
            for layer in layers:
                if arch.site_out is None:
                    handles.append(arch.mlp_out[layer].register_forward_pre_hook(capture_site(layer)))
                else:
                    handles.append(arch.site_out[layer].register_forward_hook(capture_site(layer)))
                if arch.spec.attributes_linearly:
                    handles.append(arch.layers[layer].register_forward_hook(capture_output(layer)))
                else:
                    handles.append(arch.layers[layer].register_forward_pre_hook(capture_input(layer), with_kwargs=True))
            with torch.no_grad():
                out = arch.base(input_ids=example.ids[None], use_cache=p0 > 0)
                self.dtype = out.last_hidden_state.dtype
                final = out.last_hidden_state[0, example.answer_positions]
                self.objective = float(objective_from_logits(arch.logits(final)[None], example.answer, objective)[0])
        finally:
            for handle in handles:
                handle.remove()
        self.prefix_kv = None
        if p0 > 0:
            cache = out.cache if "cache" in out else out.past_key_values
            self.prefix_kv = [(lay.keys[:, :, :p0], lay.values[:, :, :p0]) for lay in cache.layers]


def _default_batch_size(arch: ModelArch, n_tokens: int, total_rows: int, elem_bytes: int) -> int:
    hidden = arch.model.config.hidden_size
    per_token = arch.num_layers * (_ACT_ELEMS_PER_D * hidden + _ACT_ELEMS_PER_I * arch.intermediate_size)
    per_row = max(1, n_tokens * per_token * elem_bytes)
    return max(1, min(total_rows, _DEFAULT_ACTIVATION_BUDGET // per_row))


@dataclass(frozen=True)
class _Row:
    """One IG row: layer ``layer`` with its site at ``alpha * a``, weighted ``weight`` in the sum.

    The baseline row (alpha = 0, weight 0) gives ``F(0)`` for delta.
    """

    layer: int
    alpha: float
    weight: float
    baseline: bool = False


class _LayerTerms:
    """One layer's part of an example: how its rows enter, and its running IG scores.

    Additive-MLP families: rows enter layer ``l + 1`` with layer ``l``'s output at ``alpha``,
    ``y_clean + (alpha - 1) W a`` (:func:`fastrit.ops.ig_interpolate` between ``y_clean - W a`` and
    ``W a``), and scores come from the gradients of that output via
    :func:`fastrit.ops.ig_accumulate_linear`. Otherwise rows enter layer ``l`` with the site at
    ``alpha * a`` and scores come from the site gradients via :func:`fastrit.ops.ig_accumulate`.
    """

    def __init__(self, arch: ModelArch, clean: _CleanPass, layer: int, backend: str) -> None:
        self.site = clean.site[layer].float()  # [P, I]
        self.entry_hidden = clean.entry_hidden[layer]  # [n, D]
        self.backend = backend
        # additive-MLP families: the output projection, whose weight [D, I] is read when needed and never kept, so
        # that no tensor here grows with the number of layers beyond the sites (a float32 copy of every layer's
        # weight would be 7.5 GB for Llama-3-8B)
        self.projection: nn.Module | None = None
        if arch.spec.attributes_linearly:
            self.projection = arch.mlp_out[layer]
            weight = linear_weight(self.projection).to(self.site.device)  # float32, this layer only, freed below
            self.site_out = self.site @ weight.t()  # [P, D]: W a
            del weight
            self.entry = layer + 1
        else:
            self.entry = layer
        self.scores = torch.zeros(self.site.shape[1], device=self.site.device)  # [I] float32
        self.baseline: torch.Tensor | None = None  # F(0), a 0-dim tensor on the device

    def scaled(self, alphas: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The entry value of rows at ``alphas`` (float32): ``[c, n, D]`` hidden states, or ``[c, P, I]`` sites."""
        if self.projection is None:
            return ops.ig_interpolate(torch.zeros_like(self.site), self.site, alphas, backend=self.backend)
        hidden = self.entry_hidden.float().expand(len(alphas), -1, -1).clone()
        clean_at_scaled = hidden[0, local]  # [P, D]
        hidden[:, local] = ops.ig_interpolate(
            clean_at_scaled - self.site_out, self.site_out, alphas, backend=self.backend
        )
        return hidden

    def add(self, weights: torch.Tensor, grads: torch.Tensor) -> None:
        """Add rows' weighted gradients ``[c, P, D]`` (of the layer output) or ``[c, P, I]`` (of the site)."""
        if self.projection is None:
            self.scores += ops.ig_accumulate(self.site, grads, weights, backend=self.backend).sum(dim=0)
        else:
            # the weight in its own dtype (the op accumulates in float32); a 4-bit one dequantized for this call only
            weight = linear_weight(self.projection, dtype=None).to(self.site.device)
            self.scores += ops.ig_accumulate_linear(self.site, grads, weight, weights, backend=self.backend).sum(dim=0)


def _chunks(rows: list[_Row], size: int, mix_layers: bool) -> Iterator[slice]:
    """Consecutive runs of at most ``size`` rows, as slices of ``rows``; with ``mix_layers=False`` a run never spans
    two layers."""
    start = 0
    while start < len(rows):
        stop = start
        while stop < len(rows) and stop - start < size and (mix_layers or rows[stop].layer == rows[start].layer):
            stop += 1
        yield slice(start, stop)
        start = stop


def _run_chunk(
    arch: ModelArch,
    example: ScoredExample,
    clean: _CleanPass,
    terms: dict[int, _LayerTerms],
    rows: list[_Row],
    alphas: torch.Tensor,
    weights: torch.Tensor,
    objective: str,
) -> None:
    """Forward and backward of one chunk of IG rows; adds their gradients to ``terms``. ``alphas`` and ``weights``:
    the rows' ``[len(rows)]`` values on the device. On CUDA nothing here waits for the GPU: no host copy of a
    device value, and no host-to-device copy either (index tensors are made on the device)."""
    p0, n = example.first_position, example.length - example.first_position
    local = example.positions - p0  # scaled positions within the recomputed window
    device = local.device
    additive = arch.spec.attributes_linearly
    spans: dict[int, slice] = {}  # layer -> its rows in the chunk, consecutive (rows are in entry order)
    for slot, row in enumerate(rows):
        span = spans.get(row.layer)
        if span is not None and span.stop != slot:
            raise AssertionError("the rows of a layer are not consecutive in the chunk")
        spans[row.layer] = slice(slot if span is None else span.start, slot + 1)

    with torch.enable_grad():
        # every row's entry value (float32), in chunk order, as one leaf for the whole chunk
        scaled = torch.cat([terms[layer].scaled(alphas[span], local) for layer, span in spans.items()])
        leaf = scaled.to(clean.dtype).requires_grad_(True)

        def site_hooks(layout: RowLayout, entry: int) -> ExitStack:
            """Other families: the site of the rows entering at ``entry`` (a segment's last slots) is theirs."""
            stack = ExitStack()
            if not additive:
                span = spans[entry]
                slots = torch.arange(span.start, span.stop, device=device)
                stack.enter_context(_site_replaced(arch, entry, leaf[span], slots, layout, local))
            return stack

        entries = [
            (terms[layer].entry,
             leaf[span] if additive else terms[layer].entry_hidden.expand(span.stop - span.start, -1, -1))
            for layer, span in spans.items()
        ]
        final = run_tail(arch, n, p0, clean.prefix_kv, entries, pack=arch.spec.pack_rows,
                         causal=not arch.spec.bidirectional, within=site_hooks)
        answer_local = example.answer_positions - p0
        values = objective_from_logits(arch.logits(final[:, answer_local]), example.answer, objective)
        (grad,) = torch.autograd.grad(values.sum(), leaf)
    grad = grad.float()
    if additive:
        grad = grad[:, local]
    for layer, span in spans.items():
        terms[layer].add(weights[span], grad[span])
        for i in range(span.start, span.stop):
            if rows[i].baseline:
                terms[layer].baseline = values[i].detach()  # a 0-dim tensor, read once the example is done


@contextmanager
def _site_replaced(
    arch: ModelArch, layer: int, value: torch.Tensor, slots: torch.Tensor, layout: RowLayout, local: torch.Tensor
) -> Iterator[None]:
    """Within the block, layer ``layer``'s site (packed ``[batch, g*n, I]``: the input of its ``mlp_out``, or
    the output of its ``site_out``) of the rows in ``slots`` is ``value [k, P, I]`` at the positions ``local``."""

    def replaced(site: torch.Tensor) -> torch.Tensor:
        per_row = layout.unpack_all(site)
        chosen = per_row.index_select(0, slots).index_copy(1, local, value.to(per_row.dtype))
        return layout.pack(per_row.index_copy(0, slots, chosen))

    if arch.site_out is None:
        handle = arch.mlp_out[layer].register_forward_pre_hook(lambda mod, args: (replaced(args[0]), *args[1:]))
    else:
        handle = arch.site_out[layer].register_forward_hook(lambda mod, args, output: replaced(output))
    try:
        yield
    finally:
        handle.remove()


def _sweep(
    arch: ModelArch,
    example: ScoredExample,
    clean: _CleanPass,
    terms: dict[int, _LayerTerms],
    rows: list[_Row],
    objective: str,
    batch_size: int | None,
    bar: tqdm | None,
) -> None:
    """Run ``rows`` (in entry order) in chunks of at most ``batch_size``; ``bar`` advances by a layer at each
    baseline row."""
    n = example.length - example.first_position
    chunk = batch_size or _default_batch_size(arch, n, len(rows), clean.dtype.itemsize)
    device = example.positions.device
    row_alphas = torch.tensor([row.alpha for row in rows]).to(device)  # once per sweep, not per chunk
    row_weights = torch.tensor([row.weight for row in rows]).to(device)
    per_layer = max(sum(1 for row in rows if row.layer == layer) for layer in {row.layer for row in rows})
    for part in _chunks(rows, chunk, mix_layers=per_layer * n < _MIX_LAYERS_BELOW_TOKENS):
        _run_chunk(arch, example, clean, terms, rows[part], row_alphas[part], row_weights[part], objective)
        if bar is not None:
            bar.update(sum(1 for row in rows[part] if row.baseline))  # a layer's baseline row is its last


def _example_scores(
    arch: ModelArch,
    example: ScoredExample,
    layers: list[int],
    rounds: list[tuple[list[float], list[float]]],
    delta_tol: float | None,
    objective: str,
    batch_size: int | None,
    bar: tqdm,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([len(layers), I] scores, [len(layers)] delta, [len(layers)] steps used)`` of one example.

    ``rounds``: ``(alphas, weights)`` of each integration rule to try. With ``delta_tol`` None only the first is
    used; otherwise a layer moves on to the next round while ``|delta| > delta_tol * |F(a) - F(0)|``, its scores
    replaced by the next round's. What rounds share: the clean pass (sites, entry states, prefix KV cache), F(a)
    and F(0) (its baseline row runs in the first round only).
    """
    clean = _CleanPass(arch, example, layers, objective)
    terms = {layer: _LayerTerms(arch, clean, layer, backend) for layer in layers}
    # layers in entry order: the rows of a chunk then join the sweep from the bottom up (see run_tail)
    pending = sorted(layers, key=lambda layer: terms[layer].entry)
    steps_used = dict.fromkeys(layers, 0)
    for index, (alphas, weights) in enumerate(rounds):
        rows = [
            row
            for layer in pending
            for row in [
                *(_Row(layer, alpha, weight) for alpha, weight in zip(alphas, weights, strict=True)),
                *([_Row(layer, 0.0, 0.0, baseline=True)] if index == 0 else []),  # F(0), once
            ]
        ]
        _sweep(arch, example, clean, terms, rows, objective, batch_size, bar if delta_tol is None else None)
        for layer in pending:
            steps_used[layer] = len(alphas)
        if delta_tol is None:
            break
        baselines = torch.stack([terms[layer].baseline for layer in pending]).double()
        delta, gap = torch.stack([_deltas(clean, terms, pending), clean.objective - baselines]).tolist()  # 1 sync
        within = [abs(d) <= delta_tol * abs(g) for d, g in zip(delta, gap, strict=True)]
        last_round = index == len(rounds) - 1
        bar.update(len(pending) if last_round else sum(within))
        pending = [layer for layer, ok in zip(pending, within, strict=True) if not ok and not last_round]
        if not pending:
            break
        for layer in pending:
            terms[layer].scores.zero_()
    scores = torch.stack([terms[layer].scores for layer in layers])
    steps = torch.tensor([steps_used[layer] for layer in layers], dtype=torch.int32)
    return scores, _deltas(clean, terms, layers).float().cpu(), steps


def _deltas(clean: _CleanPass, terms: dict[int, _LayerTerms], layers: list[int]) -> torch.Tensor:
    """``[len(layers)]`` float64 completeness errors ``sum_i scores - (F(a) - F(0))``, on the device."""
    scores = torch.stack([terms[layer].scores for layer in layers])
    baselines = torch.stack([terms[layer].baseline for layer in layers]).double()
    return scores.sum(dim=1).double() - (clean.objective - baselines)


def attribute(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    target_ids: torch.Tensor,
    objective: str = "logprob",
    positions: str = "last",
    steps: int | str = 20,
    method: str | None = None,
    delta_tol: float | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    spec: ArchSpec | None = None,
    backend: str = "auto",
) -> NeuronAttribution:
    """Integrated Gradients of every MLP neuron of every chosen layer, zero baseline.

    Args:
        model: a transformers causal LM (fp32, bf16, fp16, or 4-bit bitsandbytes). Never modified:
            nothing stays hooked, and its training flag and attention implementation (switched to
            sdpa or eager while attributing if it cannot take 4D masks) are restored, also on error.
        input_ids: ``[B, T]`` prompts, padded on the left or the right.
        attention_mask: ``[B, T]``, 1 for real tokens; None = all real.
        target_ids: ``[B, K]`` answer tokens, padded with -100.
        objective: ``"logprob"`` = sum_j log p(answer_j | prompt, answer_<j);
            ``"prob"`` = p(answer_0 | prompt).
        positions: ``"last"`` (last prompt token), ``"answer"`` (positions that predict answer
            tokens) or ``"all"`` (every position of prompt + answer[:-1]).
        steps: number of integration points, or ``"auto"``: per layer, Gauss-Legendre with the fewest of
            4, 8, 16, 32, 64 points (:data:`~fastrit.attribution.integration.AUTO_STEPS`) whose completeness
            error ``|delta|`` is at most ``delta_tol * |F(a) - F(0)|`` (or 64); the points each layer used are in
            the result's ``steps_used``. Gauss-Legendre rules do not nest, so a layer that grows recomputes its
            rows at the new points; the clean pass, the prefix KV cache, ``F(a)`` and ``F(0)`` are shared.
        method: ``riemann_left``, ``riemann_right``, ``riemann_middle``, ``riemann_trapezoid`` or
            ``gausslegendre`` (Captum's points and weights); None = ``riemann_right`` (``gausslegendre`` with
            ``steps="auto"``, the only rule it takes).
        delta_tol: ``steps="auto"`` only: the tolerance as a fraction of ``|F(a) - F(0)|``; None = 0.005
            (:data:`~fastrit.attribution.integration.DEFAULT_DELTA_TOL`).
        layers: layer indices (negative count from the top); None = all layers.
        batch_size: the most IG rows (each of ``n`` recomputed tokens) in any internal forward;
            default: as many as fit a 2 GiB activation budget, at most ``len(layers) * (steps + 1)``.
        progress: show a tqdm bar over examples x layers.
        spec: where the layers and MLP output projections are, for a family fastrit does not know.
        backend: the kernels of the IG interpolation and accumulation (:func:`fastrit.backends`):
            ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        :class:`NeuronAttribution` with ``scores [B, len(layers), I]`` and ``delta [B, len(layers)]``
        (float32, on the CPU), and ``steps_used [B, len(layers)]``.
    """
    call = prepare_call(model, input_ids, attention_mask, target_ids, objective, positions, steps, method, layers, spec,
                        delta_tol)
    return attribute_call(call, batch_size=batch_size, progress=progress, backend=backend)


def _objectives_part(example: ScoredExample, objective: str) -> ScoredExample:
    """The part of ``example`` its objective depends on. For ``"prob"`` (p(answer_0 | prompt)) in a causal model
    that is the prompt: the example is cut to it and the first answer token, so that no IG row recomputes, and no LM
    head scores, the later answer tokens. Sites after the prompt cannot change the objective (their gradient is 0),
    so dropping those positions leaves every score as it was."""
    if (objective != "prob" or example.bidirectional or example.readout is not None
            or example.answer.numel() == 1):
        return example
    return replace(example, ids=example.ids[: example.prompt_len], answer=example.answer[:1],
                   positions=example.positions[example.positions < example.prompt_len])


def attribute_call(
    call: AttributionCall, *, batch_size: int | None = None, progress: bool = False, backend: str = "auto"
) -> NeuronAttribution:
    """:func:`attribute` of a checked call (:func:`.inputs.prepare_call`, or one built by a drop-in such as
    :mod:`fastrit.compat` with its own examples and integration rule)."""
    check_optional_count("batch_size", batch_size)
    if backend not in ("auto", *ops.BACKENDS):
        raise ValueError(f"backend: expected one of auto, {', '.join(ops.BACKENDS)}, got {backend!r}")
    model, objective = call.arch.model, call.settings["objective"]
    for example in call.examples:
        check_sequence_fits(model, example.length)
        if example.bidirectional != call.arch.spec.bidirectional:
            raise ValueError("call: every example must be bidirectional exactly when the model's spec is")

    scores = torch.zeros(len(call.examples), len(call.layers), call.arch.intermediate_size)
    delta = torch.zeros(len(call.examples), len(call.layers))
    steps_used = torch.zeros(len(call.examples), len(call.layers), dtype=torch.int32)
    rule = call.rule
    rounds = rule.rounds() if rule is not None and rule.adaptive else [(call.alphas, call.weights)]
    delta_tol = rule.delta_tol if rule is not None else None
    bar = tqdm(total=len(call.examples) * len(call.layers), desc="fastrit.attribute", disable=not progress)
    try:
        with model_session(model):
            for b, example in enumerate(call.examples):
                scores[b], delta[b], steps_used[b] = _example_scores(
                    call.arch, _objectives_part(example, objective), call.layers, rounds, delta_tol,
                    objective, batch_size, bar, backend
                )
    finally:
        bar.close()
    return NeuronAttribution(scores=scores, delta=delta, layers=call.layers, settings=call.settings,
                             steps_used=steps_used)
