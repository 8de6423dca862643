"""A synthetic RAG QA benchmark of invented entities, whose answers can only come from the passages.

The world: 2,000 invented entity names in families of four that differ by one syllable (the near-miss
distractors), and for each of five attributes (capital, founder, founding year, river, language) a pool of
invented values. Its vocabulary is fixed (independent of any seed), so one word-level tokenizer covers every
record. A record asks for one (entity, attribute) pair; its value is drawn afresh for every record (nothing
repeats consistently enough to be memorised: the model has to read). Passages:

- relevant: the fact, in one of several phrasings, sometimes after a filler sentence about the entity;
- irrelevant, of three kinds: a fact of another entity, another attribute of the same entity, and a near-miss
  (the same attribute of an entity of the same family, with another value).

Train, dev and test use disjoint sets of (entity, attribute) pairs. has_answer is set by construction (a passage
states the asked fact or it does not); no irrelevant passage contains the answer's word.
"""

from __future__ import annotations

import random
import zlib

import datasets

from .. import _args
from .rag import FEATURES, RagData

__all__ = ["ATTRIBUTES", "SPLITS", "entity_names", "synthetic", "vocabulary"]

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_SYLLABLES = tuple(o + v for o in _ONSETS for v in _VOWELS)  # 70 syllables

# attribute -> (question templates, fact phrasings, filler about the entity); {e} entity, {v} value
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital": (
        ("What is the capital of {e} ?", "Which city is the capital of {e} ?"),
        ("The capital of {e} is {v} .", "{v} is the capital city of {e} .", "{e} has {v} as its capital ."),
    ),
    "founder": (
        ("Who founded {e} ?", "Who was the founder of {e} ?"),
        ("{e} was founded by {v} .", "The founder of {e} was {v} .", "{v} founded {e} long ago ."),
    ),
    "year": (
        ("In which year was {e} founded ?", "When was {e} founded ?"),
        ("{e} was founded in {v} .", "The founding year of {e} is {v} .", "In {v} the people founded {e} ."),
    ),
    "river": (
        ("Which river flows through {e} ?", "What river crosses {e} ?"),
        ("The river {v} flows through {e} .", "{e} is crossed by the river {v} .", "{v} is the main river of {e} ."),
    ),
    "language": (
        ("What language is spoken in {e} ?", "Which language do people speak in {e} ?"),
        ("People in {e} speak {v} .", "The language of {e} is {v} .", "{v} is spoken across {e} ."),
    ),
}
_FILLERS = ("{e} is an old land .", "Many travellers visit {e} .", "{e} is known for its markets .",
            "The winters in {e} are long .")

SPLITS = ("train", "dev", "test")


def _names(count: int, syllables: int, rng: random.Random, suffix: str = "") -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize() + suffix)
    return sorted(names)


def _world() -> tuple[list[list[str]], dict[str, list[str]]]:
    """``(entity families, value pools)``, the same on every call (a fixed seed)."""
    rng = random.Random(20261123)
    families, seen = [], set()
    while len(families) < 500:
        stem = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)
        if stem in seen:
            continue
        seen.add(stem)
        endings = rng.sample(_SYLLABLES, 4)
        families.append([(stem + end).capitalize() for end in endings])
    pools = {
        "capital": _names(300, 2, rng, "ton"),
        "founder": _names(300, 2, rng, "son"),
        "year": [str(y) for y in range(1100, 1900)],
        "river": _names(200, 2, rng, "el"),
        "language": _names(100, 2, rng, "ish"),
    }
    return families, pools


_FAMILIES, _POOLS = _world()


def entity_names() -> list[str]:
    """Every entity name of the world, family by family (four to a family)."""
    return [name for family in _FAMILIES for name in family]


def vocabulary() -> list[str]:
    """Every word any synthetic record can contain, sorted (what a word-level tokenizer needs)."""
    words = set(entity_names())
    for pool in _POOLS.values():
        words.update(pool)
    for questions, facts in ATTRIBUTES.values():
        for template in (*questions, *facts):
            words.update(template.replace("{e}", " ").replace("{v}", " ").split())
    for template in _FILLERS:
        words.update(template.replace("{e}", " ").split())
    return sorted(words)


def _split_of(entity: str, attribute: str) -> str:
    bucket = zlib.crc32(f"{entity}/{attribute}".encode()) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


_PAIRS = {split: [] for split in SPLITS}
for _family in _FAMILIES:
    for _entity in _family:
        for _attribute in ATTRIBUTES:
            _PAIRS[_split_of(_entity, _attribute)].append((_entity, _attribute))


def _fact(
    rng: random.Random, entity: str, attribute: str, value: str, filler: bool, phrasing: str | None = None
) -> str:
    sentence = (phrasing or rng.choice(ATTRIBUTES[attribute][1])).format(e=entity, v=value)
    if filler:
        return f"{rng.choice(_FILLERS).format(e=entity)} {sentence}"
    return sentence


def _other_value(rng: random.Random, attribute: str, avoid: set[str]) -> str:
    while True:
        value = rng.choice(_POOLS[attribute])
        if value not in avoid:
            return value


def _record(rng: random.Random, entity: str, attribute: str, k: int) -> dict:
    family = next(f for f in _FAMILIES if entity in f)
    value = rng.choice(_POOLS[attribute])
    used = {value}
    ctxs = []
    for phrasing in rng.sample(ATTRIBUTES[attribute][1], rng.randint(1, 3)):  # relevant: distinct phrasings
        ctxs.append({"title": entity, "text": _fact(rng, entity, attribute, value, rng.random() < 0.3, phrasing),
                     "has_answer": True})
    kinds = ["near-miss", "same entity", "other entity"] + [rng.choice(["near-miss", "same entity", "other entity"])
                                                              for _ in range(k - 1)]
    for kind in kinds:  # at least k irrelevant passages, every kind at least once
        if kind == "near-miss":
            other, other_attribute = rng.choice([e for e in family if e != entity]), attribute
        elif kind == "same entity":
            other, other_attribute = entity, rng.choice([a for a in ATTRIBUTES if a != attribute])
        else:
            other_family = rng.choice([f for f in _FAMILIES if f is not family])
            other, other_attribute = rng.choice(other_family), rng.choice(list(ATTRIBUTES))
        other_value = _other_value(rng, other_attribute, used)
        used.add(other_value)
        ctxs.append({"title": other, "text": _fact(rng, other, other_attribute, other_value, rng.random() < 0.3),
                     "has_answer": False})
    rng.shuffle(ctxs)
    question = rng.choice(ATTRIBUTES[attribute][0]).format(e=entity)
    return {"question": question, "answers": [value], "ctxs": ctxs}


def synthetic(n: int, *, split: str = "train", seed: int = 0, k: int = 5) -> RagData:
    """``n`` records of ``split`` ("train", "dev" or "test"), each with 1-3 relevant passages and at least ``k``
    irrelevant ones (so every condition of ``fastrit.data.prompts`` can take ``k`` passages). Deterministic from
    ``seed``; different splits never ask about the same (entity, attribute) pair."""
    _args.integer("n", n, low=0)
    _args.one_of("split", split, SPLITS)
    _args.positive("k", k)
    rng = random.Random(f"{seed}/{split}")
    pairs = _PAIRS[split]
    records = [_record(rng, *rng.choice(pairs), k) for _ in range(n)]
    return RagData(records=datasets.Dataset.from_list(records, features=FEATURES), skipped={})
