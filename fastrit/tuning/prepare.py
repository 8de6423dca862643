"""``fastrit.prepare``: a transformers model, ready for Neuro-RIT training, in place.

- Deactivated neurons (by default each layer's irrelevant-exclusive set) are removed from their layer's MLP.
- ``train="mlp"``: the MLPs of the target layers are trainable (every kept neuron, and the output bias);
  ``train="neurons"``: only the chosen neurons of the target layers (their input rows and biases, output
  columns); ``train="lora"``: PEFT LoRA adapters on the target layers' MLP projections.
- Everything else is frozen. ``quantize_frozen="auto"`` and ``gradient_checkpointing="auto"`` (the defaults) keep
  the model's dtype and no checkpointing when a training step fits the device's memory so, and save memory only as
  far as they must (:func:`fastrit.tuning.auto.choose_settings`); with ``quantize_frozen="nf4"`` every frozen
  linear layer of the decoder becomes a
  :class:`fastrit.nn.NF4Linear` (bitsandbytes' format, fastrit's kernels), LoRA's base layers included (QLoRA).
  Embeddings and the output head keep their dtype. A model loaded in 4 bits through transformers'
  ``BitsAndBytesConfig`` is taken as it is: its bitsandbytes layers are adopted as NF4Linear holding the same
  bytes (never re-quantized), whatever ``quantize_frozen`` says; transformers' quantizer record is then removed
  from the model (``hf_quantizer.remove_quantization_config``), so that a Trainer takes it like any model.
- Backward stops at the lowest trainable layer: nothing below it requires grad or saves activations
  (see :func:`enable_checkpointing`).

With ``check_prompts`` (a few of the user's prompts), what deactivation and quantization did to the untrained
model's next-token predictions is measured (fastrit.tuning.effect), recorded in ``Preparation.effect`` and logged;
a warning names the cause when the most likely next token changes on more than 2 % of positions.

Every argument is checked before the model is touched. The model keeps its class, config, ``generate`` and
Trainer compatibility; what was done is recorded in ``model.fastrit_preparation`` (a :class:`Preparation`).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _args
from ..arch import (
    SPEC_ATTR,
    ArchSpec,
    MLPLayout,
    decoder_layers,
    is_bnb_4bit,
    is_conv1d,
    linear_in_features,
    mlp_layout,
    mlp_of,
    model_spec,
    set_mlp,
    spec_to_json,
)
from ..mining import SET_NAMES, NeuronSets
from ..nn import NeuronMLP, NF4Linear
from .deactivation import DEFAULT_TOLERANCE, limit_deactivation
from .effect import ARGMAX_AGREEMENT_WARNING, check_batch, compare, next_token_logprobs, zeroed_neurons

__all__ = ["TRAIN_MODES", "QUANTIZE_MODES", "Preparation", "prepare"]

TRAIN_MODES = ("mlp", "neurons", "lora")
QUANTIZE_MODES = (None, "nf4")
#: what prepare's quantize_frozen accepts: a mode, or "auto" (chosen from the device's memory)
QUANTIZE_CHOICES = (*QUANTIZE_MODES, "auto")
PREPARATION_ATTR = "fastrit_preparation"
#: the training batch (batch size, sequence length) quantize_frozen="auto" plans for unless told
PLANNED_BATCH = (8, 512)

logger = logging.getLogger("fastrit.prepare")


@dataclass
class Preparation:
    """What :func:`prepare` did to a model.

    Attributes:
        deactivated: ``{layer: sorted int64 original neuron indices}`` removed, for every layer with any.
        trainable_neurons: ``{layer: sorted int64 indices}`` of trainable neurons (``train="neurons"``), or every
            kept neuron of a target layer (``train="mlp"``); empty for ``train="lora"``.
        train_layers: the target layers.
        settings: the arguments of :func:`prepare` (JSON values).
        lora_config: ``train="lora"``: the LoRA configuration applied, as JSON values (``LoraConfig(**it)``).
        effect: with ``check_prompts``: ``{"deactivation" | "quantization" | "total": ModelChange.to_dict()}``,
            what each change did to the untrained model's next-token predictions (quantization: relative to the
            model with its neurons deactivated).
    """

    deactivated: dict[int, torch.Tensor]
    trainable_neurons: dict[int, torch.Tensor]
    train_layers: list[int]
    settings: dict = field(default_factory=dict)
    lora_config: dict | None = None
    effect: dict = field(default_factory=dict)


def _index_map(name: str, value, num_layers: int, intermediate: int) -> dict[int, torch.Tensor]:
    """``{layer: sorted unique int64 indices}`` from a ``{layer: indices}`` mapping, checked."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a set name or a {{layer: neuron indices}} mapping, got "
                        f"{type(value).__name__}")
    out = {}
    for layer, indices in value.items():
        if not _args.is_integer(layer) or not 0 <= layer < num_layers:
            raise ValueError(f"{name}: layer {layer!r} out of range [0, {num_layers})")
        tensor = torch.as_tensor(indices)
        if tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dim() != 1):
            raise TypeError(f"{name}: layer {layer}: expected a 1-D list or tensor of integer neuron indices")
        tensor = tensor.to(torch.int64).reshape(-1)
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= intermediate):
            raise ValueError(f"{name}: layer {layer}: neuron indices must lie in [0, {intermediate})")
        out[layer] = torch.unique(tensor)
    return out


