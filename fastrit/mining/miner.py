"""``fastrit.mine``: attribution over a RAG dataset -> the neurons of relevant and irrelevant contexts.

The records are cut into chunks of :data:`CHUNK_RECORDS` consecutive records. Chunk ``c`` is attributed by
process ``c % world`` (interleaved, so processes finish together); after each round of ``world`` chunks every
process gathers the round's statistics and adds them to the running total in chunk order. Counts are integers
and every float sum is taken in one fixed order (records within a chunk, then chunks), so the result is the
same bit for bit however the run was split across processes or interrupted and resumed (on the CPU, given the
same threads per process: a matmul over another thread count may round differently).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .. import _args
from ..arch import ArchSpec, ModelArch, resolve_arch
from ..attribution import attribute
from ..attribution.inputs import check_settings
from ..attribution.integration import IntegrationRule
from ..data import RagData, load, prompts
from ..data.turns import resolve_template
from .identity import data_fingerprint, model_identity, tokenizer_fingerprint
from .sets import NeuronSets, check_selection
from .stats import MINED_CONDITIONS, MiningStats
from .store import MiningStore
from .workers import Workers

__all__ = ["CHUNK_RECORDS", "MineSettings", "check_mine_arguments", "mine"]

logger = logging.getLogger("fastrit.mine")

CHUNK_RECORDS = 16  # records per chunk: the unit of work per process, of saving, and of resuming


def check_mine_arguments(*, k: int, steps: int | str, method: str | None, objective: str, positions: str,
                         threshold: float, share: float, top_n: int | None, target_layers: int,
                         batch_size: int | None, max_examples: int | None, max_length: int | None,
                         delta_tol: float | None = None) -> IntegrationRule:
    """Raise ValueError naming the first argument of :func:`mine` that is out of range (``target_layers`` is
    checked against the model's layers later); return the integration rule ``steps``, ``method`` and ``delta_tol``
    resolve to."""
    rule = check_settings(objective, positions, method, steps, batch_size, delta_tol)
    _args.number("threshold", threshold, low=0, high=1)
    _args.positive("k", k)
    _args.positive("max_examples", max_examples, optional=True)
    _args.positive("max_length", max_length, optional=True)
    check_selection(share, top_n, target_layers, None)
    return rule


@dataclass(frozen=True)
class MineSettings:
    """What the statistics of a mining run depend on besides the model, tokenizer and data: recorded as the
    ``"statistics"`` of the run's manifest and in :attr:`NeuronSets.settings` (:meth:`to_dict`).

    ``template`` is the resolved one (so that tuning and evaluation can match it), ``max_length`` the model's
    maximum positions when not given, ``delta_tol`` None unless the integration rule is adaptive (``steps="auto"``).
    """

    k: int
    steps: int | str
    method: str
    objective: str
    positions: str
    threshold: float
    template: str
    seed: int
    max_length: int | None
    batch_size: int | None
    chunk_records: int
    layers: int
    intermediate_size: int
    delta_tol: float | None = None

    @classmethod
    def resolve(cls, rule: IntegrationRule, arch: ModelArch, *, k: int, objective: str, positions: str,
                threshold: float, template: str, seed: int, max_length: int | None,
                batch_size: int | None) -> MineSettings:
        """The settings of :func:`mine`'s checked arguments, for the model ``arch`` describes."""
        return cls(k=k, steps=rule.steps, method=rule.method, objective=objective, positions=positions,
                   threshold=float(threshold), template=template, seed=seed,
                   max_length=arch.max_positions if max_length is None else max_length, batch_size=batch_size,
                   chunk_records=CHUNK_RECORDS, layers=arch.num_layers, intermediate_size=arch.intermediate_size,
                   delta_tol=rule.delta_tol if rule.adaptive else None)

    def to_dict(self) -> dict[str, Any]:
        """The fields in their order, ``delta_tol`` only when set (so that the manifests of fixed-step runs stay
        as they were before adaptive rules existed)."""
        out = asdict(self)
        if out["delta_tol"] is None:
            del out["delta_tol"]
        return out


class _ChunkAttributor:
    """The statistics of one chunk of records: both conditions' prompts, attributed, reduced per neuron."""

    def __init__(self, model, tokenizer, data: RagData, settings: MineSettings, spec: ArchSpec | None) -> None:
        self.model, self.tokenizer, self.data, self.spec = model, tokenizer, data, spec
        self.s = settings
        self.layers, self.intermediate = settings.layers, settings.intermediate_size
        self.seconds_attributing = 0.0

    def __call__(self, records: range) -> MiningStats:
        s = self.s
        stats = MiningStats.zeros(self.layers, self.intermediate)
        for condition in MINED_CONDITIONS:
            batch = prompts(self.data, self.tokenizer, condition=condition, k=s.k, template=s.template,
                            max_length=s.max_length, seed=s.seed, indices=records)
            stats.conditions[condition].skipped.update(batch.skipped)
            if len(batch) == 0:
                continue
            start = time.perf_counter()
            result = attribute(self.model, **batch.tensors(), objective=s.objective, positions=s.positions,
                               steps=s.steps, method=s.method, delta_tol=s.delta_tol, batch_size=s.batch_size,
                               spec=self.spec)
            self.seconds_attributing += time.perf_counter() - start
            stats.conditions[condition].add_examples(result.scores, s.threshold)
        return stats


def _open_store(out_dir: str | os.PathLike | None, manifest: dict, workers: Workers) -> MiningStore | None:
    """The run's store in ``out_dir`` (None without one), its manifest checked by every process and written by
    process 0 (the others wait for it)."""
    if out_dir is None:
        return None
    store = MiningStore(out_dir, manifest)
    if workers.is_writer:
        store.open(create=True)
    workers.barrier()
    if not workers.is_writer:
        store.open(create=False)
    return store


@dataclass
class _Rounds:
    """The chunks of ``records`` records, attributed ``workers.world`` at a time (one round) and summed in order.

    Chunk ``c`` is process ``c % world``'s; a chunk the store holds already (saved by a run that stopped before
    summing it) is loaded instead of attributed.
    """

    attribute_chunk: _ChunkAttributor
    store: MiningStore | None
    workers: Workers
    records: int

    @property
    def chunks(self) -> int:
        return math.ceil(self.records / CHUNK_RECORDS)

    def chunk_records(self, chunk: int) -> range:
        return range(chunk * CHUNK_RECORDS, min((chunk + 1) * CHUNK_RECORDS, self.records))

    def sum(self, progress: bool) -> MiningStats:
        """The statistics of every chunk summed in chunk order: from the store's total on (a resumed run), one
        round after another, the store's total saved after each."""
        prefix, total = self.store.load_total() if self.store else (0, None)
        total = total or MiningStats.zeros(self.attribute_chunk.layers, self.attribute_chunk.intermediate)
        bar = tqdm(total=self.records, initial=min(prefix * CHUNK_RECORDS, self.records), unit="record",
                   desc="fastrit.mine", disable=not (progress and self.workers.is_writer))
        try:
            world = self.workers.world
            for round_start in range(prefix - prefix % world, self.chunks, world):
                for offset, stats in enumerate(self.gather(round_start, prefix)):
                    if stats is not None and round_start + offset >= prefix:
                        total.add(stats)
                        bar.update(len(self.chunk_records(round_start + offset)))
                prefix = min(round_start + world, self.chunks)
                if self.store and self.workers.is_writer:
                    self.store.save_total(prefix, total)
        finally:
            bar.close()
        return total

    def gather(self, round_start: int, prefix: int) -> list[MiningStats | None]:
        """Every process's statistics of its chunk of the round starting at ``round_start``, in rank order (None
        for a process without a chunk below ``prefix`` or past the end). Raises RuntimeError on every process
        naming each process that failed: every process must learn of a failure, or the others wait forever."""
        gathered = self.workers.gather(self.outcome(round_start + self.workers.rank, prefix))
        failures = [item for item in gathered if isinstance(item, str)]
        if failures:
            raise RuntimeError("fastrit.mine failed in " + "; ".join(failures))
        return gathered

    def outcome(self, chunk: int, prefix: int) -> MiningStats | str | None:
        """This process's statistics of ``chunk`` (None when it needs none), or, with several processes, the
        error that stopped it as a string (one process: the error is raised)."""
        if not prefix <= chunk < self.chunks:
            return None
        try:
            return self.chunk_stats(chunk)
        except Exception as error:
            if self.workers.world == 1:
                raise
            return f"process {self.workers.rank}, records {self.chunk_records(chunk)}: {error!r}"

    def chunk_stats(self, chunk: int) -> MiningStats:
        """The statistics of ``chunk``: from the store when it holds them, else attributed (and saved there)."""
        if self.store and self.store.has_chunk(chunk):
            return self.store.load_chunk(chunk)
        stats = self.attribute_chunk(self.chunk_records(chunk))
        if self.store:
            self.store.save_chunk(chunk, self.chunk_records(chunk), stats)
        return stats


def mine(model: nn.Module, tokenizer, data: RagData | str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
         k: int = 5, steps: int | str = 20, method: str | None = None, objective: str = "logprob",
         positions: str = "last", threshold: float = 0.2, share: float = 0.3, top_n: int | None = None,
         target_layers: int = 3, batch_size: int | None = None, max_examples: int | None = None,
         progress: bool = True, template: str | None = None, seed: int = 0, max_length: int | None = None,
         spec: ArchSpec | None = None, delta_tol: float | None = None) -> NeuronSets:
    """Mine the MLP neurons that respond to relevant and to irrelevant retrieved passages.

    For each record (the first ``max_examples``), its relevant-context and irrelevant-context prompts
    (:func:`fastrit.data.prompts` with ``k``, ``template``, ``seed``, ``max_length``; default: the model's
    maximum positions) are attributed to the gold answer with :func:`fastrit.attribute` (``steps``, ``method``,
    ``delta_tol``, ``objective``, ``positions``, ``batch_size``), every layer. In one example a neuron is active when
    its score is positive and at least ``threshold`` x the example's largest score in its layer. Sets and target
    layers are then chosen as :meth:`NeuronSets.select` says (``share``, ``top_n``, ``target_layers``). Records
    without a prompt of a condition are skipped for that condition and counted by reason.

    With ``out_dir``, the statistics of each finished chunk of records are saved there as it finishes, a run
    started again with the same arguments continues where it stopped (the selection arguments may change), and
    the result is saved there too (``NeuronSets.save``). Under torchrun or ``accelerate launch`` the records
    are split across the processes; every process returns the same NeuronSets and process 0 writes.

    ``data``: a RagData, or anything :func:`fastrit.data.load` reads. ``spec``: where the layers are, for a
    model family fastrit does not know. Returns the same NeuronSets, bit for bit, however the run was split
    or resumed (given the same kernels: the same device, backend and number of threads).
    """
    rule = check_mine_arguments(k=k, steps=steps, method=method, objective=objective, positions=positions,
                                threshold=threshold, share=share, top_n=top_n, target_layers=target_layers,
                                batch_size=batch_size, max_examples=max_examples, max_length=max_length,
                                delta_tol=delta_tol)
    data = data if isinstance(data, RagData) else load(data)
    template = resolve_template(tokenizer, template)  # recorded resolved, so tuning and evaluation can match it
    arch = resolve_arch(model, spec)
    settings = MineSettings.resolve(rule, arch, k=k, objective=objective, positions=positions,
                                    threshold=threshold, template=template, seed=seed, max_length=max_length,
                                    batch_size=batch_size)
    check_selection(share, top_n, target_layers, arch.num_layers)
    records = len(data) if max_examples is None else min(max_examples, len(data))
    if records == 0:
        raise ValueError("data: no records to mine")
    manifest = {"statistics": settings.to_dict(), "data": data_fingerprint(data, records),
                "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "model": model_identity(model, arch)}
    attribute_chunk = _ChunkAttributor(model, tokenizer, data, settings, spec)
    started = time.perf_counter()
    workers = Workers.start(next(model.parameters()).device)
    try:
        store = _open_store(out_dir, manifest, workers)
        total = _Rounds(attribute_chunk, store, workers, records).sum(progress)
        sets = NeuronSets.from_stats(total, share=share, top_n=top_n, target_layers=target_layers,
                                     settings={**manifest["statistics"], "data": manifest["data"],
                                               "tokenizer_sha256": manifest["tokenizer_sha256"]},
                                     model=manifest["model"])
        if store and workers.is_writer:
            sets.save(store.directory)
        workers.barrier()
    finally:
        workers.close()
    logger.info("fastrit.mine: %s examples (%s skipped) in %.1f s, %.1f s of it attributing on this process",
                sets.examples, {c: sum(v.values()) for c, v in sets.skipped.items()},
                time.perf_counter() - started, attribute_chunk.seconds_attributing)
    return sets
