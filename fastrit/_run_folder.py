"""A run's folder: the record of what the run depends on, so that the same run started again resumes there and any
other run is refused.

A resumable run (``fastrit.mine``'s ``out_dir``, ``fastrit.tune``'s ``output_dir``) keeps one JSON record in its
folder: its **identity** (the settings, data, model... its files depend on) and, beside it, **notes**: what the run
chose as it went and a resumed run must choose the same way (tune's ``"prepared"``). A run started into a folder
whose record holds another identity is refused with a message that lists what differs; the notes are handed back
to the resumed run. The record is written atomically (:func:`fastrit._io.write_text_atomic`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._io import write_text_atomic

__all__ = ["RunFolder", "differences"]


def differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """``"<key>: <saved!r> there, <current!r> now"`` for each key whose values differ (nested mappings key by key,
    dotted: ``"data.sha256: ..."``), keys in sorted order; empty when the two are equal."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b and json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):  # NaN equals NaN here
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _as_json(value: Any) -> Any:
    """``value`` as a reader of its JSON gets it back (tuples as lists, what JSON cannot hold as its ``str``)."""
    return json.loads(json.dumps(value, default=str))


class RunFolder:
    """The folder ``directory`` of one run, named ``argument`` in errors (``"out_dir"``, ``"output_dir"``).

    Args:
        record: the file name of the run's record in the folder (e.g. ``"mining_run.json"``).
        identity: what the run's files depend on (JSON-serialisable; other values are recorded as their ``str``);
            its top-level keys are the record's, besides the notes.
        kind: what the folder holds, for messages (``"mining run"``).
        notes: the top-level keys of the record that are not identity (what the run recorded beside it).
        exclusive: the folder holds this run's files only, so a non-empty folder without a record is refused
            (otherwise the run starts there beside what the folder holds).
        derived: identity keys computed from the others (a hash of them): a refusal lists them only when nothing
            else differs.

    Raises ValueError when ``directory`` exists and is not a directory.
    """

    def __init__(self, directory: str | os.PathLike, *, argument: str, record: str, identity: Mapping[str, Any],
                 kind: str = "run", notes: Sequence[str] = (), exclusive: bool = False,
                 derived: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.argument, self.kind, self.notes, self.exclusive = argument, kind, tuple(notes), exclusive
        self.derived = tuple(derived)
        self.record = self.directory / record
        self.identity: dict[str, Any] = _as_json(dict(identity))
        overlap = set(self.identity) & set(self.notes)
        if overlap:
            raise ValueError(f"notes: {sorted(overlap)} are identity keys too")
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{argument}: {str(self.directory)!r} exists and is not a directory")

    def saved(self) -> dict[str, Any] | None:
        """The record a run wrote in the folder, or None when there is none."""
        if not self.record.is_file():
            return None
        return json.loads(self.record.read_text(encoding="utf-8"))

    def check(self, *, must_exist: bool = False) -> dict[str, Any] | None:
        """Check that the folder may hold this run; return the notes of the run recorded there (``{}`` when it
        recorded none), or None when the folder holds no run yet (it may not exist).

        Raises ValueError when the folder holds a run of another identity (the message lists what differs) or,
        ``exclusive``, when it is not empty and holds no run; RuntimeError when ``must_exist`` and there is no
        record (a process that waited for another one to write it).
        """
        saved = self.saved()
        if saved is None:
            if must_exist:
                raise RuntimeError(f"{self.argument}: {self.record.name} missing in {str(self.directory)!r}")
            if self.exclusive and self.directory.is_dir() and any(self.directory.iterdir()):
                raise ValueError(f"{self.argument}: {str(self.directory)!r} is not empty and holds no fastrit run")
            return None
        recorded = {k: v for k, v in saved.items() if k not in self.notes}
        found = (differences(*({k: v for k, v in side.items() if k not in self.derived}
                               for side in (recorded, self.identity)))
                 or differences(recorded, self.identity))
        if found:
            raise ValueError(f"{self.argument}: {str(self.directory)!r} holds a {self.kind} made differently; "
                             + "; ".join(found) + f". Use another {self.argument}, or the same arguments.")
        return {k: saved[k] for k in self.notes if k in saved}

    def write(self, **notes: Any) -> Path:
        """Write the record: the identity and ``notes`` (each a key of ``notes`` given to the constructor), creating
        the folder if needed. Returns the record's path."""
        unknown = set(notes) - set(self.notes)
        if unknown:
            raise ValueError(f"notes: {sorted(unknown)} were not declared")
        text = json.dumps({**self.identity, **notes}, indent=2, sort_keys=True, default=str) + "\n"
        return write_text_atomic(self.record, text)

    def remove_leftovers(self, *subfolders: str) -> None:
        """Delete the temporary files (``.<name>.<random>.tmp``, :func:`fastrit._io.atomic_path`) that a run killed
        while writing left in the folder and in ``subfolders``; for one process only, before any writes."""
        for folder in (self.directory, *(self.directory / name for name in subfolders)):
            for leftover in folder.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
