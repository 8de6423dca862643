"""fastrit.prepare on tiny models of five families: the same function as the original with deactivated neurons
zeroed at the neuron site (every train mode; NF4 against the dequantized weights), neuron gradients equal to
slices of the dense ones, only declared parameters change in training, generate and Trainer run, bad input
leaves the model untouched."""

import copy

import pytest
import torch

import fastrit
from fastrit import demo
from fastrit.arch import decoder_layers
from fastrit.nn import NeuronMLP, NF4Linear
from fastrit.nn.mlp_layout import mlp_layout
from tests.tiny_models import VOCAB, build_tiny_model

FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "phi3")
DEACTIVATE = {0: [1, 5, 7], 2: [0, 3, 47]}
TRAIN_LAYERS = [1, 2]
NEURONS = {1: [2, 4, 9], 2: [1, 8]}


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 7), generator=gen)


def _zeroing_hooks(model, deactivated):
    """Forward pre-hooks on each layer's MLP output projection that zero the deactivated neurons' site values."""
    arch = fastrit.resolve_arch(model)
    handles = []

    def zeroing(indices):
        def hook(module, args):
            site = args[0].clone()
            site[..., indices] = 0
            return (site, *args[1:])
        return hook

    for layer, indices in deactivated.items():
        handles.append(arch.mlp_out[layer].register_forward_pre_hook(zeroing(torch.tensor(indices))))
    return handles


def _reference_logits(model, ids, deactivated):
    handles = _zeroing_hooks(model, deactivated)
    try:
        return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def _prepare(model, train, quantize=None, **kwargs):
    args = dict(deactivate=DEACTIVATE, train_layers=TRAIN_LAYERS, train=train, quantize_frozen=quantize,
                gradient_checkpointing=False)
    if train == "neurons":
        args["neurons"] = NEURONS
    return fastrit.prepare(model, **{**args, **kwargs})


