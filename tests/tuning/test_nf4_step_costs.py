"""What one training step of a prepared model costs in NF4 dequantizations, counted on the op itself: each frozen NF4
weight is dequantized once per step without gradient checkpointing (its backward reuses the forward's weight) and
twice with it in the layers that are checkpointed (forward, then the recompute, whose weight the backward reuses);
and a checkpointed layer's recompute stops before the product of its frozen output projection."""

import copy
from collections import Counter

import pytest
import torch
import transformers

import fastrit
import fastrit.ops.nf4 as nf4_ops
from fastrit.arch import decoder_layers
from fastrit.nn import NF4Linear
from fastrit.tuning import causal_lm_loss
from fastrit.tuning.prepare import checkpointed_layers
from tests.tiny_models import VOCAB, tiny_config

TRAIN_LAYERS = [1, 2]


def _model() -> torch.nn.Module:
    config = tiny_config("llama")
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _step_counts(model: torch.nn.Module, monkeypatch) -> tuple[Counter, dict[int, int]]:
    """Dequantizations per packed weight (by storage) in one forward + backward, and each packed weight's layer."""
    counts: Counter = Counter()
    real = nf4_ops.dispatch  # every NF4 dequantization, whichever function asks for it, runs through it

    def counted(op, backend, device, reference_fn, *args):
        if op == "nf4_dequantize":
            counts[args[0].data_ptr()] += 1  # args[0]: the packed codes
        return real(op, backend, device, reference_fn, *args)

    monkeypatch.setattr(nf4_ops, "dispatch", counted)
    layer_of = {}
    for index, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if isinstance(module, NF4Linear):
                layer_of[module.packed.data_ptr()] = index
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    model.train()
    causal_lm_loss(model, ids, ids).backward()
    monkeypatch.setattr(nf4_ops, "dispatch", real)
    return counts, layer_of


@pytest.mark.parametrize("train", ["mlp", "neurons", "lora"])
def test_each_nf4_weight_is_dequantized_once_without_checkpointing_and_twice_with_it(train, monkeypatch):
    original = _model()
    grads = {}
    for checkpointing in (False, True):
        kwargs = dict(deactivate={3: [1, 2], 1: [4]}, train_layers=TRAIN_LAYERS, train=train, quantize_frozen="nf4",
                      gradient_checkpointing=checkpointing)
        if train == "neurons":
            kwargs["neurons"] = {1: [0, 5, 9], 2: [3, 4]}
        torch.manual_seed(1)  # LoRA's adapters are drawn: the same for both
        model = fastrit.prepare(copy.deepcopy(original), **kwargs)
        counts, layer_of = _step_counts(model, monkeypatch)
        assert set(counts) == set(layer_of) and len(layer_of) > 20  # every NF4 weight ran, nothing else was counted
        twice = checkpointed_layers(5, TRAIN_LAYERS, train) if checkpointing else set()
        want = {ptr: 2 if layer_of[ptr] in twice else 1 for ptr in layer_of}
        assert dict(counts) == want
        assert (2 in counts.values()) == checkpointing
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])


def test_the_recompute_stops_before_the_frozen_output_projections_product():
    """In a checkpointed layer the recompute dequantizes the frozen output projection (its backward needs the
    weight) but does not form its product: no forward product ``x @ W^T`` of that shape runs during backward,
    while the forward pass runs one per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = fastrit.prepare(_model(), deactivate=None, train_layers=TRAIN_LAYERS, train="neurons",
                            neurons={1: [0, 5], 2: [3]}, quantize_frozen="nf4", gradient_checkpointing=True)
    config = model.config
    down = (config.intermediate_size, config.hidden_size)

    class CountDownProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                # x [tokens, neurons] @ W^T, W^T a transposed view of the [hidden, neurons] weight (a backward
                # product grad @ W of an input projection has this shape too, but a contiguous W)
                if (a.shape[-1], b.shape[-1]) == down and b.t().is_contiguous() and not b.is_contiguous():
                    self.count += 1
            return out

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    model.train()
    with CountDownProducts() as forward:
        loss = causal_lm_loss(model, ids, ids)
    assert forward.count == config.num_hidden_layers  # the control: each layer's output projection, once
    with CountDownProducts() as backward:
        loss.backward()
    assert backward.count == 0
