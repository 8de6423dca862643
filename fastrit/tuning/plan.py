"""``fastrit.plan_memory``: how much memory a Neuro-RIT training run takes, before anything is loaded.

The model is built on the meta device and prepared with :func:`fastrit.prepare` exactly as a run would prepare
it, so the trainable parameters (names, shapes, count) are prepare's own; the rest is arithmetic over the
config: bytes of each stored tensor, of the optimizer's states, and of the activations the backward pass keeps.

Breakdown (bytes, at the peak, which is the backward pass of the lowest trainable layer's neighbourhood):

- ``frozen weights``: NF4 decoder projections (half a byte per value, plus one absmax byte per 64 values and
  the nested statistics with double quantization), or dense ones; norms; embeddings and output head in ``dtype``;
- ``trainable weights``, ``gradients``: in float32 when the model computes in bfloat16/float16 and
  ``master_weights`` (prepare's default: float32 master weights), else in ``dtype``;
- ``optimizer states``: bitsandbytes 8-bit AdamW: two uint8 states per value plus two float32 absmax per 256
  values (tensors under 4,096 values keep float32 states); torch AdamW: two states in the trainable weights' dtype;
- ``saved activations``: with gradient checkpointing, each decoder layer from the lowest trainable one up keeps
  its input (``B x T x H``), and one layer's attention and MLP intermediates exist at a time (a layer recomputed
  in backward, or the last layer, which is not checkpointed, during the loss); with ``train="neurons"`` the lowest
  target layer is not checkpointed either and keeps the chosen neurons' gate, up and activation too; without
  checkpointing, every such layer keeps its intermediates;
- ``logits and loss``: fastrit.tuning.causal_lm_loss: one chunk of positions sized by ``loss_chunk_bytes``
  (float32 logits, whose softmax and gradient are formed in place; in 16-bit dtypes one more chunk in that dtype),
  and the hidden-state gradient of the labelled positions (``loss="model"``: the whole logits, as the model's own loss);
- ``weight copies``: weights in the compute dtype that autograd keeps from a layer's forward (or its recompute)
  to its backward: the NF4 projections' dequantized weights (each is dequantized once and its backward reuses it,
  fastrit.nn.NF4Linear) and the master weights cast to ``dtype``, in every layer above the lowest trainable one
  whose input needs a gradient (in the lowest, only what trains and, with LoRA, the output projection). A layer
  that is not checkpointed holds them from its forward to its backward, a checkpointed one from its recompute to
  its backward: the peak is the larger of what the layers that are not checkpointed hold at the loss and what a
  checkpointed layer holds with those below it. At least the largest NF4 projection (dequantized in the forward
  pass);
- ``optimizer workspace``: what the optimizer step allocates while it runs. torch's AdamW (foreach) takes the
  square root of every second moment at once (the trainable parameters' size again); bitsandbytes' 8-bit AdamW
  updates in place on CUDA, while its CPU implementation dequantizes one tensor's two states to float32 and forms
  the update in float32: five float32 copies of the largest trainable tensor (six for 16-bit parameters).

The weights, gradients and optimizer states persist through the step; the activations, logits and weight copies exist
during forward and backward, the optimizer workspace during the optimizer step only. ``peak_bytes`` is the
persistent part plus the larger of the two.

Activations assume every position is labelled and attention that keeps no ``T x T`` matrix (SDPA's flash or
memory-efficient kernels); an integer ``train_layers`` places the target layers lowest in the stack (the most
backward: an upper bound).

Each part of the breakdown is one function below (``_frozen_weight_bytes``, ``_trainable_bytes``,
``_optimizer_state_bytes``, ``_saved_activation_bytes`` with ``_lora_input_bytes``, ``_loss_bytes``,
``_weight_copy_bytes``, ``_optimizer_workspace_bytes``) whose docstring gives its formula in bytes; ``_peak_bytes``
sums them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _args
from ..arch import decoder_layers, mlp_layout, model_spec
from ..memory import BUILT_IN_CONFIGS, DTYPES, GIB, MemoryPlan, meta_model, resolve_config
from .loss import MIN_CHUNK_BYTES, chunk_positions
from .prepare import QUANTIZE_MODES, TRAIN_MODES, checkpointed_layers, prepare

__all__ = ["BUILT_IN_CONFIGS", "GIB", "PERSISTENT_PARTS", "STEP_PARTS", "MemoryPlan", "plan_memory"]

OPTIMIZERS = ("adamw8bit", "adamw")
LOSSES = ("chunked", "model")
DEVICES = ("cuda", "cpu")
#: the breakdown's parts that persist through a step, and those that exist during forward and backward only
PERSISTENT_PARTS = ("frozen weights", "trainable weights", "gradients", "optimizer states")
STEP_PARTS = ("saved activations", "logits and loss", "weight copies")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 optimizer states for smaller tensors
BNB_STATE_BLOCK = 256
NF4_BLOCK = 64  # values per NF4 absmax
NF4_NESTED_BLOCK = 256  # absmax values per float32 statistic of the double quantization


def plan_memory(config, *, seq_len: int = 2048, batch_size: int = 1, train: str = "mlp",
                train_layers: int | list[int] = 3, neurons: int | None = None, quantize_frozen: str | None = "nf4",
                optimizer: str = "adamw8bit", gradient_checkpointing: bool = True, dtype: str = "bfloat16",
                master_weights: bool = True, lora_r: int = 8, loss: str = "chunked",
                loss_chunk_bytes: int | None = None, device: str = "cuda") -> MemoryPlan:
    """The memory one training step of a prepared model takes (see the module docstring).

    Args:
        config: a transformers config, or "llama-3-8b", "mistral-7b", "qwen2-7b", "gemma-2-9b".
        train_layers: the target layers, or their number (placed lowest: an upper bound).
        neurons: ``train="neurons"``: trainable neurons per target layer.
        master_weights: train float32 master weights of a bfloat16/float16 model (fastrit.prepare's default).
        lora_r: ``train="lora"``: the adapters' rank.
        loss: "chunked" (fastrit.tuning.causal_lm_loss, what NeuroRITTrainer uses) or "model" (the model's own
            loss: the whole ``[B, T, V]`` float32 logits, their log-softmax and their gradient).
        loss_chunk_bytes: the chunked loss's memory budget per chunk (causal_lm_loss's ``chunk_bytes``); default
            64 MiB, causal_lm_loss's on the CPU (on a GPU it takes 1/64 of the device's memory, at most 1 GiB: pass
            ``fastrit.tuning.loss.loss_chunk_bytes(device memory)``, as the "auto" settings do).
        device: "cuda" or "cpu": where the step runs (bitsandbytes' 8-bit AdamW needs a float32 workspace on CPU).
    """
    config = resolve_config(config)
    loss_chunk_bytes = MIN_CHUNK_BYTES if loss_chunk_bytes is None else loss_chunk_bytes
    _check_arguments(seq_len=seq_len, batch_size=batch_size, train=train, quantize_frozen=quantize_frozen,
                     optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, master_weights=master_weights,
                     loss_chunk_bytes=loss_chunk_bytes, loss=loss, dtype=dtype, device=device)
    train_layers = _checked_targets(config, train, train_layers, neurons)
    model = _prepared_meta_model(config, DTYPES[dtype], train, train_layers, neurons, master_weights, lora_r)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = _Step.of(DTYPES[dtype], master_weights, tokens=batch_size * seq_len, train=train,
                    train_layers=train_layers, neurons=neurons, nf4=quantize_frozen == "nf4",
                    checkpointing=gradient_checkpointing)
    shape = _Shape.of(config)
    breakdown = {
        "frozen weights": _frozen_weight_bytes(model, step.nf4),
        "trainable weights": _trainable_bytes(trainable, step.master_bytes),
        "gradients": _trainable_bytes(trainable, step.master_bytes),
        "optimizer states": _optimizer_state_bytes(trainable, optimizer, step.master_bytes),
        "saved activations": _saved_activation_bytes(shape, step) + _lora_input_bytes(model, shape, step),
        "logits and loss": _loss_bytes(shape, step, loss, loss_chunk_bytes),
        "weight copies": _weight_copy_bytes(model, step),
        "optimizer workspace": _optimizer_workspace_bytes(trainable, optimizer, step.master_bytes, device),
    }
    settings = dict(seq_len=seq_len, batch_size=batch_size, train=train, train_layers=train_layers, neurons=neurons,
                    quantize_frozen=quantize_frozen, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, dtype=dtype, master_weights=master_weights,
                    loss=loss, device=device, model_type=config.model_type)
    return MemoryPlan(_peak_bytes(breakdown), sum(p.numel() for p in trainable), breakdown, settings)


# --- the arguments -----------------------------------------------------------------------------------------------


def _check_arguments(*, seq_len, batch_size, train, quantize_frozen, optimizer, gradient_checkpointing,
                     master_weights, loss_chunk_bytes, loss, dtype, device) -> None:
    """ValueError naming the first argument (in this order) that plan_memory cannot plan for."""
    _args.positive("seq_len", seq_len)
    _args.positive("batch_size", batch_size)
    _args.one_of("train", train, TRAIN_MODES)
    _args.one_of("quantize_frozen", quantize_frozen, QUANTIZE_MODES)
    _args.one_of("optimizer", optimizer, OPTIMIZERS)
    _args.flag("gradient_checkpointing", gradient_checkpointing)
    _args.flag("master_weights", master_weights)
    _args.positive("loss_chunk_bytes", loss_chunk_bytes, what="a positive number of bytes")
    _args.one_of("loss", loss, LOSSES, what="'chunked' or 'model'")
    _args.one_of("dtype", dtype, DTYPES, what=f"one of {sorted(DTYPES)}")
    _args.one_of("device", device, DEVICES, what="'cuda' or 'cpu'")


def _checked_targets(config, train: str, train_layers: int | list[int], neurons: int | None) -> list[int]:
    """The target layers as a list: a number ``n`` (1 to the config's layers) stands for the lowest ``n`` layers; a
    list is returned as given (prepare checks it). With ``train="neurons"``, ValueError unless ``neurons`` is an
    integer from 1 to the MLP's intermediate size. A config without ``num_hidden_layers`` or ``intermediate_size``
    raises AttributeError here (after the check of an integer ``train_layers``), before any model is
    built."""
    layers = config.num_hidden_layers
    if _args.is_integer(train_layers):
        _args.integer("train_layers", train_layers, low=1, high=layers + 1, what=f"1 to {layers} layers")
        train_layers = list(range(train_layers))
    intermediate = config.intermediate_size
    if train == "neurons" and not (_args.is_integer(neurons) and 1 <= neurons <= intermediate):
        raise ValueError(f"neurons: expected the trainable neurons per target layer, 1 to {intermediate}")
    return train_layers


# --- the prepared model and the step's sizes ---------------------------------------------------------------------


def _prepared_meta_model(config, dtype: torch.dtype, train: str, train_layers: list[int], neurons: int | None,
                         master_weights: bool, lora_r: int) -> nn.Module:
    """The causal LM of ``config`` on the meta device, prepared by :func:`fastrit.prepare` as the run would prepare
    it (the lowest ``neurons`` of each target layer; LoRA of rank ``lora_r``, alpha ``2 x lora_r``), so that its
    trainable parameters are prepare's own. Quantization and checkpointing are left to the arithmetic."""
    model = meta_model(config, dtype)
    kwargs = dict(deactivate=None, train_layers=train_layers, train=train, quantize_frozen=None,
                  gradient_checkpointing=False, master_weights=master_weights)
    if train == "neurons":
        kwargs["neurons"] = {layer: list(range(neurons)) for layer in train_layers}
    if train == "lora":
        from peft import LoraConfig

        kwargs["lora_config"] = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
    prepare(model, **kwargs)
    return model


@dataclass(frozen=True)
class _Shape:
    """The sizes of a config that the activation and loss terms read.

    Attributes:
        layers: decoder layers.
        hidden: the hidden size (values per position between layers).
        intermediate: the MLP's intermediate size.
        attention: values per position of the attention's query, key, value and output:
            ``heads x head_dim + 2 x kv_heads x head_dim + heads x head_dim``.
        vocab: the vocabulary size (logits per position).
        softcap: whether the logits are soft-capped (Gemma 2: ``final_logit_softcapping``).
    """

    layers: int
    hidden: int
    intermediate: int
    attention: int
    vocab: int
    softcap: bool

    @classmethod
    def of(cls, config) -> _Shape:
        hidden = config.hidden_size
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        query = config.num_attention_heads * head_dim
        return cls(layers=config.num_hidden_layers, hidden=hidden, intermediate=config.intermediate_size,
                   attention=query + 2 * kv_heads * head_dim + query, vocab=config.vocab_size,
                   softcap=bool(getattr(config, "final_logit_softcapping", None)))


@dataclass(frozen=True)
class _Step:
    """One step's settings as the terms read them.

    Attributes:
        dtype: the compute dtype; ``value_bytes``: bytes of one value in it.
        master_bytes: bytes of one trainable value: 4 with float32 master weights of a 16-bit model, else
            ``value_bytes``.
        tokens: positions in one step (``batch_size x seq_len``).
        train, train_layers, neurons: what trains (``train_layers`` as a list of layer indices).
        nf4: the frozen decoder projections are stored in NF4.
        checkpointing: gradient checkpointing of the decoder layers.
    """

    dtype: torch.dtype
    value_bytes: int
    master_bytes: int
    tokens: int
    train: str
    train_layers: list[int]
    neurons: int | None
    nf4: bool
    checkpointing: bool

    @classmethod
    def of(cls, dtype: torch.dtype, master_weights: bool, **settings) -> _Step:
        value_bytes = torch.empty((), dtype=dtype).element_size()
        master_bytes = 4 if master_weights and value_bytes < 4 else value_bytes
        return cls(dtype=dtype, value_bytes=value_bytes, master_bytes=master_bytes, **settings)

    @property
    def lowest(self) -> int:
        """The lowest target layer: backward runs from the loss down to it."""
        return min(self.train_layers)

    @property
    def cast(self) -> bool:
        """Whether the trainable weights are stored in another dtype than the one the model computes in."""
        return self.master_bytes != self.value_bytes


# --- one function per part of the breakdown (bytes) --------------------------------------------------------------


def _frozen_weight_bytes(model: nn.Module, nf4: bool) -> int:
    """``frozen weights``: each parameter and buffer that does not train, as stored: a decoder projection's weight
    ``_nf4_bytes(numel)`` when ``nf4``, anything else ``numel x element size`` (norms, embeddings, output head, in
    the model's dtype); a tied output head is counted once."""
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if getattr(tensor, "requires_grad", False) or tensor is None:
                continue
            if nf4 and _is_projection(module, name, head):
                total += _nf4_bytes(tensor.numel())
            else:
                total += tensor.numel() * tensor.element_size()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        total -= head.weight.numel() * head.weight.element_size()  # tied: counted once
    return total


def _nf4_bytes(numel: int, nested: bool = True) -> int:
    """Bytes of ``numel`` values in bitsandbytes' NF4: half a byte per value (rounded up) and one absmax per 64
    values, a byte each with double quantization (``nested``: plus a float32 statistic per 256 absmax, a 256-entry
    float32 code and a float32 offset), else float32."""
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks if nested else 4 * blocks
    nested_stats = 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4 if nested else 0
    return (numel + 1) // 2 + absmax + nested_stats


def _trainable_bytes(trainable: list[nn.Parameter], master_bytes: int) -> int:
    """``trainable weights``, and ``gradients`` (one per trainable value, in the same dtype): ``trainable values x
    master_bytes``."""
    return sum(p.numel() for p in trainable) * master_bytes


def _optimizer_state_bytes(trainable: list[nn.Parameter], optimizer: str, master_bytes: int) -> int:
    """``optimizer states``: both AdamW moments of every trainable tensor. torch AdamW (``"adamw"``): ``2 x numel x
    master_bytes``; bitsandbytes' 8-bit AdamW: ``2 x numel`` uint8 plus ``2 x 4 x ceil(numel / 256)`` float32
    absmax, or ``2 x 4 x numel`` (float32 states) for a tensor under 4,096 values."""
    total = 0
    for param in trainable:
        n = param.numel()
        if optimizer == "adamw":
            total += 2 * n * master_bytes
        elif n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_STATE_BLOCK)
    return total


def _saved_activation_bytes(shape: _Shape, step: _Step) -> int:
    """``saved activations`` (LoRA's input copies apart, :func:`_lora_input_bytes`), with ``L = layers - lowest
    target layer`` layers in backward and one layer's intermediates ``I = tokens x value_bytes x (4 x hidden +
    attention + 3 x intermediate)`` (four hidden-size tensors, the attention's query, key, value and output, three
    intermediate-size tensors of the MLP):

    - checkpointing: ``L x tokens x hidden x value_bytes`` (each layer's input) ``+ I`` (one layer recomputed, or
      the last one during the loss), ``+ tokens x value_bytes x 3 x neurons`` with ``train="neurons"`` when the
      lowest target layer is not checkpointed (its chosen neurons' gate, up and activation);
    - no checkpointing: ``L x I``.
    """
    per_layer = step.tokens * step.value_bytes * (4 * shape.hidden + shape.attention + 3 * shape.intermediate)
    backward_layers = shape.layers - step.lowest
    if not step.checkpointing:
        return backward_layers * per_layer
    saved = backward_layers * step.tokens * shape.hidden * step.value_bytes + per_layer
    if step.train == "neurons" and step.lowest not in checkpointed_layers(shape.layers, step.train_layers, step.train):
        saved += step.tokens * step.value_bytes * 3 * step.neurons
    return saved


def _lora_input_bytes(model: nn.Module, shape: _Shape, step: _Step) -> int:
    """The ``saved activations`` of LoRA's float32 adapters on a 16-bit model: PEFT casts each adapted
    projection's input to the adapters' dtype and lora_A keeps that copy: ``tokens x 4 x (inputs x hidden +
    intermediate)`` per target layer (``inputs``: 2 for a gated MLP's gate and up, else 1; the down projection's
    input), one layer's at a time with checkpointing. 0 for other settings."""
    if step.train != "lora" or not step.cast:
        return 0
    inputs = 2 if mlp_layout(model).gated else 1
    per_layer = step.tokens * 4 * (inputs * shape.hidden + shape.intermediate)
    return per_layer * (1 if step.checkpointing else len(step.train_layers))


def _loss_bytes(shape: _Shape, step: _Step, loss: str, chunk_bytes: int) -> int:
    """``logits and loss``. ``"chunked"`` (fastrit.tuning.causal_lm_loss): one chunk of ``C`` positions
    (:func:`fastrit.tuning.loss.chunk_positions` for ``chunk_bytes``, at most ``tokens``) of ``C x vocab x (4 +
    value_bytes in a 16-bit dtype + 8 with soft-capping)`` and the hidden-state gradient ``tokens x hidden x
    value_bytes``; ``"model"``: the whole float32 logits, their log-softmax and gradient ``3 x tokens x vocab x 4``,
    plus the logits in a 16-bit dtype ``tokens x vocab x value_bytes``."""
    size, vocab = step.value_bytes, shape.vocab
    if loss == "chunked":
        chunk = min(chunk_positions(vocab, step.dtype, shape.softcap, chunk_bytes), step.tokens)
        per_position = 4 + (size if size != 4 else 0) + (8 if shape.softcap else 0)
        return chunk * vocab * per_position + step.tokens * shape.hidden * size
    return 3 * step.tokens * vocab * 4 + (step.tokens * vocab * size if size != 4 else 0)


def _weight_copy_bytes(model: nn.Module, step: _Step) -> int:
    """``weight copies`` (see the module docstring): the largest of the largest NF4 projection dequantized, what
    the layers that are not checkpointed hold at the loss, and, for each checkpointed layer, what it holds with the
    layers below it that are not checkpointed (those above have freed theirs in their backward)."""
    head = model.get_output_embeddings()
    spec = model_spec(model)
    lora_output = f"{spec.mlp_path}.{mlp_layout(model, spec).output}.base_layer"
    held, largest = [], 0
    for index, layer in enumerate(decoder_layers(model, spec)):
        kept, dequantized = _layer_weight_copies(layer, index, step, head, lora_output)
        held.append(kept if index >= step.lowest else 0)
        largest = max(largest, dequantized)
    checkpointed = checkpointed_layers(len(held), step.train_layers, step.train) if step.checkpointing else set()
    at_loss = sum(b for i, b in enumerate(held) if i not in checkpointed)
    during = [held[i] + sum(b for j, b in enumerate(held[:i]) if j not in checkpointed) for i in checkpointed]
    return max(largest, at_loss, *during)


def _layer_weight_copies(layer: nn.Module, index: int, step: _Step, head: nn.Module | None,
                         lora_output: str) -> tuple[int, int]:
    """``(bytes layer index keeps from its forward or recompute to its backward, bytes of its largest NF4
    projection dequantized)``: its trainable tensors cast to the compute dtype (not LoRA's float32 adapters, which
    take a float32 input; not the lowest target layer's input rows, whose input needs no gradient), and its NF4
    projections dequantized where their input needs a gradient (above the lowest target layer; in it, with LoRA,
    the output projection, whose input comes out of the adapted input projections)."""
    kept = largest = 0
    for module_name, module in layer.named_modules():
        for name, tensor in module.named_parameters(recurse=False):
            if tensor.requires_grad:
                lowest_input = index == step.lowest and name in ("in_weight", "in_bias")
                if step.cast and step.train != "lora" and not lowest_input:
                    kept += tensor.numel() * step.value_bytes
            elif step.nf4 and _is_projection(module, name, head):
                largest = max(largest, tensor.numel() * step.value_bytes)
                if index > step.lowest or (step.train == "lora" and module_name == lora_output):
                    kept += tensor.numel() * step.value_bytes
    return kept, largest


def _optimizer_workspace_bytes(trainable: list[nn.Parameter], optimizer: str, master_bytes: int,
                               device: str) -> int:
    """``optimizer workspace``: torch AdamW (foreach) ``trainable values x master_bytes`` (every second moment's
    square root at once); bitsandbytes' 8-bit AdamW on the CPU ``largest 8-bit tensor x 4 x 5`` (float32 states,
    update and workspace; 6 copies for 16-bit parameters), on CUDA 0 (it updates in place)."""
    if optimizer == "adamw":
        return sum(p.numel() for p in trainable) * master_bytes
    if device == "cpu":
        largest = max((p.numel() for p in trainable if p.numel() >= BNB_MIN_8BIT_SIZE), default=0)
        return largest * 4 * (5 if master_bytes == 4 else 6)
    return 0


def _peak_bytes(breakdown: dict[str, int]) -> int:
    """The step's peak: the parts that persist (:data:`PERSISTENT_PARTS`) plus the larger of forward and backward's
    (:data:`STEP_PARTS`) and the optimizer workspace."""
    persistent = sum(breakdown[k] for k in PERSISTENT_PARTS)
    return persistent + max(sum(breakdown[k] for k in STEP_PARTS), breakdown["optimizer workspace"])


def _is_projection(module: nn.Module, name: str, head: nn.Module | None) -> bool:
    """Whether ``name`` of ``module`` is a frozen decoder projection's weight (what NF4 stores)."""
    return isinstance(module, nn.Linear) and name == "weight" and module is not head