def _neuron_map(name: str, value, neuron_sets: NeuronSets | None, num_layers: int,
                intermediate: int) -> dict[int, torch.Tensor]:
    if isinstance(value, str):
        if value not in SET_NAMES:
            raise ValueError(f"{name}: expected one of {SET_NAMES} or a {{layer: indices}} mapping, got {value!r}")
        if neuron_sets is None:
            raise ValueError(f"{name}: {value!r} needs neuron_sets")
        value = neuron_sets.indices(value)
    return _index_map(name, value, num_layers, intermediate)


def _check_neuron_sets(neuron_sets: NeuronSets | None, model: nn.Module, num_layers: int, intermediate: int) -> None:
    if neuron_sets is None:
        return
    if not isinstance(neuron_sets, NeuronSets):
        raise TypeError(f"neuron_sets: expected a fastrit.NeuronSets, got {type(neuron_sets).__name__}")
    model_type = getattr(model.config, "model_type", None)
    mined = neuron_sets.model.get("model_type")
    if mined is not None and mined != model_type:
        raise ValueError(f"neuron_sets: mined on a {mined!r} model, this is a {model_type!r} model")
    if (neuron_sets.num_layers, neuron_sets.intermediate_size) != (num_layers, intermediate):
        raise ValueError(f"neuron_sets: mined on {neuron_sets.num_layers} layers of {neuron_sets.intermediate_size} "
                         f"neurons, this model has {num_layers} layers of {intermediate}")


