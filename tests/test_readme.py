"""The README's Python quickstart, extracted from README.md and run exactly as written (so it cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    """The first ```python block under the README's "## Quickstart" heading."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.S | re.M)
    if section is None:
        raise AssertionError("README.md has no '## Quickstart' section")
    block = re.search(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)
    if block is None:
        raise AssertionError("the README's Quickstart has no python block")
    return block.group(1)


def test_quickstart_is_the_whole_pipeline():
    code = quickstart_code()
    for step in ("fastrit.attribute(", "fastrit.mine(", "fastrit.prepare(", "NeuroRITTrainer(", "fastrit.export("):
        assert step in code, step


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes quickstart/ in the working directory
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(quickstart_code(), str(README) + ":quickstart", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "deactivate:" in printed and "'relevant'" in printed and "'noisy'" in printed
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "quickstart" / "tuned")
    assert exported.config.num_hidden_layers == namespace["model"].config.num_hidden_layers
