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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import decoder_layers
from ..memory import BUILT_IN_CONFIGS, DTYPES, GIB, MemoryPlan, meta_model, resolve_config
from ..nn.mlp_layout import mlp_layout
from .loss import MIN_CHUNK_BYTES, chunk_positions
from .prepare import QUANTIZE_MODES, TRAIN_MODES, checkpointed_layers, prepare

__all__ = ["BUILT_IN_CONFIGS", "GIB", "PERSISTENT_PARTS", "STEP_PARTS", "MemoryPlan", "plan_memory"]

OPTIMIZERS = ("adamw8bit", "adamw")
#: the breakdown's parts that persist through a step, and those that exist during forward and backward only
PERSISTENT_PARTS = ("frozen weights", "trainable weights", "gradients", "optimizer states")
STEP_PARTS = ("saved activations", "logits and loss", "weight copies")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 optimizer states for smaller tensors
BNB_STATE_BLOCK = 256


def _nf4_bytes(numel: int, nested: bool = True) -> int:
    blocks = math.ceil(numel / 64)
    absmax = blocks if nested else 4 * blocks
    return (numel + 1) // 2 + absmax + (4 * math.ceil(blocks / 256) + 4 * 256 + 4 if nested else 0)


def _optimizer_bytes(param: nn.Parameter, optimizer: str, dtype_bytes: int) -> int:
    n = param.numel()
    if optimizer == "adamw":
        return 2 * n * dtype_bytes
    if n < BNB_MIN_8BIT_SIZE:
        return 2 * 4 * n
    return 2 * n + 2 * 4 * math.ceil(n / BNB_STATE_BLOCK)


