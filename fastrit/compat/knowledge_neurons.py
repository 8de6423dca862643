"""``fastrit.compat.KnowledgeNeurons``: the knowledge-neurons package's API, computed by fastrit's IG engine.

Code written for ``knowledge_neurons.KnowledgeNeurons`` (PyPI ``knowledge-neurons`` 0.0.2, EleutherAI) runs unchanged
after ``from fastrit.compat import KnowledgeNeurons``: the same methods, arguments, defaults, return types and
results. The package computes one layer at a time, each batch of integration steps a full forward and backward of
the whole prompt; here one clean forward is followed by all layers' steps in one sweep that recomputes only what a
step changes (the last position of a causal model, the layers from ``l`` up in BERT); see :mod:`fastrit.attribution`.

What it computes, as the package does:

- **Site**: BERT: the output of ``intermediate`` (after the activation) at the ``[MASK]`` position; GPT-2 / GPT-Neo:
  the output of ``mlp.c_fc``, *before* the activation, at the last position. Other families fastrit recognises:
  fastrit's neuron site (the input of the MLP output projection) at the last position.
- **Steps**: the site scaled by ``torch.linspace(0, 1, steps)`` (both ends included); the gradients of the target's
  probability are summed and multiplied by activation / steps. ``batch_size`` must divide ``steps``.
- **Thresholds, refinement, suppress / enhance / erase / edit**: the same rules, result dicts and undo functions.

Where the package crashes or is wrong, this does what it evidently meant (each tested):

- **Multi-token targets of GPT models**: the package raises inside autograd (``model_type="gpt2"``) or, for
  ``model_type="gpt"``, appends its *argmax* token between steps. Here the target tokens are attributed one after
  another by teacher forcing (the prompt plus the target's earlier tokens) and averaged; the ``gt_prob`` of
  suppress / enhance / erase is the product of the teacher-forced probabilities, and ``argmax_completion`` is the
  greedy completion of as many tokens.
- **Negative examples** (``get_refined_neurons(..., negative_examples=...)``, present in the package's repository
  but not in its release, and a no-op there: it looks for a whole list of neurons inside the refined list): every
  neuron that is coarse for any negative example is removed.
- **Undo of weight edits** restores the weights exactly, also when a neuron is listed twice (the package restores
  in the wrong order and leaves such a column edited); weight edits find the orientation from the module
  (``Conv1D`` or ``nn.Linear``), not from ``model_type == "gpt2"``.
- ``erase_knowledge`` without ``target`` reports ``gt_prob`` None instead of crashing.
- ``intermediate_size()`` is the model's real width (the package says ``4 * hidden`` for every GPT model).
- Bad input (no or several ``[MASK]`` tokens, a BERT target that is not one vocabulary token, an empty target, a
  neuron or layer out of range, an unknown ``model_type``) raises a ValueError naming it; the package's own
  assertions stay AssertionErrors with its messages.

Scores are float32 whatever the model's dtype; they are computed with the model in eval mode (the package runs it
in whatever mode it is in), and its training flag is restored.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _args, ops
from ..attribution.engine import attribute_call
from ..attribution.inputs import AttributionCall, ScoredExample
from ._sites import KNSites, resolve_sites

__all__ = ["KnowledgeNeurons"]

Neurons = list[list[int]]


class KnowledgeNeurons:
    """Drop-in for ``knowledge_neurons.KnowledgeNeurons``.

    Args:
        model: a BERT masked LM (``model_type="bert"``), a GPT-2 / GPT-Neo / GPTBigCode causal LM (``"gpt2"``,
            ``"gpt_neo"``, ``"gpt"`` or any name containing ``"gpt"``, as the package accepts), or a model of
            another family fastrit recognises, with ``model_type`` its transformers ``config.model_type``
            (``"llama"``, ...). Moved to ``device`` as the package does.
        tokenizer: its tokenizer.
        model_type: see ``model``; an unknown one raises a ValueError listing the supported ones.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        backend: fastrit kernel backend of the IG interpolation and accumulation (``"auto"``, ``"torch"``,
            ``"triton"``, ``"cpp"``, ``"cuda"``; see :func:`fastrit.backends`).
        progress: False turns off every progress bar (the methods' ``pbar`` / ``quiet`` still apply when True).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_type: str = "bert",
        device: str | torch.device | None = None,
        *,
        backend: str = "auto",
        progress: bool = True,
    ) -> None:
        self._sites: KNSites = resolve_sites(model, model_type)
        if backend not in ("auto", *ops.BACKENDS):
            raise ValueError(f"backend: expected one of auto, {', '.join(ops.BACKENDS)}, got {backend!r}")
        self._live_patches = 0  # activation patches kept by undo_modification=False, not undone yet
        self.model = model
        self.model_type = model_type
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.tokenizer = tokenizer
        self.backend = backend
        self.progress = progress
        self.baseline_activations = None
        for name, value in self._sites.attrs.items():
            setattr(self, name, value)
        if self._sites.masked_lm:
            self.unk_token = getattr(self.tokenizer, "unk_token_id", None)

    # ---------------------------------------------------------------- inputs

    def _prepare_inputs(self, prompt: str, target: str | None = None, encoded_input: dict | None = None):
        """``(encoded_input, mask_idx, target)`` as the package returns them: the tokenized prompt, the scored
        position (the ``[MASK]`` index, or -1) and the target (one token id for BERT, a list for GPT models)."""
        if encoded_input is None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
            encoded_input = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        _check_encoded(encoded_input)
        if self._sites.masked_lm:
            found = torch.where(encoded_input["input_ids"][0] == self.tokenizer.mask_token_id)[0]
            if found.numel() != 1:
                raise ValueError(
                    f"prompt: expected exactly one {self.tokenizer.mask_token} token for a BERT model, found "
                    f"{found.numel()} in {prompt!r}"
                )
            mask_idx = int(found.item())
        else:
            mask_idx = -1
        if target is not None:
            target = self._target_ids(target)
        return encoded_input, mask_idx, target

    def _target_ids(self, target: str) -> int | list[int]:
        if not isinstance(target, str):
            raise TypeError(f"ground_truth/target: expected a str, got {type(target).__name__}")
        if self._sites.masked_lm:
            token = self.tokenizer.convert_tokens_to_ids(target)
            if token is None or (token == self.tokenizer.unk_token_id and target != self.tokenizer.unk_token):
                raise ValueError(
                    f"ground_truth/target: {target!r} is not a token of the tokenizer's vocabulary (a BERT target is "
                    "one vocabulary token, as knowledge-neurons reads it with convert_tokens_to_ids)"
                )
            return int(token)
        tokens = self.tokenizer.encode(target, add_special_tokens=False)
        if not tokens:
            raise ValueError(f"ground_truth/target: {target!r} encodes to no token")
        return list(tokens)

    def _check_steps(self, steps: int, batch_size: int) -> tuple[int, int]:
        steps, batch_size = _integer("steps", steps), _integer("batch_size", batch_size)
        _args.positive("steps", steps, what="an int >= 1")
        _args.positive("batch_size", batch_size, what="an int >= 1")
        assert steps % batch_size == 0  # the package's own check: batch_size must divide steps
        return steps, batch_size

    def _layer_index(self, layer_idx: int) -> int:
        n = self.n_layers()
        layer_idx = _integer("layer_idx", layer_idx)
        assert layer_idx < n, f"cannot get layer {layer_idx + 1} of a {n} layer model"
        if layer_idx < -n:
            raise ValueError(f"layer_idx: {layer_idx} is out of range for a model with {n} layers")
        return layer_idx % n

    def _check_neurons(self, neurons: Neurons) -> list[tuple[int, int]]:
        if not isinstance(neurons, (list, tuple)):
            raise TypeError(f"neurons: expected a list of [layer, neuron] pairs, got {type(neurons).__name__}")
        width = self.intermediate_size()
        checked = []
        for pair in neurons:
            if len(pair) != 2 or not all(map(_is_integral, pair)):
                raise ValueError(f"neurons: expected [layer, neuron] pairs of ints, got {pair!r}")
            layer, neuron = (operator.index(v) for v in pair)
            assert layer < self.n_layers()  # the package's check
            if layer < -self.n_layers() or not -width <= neuron < width:
                raise ValueError(
                    f"neurons: {list(pair)} is out of range ({self.n_layers()} layers of {width} neurons)"
                )
            checked.append((layer, neuron))
        return checked

    # ---------------------------------------------------------------- sizes and helpers of the package

    def n_layers(self) -> int:
        return self._sites.arch.num_layers

    def intermediate_size(self) -> int:
        return self._sites.arch.intermediate_size

    @staticmethod
    def scaled_input(activations: torch.Tensor, steps: int = 20, device: str = "cpu") -> torch.Tensor:
        """``activations [b, d]`` tiled ``steps`` times along the batch and scaled by ``linspace(0, 1, steps)``."""
        tiled = activations.repeat(steps, 1)
        return tiled * torch.linspace(start=0, end=1, steps=steps).to(device)[:, None]

    def get_baseline_with_activations(self, encoded_input: dict, layer_idx: int, mask_idx: int):
        """``(outputs, activations [1, I])``: the unmodified model's outputs and layer ``layer_idx``'s site at
        ``mask_idx``."""
        layer = self._layer_index(layer_idx)
        captured = {}

        def keep(site: torch.Tensor) -> torch.Tensor:
            captured["site"] = site[:, mask_idx, :]
            return site

        handle = self._sites.patch(layer, keep)
        try:
            outputs = self.model(**encoded_input)
        finally:
            handle.remove()
        return outputs, captured["site"]

    # ---------------------------------------------------------------- attribution

    def _examples(self, prompt: str, ground_truth: str, encoded_input: dict | None) -> list[ScoredExample]:
        """The scored examples of one prompt: BERT's one ``[MASK]`` reading, or one teacher-forced example per
        target token of a causal model."""
        encoded_input, mask_idx, target = self._prepare_inputs(prompt, ground_truth, encoded_input)
        ids = encoded_input["input_ids"][0].to(self.device)
        if self._sites.masked_lm:
            where = torch.tensor([mask_idx], device=ids.device)
            answer = torch.tensor([target], device=ids.device)
            return [ScoredExample(ids, ids.numel(), answer, where, readout=where, bidirectional=True)]
        examples = []
        for j, token in enumerate(target):
            sequence = torch.cat([ids, torch.tensor(target[:j], dtype=ids.dtype, device=ids.device)])
            last = torch.tensor([sequence.numel() - 1], device=ids.device)
            examples.append(ScoredExample(sequence, sequence.numel(), torch.tensor([token], device=ids.device), last))
        return examples

    def _scores(
        self,
        prompts: list[str],
        ground_truth: str,
        layers: list[int],
        batch_size: int,
        steps: int,
        pbar: bool,
        encoded_input: dict | None = None,
    ) -> list[torch.Tensor]:
        """Per prompt, ``[len(layers), I]`` float32 scores on ``self.device``, all prompts in one engine call."""
        steps, batch_size = self._check_steps(steps, batch_size)
        per_prompt = [self._examples(p, ground_truth, encoded_input) for p in prompts]
        examples = [example for group in per_prompt for example in group]
        if not examples:
            return []
        arch = self._sites.arch
        if self._live_patches:
            # a kept suppress/enhance patch edits the last position of each sequence: one IG row per sequence
            arch = dataclasses.replace(arch, spec=dataclasses.replace(arch.spec, pack_rows=False))
        # the package's rule: linspace(0, 1, steps), every point weighted 1 / steps
        alphas = torch.linspace(0, 1, steps).tolist()
        call = AttributionCall(
            arch=arch,
            examples=examples,
            layers=layers,
            alphas=alphas,
            weights=[1.0 / steps] * steps,
            settings={"objective": "prob", "positions": "mask" if self._sites.masked_lm else "last", "steps": steps},
        )
        # as many tokens per internal forward as the package's batch of `batch_size` whole prompts
        shortest = min(example.length for example in examples)
        recomputed = shortest if self._sites.masked_lm else 1
        rows = batch_size * max(1, shortest // recomputed)
        result = attribute_call(call, batch_size=rows, progress=self.progress and pbar, backend=self.backend)
        out, start = [], 0
        for group in per_prompt:
            scores = result.scores[start : start + len(group)].sum(dim=0) / len(group)
            out.append(scores.to(self.device))
            start += len(group)
        return out

    def get_scores(
        self, prompt: str, ground_truth: str, batch_size: int = 10, steps: int = 20, pbar: bool = True
    ) -> torch.Tensor:
        """``[n_layers, intermediate_size]`` IG scores of every neuron for ``ground_truth`` after ``prompt``."""
        return self._scores([prompt], ground_truth, list(range(self.n_layers())), batch_size, steps, pbar)[0]

    def get_scores_for_layer(
        self,
        prompt: str,
        ground_truth: str,
        layer_idx: int,
        batch_size: int = 10,
        steps: int = 20,
        encoded_input: dict | None = None,
    ) -> torch.Tensor:
        """``[intermediate_size]`` IG scores of layer ``layer_idx``'s neurons."""
        layer = self._layer_index(layer_idx)
        return self._scores([prompt], ground_truth, [layer], batch_size, steps, False, encoded_input)[0][0]

    @staticmethod
    def _check_one_threshold(threshold, adaptive_threshold, percentile) -> None:
        assert sum(e is not None for e in [threshold, adaptive_threshold, percentile]) == 1, (
            "Provide one and only one of threshold / adaptive_threshold / percentile"
        )

    @staticmethod
    def _threshold(scores: torch.Tensor, threshold, adaptive_threshold, percentile) -> Neurons:
        if adaptive_threshold is not None:
            threshold = scores.max().item() * adaptive_threshold
        if threshold is not None:
            return torch.nonzero(scores > threshold).cpu().tolist()
        flat = scores.flatten().detach().cpu().numpy()
        return torch.nonzero(scores > np.percentile(flat, percentile)).cpu().tolist()

    def get_coarse_neurons(
        self,
        prompt: str,
        ground_truth: str,
        batch_size: int = 10,
        steps: int = 20,
        threshold: float | None = None,
        adaptive_threshold: float | None = None,
        percentile: float | None = None,
        pbar: bool = True,
    ) -> Neurons:
        """``[layer, neuron]`` pairs whose score is above ``threshold``, ``adaptive_threshold`` x the largest
        score, or the ``percentile``-th percentile of all scores (exactly one of the three)."""
        self._check_one_threshold(threshold, adaptive_threshold, percentile)  # before the scores, not after
        scores = self.get_scores(prompt, ground_truth, batch_size=batch_size, steps=steps, pbar=pbar)
        return self._threshold(scores, threshold, adaptive_threshold, percentile)

    def get_refined_neurons(
        self,
        prompts: list[str],
        ground_truth: str,
        p: float = 0.5,
        batch_size: int = 10,
        steps: int = 20,
        coarse_adaptive_threshold: float | None = 0.3,
        coarse_threshold: float | None = None,
        coarse_percentile: float | None = None,
        quiet: bool = False,
        negative_examples: list[str] | None = None,
    ) -> Neurons:
        """Neurons coarse for more than ``len(prompts) * p`` of ``prompts``, minus every neuron coarse for any of
        ``negative_examples``; in the order the package lists them."""
        assert isinstance(prompts, list), "Must provide a list of different prompts to get refined neurons"
        assert 0.0 <= p < 1.0, "p should be a float between 0 and 1"
        if negative_examples is not None and not isinstance(negative_examples, list):
            raise TypeError(f"negative_examples: expected a list of prompts or None, got {type(negative_examples)}")
        thresholds = (coarse_threshold, coarse_adaptive_threshold, coarse_percentile)
        self._check_one_threshold(*thresholds)
        negatives = negative_examples or []
        layers = list(range(self.n_layers()))
        show = not quiet
        scores = self._scores([*prompts, *negatives], ground_truth, layers, batch_size, steps, show)
        coarse = [self._threshold(s, *thresholds) for s in scores]
        coarse, negative_coarse = coarse[: len(prompts)], coarse[len(prompts) :]
        if show:
            print(f"\n{sum(len(c) for c in coarse)} coarse neurons found - refining")
        counts = collections.Counter(tuple(n) for neurons in coarse for n in neurons)
        excluded = {tuple(n) for neurons in negative_coarse for n in neurons}
        refined = [list(n) for n, count in counts.items() if count > len(prompts) * p and n not in excluded]
        if show:
            print(f"{len(refined)} neurons remaining after refining")
        return refined

    # ---------------------------------------------------------------- reading out probabilities

    def _next_token_probs(self, encoded_input: dict, mask_idx: int) -> torch.Tensor:
        """``[V]`` next-token (or ``[MASK]``) probabilities, as the package computes them."""
        outputs = self.model(**encoded_input)
        return F.softmax(outputs.logits[:, mask_idx, :], dim=-1)[0]

    def _encoded(self, ids: torch.Tensor) -> dict:
        return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}

    def _generate(self, prompt: str, ground_truth: str | None):
        """``(gt_prob, argmax_prob, argmax_completion_str, argmax_tokens)``.

        One reading for BERT or a one-token (or absent) target; for a longer target of a causal model,
        ``gt_prob`` is the teacher-forced probability of the whole target and the argmax completion is the greedy
        completion of as many tokens.
        """
        encoded_input, mask_idx, target = self._prepare_inputs(prompt, ground_truth)
        with torch.no_grad():
            probs = self._next_token_probs(encoded_input, mask_idx)
            if self._sites.masked_lm or target is None or len(target) == 1:
                gt_prob = None if target is None else probs[target if self._sites.masked_lm else target[0]].item()
                argmax_prob, argmax_id = (v.item() for v in probs.max(dim=-1))
                return gt_prob, argmax_prob, self.tokenizer.decode([argmax_id]), [argmax_id]
            ids = encoded_input["input_ids"][0]
            gt_probs = [probs[target[0]].item()]
            for j in range(1, len(target)):
                forced = torch.cat([ids, torch.tensor(target[:j], dtype=ids.dtype, device=ids.device)])
                gt_probs.append(self._next_token_probs(self._encoded(forced), -1)[target[j]].item())
            argmax_probs, argmax_tokens, sequence = [], [], ids
            for _ in range(len(target)):
                step = probs if not argmax_tokens else self._next_token_probs(self._encoded(sequence), -1)
                value, token = (v.item() for v in step.max(dim=-1))
                argmax_probs.append(value)
                argmax_tokens.append(token)
                sequence = torch.cat([sequence, torch.tensor([token], dtype=ids.dtype, device=ids.device)])
        return math.prod(gt_probs), math.prod(argmax_probs), self.tokenizer.decode(argmax_tokens), argmax_tokens

    @staticmethod
    def _report(results: dict, when: str, quiet: bool, values: tuple, end: str = "\n") -> None:
        gt_prob, argmax_prob, completion = values[:3]
        results[when] = {"gt_prob": gt_prob, "argmax_completion": completion, "argmax_prob": argmax_prob}
        if not quiet:
            title = "Before" if when == "before" else "After"
            print(
                f"\n{title} modification - groundtruth probability: {gt_prob}\n"
                f"Argmax completion: `{completion}`\nArgmax prob: {argmax_prob}{end}"
            )

    # ---------------------------------------------------------------- modifying activations

    def modify_activations(
        self,
        prompt: str,
        ground_truth: str,
        neurons: Neurons,
        mode: str = "suppress",
        undo_modification: bool = True,
        quiet: bool = False,
    ) -> tuple[dict, Callable]:
        """Zero (``"suppress"``) or double (``"enhance"``) the ``neurons``' site at the scored position, and report
        the target's probability and the argmax completion before and after.

        Returns ``(results, unpatch)``; with ``undo_modification`` the model is restored before returning,
        else ``unpatch()`` restores it.
        """
        assert mode in ["replace", "suppress", "enhance"]
        if mode == "replace":
            raise ValueError("mode: 'replace' needs replacement activations; use 'suppress' or 'enhance'")
        checked = self._check_neurons(neurons)
        _, mask_idx, _ = self._prepare_inputs(prompt, ground_truth)
        results: dict = {}
        self._report(results, "before", quiet, self._generate(prompt, ground_truth))

        by_layer: dict[int, list[int]] = collections.defaultdict(list)
        for layer, neuron in checked:
            by_layer[layer].append(neuron)
        handles = [
            self._sites.patch(layer % self.n_layers(), _scaled_neurons(mask_idx, positions, mode))
            for layer, positions in by_layer.items()
        ]

        def unpatch(*args):
            if handles:
                self._live_patches -= 1
            while handles:
                handles.pop().remove()
            return args

        self._live_patches += 1
        try:
            self._report(results, "after", quiet, self._generate(prompt, ground_truth))
        except BaseException:
            unpatch()
            raise
        return _undone_or_kept(results, unpatch, undo_modification)

    def suppress_knowledge(
        self, prompt: str, ground_truth: str, neurons: Neurons, undo_modification: bool = True, quiet: bool = False
    ) -> tuple[dict, Callable]:
        """:meth:`modify_activations` with the neurons' activations zeroed."""
        return self.modify_activations(prompt, ground_truth, neurons, "suppress", undo_modification, quiet)

    def enhance_knowledge(
        self, prompt: str, ground_truth: str, neurons: Neurons, undo_modification: bool = True, quiet: bool = False
    ) -> tuple[dict, Callable]:
        """:meth:`modify_activations` with the neurons' activations doubled."""
        return self.modify_activations(prompt, ground_truth, neurons, "enhance", undo_modification, quiet)

    # ---------------------------------------------------------------- modifying weights

    @torch.no_grad()
    def modify_weights(
        self,
        prompt: str,
        neurons: Neurons,
        target: str | None,
        mode: str = "edit",
        erase_value: str = "zero",
        undo_modification: bool = True,
        quiet: bool = False,
    ) -> tuple[dict, Callable]:
        """Change the neurons' weights in the MLP output projection: ``"edit"`` moves them from the word embedding
        of the current prediction to that of ``target`` (twice each, BERT only); ``"erase"`` sets them to zero or
        (BERT) to the ``[UNK]`` embedding. Returns ``(results, unpatch)`` as :meth:`modify_activations`."""
        assert mode in ["edit", "erase"]
        assert erase_value in ["zero", "unk"]
        checked = self._check_neurons(neurons)
        if mode == "edit" and target is None:
            raise ValueError("target: edit_knowledge needs the target word")
        self._prepare_inputs(prompt, target)
        results: dict = {}
        before = self._generate(prompt, target)
        self._report(results, "before", quiet, before, end="")

        embeddings = self._sites.word_embeddings()
        if mode == "edit":
            assert self._sites.masked_lm, "edit mode currently only working for bert models - TODO"
            original_embedding = embeddings[before[3][0]]
            target_embedding = embeddings[self._target_ids(target)]
        if erase_value == "unk":
            assert self._sites.masked_lm, "GPT models don't have an unk token"
        saved = []  # (weight, neuron_rows, neuron, original values), in the order of the changes
        try:
            for layer, neuron in checked:
                weight, neuron_rows = self._sites.output_weight(layer)
                column = weight[neuron, :] if neuron_rows else weight[:, neuron]
                saved.append((weight, neuron_rows, neuron, column.clone()))
                if mode == "edit":
                    column -= original_embedding * 2
                    column += target_embedding * 2
                elif erase_value == "zero":
                    column.zero_()
                else:
                    column.copy_(embeddings[self.unk_token])
            after = self._generate(prompt, target)
        except BaseException:
            _restore(saved)
            raise
        self._report(results, "after", quiet, after, end="")

        def unpatch(*args):
            _restore(saved)
            saved.clear()
            return args

        return _undone_or_kept(results, unpatch, undo_modification)

    def edit_knowledge(
        self, prompt: str, target: str, neurons: Neurons, undo_modification: bool = True, quiet: bool = False
    ) -> tuple[dict, Callable]:
        """:meth:`modify_weights` in ``"edit"`` mode (BERT)."""
        return self.modify_weights(prompt, neurons, target, mode="edit", undo_modification=undo_modification,
                                   quiet=quiet)

    def erase_knowledge(
        self,
        prompt: str,
        neurons: Neurons,
        erase_value: str = "zero",
        target: str | None = None,
        undo_modification: bool = True,
        quiet: bool = False,
    ) -> tuple[dict, Callable]:
        """:meth:`modify_weights` in ``"erase"`` mode."""
        return self.modify_weights(prompt, neurons, target, mode="erase", erase_value=erase_value,
                                   undo_modification=undo_modification, quiet=quiet)


