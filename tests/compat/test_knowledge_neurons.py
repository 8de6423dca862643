"""fastrit.compat.KnowledgeNeurons against its oracle, the released knowledge-neurons package (0.0.2).

Scores are compared as ``max |ours - package| <= 1e-4 * max |package|`` over all neurons of all layers.
"""

import copy

import pytest
import torch

knowledge_neurons = pytest.importorskip("knowledge_neurons")
pytest.importorskip("einops")

from fastrit.compat import KnowledgeNeurons  # noqa: E402

PROMPTS = {
    "gpt": [
        "the capital of france is",
        "a famous city in the north of france is named",
        "where the old river and the big mountain meet in the south of france lives the capital named",
    ],
    "bert": [
        "the capital of france is [MASK] .",
        "[MASK] is a famous city in the north of france",
        "a big old city named [MASK] lives on the river in the south of the country",
    ],
}
KINDS = {"gpt2": "gpt2", "gpt_neo": "gpt_neo", "bert": "bert"}  # model kind -> the package's model_type
RTOL = 1e-4


def prompts_of(kind: str) -> list[str]:
    return PROMPTS["bert" if kind == "bert" else "gpt"]


@pytest.fixture
def pair(kn_model, word_tok, bert_tok):
    """``pair(kind)`` -> (the package on one copy of the model, fastrit's drop-in on another)."""

    def make(kind: str):
        tok = bert_tok if kind == "bert" else word_tok
        model = kn_model(kind)
        theirs = knowledge_neurons.KnowledgeNeurons(copy.deepcopy(model), tok, model_type=KINDS[kind], device="cpu")
        ours = KnowledgeNeurons(model, tok, model_type=KINDS[kind], device="cpu")
        return theirs, ours

    return make


def assert_scores_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.detach()
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    scale = ref.abs().max()
    assert scale > 0
    err = float((ours - ref).abs().max() / scale)
    assert err <= RTOL, f"max |diff| / max |ref| = {err:.2e}"


def snapshot(model: torch.nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict, structure: list[str]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before), "a weight changed"
    assert [type(m).__name__ for m in model.modules()] == structure, "a module was replaced"
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{type(module).__name__} left hooked"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("prompt_index", [0, 1, 2])
@pytest.mark.parametrize(("batch_size", "steps"), [(1, 10), (1, 20), (5, 10), (5, 20), (10, 10), (10, 20)])
def test_get_scores_match_the_package(pair, kind, prompt_index, batch_size, steps):
    theirs, ours = pair(kind)
    prompt = prompts_of(kind)[prompt_index]
    ref = theirs.get_scores(prompt, "paris", batch_size=batch_size, steps=steps, pbar=False)
    got = ours.get_scores(prompt, "paris", batch_size=batch_size, steps=steps, pbar=False)
    assert got.shape == (theirs.n_layers(), theirs.intermediate_size())
    assert_scores_close(got, ref)


@pytest.mark.parametrize("kind", list(KINDS))
def test_get_scores_for_layer_and_baseline_match(pair, kind):
    theirs, ours = pair(kind)
    prompt = prompts_of(kind)[1]
    assert ours.n_layers() == theirs.n_layers() and ours.intermediate_size() == theirs.intermediate_size()
    for layer in (0, -1):
        ref = theirs.get_scores_for_layer(prompt, "rome", layer_idx=layer, batch_size=5, steps=10)
        assert_scores_close(ours.get_scores_for_layer(prompt, "rome", layer_idx=layer, batch_size=5, steps=10), ref)
    encoded, mask_idx, _ = theirs._prepare_inputs(prompt, "rome")
    ref_out, ref_act = theirs.get_baseline_with_activations(encoded, 1, mask_idx)
    out, act = ours.get_baseline_with_activations(encoded, 1, mask_idx)
    assert torch.equal(act, ref_act) and torch.equal(out.logits, ref_out.logits)
    assert torch.equal(ours.scaled_input(act, steps=7), theirs.scaled_input(ref_act, steps=7))


