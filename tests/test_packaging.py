"""A plain (non-editable) build carries every package and the reader's data: an editable install hides what a
wheel would miss."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["fastrit", "kernels", "csrc", "setup.py", "build_cuda.py", "pyproject.toml", "MANIFEST.in", "README.md"]


def _packages_on_disk() -> set[str]:
    found = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "fastrit").rglob("__init__.py")}
    return {name for name in found if "__pycache__" not in name} | {"fastrit/kernels"}


def test_wheel_carries_every_package_and_imports_from_outside_the_repo(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, source / name)
    env = {**os.environ, "FASTRIT_BUILD_EXT": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fastrit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    folders = {name.rsplit("/", 1)[0] for name in names if name.endswith(".py")}
    assert _packages_on_disk() <= folders, f"missing from the wheel: {_packages_on_disk() - folders}"
    assert {"fastrit/demo/reader/model.safetensors", "fastrit/demo/reader/config.json"} <= set(names)

    code = ("import fastrit, fastrit.compat, fastrit.tuning, fastrit.nn, fastrit.kernels; "
            "from fastrit import demo; model, tok = demo.load_model(); print(fastrit.__file__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert Path(out.stdout.strip().splitlines()[-1]).is_relative_to(tmp_path / "site")
