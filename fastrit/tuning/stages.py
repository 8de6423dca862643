"""The training examples of Neuro-RIT's two stages, as 🤗 datasets of token ids with labels on the target only.

- ``"denoise"``: a noisy-context prompt (fastrit.data.prompts, condition "noisy": relevant and irrelevant passages
  mixed) followed by the first gold answer and the end token; the loss is on the answer and the end token. The end
  token is the chat template's end-of-turn token for chat prompts, else the end-of-sequence token
  (fastrit.data.turns.end_token_id), so that a tuned model stops where an answer ends.
- ``"distill"``: the same prompt followed by ``Evidence: <the evidence sentence> Answer: <answer>`` and the end
  token (fastrit.data.evidence_target; the evidence is the first sentence of a relevant passage that contains an
  answer); the loss is on that whole target. Records without evidence are skipped and counted
  (``"no_evidence"``), as are targets that no longer fit ``max_length`` (``"too_long"``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch

from .. import _args
from .. import data as rag
from ..data import RagData
from ..data.turns import end_token_id

__all__ = ["STAGES", "StageData", "check_stage_names", "collate", "stage_data"]

STAGES = ("denoise", "distill")


def check_stage_names(name: str, stages: Sequence[str], given: object = None) -> None:
    """ValueError naming ``name`` unless ``stages`` are one or more distinct names of :data:`STAGES`; the message
    shows ``given`` (what the user wrote; default ``stages``)."""
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        shown = stages if given is None else given
        raise ValueError(f"{name}: expected distinct names among {STAGES}, got {shown!r}")
IGNORE_INDEX = -100


@dataclass
class StageData:
    """One stage's examples: ``dataset`` has columns ``input_ids`` and ``labels`` (lists of int, the same length;
    labels ``-100`` on the prompt), ``records`` the record index of each row, ``skipped`` counts by reason."""

    dataset: datasets.Dataset
    records: list[int]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)

    def prompts(self, n: int) -> list[list[int]]:
        """The prompt token ids (the tokens before the first labelled one) of the first ``n`` examples."""
        out = []
        for ids, labels in zip(self.dataset["input_ids"][:n], self.dataset["labels"][:n], strict=True):
            out.append(ids[: next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))])
        return out


def stage_data(data: RagData, tokenizer, stage: str, *, k: int = 5, template: str | None = None,
               max_length: int | None = None, seed: int = 0, model=None) -> StageData:
    """The examples of ``stage`` ("denoise" or "distill") from ``data`` (see the module docstring).

    ``k``, ``template``, ``max_length``, ``seed`` and ``model`` are those of :func:`fastrit.data.prompts`; the
    end token (:func:`fastrit.data.turns.end_token_id`) closes every target when the tokenizer has one.
    """
    _args.one_of("stage", stage, STAGES)
    if not isinstance(data, RagData):
        raise TypeError(f"data: expected fastrit.data.RagData, got {type(data).__name__}")
    built = rag.prompts(data, tokenizer, condition="noisy", k=k, template=template, max_length=max_length,
                        seed=seed, model=model)
    skipped = Counter(built.skipped)
    end = end_token_id(tokenizer, template)
    eos = [end] if end is not None else []
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    records = []
    for text, prompt, answer, index in zip(built.texts, built.prompt_ids, built.target_ids, built.records,
                                           strict=True):
        if stage == "distill":
            target_text = rag.evidence_target(data.records[index])
            if target_text is None:
                skipped["no_evidence"] += 1
                continue
            prompt, answer = rag.encode_pair(tokenizer, text, target_text)
        target = answer + eos
        if limit is not None and limit < 10**9 and len(prompt) + len(target) - 1 > limit:
            skipped["too_long"] += 1
            continue
        rows["input_ids"].append(prompt + target)
        rows["labels"].append([IGNORE_INDEX] * len(prompt) + target)
        records.append(index)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "labels": datasets.Sequence(datasets.Value("int64"))})
    return StageData(datasets.Dataset.from_dict(rows, features=features), records, dict(skipped))


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) into ``[B, T]`` int64 tensors,
    with the ``attention_mask``."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
        labels[row, :n] = torch.as_tensor(feature["labels"])
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