@pytest.mark.parametrize("kind", list(KINDS))
def test_coarse_neurons_identical(pair, kind):
    theirs, ours = pair(kind)
    prompt = prompts_of(kind)[0]
    for rule in ({"threshold": 1e-4}, {"adaptive_threshold": 0.3}, {"percentile": 99.0}):
        ref = theirs.get_coarse_neurons(prompt, "paris", batch_size=10, steps=20, pbar=False, **rule)
        got = ours.get_coarse_neurons(prompt, "paris", batch_size=10, steps=20, pbar=False, **rule)
        assert got == ref and len(ref) > 0, rule


@pytest.mark.parametrize("kind", list(KINDS))
def test_refined_neurons_identical_with_and_without_negative_examples(pair, kind, capsys):
    theirs, ours = pair(kind)
    prompts = prompts_of(kind)
    settings = dict(p=0.3, batch_size=5, steps=10, coarse_adaptive_threshold=0.2)
    ref = theirs.get_refined_neurons(prompts, "paris", quiet=True, **settings)
    got = ours.get_refined_neurons(prompts, "paris", quiet=True, **settings)
    assert got == ref and len(ref) > 0
    assert capsys.readouterr().out == ""

    # negative examples (not in the release): its rule, composed from the release's coarse neurons
    negatives = [prompts[0]]
    negative_coarse = theirs.get_coarse_neurons(negatives[0], "paris", batch_size=5, steps=10,
                                                adaptive_threshold=0.2, pbar=False)
    expected = [n for n in ref if n not in negative_coarse]
    got = ours.get_refined_neurons(prompts, "paris", quiet=True, negative_examples=negatives, **settings)
    assert got == expected and len(expected) < len(ref)

    ours.get_refined_neurons(prompts, "paris", **settings)
    printed = capsys.readouterr().out
    assert "coarse neurons found - refining" in printed and f"{len(ref)} neurons remaining" in printed


def assert_results_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys() == {"before", "after"}
    for when in ref:
        assert got[when].keys() == ref[when].keys()
        assert got[when]["argmax_completion"] == ref[when]["argmax_completion"]
        for key in ("gt_prob", "argmax_prob"):
            assert got[when][key] == pytest.approx(ref[when][key], rel=1e-5, abs=1e-7), (when, key)


def neurons_of(theirs, kind: str) -> list[list[int]]:
    return [[0, 3], [1, 10], [theirs.n_layers() - 1, 5], [1, 10]]  # a neuron twice, as users' lists can have


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ["suppress_knowledge", "enhance_knowledge"])
def test_suppress_and_enhance_match_and_restore(pair, kind, method):
    theirs, ours = pair(kind)
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    prompt, neurons = prompts_of(kind)[0], neurons_of(theirs, kind)
    ref, _ = getattr(theirs, method)(prompt, "paris", neurons, quiet=True)
    got, undo = getattr(ours, method)(prompt, "paris", neurons, quiet=True)
    assert_results_close(got, ref)
    assert got["after"]["gt_prob"] != got["before"]["gt_prob"]
    assert undo() == ()
    assert_untouched(ours.model, before, structure)

    # kept in place until undone: the model's outputs are the package's patched outputs
    _, ref_undo = getattr(theirs, method)(prompt, "paris", neurons, undo_modification=False, quiet=True)
    _, undo = getattr(ours, method)(prompt, "paris", neurons, undo_modification=False, quiet=True)
    encoded, _, _ = theirs._prepare_inputs(prompt)
    with torch.no_grad():
        torch.testing.assert_close(ours.model(**encoded).logits, theirs.model(**encoded).logits, rtol=1e-5, atol=1e-6)
    undo()
    ref_undo()
    assert_untouched(ours.model, before, structure)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("erase_value", ["zero", "unk"])
