"""``fastrit.mine``: attribution over a RAG dataset -> the neurons of relevant and irrelevant contexts.

The records are cut into chunks of :data:`CHUNK_RECORDS` consecutive records. Chunk ``c`` is attributed by
process ``c % world`` (interleaved, so processes finish together); after each round of ``world`` chunks every
process gathers the round's statistics and adds them to the running total in chunk order. Counts are integers
and every float sum is taken in one fixed order (records within a chunk, then chunks), so the result is the
same bit for bit however the run was split across processes or interrupted and resumed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchSpec, resolve_arch
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

__all__ = ["CHUNK_RECORDS", "check_mine_arguments", "mine"]

logger = logging.getLogger("fastrit.mine")

CHUNK_RECORDS = 16  # records per chunk: the unit of work per process, of saving, and of resuming


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")


def _check_count(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}a positive integer, got {value!r}")


def check_mine_arguments(*, k: int, steps: int | str, method: str | None, objective: str, positions: str,
                         threshold: float, share: float, top_n: int | None, target_layers: int,
                         batch_size: int | None, max_examples: int | None, max_length: int | None,
                         delta_tol: float | None = None) -> IntegrationRule:
    """Raise ValueError naming the first argument of :func:`mine` that is out of range (``target_layers`` is
    checked against the model's layers later); return the integration rule ``steps``, ``method`` and ``delta_tol``
    resolve to."""
    rule = check_settings(objective, positions, method, steps, batch_size, delta_tol)
    _check_fraction("threshold", threshold)
    _check_count("k", k)
    _check_count("max_examples", max_examples, optional=True)
    _check_count("max_length", max_length, optional=True)
    check_selection(share, top_n, target_layers, None)
    return rule


class _ChunkAttributor:
    """The statistics of one chunk of records: both conditions' prompts, attributed, reduced per neuron."""

    def __init__(self, model, tokenizer, data: RagData, statistics: dict, spec: ArchSpec | None) -> None:
        self.model, self.tokenizer, self.data, self.spec = model, tokenizer, data, spec
        self.s = statistics
        self.layers, self.intermediate = statistics["layers"], statistics["intermediate_size"]
        self.seconds_attributing = 0.0

    def __call__(self, records: range) -> MiningStats:
        s = self.s
        stats = MiningStats.zeros(self.layers, self.intermediate)
        for condition in MINED_CONDITIONS:
            batch = prompts(self.data, self.tokenizer, condition=condition, k=s["k"], template=s["template"],
                            max_length=s["max_length"], seed=s["seed"], indices=records)
            stats.conditions[condition].skipped.update(batch.skipped)
            if len(batch) == 0:
                continue
            start = time.perf_counter()
            result = attribute(self.model, **batch.tensors(), objective=s["objective"], positions=s["positions"],
                               steps=s["steps"], method=s["method"], delta_tol=s.get("delta_tol"),
                               batch_size=s["batch_size"], spec=self.spec)
            self.seconds_attributing += time.perf_counter() - start
            stats.conditions[condition].add_examples(result.scores, s["threshold"])
        return stats


def mine(
    model: nn.Module,
    tokenizer,
    data: RagData | str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    k: int = 5,
    steps: int | str = 20,
    method: str | None = None,
    objective: str = "logprob",
    positions: str = "last",
    threshold: float = 0.2,
    share: float = 0.3,
    top_n: int | None = None,
    target_layers: int = 3,
    batch_size: int | None = None,
    max_examples: int | None = None,
    progress: bool = True,
    template: str | None = None,
    seed: int = 0,
    max_length: int | None = None,
    spec: ArchSpec | None = None,
    delta_tol: float | None = None,
) -> NeuronSets:
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
    check_selection(share, top_n, target_layers, arch.num_layers)
    if max_length is None:
        max_length = arch.max_positions
    records = len(data) if max_examples is None else min(max_examples, len(data))
    if records == 0:
        raise ValueError("data: no records to mine")

    statistics = {"k": k, "steps": rule.steps, "method": rule.method, "objective": objective, "positions": positions,
                  "threshold": float(threshold), "template": template, "seed": seed, "max_length": max_length,
                  "batch_size": batch_size, "chunk_records": CHUNK_RECORDS, "layers": arch.num_layers,
                  "intermediate_size": arch.intermediate_size}
    if rule.adaptive:  # recorded only then, so that the manifests of fixed-step runs stay as they were
        statistics["delta_tol"] = rule.delta_tol
    identity = model_identity(model, arch)
    manifest = {"statistics": statistics, "data": data_fingerprint(data, records),
                "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "model": identity}
    attribute_chunk = _ChunkAttributor(model, tokenizer, data, statistics, spec)
    chunks = math.ceil(records / CHUNK_RECORDS)
    started = time.perf_counter()

    workers = Workers.start(next(model.parameters()).device)
    try:
        store = None
        if out_dir is not None:
            store = MiningStore(out_dir, manifest)
            if workers.is_writer:
                store.open(create=True)
            workers.barrier()
            if not workers.is_writer:
                store.open(create=False)
        prefix, total = store.load_total() if store else (0, None)
        total = total or MiningStats.zeros(arch.num_layers, arch.intermediate_size)

        def chunk_records(chunk: int) -> range:
            return range(chunk * CHUNK_RECORDS, min((chunk + 1) * CHUNK_RECORDS, records))

        bar = tqdm(total=records, initial=min(prefix * CHUNK_RECORDS, records), unit="record", desc="fastrit.mine",
                   disable=not (progress and workers.is_writer))
        try:
            for round_start in range(prefix - prefix % workers.world, chunks, workers.world):
                mine_chunk = round_start + workers.rank
                outcome: Any = None
                if prefix <= mine_chunk < chunks:
                    try:
                        if store and store.has_chunk(mine_chunk):
                            outcome = store.load_chunk(mine_chunk)
                        else:
                            outcome = attribute_chunk(chunk_records(mine_chunk))
                            if store:
                                store.save_chunk(mine_chunk, chunk_records(mine_chunk), outcome)
                    except Exception as error:  # every process must learn of it, or the others wait forever
                        if workers.world == 1:
                            raise
                        outcome = f"process {workers.rank}, records {chunk_records(mine_chunk)}: {error!r}"
                gathered = workers.gather(outcome)
                failures = [item for item in gathered if isinstance(item, str)]
                if failures:
                    raise RuntimeError("fastrit.mine failed in " + "; ".join(failures))
                for offset, stats in enumerate(gathered):
                    if stats is not None and round_start + offset >= prefix:
                        total.add(stats)
                        bar.update(len(chunk_records(round_start + offset)))
                prefix = min(round_start + workers.world, chunks)
                if store and workers.is_writer:
                    store.save_total(prefix, total)
        finally:
            bar.close()

        sets = NeuronSets.from_stats(
            total, share=share, top_n=top_n, target_layers=target_layers,
            settings={**statistics, "data": manifest["data"], "tokenizer_sha256": manifest["tokenizer_sha256"]},
            model=identity,
        )
        if store and workers.is_writer:
            sets.save(store.directory)
        workers.barrier()
    finally:
        workers.close()

    elapsed = time.perf_counter() - started
    logger.info("fastrit.mine: %s examples (%s skipped) in %.1f s, %.1f s of it attributing on this process",
                sets.examples, {c: sum(v.values()) for c, v in sets.skipped.items()}, elapsed,
                attribute_chunk.seconds_attributing)
    return sets
