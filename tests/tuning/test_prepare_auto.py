"""prepare's choices from the device and its report of what it did to the model: quantize_frozen="auto" keeps the
dtype exactly when plan_memory says the unquantized step fits the budget; check_prompts measures deactivation and
quantization against independent forwards (the original model, and the original with the neurons zeroed by hooks)
and warns, naming the cause, when predictions change."""

import copy
import warnings

import pytest
import torch

import fastrit
from fastrit.nn import NF4Linear
from fastrit.tuning.auto import CANDIDATES, FIT_MARGIN, choose_for_model
from fastrit.tuning.effect import compare
from tests.tiny_models import VOCAB, build_tiny_model
from tests.tuning.test_prepare import _reference_logits

DEACTIVATE = {0: [1, 5, 7], 2: [0, 3, 47]}


def _prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (9, 6, 4)]


def _peak(model, quantize=None, checkpointing=False) -> int:
    plan = fastrit.plan_memory(model.config, seq_len=64, batch_size=2, train="mlp", train_layers=[1, 2],
                               quantize_frozen=quantize, gradient_checkpointing=checkpointing, dtype="float32",
                               device="cpu")
    return plan.peak_bytes


@pytest.mark.parametrize("slack, expected", [(0, None), (-1, "nf4")])
def test_auto_quantizes_exactly_when_the_unquantized_step_does_not_fit(slack, expected):
    model = build_tiny_model("llama")
    budget = _peak(model) + slack
    prepared = fastrit.prepare(model, deactivate=DEACTIVATE, train_layers=[1, 2], gradient_checkpointing=False,
                               memory_budget=budget, planned_batch=(2, 64))
    settings = prepared.fastrit_preparation.settings
    assert settings["quantize_frozen"] == expected
    assert any(isinstance(m, NF4Linear) for m in prepared.modules()) == (expected == "nf4")
    assert ("NF4" in settings["quantize_reason"]) == (expected == "nf4")


@pytest.mark.parametrize("fits", range(len(CANDIDATES)))
def test_auto_takes_the_first_setting_that_fits_in_order(fits):
    """With a budget of exactly one candidate's planned peak, both "auto" settings become the first candidate
    (dense then NF4, each without then with checkpointing) whose plan is within it; the reason lists the plans."""
    model = build_tiny_model("llama")
    peaks = [_peak(model, q, c) for q, c in CANDIDATES]
    budget = peaks[fits]
    want = next(candidate for candidate, peak in zip(CANDIDATES, peaks, strict=True) if peak <= budget)
    prepared = fastrit.prepare(model, deactivate=DEACTIVATE, train_layers=[1, 2], memory_budget=budget,
                               planned_batch=(2, 64))
    settings = prepared.fastrit_preparation.settings
    assert (settings["quantize_frozen"], settings["gradient_checkpointing"]) == want
    assert model.is_activation_checkpointing == want[1]
    assert any(isinstance(m, NF4Linear) for m in prepared.modules()) == (want[0] == "nf4")
    assert "fits memory_budget" in settings["quantize_reason"]


def test_auto_with_no_setting_that_fits_takes_the_least_memory_and_says_so():
    model = build_tiny_model("llama")
    prepared = fastrit.prepare(model, deactivate=DEACTIVATE, train_layers=[1, 2], memory_budget=1,
                               planned_batch=(2, 64))
    settings = prepared.fastrit_preparation.settings
    least = min(CANDIDATES, key=lambda c: _peak(model, *c))
    assert (settings["quantize_frozen"], settings["gradient_checkpointing"]) == least
    assert "no setting fits" in settings["quantize_reason"]


def test_auto_on_the_device_keeps_the_dtype_of_a_model_that_fits():
    model = build_tiny_model("llama")
    quantize, checkpointing, why = choose_for_model(
        model, train="mlp", train_layers=[1], neurons=None, quantize_frozen="auto", gradient_checkpointing="auto",
        master_weights=True, memory_budget=None, planned_batch=(8, 512))
    assert (quantize, checkpointing) == (None, False)
    assert "cpu memory available" in why and f"x{FIT_MARGIN}" in why
    prepared = fastrit.prepare(model, deactivate=None, train_layers=[1])
    assert not any(isinstance(m, NF4Linear) for m in prepared.modules())
    assert prepared.fastrit_preparation.settings["gradient_checkpointing"] is False


def test_explicit_settings_win_over_auto():
    model = build_tiny_model("llama")
    prepared = fastrit.prepare(model, deactivate=None, train_layers=[1], quantize_frozen="nf4",
                               gradient_checkpointing=False)
    assert any(isinstance(m, NF4Linear) for m in prepared.modules())
    assert prepared.fastrit_preparation.settings["quantize_reason"] == "NF4 frozen layers, no checkpointing: as asked"


def _logprobs(logits):
    return torch.log_softmax(logits.float(), dim=-1)


