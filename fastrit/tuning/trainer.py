"""Neuro-RIT training: ``NeuroRITTrainer`` (a transformers Trainer) and ``fastrit.tune`` (prepare, then both stages).

The Trainer is transformers' own (accelerate, DDP/FSDP, gradient accumulation, logging, schedules, checkpoints and
resume behave as users expect) with three changes:

- the loss is :func:`fastrit.tuning.causal_lm_loss` (the labelled positions only, the output head a chunk at a
  time), normalised as the Trainer normalises the model's own loss under gradient accumulation;
- a checkpoint holds what training changes, not the frozen model: the delta of :func:`fastrit.save_delta`
  (trainable tensors, indices, settings) plus the Trainer's optimizer, scheduler, RNG and progress state; resuming
  loads the trained tensors back into the prepared model;
- batches are right-padded by :func:`fastrit.tuning.stages.collate` unless another collator is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn

from .. import _args
from .._io import write_text_atomic
from .._run_folder import RunFolder
from ..data import RagData
from ..data.turns import resolve_template
from ..mining import NeuronSets
from .delta import save_delta
from .effect import ModelChange
from .loss import causal_lm_loss
from .metrics import answer_loss, answer_loss_after_evidence, answer_loss_over_own_evidence
from .prepare import PREPARATION_ATTR, prepare, prepare_on_meta
from .stages import STAGES, StageData, check_stage_names, collate, stage_data

__all__ = ["DELTA_NAME", "NeuroRITTrainer", "OPTIMIZERS", "TuneSettings", "tune"]

DELTA_NAME = "fastrit_delta.safetensors"
#: how many training prompts tune gives prepare to measure what deactivation and quantization did to the model
CHECK_PROMPTS = 8
#: sampled continuations per prompt of the own-evidence answer loss that eval_data measures
OWN_EVIDENCE_SAMPLES = 16
#: optimizer name -> transformers TrainingArguments ``optim`` (8-bit AdamW is paged on CUDA)
OPTIMIZERS = {"adamw8bit": ("adamw_bnb_8bit", "paged_adamw_8bit"), "adamw": ("adamw_torch", "adamw_torch")}
#: tune's hyperparameters that take one value, or one per stage (``{stage: value}``)
PER_STAGE = ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "warmup", "max_steps")
#: the record of a tuning run in its output_dir (fastrit._run_folder.RunFolder): fingerprint, settings, prepared
RUN_RECORD = "fastrit_run.json"
#: the held-out losses of tune's eval_data, in its output_dir
EVAL_LOSSES = "eval_loss.json"


logger = logging.getLogger("fastrit.tune")


class NeuroRITTrainer(transformers.Trainer):
    """A transformers Trainer for a model prepared by :func:`fastrit.prepare` (see the module docstring)."""

    def __init__(self, model: nn.Module, args: transformers.TrainingArguments, *, loss_chunk_size: int | None = None,
                 loss_chunk_bytes: int | None = None, **kwargs) -> None:
        if getattr(model, PREPARATION_ATTR, None) is None:
            raise ValueError("model: prepare it with fastrit.prepare first (NeuroRITTrainer trains prepared models)")
        if args.gradient_checkpointing:
            raise ValueError("args: leave gradient_checkpointing off; fastrit.prepare enables it so that backward "
                             "stops at the lowest trainable layer")
        if kwargs.get("data_collator") is None:
            pad = getattr(kwargs.get("processing_class"), "pad_token_id", None)
            kwargs["data_collator"] = partial(collate, pad_token_id=pad if pad is not None else 0)
        super().__init__(model=model, args=args, **kwargs)
        self.loss_chunk_size, self.loss_chunk_bytes = loss_chunk_size, loss_chunk_bytes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs: NeuroRITTrainer computes the loss without the logits")
        return causal_lm_loss(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                              chunk_size=self.loss_chunk_size, chunk_bytes=self.loss_chunk_bytes,
                              num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        save_delta(self.accelerator.unwrap_model(self.model), output_dir / DELTA_NAME)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trained_tensors(model if model is not None else self.model, Path(resume_from_checkpoint) / DELTA_NAME)


def load_trained_tensors(model: nn.Module, path: Path) -> None:
    """Copy the trained tensors of the delta at ``path`` into the already prepared ``model`` (every trainable
    parameter must be there, with its shape)."""
    model = getattr(model, "module", model)
    if not path.is_file():
        raise ValueError(f"resume_from_checkpoint: no fastrit delta at {path}")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(path), framework="pt") as handle:
        names = {key[len("param."):] for key in handle.keys() if key.startswith("param.")}  # noqa: SIM118
        if names != set(trainable) or any(tuple(handle.get_slice("param." + n).get_shape()) != tuple(p.shape)
                                          for n, p in trainable.items()):
            raise ValueError(f"resume_from_checkpoint: the delta at {path} does not fit this prepared model")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(handle.get_tensor("param." + name))


def _per_stage(name: str, value, stage: str):
    """``value`` itself, or ``value[stage]`` when it is a mapping by stage name."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(STAGES)
        if unknown:
            raise ValueError(f"{name}: unknown stage names {sorted(unknown)}; expected {STAGES}")
        if stage not in value:
            raise ValueError(f"{name}: no value for stage {stage!r}")
        return value[stage]
    return value


