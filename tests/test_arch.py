"""Family detection, explicit specs, and the error for models fastrit cannot read."""

import pytest
import torch
import transformers

import fastrit
from fastrit.arch import dense_weight, linear_weight
from tests.tiny_models import prompt_batch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_detected(tiny_model, family):
    model = tiny_model(family)
    arch = fastrit.resolve_arch(model)
    assert arch.num_layers == 3 and arch.intermediate_size == 48
    assert arch.spec.additive_mlp == (family not in ("gemma2", "gemma3_text"))
    # the site really is the input of the output projection: it maps I -> hidden
    weight = linear_weight(arch.mlp_out[0])
    assert weight.shape == (32, 48) and weight.dtype == torch.float32


def test_conv1d_weight_is_transposed(tiny_model):
    model = tiny_model("gpt2")
    c_proj = model.transformer.h[0].mlp.c_proj
    x = torch.randn(5, 48)
    want = c_proj(x) - c_proj.bias
    assert torch.allclose(x @ linear_weight(c_proj).t(), want, atol=1e-6)


def olmo_model():
    torch.manual_seed(0)
    config = transformers.OlmoConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_unknown_family_error_lists_families_and_spec():
    with pytest.raises(ValueError) as info:
        fastrit.resolve_arch(olmo_model())
    message = str(info.value)
    assert message.startswith("model:") and "'olmo'" in message
    for family in FAMILIES:
        assert family in message
    assert "fastrit.ArchSpec(" in message


def test_explicit_spec_for_an_unknown_family():
    model = olmo_model()
    spec = fastrit.ArchSpec(layers="layers", mlp_out="mlp.down_proj", final_norm="norm")
    input_ids, attention_mask, target_ids = prompt_batch("left")
    kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions="answer", steps=4, spec=spec)
    fast = fastrit.attribute(model, input_ids, **kwargs)
    ref = fastrit.attribute_reference(model, input_ids, **kwargs)
    assert float((fast.scores - ref.scores).abs().max() / ref.scores.abs().max()) < 1e-4


def test_spec_with_wrong_paths_is_reported(tiny_model):
    bad = fastrit.ArchSpec(layers="layers", mlp_out="mlp.nope", final_norm="norm")
    with pytest.raises(ValueError, match="mlp.nope"):
        fastrit.resolve_arch(tiny_model("llama"), bad)
    with pytest.raises(TypeError, match="spec"):
        fastrit.resolve_arch(tiny_model("llama"), {"layers": "layers"})


def test_import_is_lean():
    import subprocess
    import sys

    code = "import fastrit, sys, torch; assert not torch.cuda.is_initialized(); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def quantized_llama(path):
    """A 4-bit (NF4) tiny Llama on the CPU, and an fp32 twin whose linear layers hold its dequantized weights."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    twin = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            twin.get_submodule(name).weight.data.copy_(weight)
    return quantized, twin


def test_4bit_model_equals_reference_on_its_dequantized_twin(tmp_path, monkeypatch):
    """The 4-bit path (dequantized W for the additive shortcut, gradients through 4-bit layers) is exact.

    Runs where bitsandbytes takes its differentiable 4-bit path on the CPU, as on CPUs without AVX512-BF16.
    """
    pytest.importorskip("bitsandbytes")
    quantized, twin = quantized_llama(tmp_path)
    for module in quantized.modules():
        if type(module).__name__ == "Linear4bit":
            monkeypatch.setattr(module, "support_avx512bf16_for_cpu", False)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    for positions in ("last", "all"):
        kwargs = dict(attention_mask=attention_mask, target_ids=target_ids, positions=positions, steps=4)
        got = fastrit.attribute(quantized, input_ids, **kwargs)
        want = fastrit.attribute_reference(twin, input_ids, **kwargs)
        assert float((got.scores - want.scores).abs().max() / want.scores.abs().max()) < 1e-4


def test_cpu_4bit_inference_kernel_is_refused(tmp_path, monkeypatch):
    """Where bitsandbytes would use its inference-only CPU kernel, attribution refuses instead of being wrong."""
    pytest.importorskip("bitsandbytes")
    quantized, _ = quantized_llama(tmp_path)
    for module in quantized.modules():
        if type(module).__name__ == "Linear4bit":
            monkeypatch.setattr(module, "support_avx512bf16_for_cpu", True)
    input_ids, attention_mask, target_ids = prompt_batch("left")
    for attribute in (fastrit.attribute, fastrit.attribute_reference):
        with pytest.raises(ValueError, match="model: .*4-bit .*inference-only"):
            attribute(quantized, input_ids, attention_mask=attention_mask, target_ids=target_ids)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dense_weight_of_a_bitsandbytes_4bit_layer_is_bitsandbytes_dequantization(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = bnb.nn.Linear4bit(64, 32, quant_type=quant_type, compute_dtype=torch.float32)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes on the move
    weight, bias = dense_weight(layer)
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(weight, want) and torch.equal(bias, linear.bias.detach())
    raw = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # still float: not quantized yet
    with pytest.raises(ValueError, match="module.*not quantized"):
        dense_weight(raw)
