"""Tuning: prepare a model (deactivate, freeze, quantize, choose what trains), train it in two stages, measure its
answer loss, summarise it, export it as a plain transformers checkpoint, and share what changed as a delta."""

from .delta import load_delta, save_delta
from .export import export
from .loss import causal_lm_loss
from .metrics import (
    EvidenceAnswerLoss,
    answer_loss,
    answer_loss_after_evidence,
    answer_loss_over_evidence,
    answer_loss_over_own_evidence,
)
from .plan import MemoryPlan, plan_memory
from .prepare import QUANTIZE_MODES, TRAIN_MODES, Preparation, prepare
from .stages import STAGES, stage_data
from .summary import trainable_summary

__all__ = [
    "QUANTIZE_MODES", "STAGES", "TRAIN_MODES", "EvidenceAnswerLoss", "MemoryPlan", "NeuroRITTrainer", "Preparation",
    "answer_loss", "answer_loss_after_evidence", "answer_loss_over_evidence", "answer_loss_over_own_evidence",
    "causal_lm_loss", "export", "load_delta", "plan_memory", "prepare", "save_delta", "stage_data",
    "trainable_summary", "tune",
]


def __getattr__(name: str):
    # the Trainer pulls in transformers.trainer (accelerate, and through it triton): only when asked for,
    # so that `import fastrit` stays lean
    if name in ("NeuroRITTrainer", "tune"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
