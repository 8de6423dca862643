"""Updates that survive bfloat16: a bf16 model tuned by ``fastrit.tune`` (prepare, then NeuroRITTrainer) at lr 1e-5
ends within bf16 rounding of the same run in float32, from the same starting weights.

Without float32 master weights a bf16 parameter of magnitude ~0.02 moves only when an update reaches half a bf16
step (~6e-5): AdamW's first updates at lr 1e-5 are ~1e-5, so most are rounded away and the run keeps a fraction of
the float32 run's change (measured on the embedded reader: 0.20 of its norm, cosine 0.23, over 30 steps).
"""

import copy

import torch

import fastrit
from fastrit import data, demo

TRAIN_LAYERS = [1, 2]
STEPS = 50


def _tuned(model, tokenizer, out) -> dict[str, torch.Tensor]:
    records = data.RagData(demo.load_data("train").records.select(range(16)))
    fastrit.tune(model, tokenizer, records, output_dir=out, stages=["denoise"], deactivate=None,
                 train_layers=TRAIN_LAYERS, train="mlp", quantize_frozen=None, gradient_checkpointing=False,
                 check_prompts=None, max_steps=STEPS, batch_size=4, learning_rate=1e-5, warmup=0,
                 optimizer="adamw", save_steps=1000, logging_steps=1000, progress=False)
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_bf16_run_ends_within_bf16_rounding_of_the_float32_run(tmp_path):
    model, tokenizer = demo.load_model()
    bf16 = model.to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same starting weights, exactly
    untrained = fastrit.prepare(copy.deepcopy(fp32), deactivate=None, train_layers=TRAIN_LAYERS, train="mlp",
                                quantize_frozen=None, gradient_checkpointing=False)
    start = {name: p.detach().clone() for name, p in untrained.named_parameters() if p.requires_grad}
    trained_bf16 = _tuned(bf16, tokenizer, tmp_path / "bf16")
    trained_fp32 = _tuned(fp32, tokenizer, tmp_path / "fp32")
    assert trained_bf16.keys() == trained_fp32.keys() == start.keys()
    for name, want in trained_fp32.items():
        # within bf16 rounding: the bf16 run is no farther from the float32 run than that run's own weights
        # stored in bf16 are
        rounding = (want.bfloat16().float() - want).norm()
        assert (trained_bf16[name] - want).norm() <= rounding, name
    # and the change itself is the float32 run's, not a fraction of it
    change_bf16 = torch.cat([(trained_bf16[n] - start[n]).reshape(-1) for n in start])
    change_fp32 = torch.cat([(trained_fp32[n] - start[n]).reshape(-1) for n in start])
    ratio = float(change_bf16.norm() / change_fp32.norm())
    cosine = float(torch.nn.functional.cosine_similarity(change_bf16, change_fp32, dim=0))
    print(f"bf16 run / float32 run: change norm ratio {ratio:.3f}, cosine {cosine:.3f}")
    assert 0.9 <= ratio <= 1.1 and cosine >= 0.95, (ratio, cosine)
