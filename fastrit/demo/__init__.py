"""The embedded default: a tiny reader model shipped in the package, and the synthetic RAG splits it was made for.

``load_model()`` gives ``(model, tokenizer)`` from the package folder (no download); ``load_data(split)`` the
synthetic records of a split, generated from a fixed seed. The reader answers :data:`ABSTAIN` when it finds no
passage that answers. ``python -m fastrit.demo.pretrain`` rebuilds the model.
"""

from __future__ import annotations

from pathlib import Path

from .. import _args, data

__all__ = ["ABSTAIN", "READER_DIR", "SPLIT_SIZES", "abstained", "load_data", "load_model"]

READER_DIR = Path(__file__).resolve().parent / "reader"
SPLIT_SIZES = {"train": 4000, "dev": 300, "test": 500}
DATA_SEED = 2026
#: the reader's answer when no passage answers the question (it was tuned for negative rejection)
ABSTAIN = "unknown"


def load_model(dtype=None):
    """``(model, tokenizer)``: the shipped reader (a LlamaForCausalLM, eval mode) and its word-level tokenizer."""
    import transformers

    if not (READER_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the reader model is not in {READER_DIR}: run `python -m fastrit.demo.pretrain`")
    model = transformers.AutoModelForCausalLM.from_pretrained(READER_DIR, dtype=dtype).eval()
    return model, transformers.AutoTokenizer.from_pretrained(READER_DIR)


def load_data(split: str = "test") -> data.RagData:
    """The synthetic records of ``split`` ("train", "dev" or "test"; sizes :data:`SPLIT_SIZES`), always the same."""
    _args.one_of("split", split, SPLIT_SIZES, what=f"one of {tuple(SPLIT_SIZES)}")
    return data.synthetic(SPLIT_SIZES[split], split=split, seed=DATA_SEED, k=5)


def abstained(predictions: dict[str, list[dict]]) -> dict[str, float]:
    """Per condition, the share of the answers in ``predictions`` (``fastrit.evaluate(...,
    return_predictions=True)[1]``) that are :data:`ABSTAIN` after SQuAD normalisation; NaN for an empty condition.

    Narrower than fastrit.evaluate's ``abstain`` (an answer that contains any of ``fastrit.data.ABSTENTIONS``):
    this reader's own answer, exactly, as the demo reports it."""
    return {condition: sum(data.normalize_answer(row["prediction"]) == ABSTAIN for row in rows) / len(rows)
            if rows else float("nan") for condition, rows in predictions.items()}