def plan_memory(
    config,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    train: str = "mlp",
    train_layers: int | list[int] = 3,
    neurons: int | None = None,
    quantize_frozen: str | None = "nf4",
    optimizer: str = "adamw8bit",
    gradient_checkpointing: bool = True,
    dtype: str = "bfloat16",
    master_weights: bool = True,
    lora_r: int = 8,
    loss: str = "chunked",
    loss_chunk_bytes: int | None = None,
    device: str = "cuda",
) -> MemoryPlan:
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
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if train not in TRAIN_MODES:
        raise ValueError(f"train: expected one of {TRAIN_MODES}, got {train!r}")
    if quantize_frozen not in QUANTIZE_MODES:
        raise ValueError(f"quantize_frozen: expected one of {QUANTIZE_MODES}, got {quantize_frozen!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if not isinstance(gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing: expected True or False, got {gradient_checkpointing!r}")
    if not isinstance(master_weights, bool):
        raise ValueError(f"master_weights: expected True or False, got {master_weights!r}")
    if loss_chunk_bytes is None:
        loss_chunk_bytes = MIN_CHUNK_BYTES
    if isinstance(loss_chunk_bytes, bool) or not isinstance(loss_chunk_bytes, int) or loss_chunk_bytes < 1:
        raise ValueError(f"loss_chunk_bytes: expected a positive number of bytes, got {loss_chunk_bytes!r}")
    if loss not in ("chunked", "model"):
        raise ValueError(f"loss: expected 'chunked' or 'model', got {loss!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    layers = config.num_hidden_layers
    if isinstance(train_layers, int) and not isinstance(train_layers, bool):
        if not 1 <= train_layers <= layers:
            raise ValueError(f"train_layers: expected 1 to {layers} layers, got {train_layers}")
        train_layers = list(range(train_layers))
    intermediate = config.intermediate_size
    if train == "neurons":
        if isinstance(neurons, bool) or not isinstance(neurons, int) or not 1 <= neurons <= intermediate:
            raise ValueError(f"neurons: expected the trainable neurons per target layer, 1 to {intermediate}")
    torch_dtype = DTYPES[dtype]
    size = torch.empty((), dtype=torch_dtype).element_size()
    model = meta_model(config, torch_dtype)
    kwargs = dict(deactivate=None, train_layers=train_layers, train=train, quantize_frozen=None,
                  gradient_checkpointing=False, master_weights=master_weights)
    if train == "neurons":
        kwargs["neurons"] = {layer: list(range(neurons)) for layer in train_layers}
    if train == "lora":
        from peft import LoraConfig

        kwargs["lora_config"] = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
    prepare(model, **kwargs)

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    master = 4 if master_weights and size < 4 else size  # bytes per trainable value
    frozen = 0
    head = model.get_output_embeddings()
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if getattr(tensor, "requires_grad", False) or tensor is None:
                continue
            if _is_projection(module, name, head) and quantize_frozen == "nf4":
                frozen += _nf4_bytes(tensor.numel())
            else:
                frozen += tensor.numel() * tensor.element_size()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        frozen -= head.weight.numel() * head.weight.element_size()  # tied: counted once
    tokens = batch_size * seq_len
    hidden = config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    per_layer = tokens * size * (4 * hidden + q + 2 * kv * head_dim + q + 3 * intermediate)
    backward_layers = layers - min(train_layers)
    if gradient_checkpointing:
        saved = backward_layers * tokens * hidden * size + per_layer
        lowest = min(train_layers)
        if train == "neurons" and lowest not in checkpointed_layers(layers, train_layers, train):
            saved += tokens * size * 3 * neurons  # its chosen neurons' gate, up and activation, beside its MLP input
    else:
        saved = backward_layers * per_layer
    if train == "lora" and master != size:  # PEFT casts each adapted projection's input to the float32 adapters'
        # dtype, and lora_A keeps that copy: the gate and up inputs [T, H] and the down input [T, I] per target layer
        inputs = 2 if mlp_layout(model).gated else 1
        lora_inputs = tokens * 4 * (inputs * hidden + intermediate)
        saved += lora_inputs * (1 if gradient_checkpointing else len(train_layers))
    vocab = config.vocab_size
    softcap = bool(getattr(config, "final_logit_softcapping", None))
    if loss == "chunked":  # one chunk (fastrit.tuning.loss.chunk_positions) and the hidden-state gradient
        chunk = min(chunk_positions(vocab, torch_dtype, softcap, loss_chunk_bytes), tokens)
        logits = chunk * vocab * (4 + (size if size != 4 else 0) + (8 if softcap else 0)) + tokens * hidden * size
    else:
        logits = 3 * tokens * vocab * 4 + (tokens * vocab * size if size != 4 else 0)
    breakdown = {
        "frozen weights": frozen,
        "trainable weights": trainable_params * master,
        "gradients": trainable_params * master,
        "optimizer states": sum(_optimizer_bytes(p, optimizer, master) for p in trainable),
        "saved activations": saved,
        "logits and loss": logits,
        "weight copies": _weight_copies(model, head, train, train_layers, quantize_frozen == "nf4",
                                        gradient_checkpointing, size, master != size),
        "optimizer workspace": _optimizer_workspace(trainable, optimizer, master, device),
    }
    persistent = sum(breakdown[k] for k in PERSISTENT_PARTS)
    backward = sum(breakdown[k] for k in STEP_PARTS)
    settings = dict(seq_len=seq_len, batch_size=batch_size, train=train, train_layers=train_layers, neurons=neurons,
                    quantize_frozen=quantize_frozen, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, dtype=dtype, master_weights=master_weights,
                    loss=loss, device=device,
                    model_type=config.model_type)
    return MemoryPlan(persistent + max(backward, breakdown["optimizer workspace"]), trainable_params, breakdown,
                      settings)


def _is_projection(module: nn.Module, name: str, head: nn.Module | None) -> bool:
    """Whether ``name`` of ``module`` is a frozen decoder projection's weight (what NF4 stores)."""
    return isinstance(module, nn.Linear) and name == "weight" and module is not head


def _weight_copies(model: nn.Module, head: nn.Module | None, train: str, train_layers: list[int], nf4: bool,
                   checkpointing: bool, size: int, cast: bool) -> int:
    """Bytes of the ``weight copies`` part (see the module docstring)."""
    layers = decoder_layers(model)
    lora_output = f"mlp.{mlp_layout(model).output}.base_layer"
    lowest = min(train_layers)
    held, largest = [], 0
    for index, layer in enumerate(layers):
        total = 0
        for module_name, module in layer.named_modules():
            for name, tensor in module.named_parameters(recurse=False):
                if tensor.requires_grad:  # LoRA's float32 adapters take a float32 input instead (PEFT); the
                    # lowest layer's input rows multiply an input that needs no gradient: their cast is not kept
                    kept = cast and train != "lora" and not (index == lowest and name in ("in_weight", "in_bias"))
                    total += tensor.numel() * size if kept else 0
                elif nf4 and _is_projection(module, name, head):
                    largest = max(largest, tensor.numel() * size)
                    # in the lowest target layer nothing frozen below the trainable tensors needs a gradient; with
                    # LoRA the output projection's input does (it comes out of the adapted input projections)
                    if index > lowest or (train == "lora" and module_name == lora_output):
                        total += tensor.numel() * size
        held.append(total if index >= lowest else 0)
    checkpointed = checkpointed_layers(len(layers), train_layers, train) if checkpointing else set()
    # at the loss every layer that is not checkpointed holds its copies; a checkpointed layer holds its own from its
    # recompute to its backward, when the layers above it (their backward ran already) have freed theirs
    at_loss = sum(b for i, b in enumerate(held) if i not in checkpointed)
    during = [held[i] + sum(b for j, b in enumerate(held[:i]) if j not in checkpointed) for i in checkpointed]
    return max(largest, at_loss, *during)


def _optimizer_workspace(trainable: list[nn.Parameter], optimizer: str, dtype_bytes: int, device: str) -> int:
    """Bytes the optimizer step allocates while it runs (see the module docstring)."""
    if optimizer == "adamw":
        return sum(p.numel() for p in trainable) * dtype_bytes
    if device == "cpu":
        largest = max((p.numel() for p in trainable if p.numel() >= BNB_MIN_8BIT_SIZE), default=0)
        return largest * 4 * (5 if dtype_bytes == 4 else 6)
    return 0
