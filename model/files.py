"""File integrity for everything the model layer writes and reads: sha256 of files and the manifest's file list,
the head checksum, and adapters read and loaded only as saved."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cli.config import UserError

MANIFEST = "manifest.json"


class AdapterError(UserError, RuntimeError):
    """A run folder (or another file the model layer wrote) whose content cannot be trusted."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(rel: str) -> bool:
    """A file being written (or left by a kill while it was): `.name.*.tmp` and the manifest's own temp file."""
    name = rel.rsplit("/", 1)[-1]
    return name == MANIFEST + ".tmp" or (name.startswith(".") and name.endswith(".tmp"))


def file_table(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """relative path -> {sha256, size} for every file under `root` but the manifest, temporary files and
    the folders in `exclude` (e.g. "trainer/": checkpoints are not part of a sealed run)."""
    table = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not is_temporary(rel) and not rel.startswith(exclude):
            table[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return table


def verify_files(root: Path, files: dict[str, dict], error=AdapterError) -> int:
    """Every listed file exists with its size and sha256 (the first mismatch named); returns the count."""
    for rel, want in files.items():
        if not isinstance(want, dict) or not {"sha256", "size"} <= set(want):
            raise error(f"{root / MANIFEST}: entry {rel!r} has no sha256 and size (edited by hand?)")
        path = root / rel
        if not path.is_file():
            raise error(f"{path}: missing (listed in {root / MANIFEST})")
        if path.stat().st_size != want["size"]:
            raise error(f"{path}: {path.stat().st_size} bytes, {want['size']} in {root / MANIFEST} (truncated or replaced)")
        if sha256_file(path) != want["sha256"]:
            raise error(f"{path}: sha256 differs from {root / MANIFEST} (changed or corrupted since it was written)")
    return len(files)


def head_checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def read_adapter(adapter_dir: Path) -> tuple[dict, Path]:
    """(tensors, file) of a saved adapter folder (a run's adapter/ or a training checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterError(f"{file}: not found")
    try:
        return load_file(file), file
    except SafetensorError as err:
        raise AdapterError(f"{file}: not a readable safetensors file ({err})") from None


def check_adapter_loaded(peft_model, saved: dict, source: Path) -> None:
    """Every saved adapter tensor (LoRA + head) is in the model with exactly the saved value."""
    from peft import get_peft_model_state_dict

    # No embedding is ever adapted here; "auto" would look for the base's config.json at the path recorded
    # at training time (another machine's, on Kaggle) and warn that it cannot.
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    if set(saved) != set(loaded):
        raise AdapterError(
            f"{source}: adapter keys do not match the model: missing {sorted(set(saved) - set(loaded))[:5]}, "
            f"unexpected {sorted(set(loaded) - set(saved))[:5]} (wrong base model or LoRA targets?)"
        )
    for name, tensor in saved.items():
        if not torch.equal(loaded[name].detach().cpu(), tensor.to(loaded[name].dtype)):
            raise AdapterError(f"{source}: weight {name} did not load as saved")


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Load a saved adapter (e.g. a training checkpoint) into an existing PeftModel, verified."""
    from peft import set_peft_model_state_dict

    saved, _ = read_adapter(adapter_dir)
    set_peft_model_state_dict(peft_model, saved)
    check_adapter_loaded(peft_model, saved, adapter_dir)