@pytest.mark.parametrize("train", ["mlp", "neurons", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_model_equals_the_original_with_neurons_zeroed(family, train):
    original = build_tiny_model(family)
    ids = _inputs()
    with torch.no_grad():
        expected = _reference_logits(original, ids, DEACTIVATE)
        prepared = _prepare(copy.deepcopy(original), train)
        actual = prepared(ids).logits
    assert type(prepared) is type(original)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _dequantized_reference(original, prepared):
    """The original model with every weight the prepared model stores in NF4 replaced by its dequantization,
    and the MLPs it rebuilt replaced by their dense weights (zeros for deactivated neurons)."""
    reference = copy.deepcopy(original)
    layout = mlp_layout(original)
    conv1d = layout.conv1d
    with torch.no_grad():
        for ref_layer, prep_layer in zip(decoder_layers(reference), decoder_layers(prepared), strict=True):
            if isinstance(prep_layer.mlp, NeuronMLP):
                dense = prep_layer.mlp.dense_weights()
                names = list(layout.inputs)
                inputs = [torch.cat(dense.inputs)] if layout.fused else dense.inputs
                biases = [None] if layout.fused else dense.input_biases
                for name, weight, bias in zip(names, inputs, biases, strict=True):
                    module = getattr(ref_layer.mlp, name)
                    module.weight.copy_(weight.t() if conv1d else weight)
                    if bias is not None:
                        module.bias.copy_(bias)
                getattr(ref_layer.mlp, layout.output).weight.copy_(dense.output.t() if conv1d else dense.output)
            for name, module in prep_layer.named_modules():
                if isinstance(module, NF4Linear) and not name.startswith("mlp.frozen"):
                    target = ref_layer.get_submodule(name.replace(".base_layer", ""))  # LoRA's base (QLoRA)
                    weight = module.dequantize()
                    target.weight.copy_(weight.t() if conv1d else weight)
    return reference


@pytest.mark.parametrize("train", ["mlp", "neurons", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_frozen_weights_equal_the_dequantized_original(family, train):
    original = build_tiny_model(family)
    prepared = _prepare(copy.deepcopy(original), train, quantize="nf4")
    nf4 = [m for m in prepared.modules() if isinstance(m, NF4Linear)]
    assert nf4, "nothing was quantized"
    reference = _dequantized_reference(original, prepared)
    ids = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_gradients_equal_slices_of_the_dense_gradients(family):
    original = build_tiny_model(family)
    prepared = _prepare(copy.deepcopy(original), "neurons")
    ids = _inputs(2)
    _loss(prepared(ids).logits, ids).backward()
    handles = _zeroing_hooks(original, DEACTIVATE)
    try:
        _loss(original(ids).logits, ids).backward()
    finally:
        for handle in handles:
            handle.remove()
    layout = mlp_layout(original)
    orig_layers, prep_layers = decoder_layers(original), decoder_layers(prepared)
    for layer in TRAIN_LAYERS:
        mlp = prep_layers[layer].mlp
        index = torch.tensor(NEURONS[layer])
        dense = [getattr(orig_layers[layer].mlp, name) for name in layout.inputs]
        grads = [m.weight.grad.t() if layout.conv1d else m.weight.grad for m in dense]
        if layout.fused:
            grads = list(grads[0].chunk(2))
        expected_in = torch.cat([g[index] for g in grads])
        torch.testing.assert_close(mlp.in_weight.grad, expected_in, rtol=1e-5, atol=1e-6)
        out = getattr(orig_layers[layer].mlp, layout.output)
        out_grad = out.weight.grad.t() if layout.conv1d else out.weight.grad
        torch.testing.assert_close(mlp.out_weight.grad, out_grad[:, index], rtol=1e-5, atol=1e-6)
        if mlp.in_bias is not None:
            bias_grads = [m.bias.grad for m in dense]
            torch.testing.assert_close(mlp.in_bias.grad, torch.cat([g[index] for g in bias_grads]),
                                       rtol=1e-5, atol=1e-6)
    for name, param in prepared.named_parameters():
        assert param.requires_grad == (param.grad is not None), name
        assert not param.requires_grad or any(key in name for key in ("in_weight", "in_bias", "out_weight")), name


@pytest.mark.parametrize("train", ["mlp", "neurons"])
def test_training_changes_only_declared_parameters(train):
    original = build_tiny_model("llama")
    prepared = _prepare(copy.deepcopy(original), train, quantize="nf4")
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    trainable = {name for name, p in prepared.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-2)
    prepared.train()
    for step in range(3):
        ids = _inputs(10 + step)
        _loss(prepared(ids).logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = prepared.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)  # NF4 bytes included
    summary = fastrit.trainable_summary(prepared, print_table=False)
    assert summary["total"]["trainable"] == sum(prepared.get_parameter(n).numel() for n in trainable)
    assert summary["total"]["deactivated_neurons"] == sum(len(v) for v in DEACTIVATE.values())
    prepared.eval()
    out = prepared.generate(_inputs(20), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)


def test_mlp_mode_trains_every_kept_weight_of_the_target_layers():
    model = _prepare(build_tiny_model("llama"), "mlp")
    hidden, intermediate = 32, 48
    kept = {1: intermediate, 2: intermediate - len(DEACTIVATE[2])}
    expected = sum(3 * hidden * n for n in kept.values())
    assert fastrit.trainable_summary(model, print_table=False)["total"]["trainable"] == expected


def test_a_transformers_trainer_runs_on_the_prepared_model(tmp_path):
    import datasets
    import transformers

    model = _prepare(build_tiny_model("llama"), "neurons", quantize="nf4", gradient_checkpointing=True)
    rows = [{"input_ids": _inputs(30 + i)[0].tolist(), "labels": _inputs(30 + i)[0].tolist()} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows))
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0


@pytest.mark.parametrize("kwargs, argument", [
    (dict(train="everything"), "train"),
    (dict(deactivate="some"), "deactivate"),
    (dict(quantize_frozen="int8"), "quantize_frozen"),
    (dict(train_layers=[3]), "train_layers"),
    (dict(deactivate={0: [48]}), "deactivate"),
    (dict(deactivate={5: [1]}), "deactivate"),
    (dict(train="neurons", neurons={1: [-1]}), "neurons"),
    (dict(train="neurons", neurons={1: [1]}, deactivate={1: [1]}), "neurons"),
    (dict(train_layers=None), "train_layers"),
    (dict(lora_config="r=8", train="lora"), "lora_config"),
])
def test_bad_input_names_the_argument_and_leaves_the_model_untouched(kwargs, argument):
    model = build_tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    with pytest.raises((ValueError, TypeError), match=f"^{argument}"):
        fastrit.prepare(model, **{**dict(deactivate=DEACTIVATE, train_layers=TRAIN_LAYERS), **kwargs})
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either


def test_neuron_sets_of_another_model_and_preparing_twice_are_refused(tmp_path):
    model = build_tiny_model("llama")
    other = build_tiny_model("gpt2")
    reader, tokenizer = demo.load_model()
    sets = fastrit.mine(reader, tokenizer, demo.load_data("train"), max_examples=2, steps=2, progress=False)
    with pytest.raises(ValueError, match="^neuron_sets"):
        fastrit.prepare(model, sets)
    with pytest.raises(ValueError, match="^neuron_sets"):
        fastrit.prepare(other, sets)
    fastrit.prepare(model, deactivate=None, train_layers=[0], quantize_frozen=None)
    with pytest.raises(ValueError, match="^model: already prepared"):
        fastrit.prepare(model, deactivate=None, train_layers=[0])



@pytest.mark.parametrize("train", ["mlp", "neurons", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_stops_at_the_lowest_trainable_layer(train, checkpointing):
    model = _prepare(build_tiny_model("llama"), train, quantize="nf4", train_layers=[2],
                     gradient_checkpointing=checkpointing)
    model.train()
    needs_grad = {}
    layers = decoder_layers(model)
    handles = [layer.register_forward_hook(
        lambda module, args, out, i=i: needs_grad.__setitem__(i, (out[0] if isinstance(out, tuple) else out)
                                                              .requires_grad))
        for i, layer in enumerate(layers)]
    try:
        ids = _inputs(3)
        _loss(model(ids).logits, ids).backward()
    finally:
        for handle in handles:
            handle.remove()
    assert model.is_activation_checkpointing == checkpointing
    assert needs_grad == {0: False, 1: False, 2: True}  # nothing below layer 2 is part of the backward graph
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_failure_while_modifying_is_rehearsed_on_a_meta_copy_and_leaves_the_model_untouched(monkeypatch):
    import importlib

    prepare_module = importlib.import_module("fastrit.tuning.prepare")  # the module, not the function

    def failing_injection(*args, **kwargs):
        raise ValueError("lora_config: PEFT refused it")

    monkeypatch.setattr(prepare_module, "_inject_lora", failing_injection)
    model = build_tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="^lora_config"):
        fastrit.prepare(model, deactivate=DEACTIVATE, train_layers=TRAIN_LAYERS, train="lora")
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert getattr(model, "fastrit_preparation", None) is None


@pytest.mark.parametrize("train, checkpointed", [("neurons", {2, 3}), ("mlp", {1, 2, 3})])
def test_checkpointing_skips_what_would_only_be_recomputed_and_keeps_the_gradients(train, checkpointed):
    """The last layer, and with train="neurons" the lowest target layer, run without a checkpoint; in checkpointed
    layers the recompute stops before the frozen NF4 output projection; the gradients are those without
    checkpointing, bit for bit."""
    import transformers

    from tests.tiny_models import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config)
    grads = {}
    for checkpointing in (False, True):
        model = _prepare(copy.deepcopy(original), train, quantize="nf4", deactivate={3: [1, 2]},
                         gradient_checkpointing=checkpointing)
        model.train()
        layers = decoder_layers(model)
        if checkpointing:
            assert {i for i, layer in enumerate(layers) if layer.gradient_checkpointing} == checkpointed
        calls = {}
        handles = []
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            if isinstance(mlp, NeuronMLP) and mlp.frozen_in is not None:
                for name, module in (("in", mlp.frozen_in[0]), ("out", mlp.frozen_out)):
                    handles.append(module.register_forward_hook(
                        lambda *_, key=(i, name), calls=calls: calls.__setitem__(key, calls.get(key, 0) + 1)))
        ids = _inputs(4)
        _loss(model(ids).logits, ids).backward()
        for handle in handles:
            handle.remove()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if checkpointing:
            assert calls == {key: 2 if key[0] in checkpointed and key[1] == "in" else 1 for key in calls}
            assert any(count == 2 for count in calls.values()) and calls[(3, "out")] == 1
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])