@dataclass(frozen=True)
class TuneSettings:
    """:func:`tune`'s settings besides the model, the data and prepare's arguments (see tune for each).

    Each of :data:`PER_STAGE` (epochs, learning_rate, batch_size, gradient_accumulation_steps, warmup, max_steps)
    is one value or a mapping ``{stage: value}``; :meth:`for_stage` gives one stage's values. ``template`` is the
    resolved one (so that mining, tuning and evaluation agree).
    """

    stages: list[str]
    epochs: float | Mapping[str, float]
    learning_rate: float | Mapping[str, float]
    batch_size: int | Mapping[str, int]
    gradient_accumulation_steps: int | Mapping[str, int]
    warmup: float | Mapping[str, float]
    max_steps: int | Mapping[str, int]
    optimizer: str
    save_steps: int
    logging_steps: int
    seed: int
    k: int
    template: str
    max_length: int | None
    loss_chunk_size: int | None
    loss_chunk_bytes: int | None
    progress: bool
    callbacks: tuple[transformers.TrainerCallback, ...]

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range: stage names (distinct, among :data:`STAGES`),
        the optimizer, ``loss_chunk_bytes``, a per-stage mapping with an unknown stage or without a stage run."""
        check_stage_names("stages", self.stages)
        _args.one_of("optimizer", self.optimizer, OPTIMIZERS, what=f"one of {sorted(OPTIMIZERS)}")
        _args.positive("loss_chunk_bytes", self.loss_chunk_bytes, optional=True, what="a positive number of bytes")
        for stage in self.stages:
            self.for_stage(stage)

    def for_stage(self, stage: str) -> TuneSettings:
        """These settings with each of :data:`PER_STAGE` replaced by its value for ``stage``."""
        return replace(self, **{name: _per_stage(name, getattr(self, name), stage) for name in PER_STAGE})

    def record(self, data: RagData, prepare_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """What a run's files depend on, as its folder records them (and :func:`_fingerprint` hashes them): the
        training and prompt settings, the data (number of records, fingerprint of a 🤗 dataset) and prepare's
        arguments (values other than str / int / float / bool / None as their repr)."""
        return {"stages": self.stages, "epochs": self.epochs, "learning_rate": self.learning_rate,
                "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "warmup": self.warmup, "max_steps": self.max_steps, "optimizer": self.optimizer, "seed": self.seed,
                "k": self.k, "template": self.template, "max_length": self.max_length, "records": len(data),
                "data": getattr(data.records, "_fingerprint", None),
                "prepare": {key: value if isinstance(value, str | int | float | bool | None) else repr(value)
                            for key, value in prepare_kwargs.items()}}


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _open_run(output_dir: str | os.PathLike, settings: TuneSettings, data: RagData,
              prepare_kwargs: Mapping[str, Any]) -> tuple[RunFolder, dict]:
    """The run's folder, checked: ``(folder, notes of the interrupted run there)`` (``{}`` when none). Its record
    (:data:`RUN_RECORD`) holds the settings' fingerprint and the settings, and beside them ``"prepared"``.

    Raises ValueError (``output_dir: ...``) for a folder of a run with other settings (what differs is listed) and
    for a non-empty folder that holds no run."""
    record = settings.record(data, prepare_kwargs)
    run = RunFolder(output_dir, argument="output_dir", record=RUN_RECORD, kind="tuning run", notes=("prepared",),
                    identity={"fingerprint": _fingerprint(record), "settings": record}, exclusive=True,
                    derived=("fingerprint",))
    return run, run.check() or {}


def _stage_examples(model: nn.Module, tokenizer, data: RagData, settings: TuneSettings) -> dict[str, StageData]:
    """``{stage: its examples}`` built from ``data`` (fastrit.tuning.stages); TypeError for data that is not a
    RagData, ValueError when a stage has no example."""
    if not isinstance(data, RagData):
        raise TypeError(f"data: expected fastrit.data.RagData, got {type(data).__name__}")
    examples = {}
    for stage in settings.stages:
        built = stage_data(data, tokenizer, stage, k=settings.k, template=settings.template,
                           max_length=settings.max_length, seed=settings.seed, model=model)
        if len(built) == 0:
            raise ValueError(f"data: no {stage} example could be built from {len(data)} records "
                             f"(skipped: {built.skipped})")
        examples[stage] = built
    return examples


class _Evaluation:
    """The noisy-context answer losses of tune's ``eval_data`` (see :func:`tune`), kept in ``output_dir /
    EVAL_LOSSES`` (a resumed run starts from the losses there). Without eval_data every method does nothing.

    Raises ValueError when no noisy-context example can be built from ``eval_data``.
    """

    def __init__(self, model: nn.Module, tokenizer, eval_data: RagData | None, settings: TuneSettings,
                 output_dir: Path) -> None:
        self.model, self.tokenizer, self.data, self.s = model, tokenizer, eval_data, settings
        self.path = output_dir / EVAL_LOSSES
        self.examples, self.losses = None, {}
        if eval_data is None:
            return
        self.examples = stage_data(eval_data, tokenizer, "denoise", k=settings.k, template=settings.template,
                                   max_length=settings.max_length, seed=settings.seed, model=model).dataset
        if len(self.examples) == 0:
            raise ValueError("eval_data: no noisy-context example could be built from it")
        self.losses = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @property
    def wants_before(self) -> bool:
        """Whether the losses before training are still to be measured."""
        return self.data is not None and "before" not in self.losses

    def measure(self, stages_done: Sequence[str]) -> dict[str, float]:
        """The losses of the model as it is now, after ``stages_done``: the answer right after the prompt and
        over the model's own evidence, and once the model has been through distill, after its greedy evidence."""
        s = self.s
        point = {"answer_after_prompt": answer_loss(self.model, self.examples, self.tokenizer),
                 "answer_over_own_evidence": answer_loss_over_own_evidence(
                     self.model, self.tokenizer, self.data, k=s.k, template=s.template, seed=s.seed,
                     samples=OWN_EVIDENCE_SAMPLES)}
        if "distill" in stages_done:
            after = answer_loss_after_evidence(self.model, self.tokenizer, self.data, k=s.k, template=s.template,
                                               seed=s.seed)
            point.update(answer_after_own_evidence=after.loss, marker_written=after.marker_written)
        return point

    def measure_before(self) -> None:
        """The losses of the model as given (before prepare deactivates and quantizes), with how long it took."""
        logger.warning(f"fastrit.tune: measuring the noisy-context answer loss on {len(self.examples)} held-out "
                       f"prompts ({OWN_EVIDENCE_SAMPLES} sampled continuations each), before training and after "
                       "each stage")
        started = time.perf_counter()
        self.losses["before"] = self.measure(())
        logger.warning(f"fastrit.tune: that measurement took {time.perf_counter() - started:.0f} s; it is repeated "
                       f"after each of the {len(self.s.stages)} stages")

    def measure_after(self, stages_done: Sequence[str]) -> None:
        """The losses after the last of ``stages_done``, saved and logged."""
        if self.data is None:
            return
        self.losses[stages_done[-1]] = self.measure(stages_done)
        self.save()
        transformers.logging.get_logger(__name__).warning(f"fastrit.tune: noisy-context answer loss {self.losses}")

    def save(self) -> None:
        if self.data is not None:
            write_text_atomic(self.path, json.dumps(self.losses, indent=1))