def test_erase_matches_and_restores(pair, kind, erase_value):
    theirs, ours = pair(kind)
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    prompt, neurons = prompts_of(kind)[1], neurons_of(theirs, kind)[:3]
    if erase_value == "unk" and kind != "bert":
        for kn in (theirs, ours):
            with pytest.raises(AssertionError, match="unk token"):
                kn.erase_knowledge(prompt, neurons, erase_value="unk", target="paris", quiet=True)
        assert_untouched(ours.model, before, structure)
        return
    ref, _ = theirs.erase_knowledge(prompt, neurons, erase_value=erase_value, target="paris", quiet=True)
    got, _ = ours.erase_knowledge(prompt, neurons, erase_value=erase_value, target="paris", quiet=True)
    assert_results_close(got, ref)
    assert_untouched(ours.model, before, structure)
    # undo_modification=False: the weights are the package's erased weights until undone
    _, ref_undo = theirs.erase_knowledge(prompt, neurons, erase_value=erase_value, target="paris",
                                         undo_modification=False, quiet=True)
    _, undo = ours.erase_knowledge(prompt, neurons, erase_value=erase_value, target="paris",
                                   undo_modification=False, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.model.state_dict().values(),
                                                 theirs.model.state_dict().values(), strict=True))
    undo()
    with torch.no_grad():  # the package's own undo of weights fails with autograd on
        ref_undo()
    assert_untouched(ours.model, before, structure)


def test_edit_matches_and_restores_bert(pair):
    theirs, ours = pair("bert")
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    prompt, neurons = prompts_of("bert")[0], [[0, 3], [2, 10]]
    ref, _ = theirs.edit_knowledge(prompt, "rome", neurons, quiet=True)
    got, _ = ours.edit_knowledge(prompt, "rome", neurons, quiet=True)
    assert_results_close(got, ref)
    assert got["after"]["gt_prob"] != got["before"]["gt_prob"]
    assert_untouched(ours.model, before, structure)


def test_weight_undo_is_exact_with_a_neuron_listed_twice(pair):
    """The package restores a twice-edited column to its once-edited value; the drop-in restores it exactly."""
    theirs, ours = pair("bert")
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    neurons = [[1, 4], [1, 4]]
    ours.edit_knowledge(prompts_of("bert")[0], "rome", neurons, quiet=True)
    assert_untouched(ours.model, before, structure)
    theirs.edit_knowledge(prompts_of("bert")[0], "rome", neurons, quiet=True)
    assert not torch.equal(theirs.model.bert.encoder.layer[1].output.dense.weight, before[
        "bert.encoder.layer.1.output.dense.weight"])


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_edit_is_bert_only_as_in_the_package(pair, kind):
    theirs, ours = pair(kind)
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    for kn in (theirs, ours):
        with pytest.raises(AssertionError, match="only working for bert"):
            kn.edit_knowledge(prompts_of(kind)[0], "rome", [[0, 1]], quiet=True)
    assert_untouched(ours.model, before, structure)


@pytest.mark.parametrize("method", ["suppress_knowledge", "erase_knowledge"])
def test_printed_reports_match(pair, capsys, method):
    theirs, ours = pair("gpt2")
    args = (prompts_of("gpt2")[0], "paris", [[0, 1]])
    if method == "erase_knowledge":
        args = (args[0], args[2], "zero", args[1])
    getattr(theirs, method)(*args)
    ref = capsys.readouterr().out
    getattr(ours, method)(*args)
    got = capsys.readouterr().out
    assert got.count("groundtruth probability") == 2
    assert [line.split(":")[0] for line in got.splitlines()] == [line.split(":")[0] for line in ref.splitlines()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_scores_with_a_kept_patch_match(pair, kind):
    """Scores taken while a suppress patch is kept (undo_modification=False) see the patch as the package's do."""
    theirs, ours = pair(kind)
    prompt, neurons = prompts_of(kind)[0], [[0, 3], [1, 10], [1, 2]]
    _, ref_undo = theirs.suppress_knowledge(prompt, "paris", neurons, undo_modification=False, quiet=True)
    _, undo = ours.suppress_knowledge(prompt, "paris", neurons, undo_modification=False, quiet=True)
    ref = theirs.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False)
    assert_scores_close(ours.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False), ref)
    undo()
    ref_undo()
    assert_scores_close(ours.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False),
                        theirs.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False))


