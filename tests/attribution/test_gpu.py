"""The attribution engine on CUDA: tiny models on the GPU against the slow reference loop on the CPU.

Skipped without a CUDA device; run with `make gpu-test`.
"""

import pytest
import torch
import transformers

import fastrit
from tests.tiny_models import prompt_batch, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAMILIES = ["llama", "gpt2", "gemma2"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.cpu() - want).abs().max() / want.abs().max())


def batch(device, padding_side="left"):
    input_ids, attention_mask, target_ids = prompt_batch(padding_side)
    return input_ids.to(device), attention_mask.to(device), target_ids.to(device)


@pytest.fixture(scope="module")
def reference_results(tiny_model):
    """``(family, positions) -> NeuronAttribution`` of the fp32 reference loop on the CPU."""
    cache = {}

    def get(family, positions):
        if (family, positions) not in cache:
            input_ids, attention_mask, target_ids = batch("cpu")
            cache[family, positions] = fastrit.attribute_reference(
                tiny_model(family), input_ids, attention_mask=attention_mask, target_ids=target_ids,
                positions=positions, steps=6,
            )
        return cache[family, positions]

    return get


# bf16: the CPU engine's error against the fp32 reference at these settings is up to 1.9e-2 (gemma2, "last")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("positions", ["last", "answer", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_on_cuda_equals_cpu_reference(tiny_model_dir, reference_results, family, positions, dtype, tol):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=dtype).cuda().eval()
    input_ids, attention_mask, target_ids = batch("cuda")
    got = fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids,
                            positions=positions, steps=6)
    want = reference_results(family, positions)
    assert got.scores.device.type in ("cuda", "cpu") and got.scores.dtype == torch.float32
    assert want.scores.abs().max() > 1e-6
    assert relative_error(got.scores, want.scores) < tol


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "flash_attention_2"])
def test_engine_with_the_attention_a_user_configures(tiny_model_dir, reference_results, attn):
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tiny_model_dir("llama"), dtype=torch.float32, attn_implementation=attn
        ).cuda().eval()
    except (ImportError, ValueError) as error:  # flash-attn not installed, or no support for this model
        pytest.skip(f"{attn}: {error}")
    input_ids, attention_mask, target_ids = batch("cuda")
    for positions in ("last", "all"):
        got = fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids,
                                positions=positions, steps=6)
        assert relative_error(got.scores, reference_results("llama", positions).scores) < 1e-4
    assert model.config._attn_implementation == attn  # restored


def test_4bit_model_on_cuda_equals_reference_on_its_dequantized_twin(tmp_path):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cuda",
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    ).eval()
    twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    n_quantized = 0
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            twin.get_submodule(name).weight.data.copy_(weight.cpu())
            n_quantized += 1
    assert n_quantized > 0
    for positions in ("last", "answer", "all"):
        input_ids, attention_mask, target_ids = batch("cuda")
        got = fastrit.attribute(quantized, input_ids, attention_mask=attention_mask, target_ids=target_ids,
                                positions=positions, steps=4)
        input_ids, attention_mask, target_ids = batch("cpu")
        want = fastrit.attribute_reference(twin, input_ids, attention_mask=attention_mask, target_ids=target_ids,
                                           positions=positions, steps=4)
        assert relative_error(got.scores, want.scores) < 1e-4


def test_the_sweep_does_not_synchronise_the_host(tiny_model_dir, monkeypatch):
    """Inside the loop over chunks of IG rows nothing waits for the GPU (torch.cuda.set_sync_debug_mode raises on a
    synchronising call): the host runs ahead and queues the next chunk."""
    import sys

    engine = sys.modules["fastrit.attribution.engine"]
    real = engine._run_chunk
    chunks = []

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        chunks.append(1)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).cuda().eval()
    input_ids, attention_mask, target_ids = batch("cuda")
    # once unchecked first: Triton's autotuning synchronises while it times its configurations
    fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, steps=6, batch_size=4)
    monkeypatch.setattr(engine, "_run_chunk", strict)
    fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, steps=6, batch_size=4)
    assert len(chunks) > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_steps_on_cuda_equal_the_cpu_engine(tiny_model, tiny_model_dir, family):
    """steps="auto" on CUDA picks the same sizes per layer as on the CPU (fp32) and gives the same scores."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).cuda().eval()
    kwargs = dict(positions="answer", steps="auto", delta_tol=1e-4)
    input_ids, attention_mask, target_ids = batch("cuda")
    got = fastrit.attribute(model, input_ids, attention_mask=attention_mask, target_ids=target_ids, **kwargs)
    input_ids, attention_mask, target_ids = batch("cpu")
    want = fastrit.attribute(tiny_model(family), input_ids, attention_mask=attention_mask, target_ids=target_ids,
                             **kwargs)
    assert torch.equal(got.steps_used.cpu(), want.steps_used)
    assert relative_error(got.scores, want.scores) < 1e-4