def _prepare_defaults(prepare_kwargs: dict, examples: dict, batch_size) -> dict:
    """prepare's arguments with tune's defaults filled in: the training batch that ``quantize_frozen="auto"`` plans
    for (the largest stage batch size, the longest example) and the first stage's first prompts, on which prepare
    limits and measures deactivation and quantization (``check_prompts``)."""
    out = dict(prepare_kwargs)
    sizes = list(batch_size.values()) if isinstance(batch_size, Mapping) else [batch_size]
    longest = max(len(row) for built in examples.values() for row in built.dataset["input_ids"])
    out.setdefault("planned_batch", (max(sizes), longest))
    if "check_prompts" not in out:
        out["check_prompts"] = next(iter(examples.values())).prompts(CHECK_PROMPTS)
    return out


def _as_prepared_before(prepare_kwargs: dict, prepared: dict | None) -> dict:
    """On resume, prepare's choices that depend on the machine or the model's outputs (the "auto" settings
    ``quantize_frozen`` and ``gradient_checkpointing``, the deactivated prefix the tolerance allowed) made as the
    interrupted run made them (``prepared``, from its fastrit_run.json), so that the resumed stages train the same
    tensors on the same model; as given otherwise. The resumed Preparation then says ``deactivate="explicit"``."""
    if not prepared:
        return prepare_kwargs
    out = dict(prepare_kwargs)
    if out.get("quantize_frozen", "auto") == "auto":
        out["quantize_frozen"] = prepared["quantize_frozen"]
    if out.get("gradient_checkpointing", "auto") == "auto" and "gradient_checkpointing" in prepared:
        out["gradient_checkpointing"] = prepared["gradient_checkpointing"]
    if isinstance(out.get("deactivate", "irrelevant_exclusive"), str):
        out["deactivate"] = {int(layer): idx for layer, idx in prepared["deactivated"].items()}
    return out