def test_numpy_integers_and_empty_prompt_lists(pair):
    np = pytest.importorskip("numpy")
    theirs, ours = pair("gpt2")
    prompt = prompts_of("gpt2")[0]
    neurons = [[np.int64(0), np.int64(3)], [np.int32(2), np.int64(7)]]
    ref, _ = theirs.suppress_knowledge(prompt, "paris", neurons, quiet=True)
    got, _ = ours.suppress_knowledge(prompt, "paris", neurons, quiet=True)
    assert_results_close(got, ref)
    assert_scores_close(ours.get_scores_for_layer(prompt, "paris", np.int64(1), batch_size=np.int64(5), steps=10),
                        theirs.get_scores_for_layer(prompt, "paris", 1, batch_size=5, steps=10))
    assert ours.get_refined_neurons([], "paris", quiet=True) == theirs.get_refined_neurons([], "paris", quiet=True)


# ---------------------------------------------------------------- multi-token targets of GPT models


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_multi_token_targets_are_teacher_forced_and_averaged(pair, kind):
    """The package raises for a multi-token target (model_type="gpt2"); the drop-in averages the single-token
    scores of each target token after the prompt and the target's earlier tokens: the per-token loop below, on
    the package."""
    theirs, ours = pair(kind)
    prompt, target = prompts_of(kind)[0], "paris and rome"
    words = target.split()
    per_token = [
        theirs.get_scores(" ".join([prompt, *words[:j]]), word, batch_size=5, steps=10, pbar=False)
        for j, word in enumerate(words)
    ]
    got = ours.get_scores(prompt, target, batch_size=5, steps=10, pbar=False)
    assert_scores_close(got, torch.stack(per_token).mean(dim=0))

    # suppress: gt_prob is the teacher-forced probability of the whole target
    probs = [theirs.suppress_knowledge(" ".join([prompt, *words[:j]]), word, [[0, 1]], quiet=True)[0]["before"]
             ["gt_prob"] for j, word in enumerate(words)]
    result, _ = ours.suppress_knowledge(prompt, target, [[0, 1]], quiet=True)
    assert result["before"]["gt_prob"] == pytest.approx(probs[0] * probs[1] * probs[2], rel=1e-5)
    assert len(result["before"]["argmax_completion"].split()) == 3

    with pytest.raises(RuntimeError):  # (and leaves its patch in the model: the last use of `theirs`)
        theirs.get_scores(prompt, target, batch_size=5, steps=10, pbar=False)


def test_gpt_model_type_uses_the_same_sites(pair, kn_model, word_tok):
    """model_type="gpt" (the package's multi-token branch) attributes the same c_fc site of a GPT-2 model."""
    theirs, _ = pair("gpt2")
    ours = KnowledgeNeurons(kn_model("gpt2"), word_tok, model_type="gpt", device="cpu")
    prompt = prompts_of("gpt2")[1]
    assert_scores_close(ours.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False),
                        theirs.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False))


def test_weight_orientation_follows_the_module(pair, kn_model, word_tok):
    """With model_type="gpt" the package edits GPT-2's Conv1D weight as if it were nn.Linear; the drop-in erases
    the same weights as the package does with model_type="gpt2"."""
    theirs, _ = pair("gpt2")
    model = kn_model("gpt2")
    before, structure = snapshot(model), [type(m).__name__ for m in model.modules()]
    ours = KnowledgeNeurons(model, word_tok, model_type="gpt", device="cpu")
    prompt, neurons = prompts_of("gpt2")[0], [[0, 100], [2, 7]]
    _, undo = ours.erase_knowledge(prompt, neurons, target="paris", undo_modification=False, quiet=True)
    _, ref_undo = theirs.erase_knowledge(prompt, neurons, target="paris", undo_modification=False, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), theirs.model.state_dict().values(),
                                                 strict=True))
    undo()
    assert_untouched(model, before, structure)
    wrong = knowledge_neurons.KnowledgeNeurons(copy.deepcopy(model), word_tok, model_type="gpt", device="cpu")
    with pytest.raises(IndexError):  # neuron 100 read as a column of the [128, 32] Conv1D weight
        wrong.erase_knowledge(prompt, neurons, target="paris", quiet=True)


def test_gpt_bigcode_matches_the_package(word_tok):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTBigCodeConfig(vocab_size=len(word_tok), n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                           initializer_range=0.2)
    model = transformers.GPTBigCodeForCausalLM(config).eval()
    theirs = knowledge_neurons.KnowledgeNeurons(copy.deepcopy(model), word_tok, model_type="gpt", device="cpu")
    ours = KnowledgeNeurons(model, word_tok, model_type="gpt", device="cpu")
    prompt = prompts_of("gpt")[2]
    assert_scores_close(ours.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False),
                        theirs.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False))


