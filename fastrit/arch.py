"""Where each transformers model family keeps its decoder layers, its MLP neuron site and its MLP's projections.

The *neuron site* of layer ``l`` is the input of that layer's MLP output projection (gated MLPs:
``act(gate) * up``, the input of ``down_proj``; GPT-2: the input of ``c_proj``; GPT-NeoX: the input
of ``dense_4h_to_h``). Neuron ``i`` of layer ``l`` is column ``i`` there.

A model is described by an :class:`ArchSpec` (module paths, relative to ``model.base_model``, and the MLP's
:class:`MLPLayout`); :data:`FAMILIES` is the one registry of the families fastrit knows. :func:`model_spec` finds the
spec of a model (given, recorded by :func:`fastrit.prepare`, or its family's), :func:`resolve_arch` returns a
:class:`ModelArch` holding the live modules, :func:`dense_weight` reads any linear projection's weight.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = [
    "ArchSpec", "FAMILIES", "MLPLayout", "ModelArch", "SPEC_ATTR", "decoder_layers", "dense_weight", "is_bnb_4bit",
    "is_conv1d", "linear_weight", "max_positions", "mlp_layout", "mlp_of", "model_spec", "resolve_arch", "set_mlp",
    "spec_from_json", "spec_to_json",
]

#: the attribute fastrit.prepare sets on a model prepared with an explicit ``spec`` (read by :func:`model_spec`)
SPEC_ATTR = "fastrit_arch_spec"


@dataclass(frozen=True)
class MLPLayout:
    """The attribute names inside one MLP module (what :func:`fastrit.prepare` rebuilds and export writes back).

    Neuron ``i`` owns row ``i`` of every input projection, its bias entries, and column ``i`` of the output
    projection.

    Attributes:
        inputs: the input projections, in the order the activation takes them (gated: gate, up; plain: fc).
        output: the output projection.
        act: the activation module's attribute name.
        conv1d: GPT-2's Conv1D layers (weights stored ``[in, out]``).
        fused: one input projection holding gate rows then up rows (Phi-3's ``gate_up_proj``).
        dropout: the dropout applied to the MLP output, if any (GPT-2).
    """

    inputs: tuple[str, ...]
    output: str
    act: str
    conv1d: bool = False
    fused: bool = False
    dropout: str | None = None

    @property
    def gated(self) -> bool:
        return self.fused or len(self.inputs) == 2


@dataclass(frozen=True)
class ArchSpec:
    """Where the neuron sites of a model are.

    The defaults describe a decoder-only causal LM attributed at the neuron site; the fields from ``site`` on
    exist for other sites and models (:mod:`fastrit.compat` reproduces the knowledge-neurons package with them).

    Attributes:
        layers: dotted path from ``model.base_model`` to the ``nn.ModuleList`` of decoder layers.
        mlp_out: dotted path inside one decoder layer to the MLP output projection (a linear map).
        final_norm: dotted path from ``model.base_model`` to the norm applied after the last layer;
            ``""`` for models that have none (BERT), allowed only with ``additive_mlp=False``.
        additive_mlp: True when a layer's output is (terms that do not depend on the MLP output)
            plus the output projection's result, with nothing applied after it (pre-norm residual
            and parallel-residual blocks). False where the MLP output passes through a nonlinear
            map first (Gemma2/3's post-feed-forward norm, BERT's post-norm); attribution then re-runs
            the whole layer.
        site: ``""`` (the neuron site: the input of ``mlp_out``), or a dotted path inside one layer to a
            module whose *output* is attributed instead (GPT-2's ``mlp.c_fc``, before the activation).
            Such a site is not followed linearly by ``mlp_out``, so attribution re-runs the layer.
        head: ``""`` (``model.get_output_embeddings()``), or a dotted path from the model to the module
            that maps final hidden states to vocabulary logits (BERT's masked-LM head ``cls``).
        bidirectional: an encoder: scaling the site at one position changes every position above the
            layer, so attribution recomputes the whole sequence there (no key/value prefix).
        pack_rows: whether attribution may pack several IG rows into one sequence as extra tokens. False
            where attention derives its mask from token indices rather than the mask it is given
            (GPT-Neo's local attention).
        layer_returns_tuple: whether a decoder layer returns a tuple whose first item is the hidden states
            (GPT-Neo) rather than the hidden states themselves.
        mlp: the MLP's projections, for :func:`fastrit.prepare`, deltas and export (attribution and mining need only
            the paths above); None for a spec that serves attribution only. The MLP module is the parent of
            ``mlp_out`` (:attr:`mlp_path`), so ``mlp_out`` must end with ``"." + mlp.output``.
    """

    layers: str
    mlp_out: str
    final_norm: str
    additive_mlp: bool = True
    site: str = ""
    head: str = ""
    bidirectional: bool = False
    pack_rows: bool = True
    layer_returns_tuple: bool = False
    mlp: MLPLayout | None = None

    def __post_init__(self) -> None:
        if self.mlp is not None:
            if not isinstance(self.mlp, MLPLayout):
                raise TypeError(f"mlp: expected fastrit.MLPLayout or None, got {type(self.mlp).__name__}")
            if not self.mlp_out.endswith("." + self.mlp.output):
                raise ValueError(f"mlp: its output {self.mlp.output!r} must be the last part of mlp_out "
                                 f"{self.mlp_out!r} (the MLP module is mlp_out's parent)")

    @property
    def mlp_path(self) -> str:
        """Dotted path inside one decoder layer to the MLP module (the parent of ``mlp_out``)."""
        return self.mlp_out.rpartition(".")[0]

    @property
    def attributes_linearly(self) -> bool:
        """Whether IG rows may enter above the layer (the site feeds a linear ``mlp_out`` added to the residual)."""
        return self.additive_mlp and not self.site and not self.bidirectional


_GATED_MLP = MLPLayout(inputs=("gate_proj", "up_proj"), output="down_proj", act="act_fn")
_GATED = ArchSpec(layers="layers", mlp_out="mlp.down_proj", final_norm="norm", mlp=_GATED_MLP)
_GATED_POST_NORM = ArchSpec(layers="layers", mlp_out="mlp.down_proj", final_norm="norm", additive_mlp=False,
                            mlp=_GATED_MLP)

#: model_type (``model.config.model_type``) -> spec, for the families fastrit recognises: the one place a family is
#: described (layers, neuron site, MLP layout). A new family is one more entry (or a ``spec=`` argument).
FAMILIES: dict[str, ArchSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "phi3": ArchSpec(layers="layers", mlp_out="mlp.down_proj", final_norm="norm",
                     mlp=MLPLayout(inputs=("gate_up_proj",), output="down_proj", act="activation_fn", fused=True)),
    "gemma2": _GATED_POST_NORM,
    "gemma3_text": _GATED_POST_NORM,
    "gpt2": ArchSpec(layers="h", mlp_out="mlp.c_proj", final_norm="ln_f",
                     mlp=MLPLayout(inputs=("c_fc",), output="c_proj", act="act", conv1d=True, dropout="dropout")),
    "gpt_neox": ArchSpec(layers="layers", mlp_out="mlp.dense_4h_to_h", final_norm="final_layer_norm",
                         mlp=MLPLayout(inputs=("dense_h_to_4h",), output="dense_4h_to_h", act="act")),
}

_SPEC_EXAMPLE = (
    'fastrit.ArchSpec(layers="layers", mlp_out="mlp.down_proj", final_norm="norm", additive_mlp=True, '
    'mlp=fastrit.MLPLayout(inputs=("gate_proj", "up_proj"), output="down_proj", act="act_fn")) '
    "(paths relative to model.base_model)"
)


def max_positions(config) -> int | None:
    """The longest sequence a model with this transformers ``config`` takes, in tokens, or None if it names none."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class ModelArch:
    """The live modules of one model that attribution needs.

    Attributes:
        model: the LM (``...ForCausalLM``, or a masked LM with a spec that says where its head is).
        base: ``model.base_model``, the layer stack that returns hidden states.
        layers: the decoder layers, in order.
        mlp_out: the MLP output projection of every layer (``mlp_out[l]`` belongs to ``layers[l]``).
        final_norm: the norm after the last layer (None for models without one).
        lm_head: the output head, final hidden states -> vocabulary logits.
        spec: the spec these were found with.
        site_out: with ``spec.site``, the module of every layer whose output is the attributed site; else None.
    """

    model: nn.Module
    base: nn.Module
    layers: nn.ModuleList
    mlp_out: list[nn.Module]
    final_norm: nn.Module | None
    lm_head: nn.Module
    spec: ArchSpec
    site_out: list[nn.Module] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        """Neurons per layer: the width of the attributed site."""
        if self.site_out is not None:
            return linear_out_features(self.site_out[0])
        return linear_in_features(self.mlp_out[0])

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.model.config)

    def cache_kwargs(self, cache) -> dict:
        """The keyword that passes a key/value ``cache`` to :attr:`base`: ``cache`` (transformers >= 5.24) or the
        older ``past_key_values``, whichever its ``forward`` takes."""
        params = inspect.signature(self.base.forward).parameters
        return {"cache" if "cache" in params else "past_key_values": cache}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits, float32, of final-normed hidden states ``[..., D] -> [..., V]``.

        Applies the family's logit soft-capping (Gemma2/3 ``final_logit_softcapping``) as the
        model's own ``forward`` does.
        """
        logits = self.lm_head(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _unsupported(model: nn.Module, why: str) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    families = ", ".join(sorted(FAMILIES))
    return ValueError(
        f"model: cannot find the MLP neurons of a {model_type!r} model ({why}). "
        f"Supported families: {families}. For any other decoder-only model pass spec=, e.g. {_SPEC_EXAMPLE}"
    )


def model_spec(model: nn.Module, spec: ArchSpec | None = None) -> ArchSpec:
    """The spec of ``model``: ``spec`` when given, else the one :func:`fastrit.prepare` recorded on it (a model
    prepared with an explicit spec), else its family's in :data:`FAMILIES` (``config.model_type``).

    Raises TypeError for a ``spec`` that is not an ArchSpec, ValueError (listing the families and showing how to
    pass a spec) for an unknown family without one.
    """
    if spec is not None and not isinstance(spec, ArchSpec):
        raise TypeError(f"spec: expected fastrit.ArchSpec or None, got {type(spec).__name__}")
    if spec is None:
        spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise _unsupported(model, "unknown model family")
        spec = FAMILIES[model_type]
    return spec


def _find_layers(model: nn.Module, spec: ArchSpec | None) -> tuple[ArchSpec, nn.Module, nn.ModuleList]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    spec = model_spec(model, spec)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise _unsupported(model, "not a causal LM with a base model and an output head")
    layers = _get_path(base, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise _unsupported(model, f"no decoder layer list at base_model.{spec.layers}")
    return spec, base, layers


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The decoder layers of ``model``, in order, whatever their MLPs have become (e.g. after fastrit.prepare).

    Raises as :func:`resolve_arch` for a model whose family is unknown (and no ``spec``) or that has no layer list.
    """
    return _find_layers(model, spec)[2]


def mlp_layout(model: nn.Module, spec: ArchSpec | None = None) -> MLPLayout:
    """The layout of ``model``'s MLPs (:func:`model_spec`'s ``mlp``); ValueError naming ``model`` for a family
    fastrit does not know, or naming ``spec`` for a spec without one."""
    try:
        found = model_spec(model, spec)
    except ValueError:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"model: fastrit cannot prepare the MLPs of a {model_type!r} model; supported: "
                         f"{', '.join(sorted(FAMILIES))}; for any other pass spec=, e.g. {_SPEC_EXAMPLE}") from None
    if found.mlp is None:
        raise ValueError(f"spec: it says where the neuron sites are but not the MLP's projections; give it mlp=, "
                         f"e.g. {_SPEC_EXAMPLE}")
    return found.mlp


