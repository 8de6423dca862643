"""Mining finds planted neurons: a tiny random Llama gets, by weight surgery, neurons in two layers that fire only
when a marker word is in the context (the marker is only ever in relevant passages) and that raise the answer's
logit. fastrit.mine must return them as the relevant-exclusive neurons (precision and recall >= 0.9) and rank
their two layers first; without the marker in the data it must not find them.

The records are built so that the marker is the only systematic difference between the two conditions: every
record has as many relevant passages as irrelevant ones, all of random filler words, the relevant ones holding
the answer and the marker, the irrelevant ones another value and a null word in its place. The model is built
so that nothing but the planted neurons sees the marker: two residual dimensions are set apart (M carries "a
marker was seen", A "say a value"); every RMSNorm is made linear (an epsilon far above the mean square, and
weights that undo the scale), so that the planted neurons do not reach other neurons through the norms; and the
value words' output rows read A only, so that a planted push scales the gradient of every other neuron by one
common factor.
"""

import random

import datasets
import pytest
import torch
import transformers

import fastrit
from fastrit import data
from fastrit.demo.pretrain import TEMPLATE_WORDS, word_tokenizer

datasets.disable_progress_bars()

MARKER, NULL = "zzmarker", "zznull"
M, A = 0, 1  # residual dimensions: marker seen, say a value
NORM_EPS = 1e6  # RMSNorm: x * w / sqrt(mean(x^2) + eps) = x for w = sqrt(eps) and mean(x^2) << eps
PLANTED = {1: [3, 11, 17, 29, 40, 64, 81, 99, 104, 120], 2: [8, 13, 21, 34, 55, 60, 77, 90, 101, 111]}
RECORDS = 60
K = 5
FILLER = [f"w{i}" for i in range(300)]
VALUES = [f"v{i}" for i in range(40)]
QUESTION_WORDS = ["what", "is", "the", "value", "of"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer([*FILLER, *VALUES, *QUESTION_WORDS, *TEMPLATE_WORDS, MARKER, NULL])


def _records(with_marker: bool) -> data.RagData:
    rng = random.Random(3)
    rows = []
    for _ in range(RECORDS):
        entity, answer = rng.choice(FILLER), rng.choice(VALUES)

        def passage(value: str, marked: bool) -> str:
            words = rng.choices(FILLER, k=10) + [value, MARKER if marked else NULL]
            rng.shuffle(words)
            return " ".join(words)

        relevant = [{"title": "", "text": passage(answer, with_marker), "has_answer": True} for _ in range(K)]
        others = [v for v in VALUES if v != answer]
        irrelevant = [{"title": "", "text": passage(rng.choice(others), False), "has_answer": False} for _ in range(K)]
        ctxs = relevant + irrelevant
        rng.shuffle(ctxs)
        rows.append({"question": f"what is the value of {entity} ?", "answers": [answer], "ctxs": ctxs})
    return data.load(datasets.Dataset.from_list(rows, features=data.FEATURES))


def _planted_model(tokenizer, push: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=NORM_EPS,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    marker, null = tokenizer.convert_tokens_to_ids([MARKER, NULL])
    values = tokenizer.convert_tokens_to_ids(VALUES)
    special = [M, A]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                module.weight.fill_(NORM_EPS**0.5)
        embed = model.model.embed_tokens.weight
        embed[:, special] = 0
        embed[[marker, null]] = 0
        embed[marker, M] = 1.0  # the marker differs from the null word on M only
        head = model.lm_head.weight
        head[:, special] = 0
        head[values] = 0
        head[values, A] = 1.0  # A raises every value's logit, and nothing else does
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                proj.weight[:, special] = 0  # nothing reads M or A ...
            attn.o_proj.weight[special] = 0  # ... or writes them,
            mlp.down_proj.weight[special] = 0
            if index == 0:  # ... but layer 0's attention: uniform, head 0 channel 0 copies M to later positions
                attn.q_proj.weight.zero_()
                attn.v_proj.weight[0] = 0
                attn.v_proj.weight[0, M] = 1.0
                attn.o_proj.weight[:, 0] = 0
                attn.o_proj.weight[M, 0] = 1.0
            for neuron in PLANTED.get(index, []):  # ... and the planted neurons: read M only, write A only
                mlp.gate_proj.weight[neuron] = 0
                mlp.gate_proj.weight[neuron, M] = 50.0
                mlp.up_proj.weight[neuron] = 0
                mlp.up_proj.weight[neuron, M] = 50.0
                mlp.down_proj.weight[:, neuron] = 0
                mlp.down_proj.weight[A, neuron] = 0.01 if push else 0.0
    return model


def _mine(tokenizer, with_marker: bool = True, push: bool = True) -> fastrit.NeuronSets:
    model = _planted_model(tokenizer, push)
    return fastrit.mine(model, tokenizer, _records(with_marker), k=K, steps=8, target_layers=2, progress=False)


def _found(sets: fastrit.NeuronSets) -> set[tuple[int, int]]:
    return {(layer, int(i)) for layer, indices in sets.relevant_exclusive.items() for i in indices}


PLANTED_PAIRS = {(layer, i) for layer, neurons in PLANTED.items() for i in neurons}


def test_mining_recovers_planted_neurons(tokenizer):
    sets = _mine(tokenizer)
    found = _found(sets)
    precision = len(found & PLANTED_PAIRS) / max(len(found), 1)
    recall = len(found & PLANTED_PAIRS) / len(PLANTED_PAIRS)
    detail = f"precision {precision:.3f}, recall {recall:.3f}, found {sorted(found)}, {sets.set_sizes()}"
    assert precision >= 0.9 and recall >= 0.9, detail
    assert sets.target_layers == sorted(PLANTED), detail
    for layer, neurons in PLANTED.items():  # the layer's largest scores in every relevant example
        assert int(sets.counts["relevant"][layer, neurons].min()) == RECORDS, detail
        assert int(sets.counts["irrelevant"][layer, neurons].max()) == 0, detail


@pytest.mark.parametrize("with_marker, push", [(False, True), (True, False)], ids=["no marker", "no push"])
def test_planted_neurons_are_not_found_without_marker_or_push(tokenizer, with_marker, push):
    # no marker in the data: they never fire; no push: they fire but do not move the answer, so IG gives them 0
    sets = _mine(tokenizer, with_marker, push)
    assert not _found(sets) & PLANTED_PAIRS
    assert sets.set_sizes()["relevant_exclusive"] == [0] * 4  # nothing else tells the conditions apart either
