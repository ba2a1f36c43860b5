"""model.gguf: a GGUF base is dequantised once into a verified safetensors copy, keyed by the file's content.

The real dequantisation (transformers reading SmolLM2's GGUF) runs in `make demo`; here a stand-in
writer copies the tiny Llama's files, so the cache's own rules are what is tested.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import model.gguf
from model.factory import AdapterError, load_base, load_tokenizer
from model.settings import ModelConfig


@pytest.fixture
def fake_gguf(tmp_path, tiny_llama, monkeypatch):
    """A folder holding `base.gguf` (any bytes), a cache folder, and a writer that counts its calls."""
    monkeypatch.setenv("ARENA_PREF_CACHE", str(tmp_path / "cache"))
    calls = []

    def write_copy(folder, gguf_file, out):
        calls.append(gguf_file)
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tiny_llama / name, out / name)

    monkeypatch.setattr(model.gguf, "_write_copy", write_copy)
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "base.gguf").write_bytes(b"GGUF" + bytes(range(256)))
    return folder, calls


def test_dequantised_once_then_read_from_the_verified_copy(fake_gguf, capsys):
    folder, calls = fake_gguf
    first = model.gguf.dequantised(folder, "base.gguf")
    assert "dequantising once" in capsys.readouterr().out
    assert model.gguf.dequantised(folder, "base.gguf") == first and calls == ["base.gguf"]
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".partial")]  # nothing half-written left

    cfg = ModelConfig(path=str(folder), gguf_file="base.gguf", quantization="none", compute_dtype="float32")
    tokenizer = load_tokenizer(cfg)
    base = load_base(cfg, tokenizer.eos_token_id, torch.device("cpu"))
    assert calls == ["base.gguf"] and base.config.num_labels == 3

    (folder / "base.gguf").write_bytes(b"GGUF" + bytes(range(255, -1, -1)))  # another file: another copy
    assert model.gguf.dequantised(folder, "base.gguf") != first and len(calls) == 2


def test_a_damaged_copy_is_refused_naming_the_file(fake_gguf):
    folder, _ = fake_gguf
    copy = model.gguf.dequantised(folder, "base.gguf")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="model.safetensors: sha256 differs"):
        model.gguf.dequantised(folder, "base.gguf")
