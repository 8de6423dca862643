"""The on-disk state of a resumable mining run.

Layout of ``out_dir``:

- ``mining_run.json``: what the statistics depend on (settings, data, tokenizer, model); a run started into the
  folder with anything different is refused.
- ``chunks/chunk-NNNNNNNN.safetensors``: the statistics of one finished chunk of records (any process writes its
  own chunks, as they finish).
- ``total.safetensors``: the statistics of chunks ``0 .. prefix - 1`` summed in order, with ``prefix`` in its
  metadata; chunk files below the prefix are deleted once it is written.
- ``neuron_sets.safetensors`` and ``summary.json``: the result (:meth:`NeuronSets.save`).

Every file is written atomically (a temporary name, then a rename), so a run killed at any moment leaves a folder
that the same command finishes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from .._io import atomic_path
from .._run_folder import RunFolder
from .stats import MiningStats

__all__ = ["MiningStore"]

_FORMAT = "fastrit.mining_run/1"
MANIFEST = "mining_run.json"
TOTAL = "total.safetensors"
CHUNKS = "chunks"


class MiningStore:
    """Reads and writes the state of one mining run in ``directory`` (see the module docstring); its manifest is
    the identity record of a :class:`fastrit._run_folder.RunFolder`."""

    def __init__(self, directory: str | os.PathLike, manifest: dict) -> None:
        self.folder = RunFolder(directory, argument="out_dir", record=MANIFEST, kind="mining run",
                                identity={"format": _FORMAT, **manifest})
        self.directory = self.folder.directory
        self.manifest = self.folder.identity

    def open(self, create: bool) -> None:
        """Check the manifest of a run already in the folder against this one; ``create`` (one process only):
        write it if there is none, and remove temporary files a killed run left behind.

        Raises ValueError saying what differs when the folder holds another run; RuntimeError when not ``create``
        and there is no manifest.
        """
        if self.folder.check(must_exist=not create) is None:
            self.folder.write()
        if create:
            (self.directory / CHUNKS).mkdir(parents=True, exist_ok=True)
            self.folder.remove_leftovers(CHUNKS)

    def _chunk_path(self, index: int) -> Path:
        return self.directory / CHUNKS / f"chunk-{index:08d}.safetensors"

    def has_chunk(self, index: int) -> bool:
        return self._chunk_path(index).is_file()

    def save_chunk(self, index: int, records: range, stats: MiningStats) -> None:
        meta = {"chunk": index, "records": [records.start, records.stop], "conditions": stats.metadata()}
        with atomic_path(self._chunk_path(index)) as tmp:
            save_file(stats.tensors(), str(tmp), metadata={"stats": json.dumps(meta)})

    def load_chunk(self, index: int) -> MiningStats:
        meta, tensors = _read(self._chunk_path(index))
        return MiningStats.from_saved(tensors, meta["conditions"])

    def load_total(self) -> tuple[int, MiningStats | None]:
        """``(prefix, statistics of chunks below it)``, or ``(0, None)`` when nothing has been summed yet."""
        path = self.directory / TOTAL
        if not path.is_file():
            return 0, None
        meta, tensors = _read(path)
        return int(meta["prefix"]), MiningStats.from_saved(tensors, meta["conditions"])

    def save_total(self, prefix: int, stats: MiningStats) -> None:
        """Write the sum of chunks below ``prefix``, then delete their files."""
        meta = {"prefix": prefix, "conditions": stats.metadata()}
        with atomic_path(self.directory / TOTAL) as tmp:
            save_file(stats.tensors(), str(tmp), metadata={"stats": json.dumps(meta)})
        for path in (self.directory / CHUNKS).glob("chunk-*.safetensors"):
            if int(path.stem.removeprefix("chunk-")) < prefix:
                path.unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["stats"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    return meta, tensors
