"""Modules built from fastrit.ops for tuning: NF4Linear (frozen 4-bit weights) and NeuronMLP (an MLP whose
neurons are deactivated, frozen or trainable)."""

from .mlp_layout import MLP_LAYOUTS, MLPLayout, MLPWeights, mlp_layout
from .neuron_mlp import NeuronMLP
from .nf4_linear import NF4Linear

__all__ = ["MLP_LAYOUTS", "MLPLayout", "MLPWeights", "NF4Linear", "NeuronMLP", "mlp_layout"]
