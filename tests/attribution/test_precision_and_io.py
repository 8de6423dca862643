"""bf16/fp16 models against the fp32 reference; integration points against Captum's; save/load."""

import pytest
import torch

import fastrit
from fastrit.attribution.integration import METHODS, integration_points
from tests.tiny_models import prompt_batch


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_bf16_model_within_2e2_of_fp32_reference(tiny_model, family, positions):
    input_ids, attention_mask, target_ids = prompt_batch("left")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions=positions, steps=8)
    ref = fastrit.attribute_reference(tiny_model(family), input_ids, **kwargs)
    got = fastrit.attribute(tiny_model(family, torch.bfloat16), input_ids, **kwargs)
    assert got.scores.dtype == torch.float32
    assert float((got.scores - ref.scores).abs().max() / ref.scores.abs().max()) < 2e-2


def test_fp16_model_runs_close_to_fp32(tiny_model):
    input_ids, attention_mask, target_ids = prompt_batch("right")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions="answer", steps=8)
    ref = fastrit.attribute_reference(tiny_model("qwen2"), input_ids, **kwargs)
    got = fastrit.attribute(tiny_model("qwen2", torch.float16), input_ids, **kwargs)
    assert float((got.scores - ref.scores).abs().max() / ref.scores.abs().max()) < 2e-2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [2, 3, 7, 20, 50])
def test_integration_points_are_captums(method, steps):
    approximation = pytest.importorskip("captum.attr._utils.approximation_methods")
    step_sizes, alphas = approximation.approximation_parameters(method)
    got_alphas, got_weights = integration_points(method, steps)
    assert got_alphas == alphas(steps)
    assert got_weights == step_sizes(steps)


def test_save_load_round_trip(tiny_model, tmp_path):
    input_ids, attention_mask, target_ids = prompt_batch("left")
    result = fastrit.attribute(
        tiny_model("llama"), input_ids, attention_mask=attention_mask, target_ids=target_ids, steps=3, layers=[2, 0]
    )
    path = result.save(tmp_path / "sub" / "attr.safetensors")
    loaded = fastrit.NeuronAttribution.load(path)
    assert torch.equal(loaded.scores, result.scores) and torch.equal(loaded.delta, result.delta)
    assert loaded.layers == [2, 0]
    assert loaded.settings == result.settings and loaded.settings["steps"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["attr.safetensors"]  # no temporary file left


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="path"):
        fastrit.NeuronAttribution.load(path)


def test_no_output_projection_weight_is_copied_for_every_layer(monkeypatch):
    """Attribution never holds a converted (float32 or dequantized) output-projection weight per layer: on a 24-layer
    bf16 model at most one is alive at any time, so the memory does not grow with the depth beyond the sites."""
    import sys
    import weakref

    import transformers

    from tests.tiny_models import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 24
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    engine = sys.modules["fastrit.attribution.engine"]
    real = engine.linear_weight
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive: list[weakref.ref] = []
    most = 0

    def counted(module, dtype=torch.float32):
        nonlocal most
        weight = real(module) if dtype == torch.float32 else real(module, dtype)
        if weight.untyped_storage().data_ptr() not in own:  # a copy, not the model's own tensor
            alive.append(weakref.ref(weight))
            most = max(most, sum(ref() is not None for ref in alive))
        return weight

    monkeypatch.setattr(engine, "linear_weight", counted)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    result = fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, steps=4)
    assert result.scores.shape[1] == 24 and alive  # float32 copies were made, for the site outputs
    assert most == 1, f"{most} converted weights alive at once"


def test_held_memory_grows_with_depth_by_the_cache_and_sites_only(monkeypatch):
    """What attribution holds between chunks (every tensor Python can reach, model parameters aside) on a 24-layer
    bf16 model exceeds a 12-layer one's by at most 12 layers' key/value cache, sites, entry states and scores: no
    per-layer weight copy (12 float32 output projections here would be 768 KiB, 8x that allowance)."""
    import gc
    import sys

    import transformers

    from tests.tiny_models import tiny_config

    engine = sys.modules["fastrit.attribution.engine"]
    real = engine._run_chunk
    input_ids, attention_mask, target_ids = prompt_batch("left")
    input_ids, attention_mask, target_ids = input_ids[:1], attention_mask[:1], target_ids[:1]

    def held_bytes(model) -> int:
        """Peak over chunk starts of the distinct storages of live tensors, the model's own excluded."""
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        most = 0

        def counted(*args, **kwargs):
            nonlocal most
            storages = {}
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    if storage.data_ptr() not in own:
                        storages[storage.data_ptr()] = storage.nbytes()
            most = max(most, sum(storages.values()))
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "_run_chunk", counted)
        fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, steps=4,
                          batch_size=5)
        return most

    held = {}
    for layers in (12, 24):
        config = tiny_config("llama")
        config.num_hidden_layers, config.intermediate_size = layers, 1024
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
        held[layers] = held_bytes(model)
    length = int(attention_mask.sum()) + int((target_ids != -100).sum()) - 1
    hidden, intermediate = config.hidden_size, config.intermediate_size
    kv = 2 * config.num_key_value_heads * (hidden // config.num_attention_heads) * length * 2
    # positions "last": one site [1, I] (bf16 and float32), W a [1, D] float32, entry states [n, D], scores [I] twice
    answer = int((target_ids != -100).sum())
    per_layer = kv + intermediate * (2 + 4) + hidden * 4 + answer * hidden * 2 + 2 * intermediate * 4
    growth = held[24] - held[12]
    assert 0 < growth <= 12 * per_layer + 4096, (growth, 12 * per_layer)
    assert 12 * hidden * intermediate * 4 > 8 * 12 * per_layer  # a per-layer weight copy would not fit
