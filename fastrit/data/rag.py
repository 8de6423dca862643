"""RAG QA records: the canonical schema, loading from files and 🤗 datasets, saving.

Canonical record: ``{question: str, answers: [str], ctxs: [{title: str, text: str, has_answer: bool}]}``.
Accepted variants: ``answer`` (one string or a list) instead of ``answers``; ``answers`` as one string; passages
with ``id``, ``score`` or other keys (dropped), without ``title``, or as plain strings; ``has_answer`` missing
(computed with :func:`fastrit.data.text.contains_answer` on title + text) or given as 0/1.

A bad record is skipped and counted under its reason (:data:`SKIP_REASONS`); a malformed file (invalid JSON,
a parquet file that does not open, a field of the wrong type) raises ValueError naming the file and the line
(JSONL) or record index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .. import _args
from .._io import atomic_path
from .text import contains_answer

__all__ = ["FEATURES", "SKIP_REASONS", "RagData", "load"]

logger = logging.getLogger("fastrit.data")

FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "answers": [datasets.Value("string")],
        "ctxs": [{"title": datasets.Value("string"), "text": datasets.Value("string"),
                  "has_answer": datasets.Value("bool")}],
    }
)
# while loading, each row also says why it is skipped ("" for a kept record)
_LOAD_FEATURES = datasets.Features({**FEATURES, "_skip": datasets.Value("string")})

SKIP_REASONS = ("missing question", "empty question", "no answer", "ctxs not a list", "passage without text")
_FILE_TYPES = (".jsonl", ".json", ".parquet")


@dataclass
class RagData:
    """RAG QA records in the canonical schema, and how many were skipped on loading, by reason."""

    records: datasets.Dataset
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the records to ``path`` (.jsonl, .json or .parquet), atomically: a temporary name, then a rename."""
        path = Path(path)
        if path.suffix not in _FILE_TYPES:
            raise ValueError(f"path: expected a {', '.join(_FILE_TYPES)} file, got {str(path)!r}")
        with atomic_path(path) as tmp:
            if path.suffix == ".parquet":
                self.records.to_parquet(str(tmp))
            elif path.suffix == ".jsonl":
                self.records.to_json(str(tmp), lines=True, force_ascii=False)
            else:
                with open(tmp, "w", encoding="utf-8") as out:
                    json.dump(self.records.to_list(), out, ensure_ascii=False)
        return path


class _Malformed(ValueError):
    """A field of the wrong type: the whole source is refused."""


def _string(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Malformed(f"{name}: expected a string, got {type(value).__name__}")


def _answers(raw: dict) -> list[str]:
    value = raw.get("answers", raw.get("answer"))
    values = [value] if isinstance(value, str) else value
    if values is None:
        return []
    if not isinstance(values, list | tuple):
        raise _Malformed(f"answers: expected a string or a list of strings, got {type(value).__name__}")
    return [a for a in (_string(v, "answers") for v in values) if a and a.strip()]


def _passage(raw: Any, answers: list[str]) -> dict | None:
    """The canonical passage, or None if it has no text."""
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict):
        raise _Malformed(f"ctxs: expected passages as objects, got {type(raw).__name__}")
    text = _string(raw.get("text"), "ctxs.text")
    if not text or not text.strip():
        return None
    title = _string(raw.get("title"), "ctxs.title") or ""
    has_answer = raw.get("has_answer")
    if has_answer is None:
        has_answer = contains_answer(f"{title} {text}", answers)
    elif isinstance(has_answer, int) and has_answer in (0, 1):  # bool is an int too
        has_answer = bool(has_answer)
    else:
        raise _Malformed(f"ctxs.has_answer: expected a boolean, got {has_answer!r}")
    return {"title": title, "text": text, "has_answer": has_answer}


def canonical_record(raw: Any) -> tuple[dict | None, str]:
    """``(record, "")`` in the canonical schema, or ``(None, reason)`` for a record to skip.

    Raises ValueError (without a location; the caller adds it) for a field of the wrong type.
    """
    if not isinstance(raw, dict):
        raise _Malformed(f"expected a record object, got {type(raw).__name__}")
    question = _string(raw.get("question"), "question")
    if question is None:
        return None, "missing question"
    if not question.strip():
        return None, "empty question"
    answers = _answers(raw)
    if not answers:
        return None, "no answer"
    ctxs = raw.get("ctxs")
    if not isinstance(ctxs, list | tuple):
        return None, "ctxs not a list"
    passages = [_passage(p, answers) for p in ctxs]
    if any(p is None for p in passages):
        return None, "passage without text"
    return {"question": question, "answers": answers, "ctxs": passages}, ""