def _prepare_arguments(model: nn.Module, prepare_kwargs: dict, prepared: dict | None,
                       examples: dict[str, StageData], settings: TuneSettings) -> dict | None:
    """The arguments tune gives :func:`fastrit.prepare` (:func:`_as_prepared_before`, then
    :func:`_prepare_defaults`), or None when ``model`` is prepared already."""
    if getattr(model, PREPARATION_ATTR, None) is not None:
        return None
    return _prepare_defaults(_as_prepared_before(prepare_kwargs, prepared), examples, settings.batch_size)


def _measure_before(evaluation: _Evaluation, model: nn.Module, neuron_sets: NeuronSets | None,
                    prepare_kwargs: dict | None) -> None:
    """The eval losses of the model as given, unless measured already (or no eval_data). For a model still to be
    prepared (``prepare_kwargs`` not None), prepare's checks come first, on a meta copy
    (:func:`fastrit.tuning.prepare.prepare_on_meta`), so that bad input costs no evaluation."""
    if not evaluation.wants_before:
        return
    if prepare_kwargs is not None:
        prepare_on_meta(model, neuron_sets, **prepare_kwargs)
    evaluation.measure_before()


def _prepare(model: nn.Module, neuron_sets: NeuronSets | None, prepare_kwargs: dict) -> None:
    """:func:`fastrit.prepare` the model, logging the settings it chose and what it did to the untrained model."""
    prepare(model, neuron_sets, **prepare_kwargs)
    preparation = getattr(model, PREPARATION_ATTR)
    logger.warning(f"fastrit.tune: {preparation.settings['quantize_reason']}")
    for name, change in preparation.effect.items():
        logger.warning(f"fastrit.tune: the untrained model after {name}: " + str(ModelChange(**change)))