def test_the_reported_effect_equals_independent_forwards():
    original = build_tiny_model("llama")
    prompts = _prompts()
    prepared = fastrit.prepare(copy.deepcopy(original), deactivate=DEACTIVATE, train_layers=[1, 2],
                               quantize_frozen="nf4", gradient_checkpointing=False, check_prompts=prompts)
    effect = prepared.fastrit_preparation.effect
    with torch.no_grad():
        before = torch.cat([_logprobs(original(torch.tensor([p])).logits[0]) for p in prompts])
        zeroed = torch.cat([_logprobs(_reference_logits(original, torch.tensor([p]), DEACTIVATE)[0])
                            for p in prompts])
        after = torch.cat([_logprobs(prepared(torch.tensor([p])).logits[0]) for p in prompts])
    for name, (a, b) in {"deactivation": (before, zeroed), "quantization": (zeroed, after),
                         "total": (before, after)}.items():
        want = compare(a, b)
        assert effect[name]["positions"] == sum(map(len, prompts)) == want.positions
        assert effect[name]["argmax_agreement"] == pytest.approx(want.argmax_agreement)
        assert effect[name]["kl_mean"] == pytest.approx(want.kl_mean, rel=1e-4, abs=1e-7)
        assert effect[name]["max_logprob_change"] == pytest.approx(want.max_logprob_change, rel=1e-4, abs=1e-6)
    assert effect["deactivation"]["kl_mean"] > 0 and effect["quantization"]["kl_mean"] > 0


def test_kl_and_agreement_by_hand():
    before = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), -1)
    after = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), -1)
    change = compare(before, after)
    p = before[1].exp()
    assert change.argmax_agreement == 0.5
    assert change.kl_mean == pytest.approx(float((p * (before[1] - after[1])).sum()) / 2)
    assert change.kl_max == pytest.approx(float((p * (before[1] - after[1])).sum()))


def test_no_change_reports_zero_and_no_warning():
    model = build_tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = fastrit.prepare(model, deactivate=None, train_layers=[1], quantize_frozen=None,
                                   gradient_checkpointing=False, check_prompts=_prompts())
    effect = prepared.fastrit_preparation.effect
    assert effect["total"]["argmax_agreement"] == 1.0 and effect["total"]["kl_max"] < 1e-6
    assert "quantization" not in effect


def test_a_large_change_warns_and_names_deactivation():
    model = build_tiny_model("llama")
    half = {layer: list(range(0, 48, 2)) for layer in range(3)}
    with pytest.warns(UserWarning, match="deactivating 72 neurons"):
        prepared = fastrit.prepare(model, deactivate=half, train_layers=[1], quantize_frozen=None,
                                   gradient_checkpointing=False, check_prompts=_prompts())
    assert prepared.fastrit_preparation.effect["deactivation"]["argmax_agreement"] < 0.98


@pytest.mark.parametrize("kwargs, argument", [
    ({"check_prompts": [[]]}, "check_prompts"),
    ({"check_prompts": "text"}, "check_prompts"),
    ({"memory_budget": 0}, "memory_budget"),
    ({"planned_batch": (8,)}, "planned_batch"),
    ({"quantize_frozen": "int8"}, "quantize_frozen"),
])
def test_bad_input_names_the_argument_and_leaves_the_model_untouched(kwargs, argument):
    model = build_tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=argument):
        fastrit.prepare(model, deactivate=None, train_layers=[1], **kwargs)
    assert getattr(model, "fastrit_preparation", None) is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _fake_sets(model, seed: int = 0):
    """NeuronSets over the tiny model with random activation counts (20 examples per condition), selected with
    share 0.5: a few dozen irrelevant-exclusive neurons of differing specificity."""
    from fastrit.mining import NeuronSets
    from fastrit.mining.stats import MiningStats

    layers, intermediate = model.config.num_hidden_layers, model.config.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    stats = MiningStats.zeros(layers, intermediate)
    for condition in ("relevant", "irrelevant"):
        stats.conditions[condition].counts = torch.randint(0, 21, (layers, intermediate), generator=gen)
        stats.conditions[condition].examples = 20
    return NeuronSets.from_stats(stats, share=0.5, top_n=None, target_layers=1, settings={},
                                 model={"model_type": "llama", "num_layers": layers,
                                        "intermediate_size": intermediate})


def _argmax_agreement(model, prompts, neurons) -> float:
    with torch.no_grad():
        before = torch.cat([_logprobs(model(torch.tensor([p])).logits[0]) for p in prompts])
        after = torch.cat([_logprobs(_reference_logits(model, torch.tensor([p]), neurons)[0]) for p in prompts])
    return compare(before, after).argmax_agreement


