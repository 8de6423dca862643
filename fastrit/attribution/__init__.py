"""Integrated Gradients over MLP neurons: the fast engine and its slow reference loop."""

from .engine import attribute, attribute_call
from .integration import METHODS, integration_points
from .plan import plan_attribution
from .reference import attribute_reference
from .result import NeuronAttribution

__all__ = [
    "attribute", "attribute_call", "attribute_reference", "NeuronAttribution", "METHODS", "integration_points",
    "plan_attribution",
]
