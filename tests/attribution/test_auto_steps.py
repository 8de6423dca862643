"""steps="auto": per layer, the smallest Gauss-Legendre rule of AUTO_STEPS within delta_tol of |F(a) - F(0)|."""

import re

import pytest
import torch

import fastrit
from fastrit.attribution.integration import AUTO_STEPS, DEFAULT_DELTA_TOL
from tests.attribution.test_errors import assert_same_state, good_inputs, model_state
from tests.tiny_models import prompt_batch


def attribute(model, **settings):
    input_ids, attention_mask, target_ids = prompt_batch("left")
    return fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, **settings)


def gap(model, positions: str) -> torch.Tensor:
    """``[B, L]`` |F(a) - F(0)| per example and layer, from a fixed rule's delta and scores."""
    fixed = attribute(model, positions=positions, steps=4, method="gausslegendre")
    return (fixed.scores.sum(-1) - fixed.delta).abs()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("delta_tol", [DEFAULT_DELTA_TOL, 1e-5])
def test_each_layer_equals_the_fixed_rule_it_stopped_at(tiny_model, family, delta_tol):
    """Scores and delta of every (example, layer) are exactly those of Gauss-Legendre at its ``steps_used``, the
    first size within tolerance (or the last), so nothing wrong was reused between rounds."""
    model = tiny_model(family)
    auto = attribute(model, positions="answer", steps="auto", delta_tol=delta_tol, batch_size=7)
    assert auto.settings["steps"] == "auto" and auto.settings["method"] == "gausslegendre"
    assert auto.settings["delta_tol"] == delta_tol
    used = auto.steps_used
    assert set(used.unique().tolist()) <= set(AUTO_STEPS)
    fixed = {size: attribute(model, positions="answer", steps=size, method="gausslegendre")
             for size in sorted(set(used.unique().tolist()))}
    tolerance = delta_tol * gap(model, "answer")
    for (b, j), size in zip(used.nonzero(as_tuple=False).tolist(), used.flatten().tolist(), strict=True):
        want = fixed[size]
        torch.testing.assert_close(auto.scores[b, j], want.scores[b, j], rtol=1e-5, atol=1e-7)
        assert abs(float(auto.delta[b, j] - want.delta[b, j])) <= 1e-6 + 1e-5 * float(want.scores[b, j].abs().sum())
        smaller = [s for s in AUTO_STEPS if s < size]
        for s in smaller:  # every smaller rule was out of tolerance
            rule = attribute(model, positions="answer", steps=s, method="gausslegendre")
            assert abs(float(rule.delta[b, j])) > tolerance[b, j] * (1 - 1e-4)
        if size < AUTO_STEPS[-1]:
            assert abs(float(auto.delta[b, j])) <= tolerance[b, j] * (1 + 1e-4)
    if delta_tol < 1e-4:
        assert int(used.max()) > AUTO_STEPS[0]  # the tight tolerance makes some layer grow


def test_fixed_steps_record_their_steps(tiny_model):
    result = attribute(tiny_model("llama"), steps=5)
    assert result.steps_used.dtype == torch.int32 and bool((result.steps_used == 5).all())
    assert "delta_tol" not in result.settings and result.settings["method"] == "riemann_right"


def test_steps_used_survive_save_and_load(tiny_model, tmp_path):
    result = attribute(tiny_model("llama"), steps="auto", delta_tol=1e-5)
    loaded = fastrit.NeuronAttribution.load(result.save(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.steps_used, result.steps_used)
    assert loaded.settings["steps"] == "auto"


AUTO_CASES = [
    ("steps", ValueError, dict(steps="many")),
    ("method", ValueError, dict(steps="auto", method="riemann_right")),
    ("delta_tol", ValueError, dict(steps="auto", delta_tol=0)),
    ("delta_tol", ValueError, dict(steps="auto", delta_tol=1.5)),
    ("delta_tol", ValueError, dict(steps="auto", delta_tol=True)),
    ("delta_tol", ValueError, dict(steps=8, delta_tol=0.01)),
]


@pytest.mark.parametrize("argument,error,override", AUTO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(AUTO_CASES)])
def test_bad_auto_settings_name_the_argument(tiny_model, argument, error, override):
    model = tiny_model("llama")
    before = model_state(model)
    kwargs = good_inputs()
    input_ids = kwargs.pop("input_ids")
    with pytest.raises(error, match=re.escape(argument)):
        fastrit.attribute(model, input_ids, **kwargs, **override)
    assert_same_state(before, model_state(model))


def test_the_reference_loop_refuses_auto(tiny_model):
    kwargs = good_inputs()
    with pytest.raises(ValueError, match="steps"):
        fastrit.attribute_reference(tiny_model("llama"), kwargs.pop("input_ids"), steps="auto", **kwargs)
