"""positions="all" equals Captum's IntegratedGradients on the neuron site, one layer at a time."""

import pytest

import fastrit
from fastrit.attribution.inputs import scored_examples
from tests.tiny_models import prompt_batch

pytest.importorskip("captum.attr")
from benchmarks.baselines import captum_site_ig  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("method", ["riemann_right", "gausslegendre"])
@pytest.mark.parametrize("objective", ["logprob", "prob"])
def test_equals_captum_on_all_positions(tiny_model, family, method, objective):
    model = tiny_model(family)
    arch = fastrit.resolve_arch(model)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    steps = 6
    result = fastrit.attribute(
        model, input_ids, attention_mask=attention_mask, target_ids=target_ids,
        positions="all", objective=objective, method=method, steps=steps,
    )
    examples = scored_examples(input_ids, attention_mask, target_ids, "all", None)
    for b, example in enumerate(examples):
        for layer in range(arch.num_layers):
            want, want_delta = captum_site_ig(model, arch, example, layer, objective, method, steps)
            got = result.scores[b, layer]
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4
            assert abs(float(result.delta[b, layer]) - want_delta) < 1e-4 * float(want.abs().sum())
