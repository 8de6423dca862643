"""fastrit.attribute equals the slow reference loop (fp32, 1e-4 relative) on every family and setting."""

import pytest
import torch

import fastrit
from fastrit.attribution import engine
from tests.tiny_models import prompt_batch

CORE_FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"]
OTHER_FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
TOL = 1e-4


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def compare(model, padding_side, **settings):
    input_ids, attention_mask, target_ids = prompt_batch(padding_side)
    fast = fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, **settings)
    ref = fastrit.attribute_reference(
        model, input_ids, attention_mask=attention_mask, target_ids=target_ids, **settings
    )
    assert fast.scores.shape == ref.scores.shape == (3, model.config.num_hidden_layers, 48)
    assert fast.scores.dtype == torch.float32 and fast.delta.dtype == torch.float32
    assert ref.scores.abs().max() > 1e-6  # the comparison is not between two all-zero tensors
    assert relative_error(fast.scores, ref.scores) < TOL
    # delta = sum(scores) - (F(a) - F(0)): compare on the scale of the scores it is made of
    assert float((fast.delta - ref.delta).abs().max()) < TOL * float(ref.scores.abs().sum(-1).max())
    return fast, ref


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("positions", ["last", "answer", "all"])
@pytest.mark.parametrize("objective", ["logprob", "prob"])
@pytest.mark.parametrize("method", ["riemann_right", "gausslegendre"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_equals_reference(tiny_model, family, positions, objective, method, padding_side):
    compare(tiny_model(family), padding_side, positions=positions, objective=objective, method=method, steps=5)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("positions", ["last", "answer", "all"])
@pytest.mark.parametrize("objective", ["logprob", "prob"])
def test_equals_reference_other_families(tiny_model, family, positions, objective):
    compare(tiny_model(family), "left", positions=positions, objective=objective, method="riemann_right", steps=4)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_middle", "riemann_trapezoid"])
def test_other_integration_rules(tiny_model, method):
    compare(tiny_model("llama"), "right", positions="answer", method=method, steps=6)


@pytest.mark.parametrize("family", ["gpt_neox", "gemma2"])
@pytest.mark.parametrize("batch_size", [None, 1, 2, 7])
@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("mix_layers", [True, False])
def test_batch_size_does_not_change_results(tiny_model, monkeypatch, family, batch_size, positions, mix_layers):
    """Chunks of any size, spanning several layers (run in segments, one per entry layer) or splitting one, give
    the same numbers."""
    monkeypatch.setattr(engine, "_MIX_LAYERS_BELOW_TOKENS", 10**9 if mix_layers else 0)
    model = tiny_model(family)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions=positions, steps=6)
    ref = fastrit.attribute_reference(model, input_ids, **kwargs)
    bounded = fastrit.attribute(model, input_ids, batch_size=batch_size, **kwargs)
    assert relative_error(bounded.scores, ref.scores) < TOL
    assert float((bounded.delta - ref.delta).abs().max()) < TOL * float(ref.scores.abs().sum(-1).max())


def test_layer_subset_and_negative_indices(tiny_model):
    model = tiny_model("qwen2")
    input_ids, attention_mask, target_ids = prompt_batch("right")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions="answer", steps=4)
    full = fastrit.attribute(model, input_ids, **kwargs)
    sub = fastrit.attribute(model, input_ids, layers=[-1, 0], **kwargs)
    assert sub.layers == [2, 0]
    assert relative_error(sub.scores[:, 0], full.scores[:, 2]) < TOL
    assert relative_error(sub.layer(0), full.layer(0)) < TOL


def test_gausslegendre_converges_faster_than_riemann(tiny_model):
    model = tiny_model("llama")
    input_ids, attention_mask, target_ids = prompt_batch("left")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions="all")
    gl = fastrit.attribute(model, input_ids, method="gausslegendre", steps=8, **kwargs)
    rr = fastrit.attribute(model, input_ids, method="riemann_right", steps=20, **kwargs)
    assert gl.delta.abs().max() < rr.delta.abs().max()


def test_progress_bar(tiny_model, capsys):
    model = tiny_model("llama")
    input_ids, attention_mask, target_ids = prompt_batch("left")
    fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, steps=2, progress=True)
    assert "fastrit.attribute" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["flex_attention", "flash_attention_2"])
