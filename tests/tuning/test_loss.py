"""fastrit.tuning.causal_lm_loss equals transformers' own causal-LM loss and its gradients, with ignored labels,
several chunk sizes and Gemma2's logit soft-capping, and never forms more than one chunk of logits."""

import pytest
import torch

from fastrit.tuning.loss import causal_lm_loss
from tests.tiny_models import VOCAB, build_tiny_model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    labels[2, :] = -100   # a row without any label
    labels[2, 7] = ids[2, 7]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels[1, :2] = -100
    return ids, labels, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_loss_and_gradients_equal_transformers(family, chunk_size):
    model = build_tiny_model(family).float()
    ids, labels, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = causal_lm_loss(model, ids, labels, mask, chunk_size=chunk_size)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_without_gradients_equals_transformers(family):
    model = build_tiny_model(family).float()
    ids, labels, mask = _batch(1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = causal_lm_loss(model, ids, labels, mask, chunk_size=4)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_no_label_gives_zero_and_bad_input_is_refused():
    model = build_tiny_model("llama")
    ids, labels, _ = _batch()
    loss = causal_lm_loss(model, ids, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="^labels"):
        causal_lm_loss(model, ids, labels[:, 1:])
    with pytest.raises(ValueError, match="^chunk_size"):
        causal_lm_loss(model, ids, labels, chunk_size=0)


def test_the_head_sees_one_chunk_of_labelled_positions_at_a_time(monkeypatch):
    from fastrit.tuning import loss as loss_module

    model = build_tiny_model("llama")
    ids, labels, mask = _batch()
    head = model.get_output_embeddings().weight
    rows, linear = [], torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        if weight is head:  # positions through the head (the model's own forward applies it to none)
            rows.append(x.shape[:-1].numel())
        return linear(x, weight, bias)

    monkeypatch.setattr(loss_module.F, "linear", recording_linear)
    causal_lm_loss(model, ids, labels, mask, chunk_size=4).backward()
    labelled = int((labels[:, 1:] != -100).sum())
    assert max(rows) <= 4 and sum(rows) == labelled  # once each: nothing is recomputed in backward


@pytest.mark.parametrize("dtype, softcap", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_the_default_chunk_is_sized_by_its_memory_budget(monkeypatch, dtype, softcap):
    """Without chunk_size, a chunk holds as many positions as fit chunk_bytes at the chunk's bytes per position
    (float32 logits, plus the 16-bit head output and gradient, plus the soft-cap derivative and its square)."""
    from fastrit.tuning import loss as loss_module

    model = build_tiny_model("gemma2" if softcap else "llama").to(dtype)
    ids, labels, mask = _batch()
    head = model.get_output_embeddings().weight
    per_position = VOCAB * (4 + (2 if dtype == torch.bfloat16 else 0) + (8 if softcap else 0))
    assert loss_module.chunk_positions(VOCAB, dtype, softcap, 3 * per_position + per_position - 1) == 3
    rows, linear = [], torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        if weight is head:
            rows.append(x.shape[:-1].numel())
        return linear(x, weight, bias)

    monkeypatch.setattr(loss_module.F, "linear", recording_linear)
    budgeted = causal_lm_loss(model, ids, labels, mask, chunk_bytes=3 * per_position)
    assert max(rows) == 3
    monkeypatch.setattr(loss_module.F, "linear", linear)
    assert torch.equal(budgeted, causal_lm_loss(model, ids, labels, mask, chunk_size=3))
    with pytest.raises(ValueError, match="^chunk_bytes"):
        causal_lm_loss(model, ids, labels, chunk_bytes=0)