_SKIPPED_ROW = {"question": "", "answers": [], "ctxs": []}


def _rows(kind: str, source: Any, fingerprint: str):
    """Canonical rows of ``source``, each with ``_skip``; ``fingerprint`` only keys the cache."""
    del fingerprint
    for where, raw in _raw_records(kind, source):
        try:
            record, reason = canonical_record(raw)
        except _Malformed as error:
            raise ValueError(f"{where}: {error}") from None
        yield {**(record or _SKIPPED_ROW), "_skip": reason}


def _raw_records(kind: str, source: Any):
    """``(location, raw record)`` pairs; the location names the file and line or record index."""
    if kind == "jsonl":
        with open(source, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{source}: line {number}: invalid JSON ({error.msg})") from None
                yield f"{source}: line {number}", raw
    elif kind == "json":
        with open(source, encoding="utf-8") as text:
            try:
                records = json.load(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}: invalid JSON at line {error.lineno} ({error.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
        for index, raw in enumerate(records):
            yield f"{source}: record {index}", raw
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(source)
        except Exception as error:  # pyarrow raises several types for a file that is not parquet
            raise ValueError(f"{source}: not a readable parquet file ({error})") from None
        index = 0
        for batch in table.iter_batches(batch_size=4096):
            for raw in batch.to_pylist():
                yield f"{source}: record {index}", raw
                index += 1
    else:  # a datasets.Dataset
        for index, raw in enumerate(source):
            yield f"dataset record {index}", raw


def _file_kind(path: Path) -> str:
    if path.suffix not in _FILE_TYPES:
        raise ValueError(f"source: expected a {', '.join(_FILE_TYPES)} file, got {str(path)!r}")
    return path.suffix[1:]


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (other sources are cached there) or already gone
        pass


def load(source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict, *, split: str | None = None) -> RagData:
    """RAG QA records from a JSONL / JSON / parquet file, a ``datasets.Dataset``, or one ``split`` of a
    ``datasets.DatasetDict``, in the canonical schema. Logs one summary line (kept, skipped by reason)."""
    if isinstance(source, datasets.DatasetDict):
        if split is None and len(source) == 1:
            split = next(iter(source))
        _args.one_of("split", split, source, what=f"one of {sorted(source)}")
        source = source[split]
    elif split is not None:
        raise ValueError("split: only a datasets.DatasetDict has splits")
    if isinstance(source, datasets.Dataset):
        kind, arg, fingerprint, name = "dataset", source, source._fingerprint, "a datasets.Dataset"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"source: no such file: {str(path)!r}")
        stat = path.stat()
        kind, arg, name = _file_kind(path), str(path.resolve()), str(path)
        fingerprint = f"{arg}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        raise TypeError(f"source: expected a file path, a datasets.Dataset or DatasetDict, got {type(source).__name__}")

    # Each source gets its own cache folder, so that a load that fails can remove everything it wrote (the
    # datasets builder leaves lock files and folders behind on failure) while a later load of the same,
    # unchanged source still reuses the cache.
    key = hashlib.sha256(f"{kind}\0{fingerprint}".encode()).hexdigest()[:24]
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "fastrit_load" / key
    new_folders = [folder for folder in (cache_dir, *cache_dir.parents) if not folder.exists()]
    try:
        rows = datasets.Dataset.from_generator(
            _rows, features=_LOAD_FEATURES, cache_dir=str(cache_dir),
            gen_kwargs={"kind": kind, "source": arg, "fingerprint": fingerprint},
        )
    except BaseException as error:
        if new_folders:
            shutil.rmtree(cache_dir, ignore_errors=True)
            for folder in new_folders[1:]:  # the parents this load created, innermost first, if nothing else is there
                _remove_if_empty(folder)
        if isinstance(error, datasets.exceptions.DatasetGenerationError) and isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise
    reasons = Counter(rows["_skip"])
    kept = reasons.pop("", 0)
    records = rows.filter(lambda skip: skip == "", input_columns="_skip").remove_columns("_skip")
    skipped = dict(sorted(reasons.items()))
    detail = ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "none"
    logger.info("fastrit.data.load: %d records from %s, skipped: %s", kept, name, detail)
    return RagData(records=records, skipped=skipped)
