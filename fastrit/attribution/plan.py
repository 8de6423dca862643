"""``fastrit.plan_attribution``: how much memory one ``fastrit.attribute`` call takes, before anything is loaded.

The model is built on the meta device (its weights' bytes are counted from it, as stored); the rest is arithmetic
over its widths, following what :mod:`.engine` and :mod:`.sweep` hold (``s`` = bytes per element of ``dtype``;
``D`` hidden, ``I`` neurons per layer, ``H``/``KV`` attention/key-value heads of ``hd`` values, ``q = H hd``,
``V`` vocabulary; ``S`` = scored tokens (prompt + answer[:-1]), ``p0`` = first scaled position, ``n = S - p0``
tokens recomputed per IG row, ``P`` scaled positions, ``K`` answer tokens scored, ``A`` attributed layers):

Persistent (from the clean pass to the end):

- ``process baseline``: CPU only, :data:`CPU_BASELINE_BYTES` (Python, torch, transformers and fastrit imported, a
  model class loaded, kernels run once), measured, not computed; 0 on CUDA (the CUDA context is not counted either,
  as ``torch.cuda.max_memory_allocated`` does not count it);
- ``weights``: every parameter and buffer as stored (a tied head once);
- ``key/value cache``: the clean pass's cache, every layer, ``2 KV hd S s`` each (the prefix the rows read is a
  view of it); none when ``p0 = 0`` (``positions="all"``);
- ``sites and entry states``: per attributed layer, the sites ``[P, I]`` (``s``, and a float32 copy when
  ``s != 4``), ``W a`` ``[P, D]`` float32 (additive-MLP families), and the entry hidden states ``[n, D]`` (a copy
  of the recomputed positions of the layer's output, or input);
- ``scores``: ``[A, I]`` float32 twice (the running sums and the result).

Transient, one at a time (the peak takes the largest):

- ``clean pass``: one decoder layer's intermediates over ``S`` tokens without gradients: the MLP's
  ``3 S I s`` (activation, up projection, product) beside its input and the residual, ``2 S D s``, or a norm's
  float32 intermediates, ``S D (8 + 2s)``, whichever is larger; SDPA keeps no ``S x S`` matrix (PyTorch's flash
  kernels on CPU and CUDA); eager attention (Gemma2/3 as configured) adds ``H S^2 (4 + 2s)``;
- ``float32 projection``: additive-MLP families whose weights are not float32: one layer's output projection in
  float32, ``D I 4`` (``W a`` at the start; on CUDA ``ig_accumulate_linear`` converts it per call), beside the
  chunk's gradients ``[R, n, D]`` (``s`` and float32) and ``[R, P, D]`` float32;
- a chunk of ``R`` IG rows (``R = min(batch_size, rows)``, ``batch_size`` by default the engine's 2 GiB budget,
  ``rows = A (steps + 1)``; :data:`AUTO_ROWS_PER_LAYER` per layer for ``steps="auto"``), packed as ``b``
  sequences of ``g`` rows of ``n`` tokens (``tok = b g n`` tokens) against ``Sk = p0 + g n`` keys:

  - ``chunk: saved activations``: what autograd keeps for the backward. **An upper bound**: every row is counted
    in every layer from the lowest entry layer up, as one forward of ``R`` rows over those layers saves; the
    sweep runs rows from their own entry layer only (segments whose batch grows as they move up), so with many
    attributed layers it saves less (about 0.8x for Llama-3-8B, all layers, default batch). The parameters do not
    require grad while the engine runs, so no projection saves its input. Per layer and token: each norm's float32
    input (RMSNorm: ``4`` per ``D``; LayerNorm: ``s``), the attention's query and output (``2 q s``; eager
    attention: the query), the MLP's ``3 I s`` (gated: gate, activation, up), one residual ``D s`` (none with
    GPT-NeoX's parallel residual); per layer ``2 b H Sk hd s`` for keys and values repeated to ``H`` heads (the 4D mask
    rules out SDPA's grouped-query path), the mask ``b g n Sk s`` and the log-sum-exp; then the final norm, the
    head's input ``[R, K, D]``, and the rows' entry values (float32 and ``s``);
  - ``chunk: logits and workspace``: the largest of the logits at the start of the backward,
    ``[R, K, V]`` x 12 bytes (the float32 log-softmax, saved, its incoming and its outgoing gradient; 16 when the
    family soft-caps its logits and saves the tanh), the
    segment's key/value cache at the end of the forward (``2 b KV Sk hd s`` per layer run) and one layer's
    backward (gradients of the repeated keys and values and three ``[tok, I]``).

  In the other families (rows enter layer ``l`` at its input, constant, with the site replaced inside it), the
  lowest entry layer's attention and its MLP up to the site save nothing.

``peak_bytes`` = the persistent parts + the largest of ``clean pass``, ``float32 projection`` and the chunk's
two parts together. Measured against peak RSS on this CPU by ``benchmarks/bench_attribution_memory.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import _args
from ..arch import FAMILIES, max_positions, resolve_arch
from ..memory import DTYPES, MemoryPlan, meta_model, resolve_config, stored_bytes
from .engine import _ACT_ELEMS_PER_D, _ACT_ELEMS_PER_I, _DEFAULT_ACTIVATION_BUDGET
from .inputs import OBJECTIVES, POSITIONS, check_optional_count, check_sequence_fits, resolve_layers

__all__ = ["AUTO_ROWS_PER_LAYER", "CPU_BASELINE_BYTES", "PERSISTENT_PARTS", "TRANSIENT_PARTS", "plan_attribution",
           "default_batch_size"]

#: Resident memory of the attributing process besides the model and the attribution's tensors: Python 3.11, torch
#: 2.14.1 (its CUDA build), transformers 5.25 and fastrit imported, the Llama model class loaded, and what the first
#: attribution at real widths touches (BLAS/oneDNN code and per-thread buffers, about 30 MiB). Measured on the 2-core
#: x86-64 machine of the benchmarks as VmRSS minus the weights after one ``fastrit.attribute`` of an 8B-wide model
#: and glibc's ``malloc_trim`` (828 MiB; 797 MiB before that first call); another torch build or machine differs by
#: tens of MiB.
CPU_BASELINE_BYTES = 828 * 1024**2
#: ``steps="auto"``: IG rows per layer in a round, at most: 64 Gauss-Legendre points plus the F(0) row
AUTO_ROWS_PER_LAYER = 65
#: bytes per element of the ``[R, K, V]`` logits at the start of the backward (see the module docstring)
LOGIT_BYTES = 12

PERSISTENT_PARTS = ("process baseline", "weights", "key/value cache", "sites and entry states", "scores")
TRANSIENT_PARTS = ("clean pass", "float32 projection", "chunk: saved activations", "chunk: logits and workspace")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class _Family:
    """How a family's decoder layer saves for the backward.

    Attributes:
        norm: "llama" (RMSNorm, float32 input, output in the model's dtype), "gemma" (RMSNorm in float32 throughout)
            or "layer" (LayerNorm).
        pre_norms: norms per layer whose output feeds a projection (which saves it); post_norms: the others.
        mlp: saved ``[tok, I]`` tensors of the MLP.
        attention: saved ``[tok, D]`` tensors of the attention besides keys and values; None: query and output.
        fused_kv: without a prefix cache, keys and values are views of a fused projection: its saved ``[tok, D]``
            tensors for them; None: ``[b, H, Sk, hd]`` each, as with a prefix.
        head_norms: per-head RMSNorm of queries and keys.
        residual: ``[tok, D]`` tensors saved per layer besides the norms' (none with GPT-NeoX's parallel residual).
    """

    norm: str = "llama"
    pre_norms: int = 2
    post_norms: int = 0
    mlp: int = 3
    attention: int | None = None
    fused_kv: int | None = None
    head_norms: bool = False
    residual: int = 1


_FAMILY_SHAPES = {
    "llama": _Family(), "mistral": _Family(), "qwen2": _Family(), "phi3": _Family(),
    "qwen3": _Family(head_norms=True), "gemma": _Family(norm="gemma"), "gemma2": _Family(norm="gemma", post_norms=2),
    "gemma3_text": _Family(norm="gemma", post_norms=2, head_norms=True),
    "gpt2": _Family(norm="layer", mlp=4, attention=4, fused_kv=0),
    "gpt_neox": _Family(norm="layer", pre_norms=1, mlp=1, fused_kv=4, residual=0),
}


def _norm_bytes(style: str, elem: int) -> int:
    """Bytes a norm saves per element of its input, not counting its output."""
    return {"llama": 4, "gemma": 4, "layer": elem}[style]


@dataclass(frozen=True)
class _Model:
    """The widths of a model (elements), its element size ``elem`` (bytes) and how its layers save."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    elem: int
    additive: bool
    pack: bool
    eager: bool
    softcap: bool  # attention logits soft-capped (eager attention saves the tanh)
    final_softcap: bool  # output logits soft-capped (the head's tanh is saved: 4 more bytes per logit)
    layer_token_bytes: int  # saved per token and decoder layer, besides keys, values, mask
    attention_token_bytes: int  # the part of layer_token_bytes before the MLP: the input norm and the attention
    mlp_token_bytes: int  # the MLP's part of layer_token_bytes (before its output projection: the site)
    final_token_bytes: int  # saved by the final norm per token, besides its output
    fused_kv_token_bytes: int | None  # without a prefix: keys and values per token (views of a fused projection)

    @classmethod
    def of(cls, model: nn.Module, elem: int, attention: str | None) -> _Model:
        """``attention``: the attention implementation the user's config asks for (None: the model's default)."""
        config = model.config
        arch = resolve_arch(model)
        family = _FAMILY_SHAPES[config.model_type]
        hidden, intermediate = config.hidden_size, arch.intermediate_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        q = heads * head_dim
        own = _norm_bytes(family.norm, elem)
        per_token = ((family.pre_norms + family.post_norms) * own + family.residual * elem) * hidden
        per_token += family.mlp * intermediate * elem
        eager = (attention or getattr(config, "_attn_implementation", None)) == "eager"
        # SDPA saves its query and output; eager attention its query (the scores' matmul; the output feeds a frozen
        # projection, which saves nothing)
        attention_part = (family.attention * hidden if family.attention else (1 if eager else 2) * q) * elem
        attention_part += own * hidden
        if family.head_norms:
            attention_part += own * (q + kv_heads * head_dim)
        per_token += attention_part - own * hidden  # the input norm is among the norms above
        return cls(hidden, intermediate, heads, kv_heads, head_dim, arch.lm_head.weight.shape[0], arch.num_layers,
                   elem, arch.spec.attributes_linearly, arch.spec.pack_rows, eager,
                   bool(getattr(config, "attn_logit_softcapping", None)),
                   bool(getattr(config, "final_logit_softcapping", None)), per_token, attention_part,
                   family.mlp * intermediate * elem, own * hidden,
                   None if family.fused_kv is None else family.fused_kv * hidden * elem)