def test_attention_without_4d_masks_runs_sdpa_and_is_restored(tiny_model_dir, attention):
    """A model configured with flex or flash attention (no custom additive 4D masks) attributes through sdpa (the
    fused kernels a GPU user has, not eager attention) with exact scores, and gets its own setting back."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="sdpa").eval()
    model.config._attn_implementation = attention  # flash-attn is not installed here: the setting is what counts
    seen = set()
    model.model.layers[0].register_forward_pre_hook(lambda *_: seen.add(model.config._attn_implementation))
    input_ids, attention_mask, target_ids = prompt_batch("left")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions="answer", steps=4)
    fast = fastrit.attribute(model, input_ids, **kwargs)
    assert seen == {"sdpa"}
    assert model.config._attn_implementation == attention
    model.config._attn_implementation = "eager"
    ref = fastrit.attribute_reference(model, input_ids, **kwargs)
    assert relative_error(fast.scores, ref.scores) < TOL


# another site (GPT-2's c_fc output, before the activation: the knowledge-neurons package's) and unpacked rows
_C_FC = fastrit.ArchSpec(layers="h", mlp_out="mlp.c_proj", final_norm="ln_f", site="mlp.c_fc")


@pytest.mark.parametrize("spec", [_C_FC, fastrit.ArchSpec(layers="h", mlp_out="mlp.c_proj", final_norm="ln_f",
                                                          pack_rows=False)], ids=["c_fc_site", "unpacked"])
@pytest.mark.parametrize("positions", ["last", "answer", "all"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_other_site_and_unpacked_rows_equal_reference(tiny_model, spec, positions, padding_side):
    model = tiny_model("gpt2")
    input_ids, attention_mask, target_ids = prompt_batch(padding_side)
    settings = dict(attention_mask=attention_mask, target_ids=target_ids, positions=positions, steps=4, spec=spec)
    fast = fastrit.attribute(model, input_ids, **settings)
    ref = fastrit.attribute_reference(model, input_ids, **settings)
    width = model.config.n_inner if spec.site else 48
    assert fast.scores.shape == (3, 3, width) and ref.scores.abs().max() > 1e-6
    assert relative_error(fast.scores, ref.scores) < TOL
    assert float((fast.delta - ref.delta).abs().max()) < TOL * float(ref.scores.abs().sum(-1).max())
    if spec.site:  # a different site gives different scores than the neuron site
        default = fastrit.attribute(model, input_ids, **{**settings, "spec": None})
        assert relative_error(fast.scores, default.scores) > 1e-2


def test_bidirectional_spec_is_refused(tiny_model):
    spec = fastrit.ArchSpec(layers="h", mlp_out="mlp.c_proj", final_norm="ln_f", additive_mlp=False,
                            bidirectional=True)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    with pytest.raises(ValueError, match="spec: a bidirectional .* fastrit.compat.KnowledgeNeurons"):
        fastrit.attribute(tiny_model("gpt2"), input_ids, attention_mask=attention_mask, target_ids=target_ids,
                          spec=spec)


def test_prob_objective_spends_nothing_on_later_answer_tokens(tiny_model):
    """p(answer_0 | prompt) depends on the prompt only: a 3-token answer costs the FLOPs of a 1-token one (no row
    recomputes, no LM head scores, the later tokens), with the same scores; under logprob it costs more."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 90, (1, 12), generator=gen)
    answer = torch.randint(3, 90, (1, 3), generator=gen)

    def run(target, objective):
        counter = FlopCounterMode(display=False)
        with counter:
            result = fastrit.attribute(model, prompt, target_ids=target, objective=objective, positions="all",
                                       steps=3)
        return counter.get_total_flops(), result

    long_flops, long = run(answer, "prob")
    short_flops, short = run(answer[:, :1], "prob")
    assert long_flops == short_flops
    torch.testing.assert_close(long.scores, short.scores, rtol=0, atol=0)
    assert run(answer, "logprob")[0] > short_flops


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_row_is_computed_below_its_entry_layer(tiny_model, family):
    """The floor (docs/attribution.md): rows of every layer in one chunk cost the matmul FLOPs of one chunk per
    layer, where each chunk starts at its own entry layer. Rows are not packed here: packing puts g rows in one
    sequence, adding masked-out cross-row attention scores and up to g - 1 filler rows per segment (the layout's
    memory-for-FLOPs trade); attention is left out of the count for the same reason. Additive-MLP families only: in
    the others (Gemma2/3) rows enter at their layer's input with its site replaced, so rows joining the carried ones
    share their entry layer's attention backward, which they do not need (docs/attribution.md)."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(family)
    spec = dataclasses.replace(fastrit.resolve_arch(model).spec, pack_rows=False)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    steps = 4

    def matmul_flops(batch_size):
        counter = FlopCounterMode(display=False)
        with counter:
            result = fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids,
                                       positions="answer", steps=steps, batch_size=batch_size, spec=spec)
        counts = counter.get_flop_counts()["Global"]
        return sum(v for op, v in counts.items() if "attention" not in str(op)), result

    per_layer, split = matmul_flops(steps + 1)  # a chunk per layer: its rows and its baseline row
    mixed, together = matmul_flops(None)  # every layer's rows in one chunk
    assert mixed == per_layer
    torch.testing.assert_close(together.scores, split.scores, rtol=1e-5, atol=1e-7)
