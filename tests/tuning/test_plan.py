"""fastrit.plan_memory: the trainable parameters are prepare's own (a real tiny model prepared the same way), the
parts add up, the paper's Llama-3-8B setting, and bad input."""

import pytest
import torch

import fastrit
from fastrit.tuning.plan import plan_memory
from tests.tiny_models import build_tiny_model, tiny_config


@pytest.mark.parametrize("train", ["mlp", "neurons", "lora"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt_neox"])
def test_trainable_params_are_those_prepare_creates(family, train):
    plan = plan_memory(tiny_config(family), train=train, train_layers=[1, 2], neurons=5, seq_len=16)
    kwargs = dict(deactivate=None, train_layers=[1, 2], train=train, quantize_frozen="nf4")
    if train == "neurons":
        kwargs["neurons"] = {1: list(range(5)), 2: list(range(5))}
    model = fastrit.prepare(build_tiny_model(family), **kwargs)
    assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = plan.breakdown
    persistent = parts["frozen weights"] + parts["trainable weights"] + parts["gradients"] + parts["optimizer states"]
    step = parts["saved activations"] + parts["logits and loss"] + parts["weight copies"]
    assert plan.peak_bytes == persistent + max(step, parts["optimizer workspace"]) > 0


def test_llama_3_8b_in_the_papers_setting():
    mlp = plan_memory("llama-3-8b", seq_len=2048, batch_size=1, train="mlp", train_layers=3)
    assert mlp.trainable_params == 528_482_304 == 3 * 3 * 4096 * 14336
    neurons = plan_memory("llama-3-8b", train="neurons", neurons=1433)
    assert neurons.trainable_params == 3 * 3 * 4096 * 1433
    plain = plan_memory("llama-3-8b", quantize_frozen=None, optimizer="adamw", gradient_checkpointing=False)
    assert neurons.peak_bytes < mlp.peak_bytes < plain.peak_bytes
    assert "frozen weights" in str(mlp) and "peak" in mlp.table()


def test_optimizer_workspace_by_optimizer_and_device():
    settings = dict(seq_len=256, train="mlp", train_layers=[14, 15, 16], dtype="float32")
    gpu = plan_memory("llama-3-8b", **settings)
    cpu = plan_memory("llama-3-8b", device="cpu", **settings)
    torch_adamw = plan_memory("llama-3-8b", optimizer="adamw", **settings)
    assert gpu.breakdown["optimizer workspace"] == 0  # bitsandbytes' CUDA kernel updates in place
    # on CPU: five float32 copies of the largest tensor, the gate and up rows of one layer [2 x 14336, 4096]
    assert cpu.breakdown["optimizer workspace"] == 5 * 4 * 2 * 14336 * 4096
    assert torch_adamw.breakdown["optimizer workspace"] == 4 * gpu.trainable_params
    assert cpu.peak_bytes > gpu.peak_bytes and {**cpu.breakdown, "optimizer workspace": 0} == gpu.breakdown


def test_bad_input_names_the_argument():
    for kwargs, argument in [(dict(config="llama-9000"), "config"), (dict(config=3), "config"),
                             (dict(train="all"), "train"), (dict(optimizer="sgd"), "optimizer"),
                             (dict(train="neurons"), "neurons"), (dict(train_layers=99), "train_layers"),
                             (dict(seq_len=0), "seq_len"), (dict(dtype="int8"), "dtype"),
                             (dict(quantize_frozen="int4"), "quantize_frozen"), (dict(device="tpu"), "device")]:
        with pytest.raises((ValueError, TypeError), match=f"^{argument}"):
            plan_memory(**{"config": "llama-3-8b", **kwargs})
    assert torch.empty(0).device.type == "cpu"  # nothing was left on the meta device by default


def test_master_weights_and_weight_copies_are_counted():
    """bf16 with master weights: trainable weights and gradients in float32 (4 bytes per value), and the weights
    cast to bf16 kept for backward; without: 2 bytes and no cast copies. NF4 without checkpointing keeps the
    dequantized weights of every layer above the lowest target layer; with it, one layer's at a time."""
    settings = dict(seq_len=512, train="mlp", train_layers=[14, 15, 16], dtype="bfloat16")
    master = plan_memory("llama-3-8b", quantize_frozen=None, gradient_checkpointing=True, **settings)
    plain = plan_memory("llama-3-8b", quantize_frozen=None, gradient_checkpointing=True, master_weights=False,
                        **settings)
    n = master.trainable_params
    assert master.breakdown["trainable weights"] == master.breakdown["gradients"] == 4 * n
    assert plain.breakdown["trainable weights"] == plain.breakdown["gradients"] == 2 * n
    assert plain.breakdown["weight copies"] == 0
    per_layer_mlp = 3 * 4096 * 14336 * 2  # one target layer's MLP cast to bf16
    # the last target layer (15 and 16 are checkpointed; 14, the lowest, too with train="mlp") at most one at a time
    assert master.breakdown["weight copies"] == per_layer_mlp
    layer = (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) * 2  # one decoder layer's projections in bf16
    nf4 = plan_memory("llama-3-8b", quantize_frozen="nf4", gradient_checkpointing=False, master_weights=False,
                      **settings)
    assert nf4.breakdown["weight copies"] == 17 * layer - 2 * per_layer_mlp  # layers 15-31, less 15-16's trainable MLPs
    nf4_checkpointed = plan_memory("llama-3-8b", quantize_frozen="nf4", gradient_checkpointing=True,
                                   master_weights=False, **settings)
    assert nf4_checkpointed.breakdown["weight copies"] == layer  # the last layer's at the loss, or one recomputed