def test_deactivation_keeps_the_most_specific_neurons_that_stay_within_the_tolerance():
    from fastrit.tuning.deactivation import ranked_neurons

    original = build_tiny_model("llama")
    sets = _fake_sets(original)
    mined = sets.irrelevant_exclusive
    prompts = _prompts()
    tolerance = 0.1
    prepared = fastrit.prepare(copy.deepcopy(original), sets, train_layers=[1], quantize_frozen=None,
                               gradient_checkpointing=False, check_prompts=prompts,
                               deactivation_tolerance=tolerance)
    record = prepared.fastrit_preparation.settings["deactivation_limit"]
    ranking = ranked_neurons(mined, sets)  # by hand below: the ranking's order
    irrelevant = sets.counts["irrelevant"].double() / 20 - sets.counts["relevant"].double() / 20
    specificity = [float(irrelevant[layer, index]) for layer, index in ranking]
    assert specificity == sorted(specificity, reverse=True)
    assert record["mined"] == len(ranking) == sum(len(v) for v in mined.values())
    assert 0 < record["kept"] < record["mined"], record  # this tiny model: some fit, not all
    kept = {}
    for layer, index in ranking[: record["kept"]]:
        kept.setdefault(layer, []).append(index)
    got = prepared.fastrit_preparation.deactivated
    assert {layer: sorted(v) for layer, v in kept.items()} == {layer: v.tolist() for layer, v in got.items()}
    assert _argmax_agreement(original, prompts, kept) >= 1 - tolerance
    one_more = copy.deepcopy(kept)
    layer, index = ranking[record["kept"]]
    one_more.setdefault(layer, []).append(index)
    assert _argmax_agreement(original, prompts, one_more) < 1 - tolerance


def test_deactivation_without_a_tolerance_or_prompts_takes_the_whole_set():
    original = build_tiny_model("llama")
    sets = _fake_sets(original)
    whole = {layer: v.tolist() for layer, v in sets.irrelevant_exclusive.items() if len(v)}
    for kwargs in ({"check_prompts": _prompts(), "deactivation_tolerance": None}, {}):
        prepared = fastrit.prepare(copy.deepcopy(original), sets, train_layers=[1], quantize_frozen=None,
                                   gradient_checkpointing=False, **kwargs)
        assert {layer: v.tolist() for layer, v in prepared.fastrit_preparation.deactivated.items()} == whole
        assert prepared.fastrit_preparation.settings["deactivation_limit"] is None


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "gemma2", "qwen2"])
def test_auto_works_on_every_family(family):
    model = build_tiny_model(family)
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prepared = fastrit.prepare(model, deactivate=None, train_layers=[1],
                               gradient_checkpointing=False)
    settings = prepared.fastrit_preparation.settings
    assert settings["quantize_frozen"] in (None, "nf4")
    assert settings["quantize_reason"].startswith((f"{model_dtype} frozen layers", "NF4 frozen layers"))


def test_a_warning_raised_as_an_error_leaves_the_model_recorded_as_prepared():
    model = build_tiny_model("llama")
    half = {layer: list(range(0, 48, 2)) for layer in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="deactivating 72 neurons"):
            fastrit.prepare(model, deactivate=half, train_layers=[1], quantize_frozen=None,
                            gradient_checkpointing=False, check_prompts=_prompts())
    assert model.fastrit_preparation is not None  # prepared, and refused a second time
    with pytest.raises(ValueError, match="already prepared"):
        fastrit.prepare(model, deactivate=None, train_layers=[1])


def test_auto_takes_a_model_already_in_4_bits_as_it_is():
    """A model whose frozen layers are NF4 already (as benchmarks/bench_8b_cpu builds one, or BitsAndBytesConfig
    loads one, maybe with layers it keeps dense): "auto" quantizes nothing more (the dense layers stay as the user
    left them) and chooses checkpointing from a plan in NF4."""
    from fastrit.arch import decoder_layers
    from fastrit.nn import NeuronMLP

    model = build_tiny_model("llama")
    for index, layer in enumerate(decoder_layers(model)):
        if index != 1:
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, name, NF4Linear.from_linear(getattr(layer.mlp, name)))
    prepared = fastrit.prepare(model, deactivate=None, train_layers=[1], train="neurons", neurons={1: [0, 3]},
                               memory_budget=2**40, planned_batch=(2, 64))
    settings = prepared.fastrit_preparation.settings
    assert settings["quantize_frozen"] is None and settings["quantize_reason"].startswith("the model is 4-bit")
    assert "NF4 frozen layers, no checkpointing" in settings["quantize_reason"]
    layers = decoder_layers(prepared)
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear  # the user's dense layers: dense
    mlp = layers[1].mlp
    assert isinstance(mlp, NeuronMLP) and all(type(m) is torch.nn.Linear for m in [*mlp.frozen_in, mlp.frozen_out])


def test_checkpointing_a_user_enabled_is_undone_when_the_settings_say_none():
    model = build_tiny_model("llama")
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    prepared = fastrit.prepare(model, deactivate=None, train_layers=[2], memory_budget=2**40,
                               planned_batch=(2, 64))
    assert prepared.fastrit_preparation.settings["gradient_checkpointing"] is False
    assert not prepared.is_activation_checkpointing
    ids = torch.tensor([[3, 4, 5, 6]])
    hidden = prepared.model(ids, output_hidden_states=True).hidden_states
    assert not hidden[1].requires_grad  # layer 0's output: backward stops at the target layer
