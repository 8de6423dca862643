"""fastrit.attribute on SmolLM2 equals the slow reference loop (fastrit.attribute_reference), fp32."""

import torch

import fastrit

LAYERS = [0, 29]  # the first and the last layer: the engine's cached prefix and its whole sweep


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_attribute_equals_the_reference_loop(smollm2, prompts):
    model, _ = smollm2
    input_ids, attention_mask, target_ids = (t[:1] for t in prompts)  # one prompt: the reference loop is slow
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions="last", steps=4,
                  layers=LAYERS)
    fast = fastrit.attribute(model, input_ids, **kwargs)
    ref = fastrit.attribute_reference(model, input_ids, **kwargs)
    assert fast.scores.shape == ref.scores.shape == (1, 2, 1536) and fast.layers == LAYERS
    assert ref.scores.abs().max() > 1e-3  # not two all-zero tensors
    assert relative_error(fast.scores, ref.scores) < 1e-4
    assert float((fast.delta - ref.delta).abs().max()) < 1e-4 * float(ref.scores.abs().sum(-1).max())
    assert not torch.equal(fast.scores[:, 0], fast.scores[:, 1])  # two layers, not one twice
