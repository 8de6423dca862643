"""positions="all" equals Captum's IntegratedGradients on the neuron site, one layer at a time."""

import pytest
import torch

import fastrit
from fastrit.attribution.inputs import objective_from_logits, scored_examples
from tests.tiny_models import prompt_batch

captum_attr = pytest.importorskip("captum.attr")


def captum_layer_scores(model, mlp_out, example, objective, method, steps):
    """Captum IG on the site of one layer (zero baseline), summed over positions: ``[I]``."""
    captured = {}

    def capture(module, args):
        captured["site"] = args[0].detach()

    handle = mlp_out.register_forward_pre_hook(capture)
    with torch.no_grad():
        model(input_ids=example.ids[None])
    handle.remove()

    def forward(site):  # site: [R, S, I]
        def replace(module, args):
            return (site,)

        hook = mlp_out.register_forward_pre_hook(replace)
        try:
            logits = model(input_ids=example.ids[None].expand(site.shape[0], -1)).logits
        finally:
            hook.remove()
        return objective_from_logits(logits[:, example.answer_positions], example.answer, objective)

    ig = captum_attr.IntegratedGradients(forward)
    attributions, delta = ig.attribute(
        captured["site"], baselines=0.0, n_steps=steps, method=method, return_convergence_delta=True
    )
    return attributions[0].sum(0), float(delta[0])


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
            want, want_delta = captum_layer_scores(model, arch.mlp_out[layer], example, objective, method, steps)
            got = result.scores[b, layer]
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4
            assert abs(float(result.delta[b, layer]) - want_delta) < 1e-4 * float(want.abs().sum())
