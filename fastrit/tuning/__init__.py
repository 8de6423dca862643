"""Tuning: prepare a model (deactivate, freeze, quantize, choose what trains) and summarise it."""

from .prepare import QUANTIZE_MODES, TRAIN_MODES, Preparation, prepare
from .summary import trainable_summary

__all__ = ["QUANTIZE_MODES", "TRAIN_MODES", "Preparation", "prepare", "trainable_summary"]
