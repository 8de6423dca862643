"""Where each model family keeps its MLP projections, and their weights read out neuron by neuron.

Neuron ``i`` of a layer (fastrit's definition: column ``i`` of the MLP output projection's input) owns row ``i``
of every input projection (gated MLPs: gate and up; plain MLPs: fc), its bias entries, and column ``i`` of the
output projection. :class:`MLPWeights` holds them in ``nn.Linear`` orientation (``[out, in]``), whatever the
family stores (GPT-2's Conv1D keeps ``[in, out]``; Phi-3 fuses gate and up into one projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import is_bnb_4bit, is_conv1d

__all__ = ["MLP_LAYOUTS", "MLPLayout", "MLPWeights", "dense_weight", "is_bnb_4bit", "is_conv1d", "mlp_layout"]


@dataclass(frozen=True)
class MLPLayout:
    """The MLP module's attribute names.

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


_GATED = MLPLayout(inputs=("gate_proj", "up_proj"), output="down_proj", act="act_fn")

#: model_type -> layout, for the families fastrit recognises
MLP_LAYOUTS: dict[str, MLPLayout] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "phi3": MLPLayout(inputs=("gate_up_proj",), output="down_proj", act="activation_fn", fused=True),
    "gpt2": MLPLayout(inputs=("c_fc",), output="c_proj", act="act", conv1d=True, dropout="dropout"),
    "gpt_neox": MLPLayout(inputs=("dense_h_to_4h",), output="dense_4h_to_h", act="act"),
}


def mlp_layout(model: nn.Module) -> MLPLayout:
    """The layout of ``model``'s MLPs; ValueError naming ``model`` for a family fastrit does not know."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MLP_LAYOUTS:
        raise ValueError(f"model: fastrit cannot prepare the MLPs of a {model_type!r} model; "
                         f"supported: {', '.join(sorted(MLP_LAYOUTS))}")
    return MLP_LAYOUTS[model_type]


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of a linear layer, detached: nn.Linear as is, GPT-2's Conv1D transposed,
    fastrit's NF4Linear and bitsandbytes' 4-bit layers dequantized (in their original dtype), a PEFT LoRA layer as
    its base weight plus its active adapters' deltas."""
    from .nf4_linear import NF4Linear

    if callable(getattr(module, "get_delta_weight", None)) and hasattr(module, "base_layer"):  # a PEFT LoRA layer
        weight, bias = dense_weight(module.base_layer)
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}):
                delta = module.get_delta_weight(name).detach()  # [in, out] when fan_in_fan_out (Conv1D bases)
                delta = delta.t() if getattr(module, "fan_in_fan_out", False) else delta
                # summed in the wider dtype, rounded once (float32 adapters of a bf16 model: master weights)
                wide = torch.promote_types(weight.dtype, delta.dtype)
                weight = (weight.to(wide) + delta.to(wide)).to(weight.dtype)
        return weight, bias
    if is_bnb_4bit(module):
        module = NF4Linear.from_bnb(module)
    if isinstance(module, NF4Linear):
        return module.dequantize(), None if module.bias is None else module.bias.detach()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"model: expected a dense linear layer, got {type(module).__name__}")
    weight = weight.detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return (weight.t() if is_conv1d(module) else weight), bias


@dataclass
class MLPWeights:
    """One MLP's weights, neuron-major, in ``nn.Linear`` orientation.

    Attributes:
        inputs: per input of the activation (gated: gate, up; plain: fc), ``[I, H]``.
        input_biases: per input, ``[I]`` or None.
        output: ``[H, I]``.
        output_bias: ``[H]`` or None.
    """

    inputs: list[torch.Tensor]
    input_biases: list[torch.Tensor | None]
    output: torch.Tensor
    output_bias: torch.Tensor | None

    @classmethod
    def read(cls, mlp: nn.Module, layout: MLPLayout) -> MLPWeights:
        inputs, biases = [], []
        for name in layout.inputs:
            weight, bias = dense_weight(getattr(mlp, name))
            if layout.fused:
                half = weight.shape[0] // 2
                inputs += [weight[:half], weight[half:]]
                biases += [None, None] if bias is None else [bias[:half], bias[half:]]
            else:
                inputs.append(weight)
                biases.append(bias)
        output, output_bias = dense_weight(getattr(mlp, layout.output))
        return cls(inputs, biases, output, output_bias)

    @property
    def intermediate_size(self) -> int:
        return int(self.output.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.output.shape[0])
