"""A model family fastrit has never heard of, described by one ArchSpec, through attribute, mine, prepare, deltas and
export.

The made-up family is the shipped reader (a Llama) rebuilt under new names: its MLP lives at ``ffn`` (not ``mlp``) with
projections ``w_gate`` / ``w_up`` / ``w_down`` and activation ``act``, and its config says ``model_type="madeup_lm"``.
It holds the reader's weights, so every step must give what the same step gives on the reader (a family fastrit
knows): that is the independent reference here. Up to float32 rounding, not bit for bit: on this CPU the matrix
products' summation order follows the tensors' memory alignment, so even ``copy.deepcopy(reader)`` attributes ~1e-6
differently from the reader itself.
"""

import dataclasses

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

import fastrit
from fastrit import demo

SPEC = fastrit.ArchSpec(layers="layers", mlp_out="ffn.w_down", final_norm="norm",
                        mlp=fastrit.MLPLayout(inputs=("w_gate", "w_up"), output="w_down", act="act"))
RENAMES = {".mlp.gate_proj.": ".ffn.w_gate.", ".mlp.up_proj.": ".ffn.w_up.", ".mlp.down_proj.": ".ffn.w_down.",
           ".mlp.": ".ffn."}


class MadeUpConfig(transformers.LlamaConfig):
    model_type = "madeup_lm"


class MadeUpMLP(nn.Module):
    def __init__(self, config: MadeUpConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w_up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


class MadeUpDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with its MLP registered as ``ffn``. Llama's forward reads ``self.mlp``: only inside this layer's
    own forward does ``mlp`` lead to ``ffn``, so any fastrit code that reads ``layer.mlp`` instead of following the
    spec fails here."""

    def __init__(self, config: MadeUpConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self.mlp
        self.ffn = MadeUpMLP(config)
        self._in_forward = False

    def forward(self, *args, **kwargs):
        self._in_forward = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._in_forward = False

    @property
    def mlp(self) -> nn.Module:
        if not self._in_forward:
            raise AttributeError("a madeup_lm layer has no 'mlp' (its MLP is 'ffn')")
        return self.ffn


class MadeUpModel(LlamaModel):
    config_class = MadeUpConfig

    def __init__(self, config: MadeUpConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList([MadeUpDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class MadeUpForCausalLM(LlamaForCausalLM):
    config_class = MadeUpConfig

    def __init__(self, config: MadeUpConfig) -> None:
        super().__init__(config)
        self.model = MadeUpModel(config)
        self.post_init()


def _rename(key: str) -> str:
    for old, new in RENAMES.items():
        key = key.replace(old, new)
    return key


def _made_up(reader: nn.Module) -> MadeUpForCausalLM:
    """The made-up family holding ``reader``'s weights."""
    settings = {k: v for k, v in reader.config.to_diff_dict().items() if k not in ("model_type", "architectures")}
    model = MadeUpForCausalLM(MadeUpConfig(**settings)).eval()
    model.load_state_dict({_rename(k): v for k, v in reader.state_dict().items()})
    return model


@pytest.fixture(scope="module")
def reader():
    return demo.load_model()


@pytest.fixture(scope="module")
def records():
    full = demo.load_data("train")
    return fastrit.data.RagData(full.records.select(range(6)), {})


@pytest.fixture(scope="module")
def expected_sets(reader, records):
    """The sets mined on the reader (the family fastrit knows)."""
    base, tokenizer = reader
    return fastrit.mine(base, tokenizer, records, steps=2, progress=False, target_layers=1)


def _batch(records, tokenizer):
    return fastrit.data.prompts(records, tokenizer, condition="irrelevant", k=2).tensors()


def test_the_family_is_unknown_without_its_spec(reader):
    model = _made_up(reader[0])
    assert "madeup_lm" not in fastrit.FAMILIES
    with pytest.raises(ValueError, match="unknown model family"):
        fastrit.resolve_arch(model)
    with pytest.raises(ValueError, match="cannot prepare the MLPs of a 'madeup_lm' model"):
        fastrit.prepare(model, deactivate=None, train_layers=[1])
    assert all(p.requires_grad for p in model.parameters())  # untouched: prepare checks before it freezes
    assert not hasattr(model, fastrit.arch.SPEC_ATTR) and getattr(model, "fastrit_preparation", None) is None


def test_attribute_and_mine_equal_the_known_family(reader, records, expected_sets):
    base, tokenizer = reader
    model = _made_up(base)
    batch = _batch(records, tokenizer)
    ours = fastrit.attribute(model, **batch, steps=4, spec=SPEC)
    theirs = fastrit.attribute(base, **batch, steps=4)
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=1e-4, atol=1e-5)
    mined = fastrit.mine(model, tokenizer, records, steps=2, progress=False, spec=SPEC, target_layers=1)
    expected = expected_sets
    assert mined.model["model_type"] == "madeup_lm"
    assert mined.examples == expected.examples and mined.examples["irrelevant"] > 0
    for condition in ("relevant", "irrelevant"):
        torch.testing.assert_close(mined.mean_scores[condition], expected.mean_scores[condition], rtol=1e-4,
                                   atol=1e-6)
        # a neuron within rounding of the activity threshold may count once more or less; nothing else may differ
        assert (mined.counts[condition] - expected.counts[condition]).abs().sum() <= 3, condition
    for name in fastrit.mining.SET_NAMES:
        agree = (mined.masks[name] == expected.masks[name]).float().mean()
        assert agree >= 0.995, (name, float(agree))