@dataclass(frozen=True)
class _Call:
    """The shapes of one attribution call (tokens): scored ``length``, first recomputed position ``first``, tokens
    recomputed per row ``n``, scaled positions ``scaled``, answer tokens scored ``answer``, attributed ``layers``,
    rows per layer, and rows per chunk."""

    length: int
    first: int
    n: int
    scaled: int
    answer: int
    layers: list[int]
    rows_per_layer: int
    chunk_rows: int

    @property
    def rows(self) -> int:
        return len(self.layers) * self.rows_per_layer


def default_batch_size(model: _Model, n: int, total_rows: int) -> int:
    """The engine's default rows per chunk (``fastrit.attribution.engine._default_batch_size``): as many rows of
    ``n`` tokens as fit its 2 GiB activation budget, at most ``total_rows``."""
    per_token = model.layers * (_ACT_ELEMS_PER_D * model.hidden + _ACT_ELEMS_PER_I * model.intermediate)
    per_row = max(1, n * per_token * model.elem)
    return max(1, min(total_rows, _DEFAULT_ACTIVATION_BUDGET // per_row))


def _call_shapes(model: _Model, tokens: int, answer_tokens: int, steps: int | str, positions: str,
                 layers: list[int], batch_size: int | None, objective: str) -> _Call:
    """The scored sequence as the engine cuts it (``objective="prob"``: the prompt and the first answer token)."""
    answer = 1 if objective == "prob" else answer_tokens
    length = tokens + answer - 1
    first = 0 if positions == "all" else tokens - 1
    scaled = {"last": 1, "answer": answer, "all": length}[positions]
    rows_per_layer = AUTO_ROWS_PER_LAYER if steps == "auto" else steps + 1
    n = length - first
    chunk = batch_size or default_batch_size(model, n, len(layers) * rows_per_layer)
    return _Call(length, first, n, scaled, answer, layers, rows_per_layer, min(chunk, len(layers) * rows_per_layer))


def _persistent(model: _Model, call: _Call, weights: int, device: str) -> dict[str, int]:
    s, d, i = model.elem, model.hidden, model.intermediate
    kv = 2 * model.layers * model.kv_heads * model.head_dim * call.length * s if call.first > 0 else 0
    per_layer = call.scaled * i * (s + (4 if s != 4 else 0)) + call.n * d * s
    if model.additive:
        per_layer += call.scaled * d * 4
    return {
        "process baseline": CPU_BASELINE_BYTES if device == "cpu" else 0,
        "weights": weights,
        "key/value cache": kv,
        "sites and entry states": len(call.layers) * per_layer,
        "scores": 2 * len(call.layers) * i * 4,
    }


def _clean_pass(model: _Model, call: _Call) -> int:
    s, d, i, length = model.elem, model.hidden, model.intermediate, call.length
    layer = length * max(3 * i * s + 2 * d * s, (8 + 2 * s) * d)
    if model.eager:
        layer += model.heads * length * length * (4 + 2 * s)
    logits = call.answer * model.vocab * (s + 8)
    return max(layer, logits)


def _float32_projection(model: _Model, call: _Call) -> int:
    if not model.additive:
        return 0
    weight = model.hidden * model.intermediate * 4 if model.elem != 4 else 0
    return weight + call.chunk_rows * model.hidden * (call.n * (model.elem + 4) + call.scaled * 4)


def _chunk(model: _Model, call: _Call) -> tuple[int, int]:
    """``(saved activations, logits and workspace)`` of the largest chunk (see the module docstring)."""
    s, d, i, rows, n = model.elem, model.hidden, model.intermediate, call.chunk_rows, call.n
    group = max(1, min(rows, call.first // n)) if call.first > 0 and model.pack else 1
    batch = math.ceil(rows / group)
    tok, keys = batch * group * n, call.first + group * n
    lowest = min(call.layers) + (1 if model.additive else 0)
    run = model.layers - lowest
    kv_repeated = 2 * batch * model.heads * keys * model.head_dim * s
    if call.first == 0 and model.fused_kv_token_bytes is not None:
        kv_repeated = tok * model.fused_kv_token_bytes
    attention_matrix = batch * model.heads * group * n * keys
    attention = kv_repeated + batch * group * n * keys * s + batch * model.heads * group * n * 4
    if model.eager:  # the float32 softmax, its copy in the model's dtype, the soft-cap's tanh
        attention += attention_matrix * (4 + (s if s != 4 else 0) + (s if model.softcap else 0))
    per_layer = tok * (model.layer_token_bytes - model.attention_token_bytes) + attention
    per_layer += tok * model.attention_token_bytes
    copy = s if s != 4 else 0  # the float32 entry values, and their copy in the model's dtype
    if model.additive:
        entries = rows * n * d * (4 + copy)
    else:
        entries = rows * (call.scaled * i * (4 + copy) + (call.scaled + n) * i * s)
    saved = run * per_layer + tok * model.final_token_bytes + rows * call.answer * d * s + entries
    if not model.additive:  # rows enter the lowest layer at its input, constant: what comes before the site (its
        # attention, and the MLP up to the replaced site) needs no backward there
        saved -= tok * (model.attention_token_bytes + model.mlp_token_bytes) + attention
    logits = (LOGIT_BYTES + (4 if model.final_softcap else 0)) * rows * call.answer * model.vocab
    cache = run * 2 * batch * model.kv_heads * keys * model.head_dim * s
    backward = kv_repeated + 3 * tok * i * s
    return saved, max(logits, cache, backward)


def _check(tokens: int, answer_tokens: int, steps: int | str, positions: str, batch_size: int | None, dtype: str,
           device: str, objective: str) -> None:
    _args.positive("tokens", tokens)
    _args.positive("answer_tokens", answer_tokens)
    if steps != "auto":
        _args.positive("steps", steps, what="a positive integer or 'auto'")
    _args.one_of("positions", positions, POSITIONS, what=f"one of {', '.join(POSITIONS)}")
    _args.one_of("objective", objective, OBJECTIVES, what=f"one of {', '.join(OBJECTIVES)}")
    check_optional_count("batch_size", batch_size)
    _args.one_of("dtype", dtype, DTYPES, what=f"one of {sorted(DTYPES)}")
    _args.one_of("device", device, DEVICES, what="'cuda' or 'cpu'")


def _model(config, dtype: str, tokens: int, answer_tokens: int) -> tuple[_Model, nn.Module]:
    """The model's widths and its meta-device model; ValueError naming ``config`` or ``tokens``."""
    config = resolve_config(config)
    if config.model_type not in FAMILIES or config.model_type not in _FAMILY_SHAPES:
        raise ValueError(f"config: no attribution plan for model type {config.model_type!r}; "
                         f"families: {sorted(_FAMILY_SHAPES)}")
    model = meta_model(config, DTYPES[dtype])
    length = tokens + answer_tokens - 1
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise ValueError(f"tokens: prompt + answer - 1 = {length} tokens, more than the model's {limit} positions")
    try:
        check_sequence_fits(model, length)
    except ValueError as error:
        raise ValueError(f"tokens: {error}") from None
    attention = getattr(config, "_attn_implementation", None)
    return _Model.of(model, torch.empty((), dtype=DTYPES[dtype]).element_size(), attention), model


def plan_attribution(
    config,
    *,
    tokens: int = 512,
    answer_tokens: int = 1,
    steps: int | str = 20,
    positions: str = "last",
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    dtype: str = "bfloat16",
    device: str = "cuda",
    objective: str = "logprob",
) -> MemoryPlan:
    """The peak memory of ``fastrit.attribute`` on one example (see the module docstring for every part).

    Args:
        config: a transformers config, or "llama-3-8b", "mistral-7b", "qwen2-7b", "gemma-2-9b".
        tokens: prompt tokens ``T``; answer_tokens: answer tokens ``K`` (the scored sequence is ``T + K - 1``).
        steps: integration points per layer, or ``"auto"`` (rounds of at most 64 points; the worst round counted).
        positions, layers, batch_size, objective: as ``fastrit.attribute`` takes them (``batch_size`` None: the
            engine's default, :func:`default_batch_size`).
        dtype: the weights' and hidden states' dtype, "bfloat16", "float16" or "float32".
        device: "cuda" or "cpu" (on CPU the process's own baseline, :data:`CPU_BASELINE_BYTES`, is added).

    Returns:
        a :class:`fastrit.MemoryPlan` (``trainable_params`` 0): ``breakdown`` in bytes, ``settings`` with the
        shapes used (rows per chunk, tokens recomputed per row, packing).
    """
    _check(tokens, answer_tokens, steps, positions, batch_size, dtype, device, objective)
    shapes, model = _model(config, dtype, tokens, answer_tokens)
    call = _call_shapes(shapes, tokens, answer_tokens, steps, positions, resolve_layers(layers, shapes.layers),
                        batch_size, objective)
    breakdown = _persistent(shapes, call, stored_bytes(model), device)
    saved, workspace = _chunk(shapes, call)
    breakdown |= {"clean pass": _clean_pass(shapes, call), "float32 projection": _float32_projection(shapes, call),
                  "chunk: saved activations": saved, "chunk: logits and workspace": workspace}
    transient = max(breakdown["clean pass"], breakdown["float32 projection"], saved + workspace)
    peak = sum(breakdown[k] for k in PERSISTENT_PARTS) + transient
    settings = dict(tokens=tokens, answer_tokens=answer_tokens, steps=steps, positions=positions,
                    layers=call.layers, batch_size=batch_size, chunk_rows=call.chunk_rows, rows=call.rows,
                    recomputed_tokens=call.n, scored_tokens=call.length, dtype=dtype, device=device,
                    objective=objective, model_type=model.config.model_type)
    summary = ("the first five plus the largest of the clean pass, the float32 projection and the chunk's two "
               "parts together; the chunk counted as every row in every layer: an upper bound")
    return MemoryPlan(peak, 0, breakdown, settings, summary)
