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
from functools import partial
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

from .._io import write_text_atomic
from ..data import RagData
from ..data.turns import resolve_template
from ..mining import NeuronSets
from .delta import save_delta
from .effect import ModelChange
from .loss import causal_lm_loss
from .metrics import answer_loss, answer_loss_after_evidence, answer_loss_over_own_evidence
from .prepare import PREPARATION_ATTR, prepare, prepare_on_meta
from .stages import STAGES, collate, stage_data

__all__ = ["DELTA_NAME", "NeuroRITTrainer", "OPTIMIZERS", "tune"]

DELTA_NAME = "fastrit_delta.safetensors"
#: how many training prompts tune gives prepare to measure what deactivation and quantization did to the model
CHECK_PROMPTS = 8
#: sampled continuations per prompt of the own-evidence answer loss that eval_data measures
OWN_EVIDENCE_SAMPLES = 16
#: optimizer name -> transformers TrainingArguments ``optim`` (8-bit AdamW is paged on CUDA)
OPTIMIZERS = {"adamw8bit": ("adamw_bnb_8bit", "paged_adamw_8bit"), "adamw": ("adamw_torch", "adamw_torch")}


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


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tune(
    model: nn.Module,
    tokenizer,
    data: RagData,
    neuron_sets: NeuronSets | None = None,
    *,
    output_dir: str | os.PathLike,
    stages: Sequence[str] = STAGES,
    epochs: float | Mapping[str, float] = 1.0,
    learning_rate: float | Mapping[str, float] = 1e-4,
    batch_size: int | Mapping[str, int] = 8,
    gradient_accumulation_steps: int | Mapping[str, int] = 1,
    warmup: float | Mapping[str, float] = 0.05,
    max_steps: int | Mapping[str, int] = -1,
    optimizer: str = "adamw8bit",
    save_steps: int = 100,
    logging_steps: int = 10,
    seed: int = 0,
    k: int = 5,
    template: str | None = None,
    max_length: int | None = None,
    loss_chunk_size: int | None = None,
    loss_chunk_bytes: int | None = None,
    progress: bool = True,
    callbacks: Sequence[transformers.TrainerCallback] | None = None,
    eval_data: RagData | None = None,
    **prepare_kwargs,
) -> nn.Module:
    """Neuro-RIT on ``model``: :func:`fastrit.prepare` (unless it is prepared already), then each stage of
    ``stages`` in order with :class:`NeuroRITTrainer`; returns the trained model.

    Args:
        data: RAG records (fastrit.data); each stage's examples are built from them (fastrit.tuning.stages).
        neuron_sets: for prepare (deactivated neurons, target layers, trainable neurons).
        output_dir: one folder per stage (``1-denoise``, ``2-distill``) with the Trainer's checkpoints, and
            ``delta.safetensors`` (fastrit.save_delta) once a stage is done. Started again after an interruption,
            tune skips the finished stages (loading their trained tensors) and resumes the unfinished one from its
            last checkpoint: on one CPU with the same seed it ends with the same weights, bit for bit, as a run that
            was never interrupted. A folder holding a run with other settings is refused.
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
    stages = list(stages)
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"stages: expected distinct names among {STAGES}, got {stages!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if loss_chunk_bytes is not None and (isinstance(loss_chunk_bytes, bool) or not isinstance(loss_chunk_bytes, int)
                                         or loss_chunk_bytes < 1):
        raise ValueError(f"loss_chunk_bytes: expected None or a positive number of bytes, got {loss_chunk_bytes!r}")
    if not isinstance(data, RagData):
        raise TypeError(f"data: expected fastrit.data.RagData, got {type(data).__name__}")
    template = resolve_template(tokenizer, template)  # recorded resolved: mining, tuning and evaluation agree
    examples = {}
    for stage in stages:
        built = stage_data(data, tokenizer, stage, k=k, template=template, max_length=max_length, seed=seed,
                           model=model)
        if len(built) == 0:
            raise ValueError(f"data: no {stage} example could be built from {len(data)} records "
                             f"(skipped: {built.skipped})")
        examples[stage] = built
    output_dir = Path(output_dir)
    settings = {"stages": stages, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
                "gradient_accumulation_steps": gradient_accumulation_steps, "warmup": warmup,
                "max_steps": max_steps, "optimizer": optimizer, "seed": seed, "k": k, "template": template,
                "max_length": max_length, "records": len(data), "data": getattr(data.records, "_fingerprint", None),
                "prepare": {key: value if isinstance(value, str | int | float | bool | None) else repr(value)
                            for key, value in prepare_kwargs.items()}}
    for stage in stages:
        for name in ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "warmup",
                     "max_steps"):
            _per_stage(name, settings[name], stage)
    run_file = output_dir / "fastrit_run.json"
    previous: dict = {}
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != _fingerprint(settings):
            raise ValueError(f"output_dir: {output_dir} holds a run with other settings; use another folder")
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"output_dir: {output_dir} is not empty and holds no fastrit run")
    eval_set = None
    if eval_data is not None:
        eval_set = stage_data(eval_data, tokenizer, "denoise", k=k, template=template, max_length=max_length,
                              seed=seed, model=model).dataset
        if len(eval_set) == 0:
            raise ValueError("eval_data: no noisy-context example could be built from it")
    eval_file = output_dir / "eval_loss.json"
    losses = json.loads(eval_file.read_text()) if eval_file.is_file() else {}

    def measure(stages_done: Sequence[str]) -> dict[str, float]:
        point = {"answer_after_prompt": answer_loss(model, eval_set, tokenizer),
                 "answer_over_own_evidence": answer_loss_over_own_evidence(model, tokenizer, eval_data, k=k,
                                                                           template=template, seed=seed,
                                                                           samples=OWN_EVIDENCE_SAMPLES)}
        if "distill" in stages_done:
            after = answer_loss_after_evidence(model, tokenizer, eval_data, k=k, template=template, seed=seed)
            point.update(answer_after_own_evidence=after.loss, marker_written=after.marker_written)
        return point

    unprepared = getattr(model, PREPARATION_ATTR, None) is None
    if unprepared:
        prepare_kwargs = _prepare_defaults(_as_prepared_before(prepare_kwargs, previous.get("prepared")), examples,
                                           batch_size)
    if eval_set is not None and "before" not in losses:
        if unprepared:  # prepare's checks first, on a meta copy, so bad input costs no evaluation
            prepare_on_meta(model, neuron_sets, **prepare_kwargs)
        logger.warning(f"fastrit.tune: measuring the noisy-context answer loss on {len(eval_set)} held-out prompts "
                       f"({OWN_EVIDENCE_SAMPLES} sampled continuations each), before training and after each stage")
        started = time.perf_counter()
        losses["before"] = measure(())  # the model as given: before prepare deactivates and quantizes
        logger.warning(f"fastrit.tune: that measurement took {time.perf_counter() - started:.0f} s; it is repeated "
                       f"after each of the {len(stages)} stages")
    if unprepared:
        prepare(model, neuron_sets, **prepare_kwargs)
        preparation = getattr(model, PREPARATION_ATTR)
        logger.warning(f"fastrit.tune: {preparation.settings['quantize_reason']}")
        for name, change in preparation.effect.items():
            logger.warning(f"fastrit.tune: the untrained model after {name}: " + str(ModelChange(**change)))
    output_dir.mkdir(parents=True, exist_ok=True)
    preparation = getattr(model, PREPARATION_ATTR)
    prepared = {"quantize_frozen": preparation.settings.get("quantize_frozen"),
                "gradient_checkpointing": preparation.settings.get("gradient_checkpointing"),
                "deactivated": {str(layer): idx.tolist() for layer, idx in preparation.deactivated.items()}}
    write_text_atomic(run_file, json.dumps({"fingerprint": _fingerprint(settings), "settings": settings,
                                            "prepared": prepared}, indent=1, default=str))
    if eval_set is not None:
        write_text_atomic(eval_file, json.dumps(losses, indent=1))
    cuda = next(model.parameters()).is_cuda
    for number, stage in enumerate(stages, start=1):
        stage_dir = output_dir / f"{number}-{stage}"
        done = stage_dir / "delta.safetensors"
        if done.is_file():
            load_trained_tensors(model, done)
            continue
        args = transformers.TrainingArguments(
            output_dir=str(stage_dir), num_train_epochs=_per_stage("epochs", epochs, stage),
            learning_rate=_per_stage("learning_rate", learning_rate, stage),
            per_device_train_batch_size=_per_stage("batch_size", batch_size, stage),
            gradient_accumulation_steps=_per_stage("gradient_accumulation_steps", gradient_accumulation_steps,
                                                   stage),
            warmup_steps=_per_stage("warmup", warmup, stage),
            max_steps=_per_stage("max_steps", max_steps, stage),
            optim=OPTIMIZERS[optimizer][1 if cuda else 0], save_strategy="steps", save_steps=save_steps,
            logging_steps=logging_steps, seed=seed, data_seed=seed, report_to=[], disable_tqdm=not progress,
            use_cpu=not cuda, remove_unused_columns=False,
        )
        trainer = NeuroRITTrainer(model, args, train_dataset=examples[stage].dataset, processing_class=tokenizer,
                                  loss_chunk_size=loss_chunk_size, loss_chunk_bytes=loss_chunk_bytes,
                                  callbacks=list(callbacks or []))
        last = transformers.trainer_utils.get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
        trainer.train(resume_from_checkpoint=last)
        save_delta(model, done)
        if eval_set is not None:
            losses[stage] = measure(stages[:number])
            write_text_atomic(eval_file, json.dumps(losses, indent=1))
            transformers.logging.get_logger(__name__).warning(f"fastrit.tune: noisy-context answer loss {losses}")
    return model
