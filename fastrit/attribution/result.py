"""NeuronAttribution: the scores of one ``attribute`` call, saved as one safetensors file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_path

__all__ = ["NeuronAttribution"]

_FORMAT = "fastrit.NeuronAttribution/1"


@dataclass
class NeuronAttribution:
    """Integrated-Gradients scores of every MLP neuron of the chosen layers.

    Attributes:
        scores: ``[B, len(layers), I]`` float32; ``scores[b, j, i]`` is the IG score of neuron ``i``
            of layer ``layers[j]`` for example ``b``, summed over the scaled positions.
        delta: ``[B, len(layers)]`` float32 completeness error, ``sum_i scores - (F(a) - F(0))``.
        layers: the layer indices, in the order of ``scores``' second axis.
        settings: how the scores were made (objective, positions, steps, method, model, ...);
            JSON-serialisable values only.
        steps_used: ``[B, len(layers)]`` int32, the integration points each example's layer was scored with (with
            ``steps="auto"`` they differ per layer); None when not recorded.
    """

    scores: torch.Tensor
    delta: torch.Tensor
    layers: list[int]
    settings: dict = field(default_factory=dict)
    steps_used: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores.dim() != 3 or self.delta.shape != self.scores.shape[:2]:
            raise ValueError(
                "scores/delta: expected [B, L, I] and [B, L], "
                f"got {list(self.scores.shape)} and {list(self.delta.shape)}"
            )
        if len(self.layers) != self.scores.shape[1]:
            raise ValueError(f"layers: expected {self.scores.shape[1]} layer indices, got {len(self.layers)}")
        if self.steps_used is not None and self.steps_used.shape != self.delta.shape:
            raise ValueError(
                f"steps_used: expected shape {list(self.delta.shape)} like delta, got {list(self.steps_used.shape)}"
            )

    @property
    def num_examples(self) -> int:
        return int(self.scores.shape[0])

    def layer(self, index: int) -> torch.Tensor:
        """``[B, I]`` scores of model layer ``index`` (a model layer index, not a position in ``layers``)."""
        if index not in self.layers:
            raise ValueError(f"index: layer {index} was not attributed; layers are {self.layers}")
        return self.scores[:, self.layers.index(index)]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores to ``path`` (safetensors, settings as JSON in its metadata).

        The file is written to a temporary name beside ``path`` and renamed, so an interrupted
        save never leaves a half-written file under ``path``.
        """
        meta = {"format": _FORMAT, "layers": json.dumps(self.layers), "settings": json.dumps(self.settings)}
        tensors = {"scores": self.scores.detach().cpu().contiguous(), "delta": self.delta.detach().cpu().contiguous()}
        if self.steps_used is not None:
            tensors["steps_used"] = self.steps_used.detach().cpu().to(torch.int32).contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronAttribution:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a fastrit NeuronAttribution file")
        tensors = load_file(str(path))
        return cls(
            scores=tensors["scores"],
            delta=tensors["delta"],
            layers=[int(x) for x in json.loads(meta["layers"])],
            settings=json.loads(meta["settings"]),
            steps_used=tensors.get("steps_used"),
        )