# ---------------------------------------------------------------- families beyond the package


class _Site(torch.nn.Module):
    """Identity: its output is the input of the MLP output projection, a site the package can hook."""

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox"]
)
def test_other_families_match_the_package_on_an_exposed_site(tiny_model, word_tok, family):
    """The package, pointed at fastrit's neuron site (the input of the output projection, exposed as the output
    of an identity module in front of it) of a copy of the model, is the oracle."""
    from fastrit.arch import FAMILIES, resolve_arch

    model = tiny_model(family)
    oracle_model = copy.deepcopy(model)
    spec = FAMILIES[family]
    for layer in resolve_arch(oracle_model).layers:
        parent_path, name = spec.mlp_out.rsplit(".", 1)
        parent = layer.get_submodule(parent_path)
        setattr(parent, name, torch.nn.Sequential(_Site(), getattr(parent, name)))
    theirs = knowledge_neurons.KnowledgeNeurons(oracle_model, word_tok, model_type="gpt2", device="cpu")
    theirs.transformer_layers_attr = f"{oracle_model.base_model_prefix}.{spec.layers}"
    theirs.input_ff_attr = f"{spec.mlp_out}.0"
    ours = KnowledgeNeurons(model, word_tok, model_type=family, device="cpu")
    prompt = prompts_of("gpt")[1]
    ref = torch.stack([theirs.get_scores_for_layer(prompt, "paris", layer, batch_size=5, steps=10)
                       for layer in range(ours.n_layers())])
    assert_scores_close(ours.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False), ref)
    assert ours.intermediate_size() == ref.shape[1]

    before, structure = snapshot(model), [type(m).__name__ for m in model.modules()]
    ref_result, _ = theirs.suppress_knowledge(prompt, "paris", [[0, 1], [2, 7]], quiet=True)
    got, _ = ours.suppress_knowledge(prompt, "paris", [[0, 1], [2, 7]], quiet=True)
    assert_results_close(got, ref_result)
    ours.erase_knowledge(prompt, [[0, 1], [2, 7]], target="paris", quiet=True)
    assert_untouched(model, before, structure)


# ---------------------------------------------------------------- options and bad input


def test_backends_agree_and_progress_is_optional(pair, capsys):
    _, ours = pair("gpt2")
    prompt = prompts_of("gpt2")[0]
    ref = ours.get_scores(prompt, "paris", batch_size=5, steps=10, pbar=False)
    quiet = KnowledgeNeurons(ours.model, ours.tokenizer, model_type="gpt2", device="cpu", backend="torch",
                             progress=False)
    assert_scores_close(quiet.get_scores(prompt, "paris", batch_size=5, steps=10), ref)
    assert "fastrit.attribute" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend"):
        KnowledgeNeurons(ours.model, ours.tokenizer, model_type="gpt2", device="cpu", backend="fast")


def test_unknown_or_mismatched_model_type(kn_model, word_tok, bert_tok, tiny_model):
    with pytest.raises(ValueError, match="model_type: expected one of bert, gpt, gpt2, gpt_neo, .*llama"):
        KnowledgeNeurons(kn_model("gpt2"), word_tok, model_type="t5", device="cpu")
    with pytest.raises(ValueError, match="needs a BERT masked LM"):
        KnowledgeNeurons(kn_model("gpt2"), word_tok, model_type="bert", device="cpu")
    with pytest.raises(ValueError, match="needs a GPT-2, GPT-Neo or GPTBigCode model"):
        KnowledgeNeurons(kn_model("bert"), bert_tok, model_type="gpt2", device="cpu")
    with pytest.raises(ValueError, match="pass model_type='gpt_neox'"):
        KnowledgeNeurons(tiny_model("gpt_neox"), word_tok, model_type="gpt_neox2", device="cpu")
    with pytest.raises(ValueError, match="does not match the model"):
        KnowledgeNeurons(tiny_model("llama"), word_tok, model_type="mistral", device="cpu")


