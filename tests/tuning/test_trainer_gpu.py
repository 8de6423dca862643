"""``fastrit.prepare`` + two ``NeuroRITTrainer`` steps in bfloat16 against plain PyTorch, on CUDA (and on the CPU).

A tiny Llama (tests/tiny_models.py) in bfloat16 gets neurons deactivated in every layer and its layers 1 and 2's
MLPs made trainable (``train="mlp"``, float32 master weights: prepare's default), once with dense frozen layers and
once with NF4 frozen layers under gradient checkpointing. NeuroRITTrainer trains it for two steps (torch AdamW,
constant learning rate, gradient clipping at norm 1: the Trainer's own); each batch and the loss the Trainer computed
on it are recorded.

The twins start from ``fastrit.export`` of the prepared, untrained model: the same architecture with deactivated
neurons as zero rows and columns and NF4 weights as their dequantized values. Both train the same parameters (the
target layers' gate, up and down projections; the zeroed neurons' entries get zero gradients and stay zero) on the
recorded batches, with ``torch.optim.AdamW`` set as the Trainer sets it, ``clip_grad_norm_`` and the mean
cross-entropy over the labelled positions written in plain PyTorch:

- ``twin16``: in bfloat16, its trainable weights float32 master copies cast to bfloat16 in the forward pass (the
  arithmetic fastrit's master weights do);
- ``twin32``: in float32 throughout: the result both bfloat16 runs approximate.

Bounds (flash-attention's rule for a low-precision implementation: no further from the float32 result than plain
PyTorch in the same precision, with a factor 2 of margin), so that they follow bfloat16's actual rounding rather than
a guessed tolerance:

- loss of each step: ``|L_fastrit - L_32| <= 2 * rms_i(l16_i - l32_i)``, the root mean square over the labelled
  positions of the bf16 twin's per-position error. A mean differs from the reference by at most the RMS of its
  per-position differences, so a correct run passes whenever fastrit's per-position error is within twice the
  plain bf16 one; a loss normalised, shifted or masked differently moves the mean by far more.
- trained weights: ``||dW_fastrit - dW_32|| <= 2 * ||dW_16 - dW_32|| + 10 * lr`` (``dW``: the update of every
  trainable value after two steps, all target layers together). Adam's first steps are nearly ``lr * sign(grad)``:
  where a gradient is smaller than bf16's rounding noise its sign, and so an update of about ``2 * lr``, may differ
  between two correct bf16 runs. Those values are a small share; the term ``10 * lr`` (about five of them beyond the
  twin's own) keeps the bound meaningful when the twin happens to have none. The test also asserts that the bound is
  below half of ``||dW_32||``: an update lost to bf16 rounding (no master weights) or applied to the wrong neurons
  exceeds it.

Exact checks besides: frozen tensors unchanged bit for bit, trainable tensors in float32, deactivated neurons zero.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import fastrit
from fastrit.nn import NeuronMLP
from tests.tiny_models import VOCAB, build_tiny_model

DEVICES = [
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
    "cpu",
]
VARIANTS = [pytest.param(None, False, id="dense"), pytest.param("nf4", True, id="nf4-checkpointing")]
DEACTIVATE = {0: [3, 10, 20, 40], 1: [0, 7, 47], 2: [5, 6, 30, 31]}
TRAIN_LAYERS = [1, 2]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LR = 1e-4
MAX_GRAD_NORM = 1.0
BATCH, STEPS = 4, 2


def examples(seed: int = 0) -> list[dict]:
    """``BATCH * STEPS`` examples of 10 to 16 tokens, the first half of each a prompt without labels."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(BATCH * STEPS):
        length = int(torch.randint(10, 17, (), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return rows


def recording_trainer(*args, **kwargs):
    """A NeuroRITTrainer that keeps each training batch and the loss it computed on it."""

    class Recording(fastrit.NeuroRITTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.batches.append({key: value.detach().clone() for key, value in inputs.items()})
            self.losses.append(float(loss.detach()))
            return loss

    trainer = Recording(*args, **kwargs)
    trainer.batches, trainer.losses = [], []
    return trainer


class MasterLinear(nn.Module):
    """A bias-free linear layer holding a float32 master weight, cast to the input's dtype in the forward pass."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def twin(path, dtype: torch.dtype, device: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """The exported checkpoint in ``dtype`` with the target layers' projections trainable (float32 masters in a 16-bit
    model); ``(model, trainable parameters in layer, projection order)``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.requires_grad_(False)
    params = []
    for layer in TRAIN_LAYERS:
        mlp = model.model.layers[layer].mlp
        for name in PROJECTIONS:
            linear = getattr(mlp, name)
            assert linear.bias is None
            if dtype == torch.float32:
                linear.weight.requires_grad_(True)
                params.append(linear.weight)
            else:
                master = MasterLinear(linear.weight)
                setattr(mlp, name, master)
                params.append(master.weight)
    return model.train(), params


def token_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of each labelled position (position t predicts label t + 1), float32, in plain PyTorch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    picked = targets != -100
    return F.cross_entropy(logits[:, :-1][picked].float(), targets[picked], reduction="none")


def train_twin(model: nn.Module, params: list[nn.Parameter], batches: list[dict]) -> list[torch.Tensor]:
    """The Trainer's two steps in plain PyTorch; each step's per-position losses (before its update)."""
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for batch in batches:
        per_position = token_losses(model, batch)
        optimizer.zero_grad(set_to_none=True)
        per_position.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        losses.append(per_position.detach().double())
    return losses


def fastrit_weights(model: nn.Module) -> list[torch.Tensor]:
    """The target layers' dense float32 weights (gate, up, down) of the prepared model: its master weights."""
    out = []
    for layer in TRAIN_LAYERS:
        mlp = model.model.layers[layer].mlp
        assert isinstance(mlp, NeuronMLP)
        dense = mlp.dense_weights(torch.float32)
        out += [*dense.inputs, dense.output]
    return out


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors])