def _undone_or_kept(results: dict, unpatch: Callable, undo_modification: bool) -> tuple[dict, Callable]:
    """The package's return value: with ``undo_modification`` the change is undone now and a no-op is returned,
    else the function that undoes it."""
    if undo_modification:
        unpatch()
        return results, lambda *args: args
    return results, unpatch


def _is_integral(value: object) -> bool:
    """Whether ``value`` is an integer the package takes: a Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integer(name: str, value: object) -> int:
    """``value`` as an int (Python or numpy integers), or a TypeError naming ``name``."""
    return _args.integer(name, operator.index(value) if _is_integral(value) else value, what="an int",
                         type_error=True)


def _check_encoded(encoded_input: dict) -> None:
    """The drop-in scores one unpadded prompt (the package's own use of ``encoded_input``)."""
    ids = encoded_input["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"encoded_input: expected input_ids of one prompt [1, T], got {list(ids.shape)}")
    mask = encoded_input.get("attention_mask")
    if mask is not None and not bool((mask != 0).all()):
        raise ValueError("encoded_input: padded inputs (zeros in attention_mask) are not supported; pass the prompt")
    types = encoded_input.get("token_type_ids")
    if types is not None and bool((types != 0).any()):
        raise ValueError("encoded_input: token_type_ids other than 0 (sentence pairs) are not supported")


def _scaled_neurons(mask_idx: int, positions: list[int], mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The site edit of suppress (zero) or enhance (x2) of ``positions`` at ``mask_idx``, one neuron after another
    as the package applies them (a neuron listed twice is doubled twice)."""

    def edit(site: torch.Tensor) -> torch.Tensor:
        site = site.clone()
        for pos in positions:
            if mode == "suppress":
                site[:, mask_idx, pos] = 0.0
            else:
                site[:, mask_idx, pos] *= 2.0
        return site

    return edit


def _restore(saved: list) -> None:
    """Undo weight changes, last first, so that a neuron changed twice gets its original values back."""
    with torch.no_grad():
        for weight, neuron_rows, neuron, original in reversed(saved):
            if neuron_rows:
                weight[neuron, :] = original
            else:
                weight[:, neuron] = original
