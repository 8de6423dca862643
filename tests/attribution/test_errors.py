"""Bad input raises ValueError/TypeError naming the argument, and the model is left exactly as it was."""

import re

import pytest
import torch
from torch import nn

import fastrit
from fastrit.attribution import engine, sweep
from tests.tiny_models import prompt_batch


def model_state(model: nn.Module):
    """Everything attribute must leave untouched: hooks, modules, parameters, grad flags, mode."""
    return {
        "hooks": [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        ],
        "modules": [id(m) for m in model.modules()],
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": model.training,
    }


def assert_same_state(before, after):
    assert before["hooks"] == after["hooks"]
    assert before["modules"] == after["modules"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), name


@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


def good_inputs():
    input_ids, attention_mask, target_ids = prompt_batch("left")
    return dict(input_ids=input_ids, attention_mask=attention_mask, target_ids=target_ids)


CASES = [
    ("target_ids", ValueError, dict(target_ids=torch.full((3, 2), -100))),
    ("target_ids", ValueError, dict(target_ids=torch.zeros(3, 0, dtype=torch.long))),
    ("target_ids", TypeError, dict(target_ids=torch.ones(3, 2))),
    ("target_ids", ValueError, dict(target_ids=torch.ones(2, 2, dtype=torch.long))),
    ("attention_mask", ValueError, dict(attention_mask=torch.ones(3, 4, dtype=torch.long))),
    ("attention_mask", ValueError, dict(attention_mask=torch.zeros(3, 9, dtype=torch.long))),
    ("input_ids", ValueError, dict(input_ids=torch.ones(9, dtype=torch.long))),
    ("input_ids", TypeError, dict(input_ids=[[1, 2, 3]])),
    ("positions", ValueError, dict(positions="first")),
    ("method", ValueError, dict(method="riemann")),
    ("objective", ValueError, dict(objective="loss")),
    ("steps", ValueError, dict(steps=0)),
    ("steps", ValueError, dict(method="riemann_trapezoid", steps=1)),
    ("steps", TypeError, dict(steps=2.5)),
    ("layers", ValueError, dict(layers=[0, 3])),
    ("layers", ValueError, dict(layers=[-4])),
    ("layers", ValueError, dict(layers=[])),
    ("layers", ValueError, dict(layers=[1, 1])),
    ("layers", TypeError, dict(layers=2)),
    ("batch_size", ValueError, dict(batch_size=0)),
    ("input_ids/target_ids", ValueError, dict(input_ids=torch.ones(1, 60, dtype=torch.long),
                                             attention_mask=None, target_ids=torch.ones(1, 8, dtype=torch.long))),
]


@pytest.mark.parametrize("argument,error,override", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("attribute", [fastrit.attribute, fastrit.attribute_reference], ids=["fast", "reference"])
def test_bad_input_names_the_argument(llama, attribute, argument, error, override):
    kwargs = {**good_inputs(), **override}
    if attribute is fastrit.attribute_reference and "batch_size" in kwargs:
        kwargs["steps_per_batch"] = kwargs.pop("batch_size")
        argument = "steps_per_batch"
    before = model_state(llama)
    input_ids = kwargs.pop("input_ids")
    with pytest.raises(error, match=re.escape(argument.split("/")[0])):
        attribute(llama, input_ids, **kwargs)
    assert_same_state(before, model_state(llama))


def test_sequence_longer_than_sliding_window(tiny_model):
    model = tiny_model("mistral")  # sliding_window = 32, max positions 64
    ids = torch.ones(1, 40, dtype=torch.long)
    with pytest.raises(ValueError, match="sliding"):
        fastrit.attribute(model, ids, target_ids=torch.ones(1, 1, dtype=torch.long))


def test_model_without_recognisable_mlp():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="model: .*Supported families: .*spec="):
        fastrit.attribute(NotAnLM(), torch.ones(1, 3, dtype=torch.long), target_ids=torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="model"):
        fastrit.attribute("gpt2", torch.ones(1, 3, dtype=torch.long), target_ids=torch.ones(1, 1, dtype=torch.long))


def test_model_untouched_after_success_in_train_mode(tiny_model):
    model = tiny_model("gpt2")
    model.train()
    try:
        before = model_state(model)
        fastrit.attribute(model, **good_inputs(), positions="answer", steps=2)
        assert_same_state(before, model_state(model))
    finally:
        model.eval()


def fail_on_call(n, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("where", ["inside_tail_forward", "after_tail_forward"])
def test_model_untouched_after_error_inside_the_sweep(tiny_model, monkeypatch, family, where):
    model = tiny_model(family)
    before = model_state(model)
    if where == "inside_tail_forward":
        # raised while the lower layers are bypassed and the entry/site hooks are installed
        monkeypatch.setattr(sweep.RowLayout, "position_ids", fail_on_call(2, sweep.RowLayout.position_ids))
    else:
        monkeypatch.setattr(engine, "objective_from_logits", fail_on_call(3, engine.objective_from_logits))
    with pytest.raises(RuntimeError, match="boom"):
        fastrit.attribute(model, **good_inputs(), positions="answer", steps=2)
    assert_same_state(before, model_state(model))
    arch = fastrit.resolve_arch(model)
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in arch.layers)