def _perturb(model: nn.Module, seed: int) -> None:
    """Set every trainable tensor to the same random values in both models (their names differ only by the family's;
    PEFT initialises LoRA A at random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(((_rename(n), p) for n, p in model.named_parameters() if p.requires_grad),
                                   key=lambda item: item[0]):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("train, quantize", [("neurons", None), ("mlp", "nf4"), ("lora", None)])
def test_prepare_deltas_and_export_equal_the_known_family(reader, tmp_path, train, quantize):
    base, _ = reader
    deactivate = {0: [1, 5, 9], 2: [3, 4]}
    kwargs = dict(deactivate=deactivate, train_layers=[1, 2], train=train, quantize_frozen=quantize,
                  gradient_checkpointing=False, neurons={1: [0, 2, 7], 2: [8, 9]})
    known = fastrit.prepare(_made_up_copy_of_reader(base), **kwargs)
    model = fastrit.prepare(_made_up(base), spec=SPEC, **kwargs)
    assert isinstance(model.model.layers[0].ffn, fastrit.nn.NeuronMLP)
    _perturb(known, seed=3)
    _perturb(model, seed=3)
    ids = torch.randint(4, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = known(ids).logits
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected)

    fastrit.save_delta(model, tmp_path / "delta.safetensors")  # the spec travels in the delta
    loaded = fastrit.load_delta(_made_up(base), tmp_path / "delta.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)

    if train == "lora":
        return  # export merges LoRA like the other modes; one dense and one NF4 export suffice here
    out = fastrit.export(model, tmp_path / "export", quantized=quantize == "nf4")
    reloaded = MadeUpForCausalLM.from_pretrained(out).eval() if quantize is None else None
    if reloaded is not None:  # a plain checkpoint of the made-up family: its own names, no fastrit
        assert any(".ffn.w_gate." in k for k in reloaded.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)
    else:
        keys = set(load_file(str(next(out.glob("*.safetensors")))))
        assert "model.layers.0.ffn.w_gate.weight" in keys and not any(".mlp." in k for k in keys)


def _made_up_copy_of_reader(base: nn.Module) -> nn.Module:
    """A fresh copy of the reader (a Llama: the family fastrit knows), for the reference run."""
    copy = transformers.LlamaForCausalLM(base.config).eval()
    copy.load_state_dict(base.state_dict())
    return copy


def test_a_family_registered_in_the_registry_needs_no_spec(reader, monkeypatch):
    base, tokenizer = reader
    monkeypatch.setitem(fastrit.arch.FAMILIES, "madeup_lm", SPEC)
    model = _made_up(base)
    assert fastrit.nn.MLP_LAYOUTS["madeup_lm"] is SPEC.mlp
    arch = fastrit.resolve_arch(model)
    assert arch.mlp_out[0] is model.model.layers[0].ffn.w_down
    fastrit.prepare(model, deactivate={1: [0, 1]}, train_layers=[2], gradient_checkpointing=False,
                    quantize_frozen=None)
    assert isinstance(model.model.layers[1].ffn, fastrit.nn.NeuronMLP)
    assert not hasattr(model, fastrit.arch.SPEC_ATTR)  # found in the registry, nothing recorded


def test_a_spec_without_an_mlp_layout_serves_attribution_only(reader):
    base, _ = reader
    model = _made_up(base)
    attribution_only = fastrit.ArchSpec(layers="layers", mlp_out="ffn.w_down", final_norm="norm")
    assert fastrit.resolve_arch(model, attribution_only).intermediate_size == base.config.intermediate_size
    with pytest.raises(ValueError, match="spec: .*mlp="):
        fastrit.prepare(model, deactivate=None, train_layers=[1], spec=attribution_only)
    with pytest.raises(ValueError, match="mlp: its output 'w_up' must be the last part of mlp_out"):
        fastrit.ArchSpec(layers="layers", mlp_out="ffn.w_down", final_norm="norm",
                         mlp=fastrit.MLPLayout(inputs=("w_gate",), output="w_up", act="act"))


def test_prepare_measures_and_limits_deactivation_through_the_spec(reader, expected_sets):
    """Check prompts: the deactivation search and the measured effect run the made-up model through its spec."""
    base, _ = reader
    prompts = [list(range(5, 25)), list(range(40, 52))]
    kwargs = dict(train_layers=[1], quantize_frozen=None, gradient_checkpointing=False, check_prompts=prompts,
                  deactivation_tolerance=0.0)
    known = fastrit.prepare(_made_up_copy_of_reader(base), expected_sets, **kwargs).fastrit_preparation
    # the same statistics, as if mined on the made-up model (prepare refuses sets mined on another family)
    sets = dataclasses.replace(expected_sets, model={**expected_sets.model, "model_type": "madeup_lm"})
    made_up = fastrit.prepare(_made_up(base), sets, spec=SPEC, **kwargs).fastrit_preparation
    assert known.settings["deactivation_limit"]["mined"] > 0  # the search ran
    assert made_up.settings["deactivation_limit"] == known.settings["deactivation_limit"]
    assert made_up.deactivated.keys() == known.deactivated.keys()
    assert all(torch.equal(made_up.deactivated[k], known.deactivated[k]) for k in known.deactivated)
    assert made_up.effect.keys() == known.effect.keys() and "deactivation" in made_up.effect
    for name, change in known.effect.items():
        assert made_up.effect[name]["argmax_agreement"] == change["argmax_agreement"], name