def _prepared_note(model: nn.Module) -> dict[str, Any]:
    """What a resumed run must choose as this one did (:func:`_as_prepared_before`): prepare's "auto" choices and
    the neurons it deactivated."""
    preparation = getattr(model, PREPARATION_ATTR)
    return {"quantize_frozen": preparation.settings.get("quantize_frozen"),
            "gradient_checkpointing": preparation.settings.get("gradient_checkpointing"),
            "deactivated": {str(layer): idx.tolist() for layer, idx in preparation.deactivated.items()}}


def _training_arguments(settings: TuneSettings, stage_dir: Path, cuda: bool) -> transformers.TrainingArguments:
    """The Trainer's arguments of one stage (``settings``: :meth:`TuneSettings.for_stage`'s)."""
    return transformers.TrainingArguments(
        output_dir=str(stage_dir), num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, warmup_steps=settings.warmup,
        max_steps=settings.max_steps, optim=OPTIMIZERS[settings.optimizer][1 if cuda else 0], save_strategy="steps",
        save_steps=settings.save_steps, logging_steps=settings.logging_steps, seed=settings.seed,
        data_seed=settings.seed, report_to=[], disable_tqdm=not settings.progress, use_cpu=not cuda,
        remove_unused_columns=False,
    )


def _train_stage(model: nn.Module, tokenizer, examples: StageData, settings: TuneSettings, stage_dir: Path) -> bool:
    """One stage in ``stage_dir`` (``settings``: :meth:`TuneSettings.for_stage`'s): a stage whose
    ``delta.safetensors`` is there is finished (its trained tensors are loaded, False is returned); else it is
    trained, from its last checkpoint if any, and its delta saved (True)."""
    done = stage_dir / "delta.safetensors"
    if done.is_file():
        load_trained_tensors(model, done)
        return False
    args = _training_arguments(settings, stage_dir, cuda=next(model.parameters()).is_cuda)
    trainer = NeuroRITTrainer(model, args, train_dataset=examples.dataset, processing_class=tokenizer,
                              loss_chunk_size=settings.loss_chunk_size, loss_chunk_bytes=settings.loss_chunk_bytes,
                              callbacks=list(settings.callbacks))
    last = transformers.trainer_utils.get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    save_delta(model, done)
    return True


def _train_stages(model: nn.Module, tokenizer, examples: dict[str, StageData], settings: TuneSettings,
                  output_dir: Path, evaluation: _Evaluation) -> None:
    """Every stage in order, stage n in ``output_dir/<n>-<stage>`` (:func:`_train_stage`), the eval losses measured
    after each stage trained."""
    for number, stage in enumerate(settings.stages, start=1):
        if _train_stage(model, tokenizer, examples[stage], settings.for_stage(stage),
                        output_dir / f"{number}-{stage}"):
            evaluation.measure_after(settings.stages[:number])