def spec_to_json(spec: ArchSpec) -> dict:
    """``spec`` as JSON values (for a delta's metadata); :func:`spec_from_json` reads it back."""
    return asdict(spec)


def spec_from_json(values: dict) -> ArchSpec:
    """The ArchSpec that :func:`spec_to_json` wrote."""
    values = dict(values)
    if values.get("mlp") is not None:
        values["mlp"] = MLPLayout(**{**values["mlp"], "inputs": tuple(values["mlp"]["inputs"])})
    return ArchSpec(**values)


def mlp_of(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    """The MLP module of one decoder ``layer`` (at ``spec.mlp_path``)."""
    mlp = _get_path(layer, spec.mlp_path)
    if mlp is None:
        raise ValueError(f"spec: no MLP module at <layer>.{spec.mlp_path}")
    return mlp


def set_mlp(layer: nn.Module, spec: ArchSpec, mlp: nn.Module) -> None:
    """Put ``mlp`` in one decoder ``layer`` in place of its MLP module (at ``spec.mlp_path``)."""
    parent, _, name = spec.mlp_path.rpartition(".")
    setattr(_get_path(layer, parent) if parent else layer, name, mlp)


def resolve_arch(model: nn.Module, spec: ArchSpec | None = None) -> ModelArch:
    """Find the decoder layers, neuron sites and output head of ``model``.

    Args:
        model: a transformers causal LM (has ``base_model`` and ``get_output_embeddings()``).
        spec: where the modules are; default: the spec of the model's family (``config.model_type``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``spec`` is not an ``ArchSpec``.
        ValueError: the family is unknown and no spec was given, or the spec's paths do not lead
            to a layer list, linear output projections and a final norm. The message lists the
            supported families and shows how to pass a spec.
    """
    spec, base, layers = _find_layers(model, spec)
    if spec.head:
        lm_head = _get_path(model, spec.head)
    else:
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is None:
        where = f" at model.{spec.head}" if spec.head else ""
        raise _unsupported(model, f"not a causal LM with a base model and an output head{where}")
    mlp_out = [_get_path(layer, spec.mlp_out) for layer in layers]
    if any(m is None or linear_in_features(m) is None for m in mlp_out):
        raise _unsupported(model, f"no linear MLP output projection at <layer>.{spec.mlp_out}")
    site_out = None
    if spec.site:
        site_out = [_get_path(layer, spec.site) for layer in layers]
        if any(m is None or linear_out_features(m) is None for m in site_out):
            raise _unsupported(model, f"no linear site module at <layer>.{spec.site}")
    final_norm = _get_path(base, spec.final_norm) if spec.final_norm else None
    if final_norm is None and (spec.final_norm or spec.attributes_linearly):
        raise _unsupported(model, f"no final norm at base_model.{spec.final_norm}")
    _check_differentiable(model)
    return ModelArch(model, base, layers, mlp_out, final_norm, lm_head, spec, site_out)


def _check_differentiable(model: nn.Module) -> None:
    """Refuse models whose layers give no input gradients (attribution through them would be silently wrong).

    bitsandbytes runs 4-bit layers on CPUs with AVX512-BF16 through an inference-only kernel: it
    repacks the weight on the first no-grad forward in eval mode and never differentiates it again.
    """
    for name, module in model.named_modules():
        if not is_bnb_4bit(module) or module.weight.device.type != "cpu":
            continue
        packed = getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        if packed or getattr(module, "support_avx512bf16_for_cpu", False):
            raise ValueError(
                f"model: {name} is a bitsandbytes 4-bit layer on a CPU where bitsandbytes uses its "
                "inference-only kernel (no input gradients), so IG through it would be wrong. Load the model "
                "in 4-bit on a CUDA device, or unquantized on the CPU."
            )


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D (GPT-2), which stores its weight ``[in_features, out_features]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_nf4_linear(module: nn.Module) -> bool:
    # fastrit.nn.NF4Linear, recognised without importing fastrit.nn (which sits above this module)
    return type(module).__name__ == "NF4Linear" and callable(getattr(module, "dequantize", None))


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized bitsandbytes 4-bit linear layer (Linear4bit and its NF4/FP4 subclasses)."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(
        getattr(module, "weight", None), "quant_state"
    )