@pytest.mark.parametrize("quantize_frozen,checkpointing", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_two_trainer_steps_match_plain_torch_twins(device, quantize_frozen, checkpointing, tmp_path):
    """Two NeuroRITTrainer steps of a prepared bf16 model: losses and trained weights within the bounds of the module
    docstring of a float32 twin, relative to a plain-PyTorch bf16 twin's own distance from it; frozen tensors
    unchanged, trainable ones float32 master weights, deactivated neurons still zero."""
    torch.manual_seed(0)
    model = build_tiny_model("llama").to(device=device, dtype=torch.bfloat16)
    fastrit.prepare(model, deactivate=DEACTIVATE, train_layers=TRAIN_LAYERS, train="mlp",
                    quantize_frozen=quantize_frozen, gradient_checkpointing=checkpointing)
    # as the Trainer does; before it, NeuronMLP's neuron-index buffers are still on the CPU (built there by
    # NeuronMLP.from_mlp), and the export and snapshots below need every tensor on the model's device
    model.to(device)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # master weights
    assert all(name.startswith(tuple(f"model.layers.{layer}.mlp." for layer in TRAIN_LAYERS)) for name in trainable)
    frozen = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
              if t is not None and not t.requires_grad}
    path = fastrit.export(model, tmp_path / "untrained")
    twin16, params16 = twin(path, torch.bfloat16, device)
    twin32, params32 = twin(path, torch.float32, device)
    before = flat(params32)
    assert torch.equal(before, flat(fastrit_weights(model)))  # all three start from the same weights

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, save_strategy="no",
        logging_steps=1, report_to=[], disable_tqdm=True, seed=0, data_seed=0, remove_unused_columns=False,
        use_cpu=device == "cpu",
    )
    trainer = recording_trainer(model, args, train_dataset=examples())
    trainer.train()
    assert len(trainer.batches) == STEPS and trainer.batches[0]["input_ids"].device.type == device
    assert all(math.isfinite(loss) for loss in trainer.losses)

    losses16 = train_twin(twin16, params16, trainer.batches)
    losses32 = train_twin(twin32, params32, trainer.batches)
    for step in range(STEPS):
        loss16, loss32 = losses16[step], losses32[step]
        rms = float((loss16 - loss32).square().mean().sqrt())
        assert abs(trainer.losses[step] - float(loss32.mean())) <= 2 * rms, (step, trainer.losses[step],
                                                                               float(loss16.mean()),
                                                                               float(loss32.mean()), rms)

    update32 = flat(params32) - before
    error16 = float((flat(params16) - before - update32).norm())
    error = float((flat(fastrit_weights(model)) - before - update32).norm())
    bound = 2 * error16 + 10 * LR
    assert bound < 0.5 * float(update32.norm()), (bound, float(update32.norm()))  # the bound sees a lost update
    assert error <= bound, (error, error16, float(update32.norm()))

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name
    for layer in TRAIN_LAYERS:
        dense = model.model.layers[layer].mlp.dense_weights(torch.float32)
        off = torch.tensor(DEACTIVATE[layer])
        assert not dense.inputs[0][off].any() and not dense.inputs[1][off].any() and not dense.output[:, off].any()