def _frozen_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` of every frozen linear layer under ``module`` that is not NF4 yet: nn.Linear,
    GPT-2's Conv1D, bitsandbytes 4-bit layers."""
    found = []
    for parent in module.modules():
        if isinstance(parent, NeuronMLP | NF4Linear):
            continue
        for name, child in parent.named_children():
            dense = type(child) is nn.Linear or is_conv1d(child)
            if (dense or is_bnb_4bit(child)) and not any(p.requires_grad for p in child.parameters()):
                found.append((parent, name, child))
    return found


def _to_nf4(child: nn.Module) -> NF4Linear:
    if is_bnb_4bit(child):  # adopted as it is, never re-quantized
        return NF4Linear.from_bnb(child)
    if is_conv1d(child):  # GPT-2 keeps [in, out]
        return NF4Linear.from_weight(child.weight.detach().t(), child.bias)
    return NF4Linear.from_linear(child)


def prepare(
    model: nn.Module,
    neuron_sets: NeuronSets | None = None,
    *,
    deactivate: str | Mapping[int, object] | None = "irrelevant_exclusive",
    train_layers: list[int] | None = None,
    train: str = "mlp",
    neurons: str | Mapping[int, object] = "relevant_exclusive",
    quantize_frozen: str | None = "auto",
    lora_config=None,
    gradient_checkpointing: bool | str = "auto",
    master_weights: bool = True,
    memory_budget: int | None = None,
    planned_batch: tuple[int, int] = PLANNED_BATCH,
    check_prompts=None,
    deactivation_tolerance: float | None = DEFAULT_TOLERANCE,
    spec: ArchSpec | None = None,
) -> nn.Module:
    """Prepare ``model`` for Neuro-RIT training, in place, and return it (see the module docstring).

    Args:
        neuron_sets: mined sets (:func:`fastrit.mine`), the source of the default deactivated neurons, target
            layers and trainable neurons.
        deactivate: a set name of :data:`fastrit.mining.SET_NAMES`, ``{layer: indices}``, or None (nothing).
        train_layers: the target layers (default: ``neuron_sets.target_layers``).
        train: "mlp", "neurons" or "lora".
        neurons: ``train="neurons"``: a set name or ``{layer: indices}`` (restricted to the target layers).
        quantize_frozen: "nf4" (frozen decoder linear layers in NF4), None (kept in their dtype), or "auto":
            chosen with ``gradient_checkpointing`` so that a training step of ``planned_batch`` fits ``memory_budget``
            (default: the model plus the device's available memory, x0.9; fastrit.tuning.auto.choose_settings); the
            choice and why are in ``Preparation.settings`` ("quantize_frozen", "gradient_checkpointing",
            "quantize_reason") and logged.
        lora_config: ``train="lora"``: a ``peft.LoraConfig`` (default: r=8, alpha=16 on the MLP projections);
            its target modules and ``layers_to_transform`` are set to the target layers' MLPs.
        gradient_checkpointing: True / False: (non-reentrant) gradient checkpointing on the decoder layers or not;
            "auto": chosen from the memory, as ``quantize_frozen="auto"`` (an explicit value of the other is kept).
        master_weights: keep the trainable tensors of a bfloat16/float16 model in float32 (the forward pass casts
            them to the model's dtype), so that updates smaller than a 16-bit rounding step are not lost; the
            optimizer then holds float32 states. False: in the model's dtype.
        planned_batch: ``(batch size, sequence length)`` of training, for the "auto" settings.
        check_prompts: a few prompts (a batch dict with ``input_ids`` / ``attention_mask``, or token id lists) on
            which the effect of deactivation and quantization is measured (see the module docstring).
        deactivation_tolerance: with ``check_prompts`` and a ``deactivate`` set name of ``neuron_sets``: the largest
            share of those prompts' positions whose most likely next token deactivation may change; the set's
            neurons most specific to irrelevant contexts are kept, as many as stay within it
            (fastrit.tuning.deactivation; the search is in ``Preparation.settings["deactivation_limit"]``). None:
            the whole set, whatever it does.
        spec: where the layers and the MLP's projections are, for a family fastrit does not know
            (``fastrit.ArchSpec(..., mlp=fastrit.MLPLayout(...))``); recorded on the model, so that deltas and export
            find them too. Default: the family's entry in ``fastrit.arch.FAMILIES``.

    Raises ValueError/TypeError naming the argument, with the model untouched, for: neuron sets of another
    model shape or type, layers or neuron indices out of range, an unknown ``train`` / ``deactivate`` /
    ``quantize_frozen``, or a model prepared already.
    """
    _check_options(model, train, quantize_frozen, gradient_checkpointing, master_weights, memory_budget, planned_batch)
    check = None if check_prompts is None else check_batch(check_prompts)
    plan = _plan(model, neuron_sets, spec, deactivate=deactivate, train_layers=train_layers, train=train,
                 neurons=neurons, lora_config=lora_config, deactivation_tolerance=deactivation_tolerance)
    # forward passes only, so after the cheap checks; the original model's predictions serve the search and the report
    before = None if check is None else next_token_logprobs(model, check)
    deactivation_limit = _limit_deactivation(model, plan, neuron_sets, check, before, deactivate,
                                             deactivation_tolerance)
    plan.trainable = _trainable(plan, neurons, neuron_sets)
    _rehearse(model, plan)  # nothing above changed the model
    quantize_frozen, gradient_checkpointing, quantize_reason = _memory_settings(
        model, plan, quantize_frozen, gradient_checkpointing, master_weights, memory_budget, planned_batch)
    deactivated_only = _deactivated_only(model, plan, check, before)
    applied_lora = _apply(model, plan, quantize_frozen == "nf4", gradient_checkpointing, master_weights)
    preparation = _record(model, plan, applied_lora, explicit_spec=spec is not None, settings={
        "deactivate": deactivate if isinstance(deactivate, str | None) else "explicit", "train": train,
        "neurons": neurons if isinstance(neurons, str) else "explicit", "quantize_frozen": quantize_frozen,
        "quantize_reason": quantize_reason, "deactivation_limit": deactivation_limit,
        "gradient_checkpointing": gradient_checkpointing, "master_weights": master_weights})
    if check is not None:
        preparation.effect = _measure_effect(model, check, before, deactivated_only, plan.deactivated,
                                             quantize_frozen)
    return model


def _deactivated_only(model: nn.Module, plan: _Plan, check, before):
    """The next-token log-probabilities on ``check`` of the model with the planned neurons zeroed (before anything
    else changes), or None without check prompts."""
    if check is None:
        return None
    if not plan.deactivated:
        return before
    with zeroed_neurons(model, plan.deactivated, plan.spec):
        return next_token_logprobs(model, check)


def _record(model: nn.Module, plan: _Plan, applied_lora: dict | None, *, explicit_spec: bool,
            settings: dict) -> Preparation:
    """Record what was done on the model (:data:`PREPARATION_ATTR`; an explicit spec also in ``settings["spec"]``
    and at :data:`fastrit.arch.SPEC_ATTR`, for deltas and export); the Preparation."""
    if explicit_spec:  # a family the registry does not hold: deltas and export need it again
        settings["spec"] = spec_to_json(plan.spec)
        setattr(model, SPEC_ATTR, plan.spec)
    preparation = Preparation(plan.deactivated, plan.trainable if plan.train != "lora" else {}, plan.train_layers,
                              settings, applied_lora)
    setattr(model, PREPARATION_ATTR, preparation)  # the model is prepared: recorded before anything else can fail
    return preparation


def _check_options(model, train, quantize_frozen, gradient_checkpointing, master_weights, memory_budget,
                   planned_batch) -> None:
    """ValueError/TypeError naming a prepared model or the first of prepare's plain options out of range."""
    if getattr(model, PREPARATION_ATTR, None) is not None:
        raise ValueError("model: already prepared by fastrit.prepare; load a fresh model to prepare again")
    _args.one_of("train", train, TRAIN_MODES)
    _args.one_of("quantize_frozen", quantize_frozen, QUANTIZE_CHOICES)
    if not (isinstance(gradient_checkpointing, bool) or gradient_checkpointing == "auto"):
        raise ValueError(f"gradient_checkpointing: expected True, False or 'auto', got {gradient_checkpointing!r}")
    _args.flag("master_weights", master_weights, type_error=True)
    _args.positive("memory_budget", memory_budget, optional=True, what="a positive number of bytes")
    if (not isinstance(planned_batch, tuple | list) or len(planned_batch) != 2
            or not all(_args.is_integer(v) and v >= 1 for v in planned_batch)):
        raise ValueError(f"planned_batch: expected (batch size, sequence length), got {planned_batch!r}")


@dataclass
class _Plan:
    """What :func:`prepare` will do, checked: where the MLPs are, which neurons go where, what trains."""

    spec: ArchSpec
    layout: MLPLayout
    intermediate: int
    deactivated: dict[int, torch.Tensor]
    trainable: dict[int, torch.Tensor]
    train: str
    train_layers: list[int]
    lora_config: object
    num_layers: int

    def kept(self) -> dict[int, torch.Tensor]:
        """``{layer: int64 indices}`` of the neurons every layer keeps (all but the deactivated)."""
        everything = torch.arange(self.intermediate)
        none = torch.empty(0, dtype=torch.long)
        return {layer: everything[~torch.isin(everything, self.deactivated.get(layer, none))]
                for layer in range(self.num_layers)}


def _plan(model, neuron_sets, spec, *, deactivate, train_layers, train, neurons, lora_config,
          deactivation_tolerance) -> _Plan:
    """prepare's neuron and layer arguments checked against the model and resolved into a :class:`_Plan`."""
    layout = mlp_layout(model, spec)  # first: its error names the families prepare knows
    spec = model_spec(model, spec)
    layers = decoder_layers(model, spec)
    num_layers = len(layers)
    intermediate = linear_in_features(getattr(mlp_of(layers[0], spec), layout.output))
    _check_neuron_sets(neuron_sets, model, num_layers, intermediate)
    deactivated = {} if deactivate is None else _neuron_map("deactivate", deactivate, neuron_sets, num_layers,
                                                           intermediate)
    deactivated = {layer: idx for layer, idx in deactivated.items() if idx.numel()}
    _args.number("deactivation_tolerance", deactivation_tolerance, low=0, high=1, low_open=False, high_open=True,
                 optional=True, what="a share in [0, 1)")
    if train_layers is None:
        if neuron_sets is None:
            raise ValueError("train_layers: give the layers to train, or neuron_sets to take its target layers")
        train_layers = list(neuron_sets.target_layers)
    if not isinstance(train_layers, list | tuple) or not all(
            _args.is_integer(t) and 0 <= t < num_layers for t in train_layers):
        raise ValueError(f"train_layers: expected layer indices in [0, {num_layers}), got {train_layers!r}")
    if train == "lora" and lora_config is not None and type(lora_config).__name__ != "LoraConfig":
        raise TypeError(f"lora_config: expected a peft.LoraConfig, got {type(lora_config).__name__}")
    return _Plan(spec, layout, intermediate, deactivated, {}, train, sorted(set(train_layers)), lora_config,
                 num_layers)


def _trainable(plan: _Plan, neurons, neuron_sets) -> dict[int, torch.Tensor]:
    """``{target layer: int64 indices}`` of the trainable neurons (``train="mlp"``: every kept one)."""
    if plan.train == "mlp":
        kept = plan.kept()
        return {layer: kept[layer] for layer in plan.train_layers}
    if plan.train != "neurons":
        return {}
    chosen = _neuron_map("neurons", neurons, neuron_sets, plan.num_layers, plan.intermediate)
    trainable = {}
    for layer in plan.train_layers:
        picked = chosen.get(layer, torch.empty(0, dtype=torch.long))
        if bool(torch.isin(picked, plan.deactivated.get(layer, torch.empty(0, dtype=torch.long))).any()):
            raise ValueError(f"neurons: layer {layer}: a trainable neuron is also deactivated")
        trainable[layer] = picked
    return trainable


def _limit_deactivation(model, plan: _Plan, neuron_sets, check, before, deactivate,
                        deactivation_tolerance) -> dict | None:
    """With a tolerance, check prompts and a set name: keep only as much of the set as stays within the tolerance
    (``plan.deactivated`` updated); the search, or None."""
    if (deactivation_tolerance is None or check is None or not isinstance(deactivate, str)
            or neuron_sets is None or not plan.deactivated or _on_meta(model)):
        return None
    plan.deactivated, limit = limit_deactivation(model, plan.deactivated, neuron_sets, check, before,
                                                 float(deactivation_tolerance), plan.spec)
    logger.info("fastrit.prepare: deactivating %s", limit)
    return limit


def _rehearse(model: nn.Module, plan: _Plan) -> None:
    """Apply the plan to a copy of the model on the meta device (no memory), so that anything that would fail
    half-way (e.g. a LoraConfig PEFT refuses) fails before the model is touched. A model on the meta device is a
    rehearsal itself (:func:`prepare_on_meta`, the memory planner): nothing to copy."""
    if _on_meta(model):
        return
    skeleton = meta_copy(model)
    if skeleton is not None:
        _modify(skeleton, plan, quantize=False)


def _memory_settings(model, plan: _Plan, quantize_frozen, gradient_checkpointing, master_weights, memory_budget,
                     planned_batch) -> tuple[str | None, bool, str]:
    """``(quantize_frozen, gradient_checkpointing, why)``: as asked, or each "auto" chosen from the memory."""
    if not getattr(model, "supports_gradient_checkpointing", False) and gradient_checkpointing == "auto":
        gradient_checkpointing = False  # nothing to choose: the model cannot checkpoint
    if "auto" not in (quantize_frozen, gradient_checkpointing):
        return quantize_frozen, gradient_checkpointing, (
            f"{'NF4' if quantize_frozen == 'nf4' else 'dtype'} frozen layers, "
            f"{'' if gradient_checkpointing else 'no '}checkpointing: as asked")
    chosen = _choose_settings(model, plan.train, plan.train_layers, plan.trainable, quantize_frozen,
                              gradient_checkpointing, master_weights, memory_budget, planned_batch)
    logger.info("fastrit.prepare: %s", chosen[2])
    return chosen


def _apply(model: nn.Module, plan: _Plan, quantize: bool, gradient_checkpointing: bool,
           master_weights: bool) -> dict | None:
    """Change the model as planned: MLPs, LoRA, NF4, master weights, checkpointing; the LoRA config applied."""
    applied_lora = _modify(model, plan, quantize=quantize)
    if master_weights:
        keep_master_weights(model)
    if getattr(model, "hf_quantizer", None) is not None and not any(is_bnb_4bit(m) for m in model.modules()):
        # every bitsandbytes layer is an NF4Linear now: nothing is left for transformers' quantizer to manage
        # (a Trainer would refuse the model as "purely quantized"); transformers' own way of saying so
        model.hf_quantizer.remove_quantization_config(model)
        model.is_loaded_in_4bit = False
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        enable_checkpointing(model, plan.train_layers, plan.train, plan.spec)
    else:
        disable_checkpointing(model)  # also what a user enabled before: the settings say none
    return applied_lora


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _choose_settings(model, train, train_layers, trainable, quantize_frozen, gradient_checkpointing,
                     master_weights, memory_budget, planned_batch) -> tuple[str | None, bool, str]:
    """``(quantize_frozen, gradient_checkpointing, why)`` with each "auto" chosen (fastrit.tuning.auto)."""
    from .auto import choose_for_model

    four_bit = any(is_bnb_4bit(m) or isinstance(m, NF4Linear) for m in model.modules())
    neurons = max(1, max((len(v) for v in trainable.values()), default=1)) if train == "neurons" else None
    quantize, checkpointing, why = choose_for_model(
        model, train=train, train_layers=train_layers, neurons=neurons,
        quantize_frozen="nf4" if four_bit else quantize_frozen,  # planned as 4-bit throughout (an approximation)
        gradient_checkpointing=gradient_checkpointing, master_weights=master_weights, memory_budget=memory_budget,
        planned_batch=tuple(planned_batch))
    if four_bit and quantize_frozen == "auto":  # taken as it is: its 4-bit layers adopted, the layers the user
        # kept dense (e.g. BitsAndBytesConfig's llm_int8_skip_modules) left dense
        return None, checkpointing, "the model is 4-bit already (taken as it is, planned as NF4); " + why
    return quantize, checkpointing, why


def keep_master_weights(model: nn.Module) -> None:
    """Every trainable bfloat16/float16 parameter of ``model`` stored in float32 from now on (the same Parameter
    objects: their ``data`` is replaced). NeuronMLP casts them back to the input's dtype in its forward pass, PEFT's
    LoRA layers run float32 adapters on an input cast to float32 (PEFT's own ``autocast_adapter_dtype``)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def _measure_effect(model, check, before, deactivated_only, deactivated, quantize_frozen) -> dict:
    """Preparation.effect: what deactivation, quantization and both did to the next-token predictions; logged,
    and a warning naming the cause when the most likely token changes on more than 2 % of positions."""
    try:
        after = next_token_logprobs(model, check)
    except Exception as error:  # noqa: BLE001 - a diagnostic: the prepared model is complete without it
        warnings.warn(f"fastrit.prepare: could not measure the prepared model on check_prompts: {error!r}",
                      stacklevel=3)
        return {}
    changes = {"deactivation": compare(before, deactivated_only), "total": compare(before, after)}
    if quantize_frozen == "nf4":
        changes["quantization"] = compare(deactivated_only, after)
    for name, change in changes.items():
        logger.info("fastrit.prepare: %s: %s", name, change)
    total = changes["total"]
    if total.argmax_agreement < ARGMAX_AGREEMENT_WARNING:
        causes = []
        if "quantization" in changes and changes["quantization"].argmax_agreement < ARGMAX_AGREEMENT_WARNING:
            causes.append(f"NF4 quantization ({changes['quantization']}): pass quantize_frozen=None if the "
                          "unquantized model fits")
        if changes["deactivation"].argmax_agreement < ARGMAX_AGREEMENT_WARNING:
            count = sum(len(v) for v in deactivated.values())
            causes.append(f"deactivating {count} neurons ({changes['deactivation']}): deactivate fewer (mine with "
                          "a higher share, or pass deactivate=None)")
        warnings.warn(f"fastrit.prepare changed the untrained model's most likely next token on "
                      f"{1 - total.argmax_agreement:.1%} of {total.positions} positions; "
                      + ("; ".join(causes) if causes else "no single change explains it"), stacklevel=3)
    return {name: change.to_dict() for name, change in changes.items()}


def meta_copy(model: nn.Module) -> nn.Module | None:
    """The model's class built from its config on the meta device (the original module types and parameter names,
    no memory), or None where that does not build."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception:  # noqa: BLE001 - a model class that cannot be built from its config: no rehearsal
        return None


def prepare_on_meta(model: nn.Module, neuron_sets: NeuronSets | None = None, **kwargs) -> nn.Module | None:
    """:func:`prepare` with these arguments, applied to a copy of ``model`` on the meta device (:func:`meta_copy`):
    every argument is checked and the copy holds the parameters preparation creates, with nothing allocated and
    ``model`` untouched. NF4 needs real weights, so ``quantize_frozen="nf4"`` is left out (any other value is
    checked as given), and so is gradient checkpointing. None where the model cannot be rebuilt from its config.
    ``quantize_frozen="auto"`` is treated as None here (the choice needs the real model's device), and
    ``check_prompts`` is checked but not run."""
    skeleton = meta_copy(model)
    if skeleton is None:
        return None
    quantize = kwargs.get("quantize_frozen", "auto")
    if kwargs.get("check_prompts") is not None:
        check_batch(kwargs["check_prompts"])
    return prepare(skeleton, neuron_sets, **{**kwargs, "check_prompts": None,
                                             "quantize_frozen": None if quantize in ("nf4", "auto") else quantize,
                                             "gradient_checkpointing": False})


def _modify(model: nn.Module, plan: _Plan, *, quantize: bool) -> dict | None:
    """Freeze, rebuild the MLPs, add LoRA and quantize (the checked plan of :func:`prepare`); the LoRA config
    applied, as JSON values, or None."""
    model.requires_grad_(False)
    layers = decoder_layers(model, plan.spec)
    kept = plan.kept()
    for layer_index, layer in enumerate(layers):
        if layer_index in plan.deactivated or layer_index in plan.trainable:
            lora_target = plan.train == "lora" and layer_index in plan.train_layers
            set_mlp(layer, plan.spec, NeuronMLP.from_mlp(
                mlp_of(layer, plan.spec), plan.layout, keep=kept[layer_index],
                train=plan.trainable.get(layer_index, torch.empty(0, dtype=torch.long)),
                quantize_frozen=quantize and not lora_target,  # PEFT wraps dense layers; quantized below
                train_out_bias=plan.train == "mlp" and layer_index in plan.trainable, mask_frozen=lora_target,
            ))
    applied_lora = _inject_lora(model, plan) if plan.train == "lora" else None
    for layer in layers:  # LoRA's base layers too (QLoRA): PEFT wrapped them while they were dense
        for parent, name, child in _frozen_linears(layer):
            if quantize or is_bnb_4bit(child):  # bitsandbytes layers run on fastrit's kernels in any case
                setattr(parent, name, _to_nf4(child))
    return applied_lora


def enable_checkpointing(model: nn.Module, train_layers: list[int], train: str, spec: ArchSpec | None = None) -> None:
    """Non-reentrant activation checkpointing on the decoder layers where it saves memory, with backward stopping
    at the lowest layer that holds a trainable parameter.

    transformers also makes the input embeddings' output require grad when it enables checkpointing (needed by
    reentrant checkpointing only); that would carry the backward pass, and the activations it saves, down through
    every frozen layer to the embeddings. It is undone here: non-reentrant checkpointing needs no input gradient.

    Two layers run without a checkpoint (:func:`checkpointed_layers`), because one would cost a recompute of the
    layer and save next to nothing:

    - the last decoder layer: its backward runs first, right after the loss, so a checkpoint would free its
      intermediates only while the loss is computed (a chunk of positions at a time) and rebuild them at once;
    - with ``train="neurons"``, the lowest target layer: nothing below it needs gradients, so its attention and the
      frozen part of its MLP keep nothing; it keeps only its MLP input and the chosen neurons' activations, while a
      checkpoint would recompute the whole layer to rebuild them.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers releases before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    remove_input_grad_hooks(model)
    layers = decoder_layers(model, spec)
    keep = checkpointed_layers(len(layers), train_layers, train)
    for index, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):  # transformers' GradientCheckpointingLayer: a per-layer switch
            layer.gradient_checkpointing = index in keep


def disable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing off, with the input-embedding hook transformers adds with it (a model on which a user
    called ``gradient_checkpointing_enable``); a no-op on a model that has neither."""
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):  # transformers releases before the rename
        model.gradient_checkpointing_disable()
    remove_input_grad_hooks(model)


def remove_input_grad_hooks(model: nn.Module) -> None:
    """Remove the forward hooks transformers' ``enable_input_require_grads`` put on the input embeddings (the
    output made to require grad, which carries backward down to them). ``disable_input_require_grads`` forgets a
    hook when that method was called twice (a user's call and one inside ``gradient_checkpointing_enable``), so
    the hooks are also found on the embeddings by their function's name."""
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model that does not expose them: no hook either
        return
    hooks = getattr(embeddings, "_forward_hooks", {})
    for key in [k for k, hook in hooks.items() if getattr(hook, "__name__", "") == "make_inputs_require_grads"]:
        del hooks[key]


def checkpointed_layers(num_layers: int, train_layers: list[int], train: str) -> set[int]:
    """The decoder layers :func:`enable_checkpointing` checkpoints: those from the lowest target layer up, except the
    last layer and, with ``train="neurons"``, the lowest target layer (layers below it run without gradients)."""
    lowest = min(train_layers)
    skip = {num_layers - 1} | ({lowest} if train == "neurons" else set())
    return set(range(lowest, num_layers)) - skip


def _inject_lora(model: nn.Module, plan: _Plan) -> dict:
    """Add LoRA adapters to the target layers' MLP projections with PEFT; returns the config as JSON values."""
    from peft import LoraConfig, inject_adapter_in_model

    layout, train_layers, lora_config = plan.layout, plan.train_layers, plan.lora_config

    # the latter three: a NeuronMLP's frozen projections (dense in LoRA target layers)
    names = [*layout.inputs, layout.output, "frozen_in.0", "frozen_in.1", "frozen_out"]
    config = copy.deepcopy(lora_config) if lora_config is not None else LoraConfig(r=8, lora_alpha=16,
                                                                                   lora_dropout=0.0)
    config.target_modules = names
    config.layers_to_transform = train_layers
    config.fan_in_fan_out = layout.conv1d
    with warnings.catch_warnings():  # PEFT corrects fan_in_fan_out per layer (NeuronMLP's are nn.Linear)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        inject_adapter_in_model(config, model)
    return json.loads(json.dumps({key: sorted(value) if isinstance(value, set) else value
                                  for key, value in config.to_dict().items()}, default=str))
