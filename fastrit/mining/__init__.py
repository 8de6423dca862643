"""Neuron mining: attribution over RAG datasets -> NeuronSets (resumable, sharded over processes), and plots."""

from .miner import CHUNK_RECORDS, mine
from .sets import SET_NAMES, NeuronSets
from .stats import MINED_CONDITIONS, active_neurons

__all__ = ["CHUNK_RECORDS", "MINED_CONDITIONS", "NeuronSets", "SET_NAMES", "active_neurons", "mine"]