def linear_in_features(module: nn.Module) -> int | None:
    """Input width (number of neurons) of a linear output projection, or None if not linear."""
    if is_conv1d(module):
        return int(module.weight.shape[0])
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int) and (hasattr(module, "weight") or _is_nf4_linear(module)):
        return in_features
    return None


def linear_out_features(module: nn.Module) -> int | None:
    """Output width of a linear map (``nn.Linear``, GPT-2's ``Conv1D``), or None if not linear."""
    if is_conv1d(module):
        return int(module.nf)
    out_features = getattr(module, "out_features", None)
    return out_features if isinstance(out_features, int) else None


def _is_lora(module: nn.Module) -> bool:
    # a PEFT LoRA layer, recognised without importing peft
    return callable(getattr(module, "get_delta_weight", None)) and hasattr(module, "base_layer")


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out_features, in_features], bias [out_features] or None)`` of a linear layer, detached, the weight
    in ``dtype`` (None: the layer's own dtype, without a copy where it can: ``nn.Linear``'s own tensor, a view of
    ``Conv1D``'s). The module is not changed.

    ``nn.Linear`` as is; GPT-2's ``Conv1D`` transposed; bitsandbytes' 4-bit layers and fastrit's NF4Linear
    dequantized (bitsandbytes' definition, to their original dtype); a PEFT LoRA layer as its base weight plus its
    active adapters' deltas (summed in the wider dtype, rounded once). TypeError naming ``module`` otherwise.
    """
    weight, bias = _dense_weight(module)
    return (weight if dtype is None else weight.to(dtype)), bias


def _dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if _is_lora(module):
        weight, bias = _dense_weight(module.base_layer)
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}):
                delta = module.get_delta_weight(name).detach()  # [in, out] when fan_in_fan_out (Conv1D bases)
                delta = delta.t() if getattr(module, "fan_in_fan_out", False) else delta
                # float32 adapters of a bf16 model (master weights): summed in float32, rounded once
                wide = torch.promote_types(weight.dtype, delta.dtype)
                weight = (weight.to(wide) + delta.to(wide)).to(weight.dtype)
        return weight, bias
    if is_bnb_4bit(module):
        from .ops.nf4 import bnb_nf4_weight, import_bnb, nf4_dequantize

        state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
        if state is not None and state.quant_type == "fp4":
            return import_bnb().dequantize_4bit(module.weight.data, state), bias
        # NF4, fastrit's dequantization (bitsandbytes' definition); ValueError for a layer not quantized yet
        return nf4_dequantize(*bnb_nf4_weight(module)), bias
    if _is_nf4_linear(module):
        return module.dequantize(), bias
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"module: expected a dense linear layer, got {type(module).__name__}")
    weight = weight.detach()
    return (weight.t() if is_conv1d(module) else weight), bias


def linear_weight(module: nn.Module, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """The weight of :func:`dense_weight`, in ``dtype`` (default float32): what attribution reads of an output
    projection."""
    return dense_weight(module, dtype)[0]