def test_bad_input(pair):
    theirs, ours = pair("bert")
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    prompt = prompts_of("bert")[0]
    for kn in (theirs, ours):  # the package's own assertions stay AssertionErrors
        with pytest.raises(AssertionError):
            kn.get_scores(prompt, "paris", batch_size=3, steps=10, pbar=False)
        with pytest.raises(AssertionError, match="p should be"):
            kn.get_refined_neurons([prompt], "paris", p=1.0, quiet=True)
        with pytest.raises(AssertionError, match="one and only one"):
            kn.get_coarse_neurons(prompt, "paris", batch_size=5, steps=10, threshold=0.1, percentile=50, pbar=False)
        with pytest.raises(AssertionError, match="list of different prompts"):
            kn.get_refined_neurons(prompt, "paris", quiet=True)
    # where the package crashes (or silently scores [UNK]): ValueErrors that name the argument
    with pytest.raises(RuntimeError):
        theirs.get_scores("the capital of france is paris", "paris", batch_size=5, steps=10, pbar=False)
    with pytest.raises(ValueError, match=r"prompt: expected exactly one \[MASK\] token.*found 0"):
        ours.get_scores("the capital of france is paris", "paris", batch_size=5, steps=10, pbar=False)
    with pytest.raises(ValueError, match="found 2"):
        ours.get_scores("[MASK] capital of france is [MASK]", "paris", batch_size=5, steps=10, pbar=False)
    with pytest.raises(ValueError, match="ground_truth/target: 'lyon' is not a token"):
        ours.get_scores(prompt, "lyon", batch_size=5, steps=10, pbar=False)
    with pytest.raises(ValueError, match="neurons: \\[0, 64\\] is out of range"):
        ours.suppress_knowledge(prompt, "paris", [[0, 64]], quiet=True)
    with pytest.raises(AssertionError):
        ours.suppress_knowledge(prompt, "paris", [[3, 1]], quiet=True)
    with pytest.raises(AssertionError, match="cannot get layer 4 of a 3 layer model"):
        ours.get_scores_for_layer(prompt, "paris", layer_idx=3)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        ours.get_scores(prompt, "paris", batch_size=5, steps=0, pbar=False)
    padded = ours.tokenizer(prompt, padding="max_length", max_length=16, return_tensors="pt")
    with pytest.raises(ValueError, match="encoded_input: padded inputs"):
        ours.get_scores_for_layer(prompt, "paris", 0, encoded_input=padded)
    pair_input = ours.tokenizer(prompt, "a city", return_tensors="pt")
    with pytest.raises(ValueError, match="token_type_ids"):
        ours.get_scores_for_layer(prompt, "paris", 0, encoded_input=pair_input)
    assert_untouched(ours.model, before, structure)


def test_bad_input_gpt(pair):
    theirs, ours = pair("gpt2")
    prompt = prompts_of("gpt2")[0]
    with pytest.raises(ValueError, match="encodes to no token"):
        ours.get_scores(prompt, "", batch_size=5, steps=10, pbar=False)
    # erase without a target: the package crashes; the drop-in reports no target probability
    with pytest.raises(RuntimeError):
        theirs.erase_knowledge(prompt, [[0, 1]], quiet=True)
    result, _ = ours.erase_knowledge(prompt, [[0, 1]], quiet=True)
    assert result["before"]["gt_prob"] is None and result["after"]["argmax_completion"]


def test_no_hook_left_after_an_error_while_patched(pair, monkeypatch):
    _, ours = pair("gpt2")
    before, structure = snapshot(ours.model), [type(m).__name__ for m in ours.model.modules()]
    calls = {"n": 0}
    real = ours._generate

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # the reading with the neurons patched (or the weights erased)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ours, "_generate", failing)
    with pytest.raises(KeyboardInterrupt):
        ours.suppress_knowledge(prompts_of("gpt2")[0], "paris", [[0, 1]], quiet=True)
    assert_untouched(ours.model, before, structure)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        ours.erase_knowledge(prompts_of("gpt2")[0], [[0, 1]], target="paris", quiet=True)
    assert_untouched(ours.model, before, structure)