def tune(model: nn.Module, tokenizer, data: RagData, neuron_sets: NeuronSets | None = None, *,
         output_dir: str | os.PathLike, stages: Sequence[str] = STAGES, epochs: float | Mapping[str, float] = 1.0,
         learning_rate: float | Mapping[str, float] = 1e-4, batch_size: int | Mapping[str, int] = 8,
         gradient_accumulation_steps: int | Mapping[str, int] = 1, warmup: float | Mapping[str, float] = 0.05,
         max_steps: int | Mapping[str, int] = -1, optimizer: str = "adamw8bit", save_steps: int = 100,
         logging_steps: int = 10, seed: int = 0, k: int = 5, template: str | None = None, max_length: int | None = None,
         loss_chunk_size: int | None = None, loss_chunk_bytes: int | None = None, progress: bool = True,
         callbacks: Sequence[transformers.TrainerCallback] | None = None, eval_data: RagData | None = None,
         **prepare_kwargs) -> nn.Module:
    """Neuro-RIT on ``model``: :func:`fastrit.prepare` (unless it is prepared already), then each stage of
    ``stages`` in order with :class:`NeuroRITTrainer`; returns the trained model.

    Args:
        data: RAG records (fastrit.data); each stage's examples are built from them (fastrit.tuning.stages).
        neuron_sets: for prepare (deactivated neurons, target layers, trainable neurons).
        output_dir: one folder per stage (``1-denoise``, ``2-distill``) with the Trainer's checkpoints, and
            ``delta.safetensors`` (fastrit.save_delta) once a stage is done. Started again after an interruption,
            tune skips the finished stages (loading their trained tensors) and resumes the unfinished one from its
            last checkpoint: on one CPU with the same seed it ends with the same weights, bit for bit, as a run that
            was never interrupted. A folder holding a run with other settings is refused, with what differs.
        epochs, learning_rate, batch_size, gradient_accumulation_steps, warmup, max_steps: one value, or a
            mapping ``{stage: value}``; ``warmup`` below 1 is a fraction of the steps, else a step count;
            ``max_steps`` > 0 overrides ``epochs`` (transformers' meaning).
        optimizer: "adamw8bit" (bitsandbytes 8-bit AdamW, paged on CUDA) or "adamw" (torch).
        save_steps / logging_steps: the Trainer's checkpoint and logging intervals, in optimizer steps.
        k, template, max_length: prompt construction (fastrit.data.prompts).
        loss_chunk_size / loss_chunk_bytes: positions per pass through the output head, or the memory budget of
            one pass that sets them (fastrit.tuning.causal_lm_loss's ``chunk_size`` / ``chunk_bytes``).
        callbacks: transformers TrainerCallbacks for every stage's Trainer.
        eval_data: held-out records: the answer loss on their noisy-context prompts, mean per answer token, is
            measured before training (on the model as given, before prepare deactivates neurons and quantizes) and
            after each stage, logged, and written to ``output_dir/eval_loss.json`` as
            ``{"before" | "<stage>": {"answer_after_prompt": ..., "answer_over_own_evidence": ...}}``: the answer
            right after the prompt (the denoise examples), and the answer with the model's own evidence
            marginalised by sampling, the answer right after the prompt included
            (fastrit.tuning.metrics.answer_loss_over_own_evidence, 16 samples per prompt): the loss in whichever
            of the two formats the model answers. Once the model has been through the distill stage, which
            teaches it to write its evidence first, also ``"answer_after_own_evidence"`` and ``"marker_written"``
            (the answer after its greedy evidence: fastrit.tuning.metrics.answer_loss_after_evidence).
        prepare_kwargs: passed to :func:`fastrit.prepare` (train, train_layers, deactivate, neurons, ...). Unless
            given, tune fills in ``planned_batch`` (its largest batch size, its longest example) for
            ``quantize_frozen="auto"``, and ``check_prompts``: the prompts of the first 8 examples of the first
            stage, on which prepare limits the deactivated neurons (``deactivation_tolerance``) and measures what
            deactivation and quantization did (``check_prompts=None`` turns both off).

    Everything is checked before training starts: unknown stage names, data of the wrong type, records without
    answers (no examples), a distill stage without any evidence, and an output folder of another run.
    """
    settings = TuneSettings(
        stages=list(stages), epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, warmup=warmup, max_steps=max_steps,
        optimizer=optimizer, save_steps=save_steps, logging_steps=logging_steps, seed=seed, k=k,
        template=resolve_template(tokenizer, template),  # recorded resolved: mining, tuning and evaluation agree
        max_length=max_length, loss_chunk_size=loss_chunk_size, loss_chunk_bytes=loss_chunk_bytes,
        progress=progress, callbacks=tuple(callbacks or ()))
    settings.check()
    examples = _stage_examples(model, tokenizer, data, settings)
    run, previous = _open_run(output_dir, settings, data, prepare_kwargs)
    evaluation = _Evaluation(model, tokenizer, eval_data, settings, run.directory)
    # prepare's arguments (as the interrupted run chose, if any); None when the model is prepared already
    to_prepare = _prepare_arguments(model, prepare_kwargs, previous.get("prepared"), examples, settings)
    _measure_before(evaluation, model, neuron_sets, to_prepare)
    if to_prepare is not None:
        _prepare(model, neuron_sets, to_prepare)
    run.write(prepared=_prepared_note(model))
    evaluation.save()
    _train_stages(model, tokenizer, examples, settings, run.directory, evaluation)
    return model
