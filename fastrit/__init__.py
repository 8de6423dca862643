"""fastrit: neuron-guided robust instruction tuning (Neuro-RIT), fast and small on one GPU.

``import fastrit`` initialises no CUDA context and compiles no kernel.
"""

from . import data
from .arch import FAMILIES, ArchSpec, MLPLayout, resolve_arch
from .attribution import METHODS, NeuronAttribution, attribute, attribute_reference, plan_attribution
from .evaluate import evaluate
from .mining import NeuronSets, mine
from .ops import backends
from .tuning import MemoryPlan, export, load_delta, plan_memory, prepare, save_delta, trainable_summary

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "MLPLayout",
    "FAMILIES",
    "METHODS",
    "MemoryPlan",
    "NeuronAttribution",
    "NeuronSets",
    "NeuroRITTrainer",
    "attribute",
    "attribute_reference",
    "backends",
    "data",
    "evaluate",
    "export",
    "load_delta",
    "mine",
    "plan_attribution",
    "plan_memory",
    "prepare",
    "resolve_arch",
    "save_delta",
    "trainable_summary",
    "tune",
    "__version__",
]


def __getattr__(name: str):
    # NeuroRITTrainer and tune import transformers' Trainer: loaded on first use (see fastrit.tuning)
    if name in ("NeuroRITTrainer", "tune"):
        from . import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
