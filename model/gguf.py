"""A GGUF base dequantised once: a safetensors copy (weights, config, tokenizer) kept in a cache folder.

transformers dequantises a GGUF file on every load (SmolLM2-135M: tens of seconds on 2 cores for the
weights and the tokenizer, at every train, predict and export start). The copy is keyed by the
GGUF's sha256 and the transformers version that dequantised it, written beside its final name and
renamed when whole, and its files are checked against their manifest at every use, like a run folder.
Cache folder: $ARENA_PREF_CACHE, else ~/.cache/arena-pref.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cli.output import as_if_created
from model.files import MANIFEST, AdapterError, file_table, sha256_file, verify_files

FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("ARENA_PREF_CACHE") or Path.home() / ".cache" / "arena-pref")


def dequantised(folder: Path, gguf_file: str) -> Path:
    """The cached safetensors copy of folder/gguf_file, made on first use (float32, as dequantised)."""
    import transformers

    gguf = folder / gguf_file
    key = f"{sha256_file(gguf)[:20]}-transformers{transformers.__version__}"
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / MANIFEST).is_file():
        try:
            verify_files(target, json.loads((target / MANIFEST).read_text())["files"])
        except (AdapterError, ValueError, KeyError) as err:
            raise AdapterError(f"{err}; the cached copy cannot be trusted: delete {target} and it is made again") from None
        return target
    print(f"{gguf}: dequantising once into {target} (later loads read that copy)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = as_if_created(Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")))
    try:
        _write_copy(folder, gguf_file, tmp)
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "gguf": str(gguf), "key": key,
                                                "files": file_table(tmp)}, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same copy first: use theirs
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_copy(folder: Path, gguf_file: str, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kwargs = {"gguf_file": gguf_file, "local_files_only": True}
    config = AutoConfig.from_pretrained(folder, **kwargs)
    backbone = AutoModel.from_pretrained(folder, dtype=torch.float32, **kwargs)
    # The backbone alone (no LM head, which may share the embedding's storage), under the prefix a
    # *ForSequenceClassification model loads it from.
    prefix = backbone.base_model_prefix
    save_file({f"{prefix}.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, **kwargs).save_pretrained(out)
