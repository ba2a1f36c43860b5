"""The run folder: writing it, reading it, and every integrity check on it, for training and inference alike.

`runs/<name>/fold<k>-seed<s>/` holds what inference needs (README: Run folders). Training builds
it as `fold<k>-seed<s>.partial/` and renames it into place only once it is complete, so a kill or
an `overwrite=true` retraining never leaves a half-written folder under the final name. Its
manifest.json lists the size and sha256 of every other file in the folder; `verify_run` checks
all of them (and that the adapter holds its head) before any base model loads, and every reader
(inference, export, a pre-stage's `train.init_from`) goes through it. Stages: "trained" (adapter,
tokenizer, config and manifest written: a kill after this resumes at OOF scoring) and "complete"
(OOF and metrics written). The manifest's `settings` are everything that decides the run's
result, so a finished run is only ever reused for the same settings (`settings_diff`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import yaml

from cli.config import ConfigError, UserError, from_dict
from data.formatter import FORMATTER_VERSION, FormatConfig, Formatter
from model.factory import HEAD_SIZES, PooledClassifier, check_base, head_to_fp32, load_base, peft_reads_deprecated_flag
from model.files import (MANIFEST, AdapterError, check_adapter_loaded, file_table, head_checksum, is_temporary, read_adapter,
                         verify_files)
from model.settings import InferSettings, ModelConfig, inference_model

ADAPTER_FILE = "adapter/adapter_model.safetensors"
# Files inference cannot do without; the manifest must list them (with every other file).
REQUIRED = (ADAPTER_FILE, "adapter/adapter_config.json", "config.yaml")
STAGES = ("trained", "complete")


def read_manifest(folder: Path, error=AdapterError) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise error(f"{path}: missing; {folder} was not written by this code, or not completely")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise error(f"{path}: no file list (written by an older version of this code, or edited): retrain the run")
    return manifest


def check_run_manifest(folder: Path, manifest: dict) -> None:
    """The keys a run folder's manifest must hold, so a hand-edited one fails in one line, not a KeyError."""
    problems = [key for key in ("formatter", "head") if not isinstance(manifest.get(key), dict)]
    if manifest.get("stage", "trained") not in STAGES:
        problems.append(f"stage {manifest.get('stage')!r} (not one of {STAGES})")
    if problems:
        raise AdapterError(f"{folder / MANIFEST}: missing or invalid {problems}; not a run folder's manifest")


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Seal the folder: the manifest lists every other file's size and sha256; written last, atomically."""
    manifest = {**manifest, "files": file_table(folder, exclude=("trainer/",))}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(folder / MANIFEST)
    return manifest


def verify_run(folder: Path, stage: str = "trained") -> dict:
    """The manifest of a run folder whose every file matches it, at `stage` or later; AdapterError naming
    the first file that does not. Reads no model: call it before a base loads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such run folder")
    manifest = read_manifest(folder)
    check_run_manifest(folder, manifest)
    missing = [rel for rel in REQUIRED if rel not in manifest["files"]]
    if missing:
        raise AdapterError(f"{folder / MANIFEST}: does not list {missing}; not a complete run folder")
    # What loading reads (adapter/, tokenizer/) must be exactly what was sealed: a stray file there, e.g.
    # a tokenizer file left by copying one run over another, would change the token ids unchecked.
    loaded = {rel for part in ("adapter", "tokenizer") for p in (folder / part).rglob("*")
              if p.is_file() and not is_temporary(rel := p.relative_to(folder).as_posix())}
    unlisted = sorted(loaded - set(manifest["files"]))
    if unlisted:
        raise AdapterError(f"{folder / unlisted[0]}: not in {folder / MANIFEST} ({len(unlisted)} unlisted file(s) "
                           "under adapter/ or tokenizer/); loading would read it unchecked")
    verify_files(folder, manifest["files"])
    if STAGES.index(manifest.get("stage", "trained")) < STAGES.index(stage):
        raise AdapterError(f"{folder}: training stage {manifest.get('stage')!r}, not {stage!r}")
    if manifest["formatter"]["version"] != FORMATTER_VERSION:
        raise AdapterError(f"{folder}: trained with formatter version {manifest['formatter']['version']}, this code has "
                           f"{FORMATTER_VERSION}; token ids would differ from training")
    key, head = adapter_head(folder)
    if key != manifest["head"]["key"] or head_checksum(head) != manifest["head"]["sha256"]:
        raise AdapterError(f"{folder / ADAPTER_FILE}: head {key} differs from the manifest's {manifest['head']['key']}")
    objective = run_objective(manifest)
    if objective["name"] not in HEAD_SIZES or head.shape[0] != HEAD_SIZES[objective["name"]]:
        raise AdapterError(f"{folder}: objective {objective['name']!r} with a head of {head.shape[0]} output(s); "
                           f"expected one of {HEAD_SIZES}")
    return manifest


def run_objective(manifest: dict) -> dict:
    """{"name": "classify"} or {"name": "bradley_terry", "tie_rate": τ} (runs before the objective was recorded classify)."""
    return manifest.get("objective", {"name": "classify"})


def adapter_head(folder: Path) -> tuple[str, torch.Tensor]:
    """(key, tensor) of the classification head inside a run's (or a checkpoint's) adapter file."""
    from model.factory import HEAD

    adapter = folder / "adapter" if (folder / ADAPTER_FILE).is_file() else folder
    saved, file = read_adapter(adapter)
    keys = [k for k in saved if k.endswith(f"{HEAD}.weight")]
    if not keys:
        raise AdapterError(
            f"{file}: no classification head ('{HEAD}.weight') in the adapter; the run would predict with a "
            "random head. Retrain, or save with task_type=SEQ_CLS so the head is in modules_to_save."
        )
    return keys[0], saved[keys[0]]


def write_trained(folder: Path, peft_model, tokenizer, config: dict, manifest: dict) -> dict:
    """Stage "trained": adapter (LoRA + head), tokenizer, resolved config.yaml and the sealed manifest."""
    peft_model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    key, head = adapter_head(folder)
    head_info = {"key": key, "shape": list(head.shape), "sha256": head_checksum(head)}
    return write_manifest(folder, {**manifest, "stage": "trained", "head": head_info})


def write_complete(folder: Path, metrics: dict) -> dict:
    """Stage "complete": after the OOF files are written, metrics.json and the manifest resealed over all."""
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return write_manifest(folder, {**read_manifest(folder), "stage": "complete", "metrics": metrics})


def run_folder(path: Path) -> Path:
    """A run folder, given as itself or as its adapter/ (as train.init_from accepts it)."""
    path = Path(path)
    return path.parent if path.name == "adapter" else path


def partial_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".partial")


class RunBusy(UserError):
    """Another process is training this fold's run folder now."""


@contextlib.contextmanager
def fold_lock(run_dir: Path):
    """Hold `<run>.lock` while this process builds the run folder, so two processes never train one fold's `.partial`
    at once (e.g. a rerun started before the first run ended). An exclusive flock, which the kernel drops when its
    holder ends, however it ends: no stale locks to judge. The file names its holder (pid, host, start) for the
    message a second trainer stops with."""
    import fcntl

    lock = run_dir.with_name(run_dir.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = json.loads(lock.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                raise RunBusy(f"{run_dir}: being trained by process {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')} since {holder.get('started', '?')} ({lock}); wait for it to "
                              "finish") from None
            except OSError as err:  # e.g. ENOLCK: a network filesystem without locks
                raise RunBusy(f"{lock}: cannot be locked ({err}); keep output_dir on a local disk") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False  # its last holder removed it between our open and our lock: take the new file
            if same:
                me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(me).encode())
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # still holding it: whoever opened this file meanwhile sees it gone and retries
        os.close(fd)


def publish(partial: Path, run_dir: Path) -> None:
    """Move a complete partial folder to its final name, replacing an older run only now."""
    old = run_dir.with_name(run_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        run_dir.rename(old)
    partial.rename(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def settings_diff(saved: dict, wanted: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two settings mappings (one line each: key: saved -> wanted).

    `defaults` (the same shape) are the settings' default values: a key the saved settings lack is no
    difference when the wanted value is its default, since a setting added to the code after a run was
    made defaults to what the code did before it existed.
    """
    out, defaults = [], defaults or {}
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out += settings_diff(a, b, f"{prefix}{key}.", sub if isinstance(sub, dict) else None)
        elif key not in saved and key in defaults and b == defaults[key]:
            continue
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclasses.dataclass
class Run:
    """A verified run folder: its resolved settings (inference overrides applied) and manifest."""

    path: Path
    model: ModelConfig  # the base as inference builds it (inference_model)
    format: FormatConfig
    infer: InferSettings
    manifest: dict

    @property
    def objective(self) -> dict:
        return run_objective(self.manifest)

    def formatter(self) -> Formatter:
        """The formatter exactly as the run was trained with: its saved tokenizer and format settings."""
        from transformers import AutoTokenizer

        return Formatter(AutoTokenizer.from_pretrained(self.path / "tokenizer", local_files_only=True), self.format)


def load_run(path: Path, infer: dict | None = None, infer_max_length: int | None = None, need_base: bool = True) -> Run:
    """A run folder, verified file by file, with `infer` (raw infer.* overrides) applied over its saved settings.

    need_base=False is for tools that only use the saved settings and tokenizer (infer plan).
    """
    path = Path(path)
    manifest = verify_run(path)
    raw = yaml.safe_load((path / "config.yaml").read_text())
    try:
        settings = from_dict(InferSettings, {**raw["infer"], **(infer or {})}, f"{path}/config.yaml:infer + overrides")
        fmt = from_dict(FormatConfig, raw["format"], f"{path}/config.yaml:format")
        if infer_max_length is not None:
            fmt = dataclasses.replace(fmt, infer_max_length=infer_max_length)
        model = inference_model(from_dict(ModelConfig, raw["model"], f"{path}/config.yaml:model"), settings)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    if need_base:
        check_base(model)
    return Run(path, model, fmt, settings, manifest)


def load_model(run_dir: Path, cfg: ModelConfig, device: torch.device, pad_token_id: int,
               packed: bool = False) -> PooledClassifier:
    """Base per `cfg` (precision may differ from training) + the run's adapter, tensor by tensor as saved.

    The adapter file is checked against the manifest again here: workers load it in their own process.
    packed=True loads the padding-free attention (model.packing) for packed batches.
    """
    from peft import PeftModel

    manifest = read_manifest(run_dir)
    verify_files(run_dir, {rel: manifest["files"][rel] for rel in REQUIRED})
    saved, _ = read_adapter(run_dir / "adapter")
    model = load_base(cfg, pad_token_id, device, packed=packed, head_restored=True,
                      num_labels=HEAD_SIZES[run_objective(manifest)["name"]])
    head_to_fp32(model)
    with peft_reads_deprecated_flag():
        peft_model = PeftModel.from_pretrained(model, run_dir / "adapter", is_trainable=False)
    check_adapter_loaded(peft_model, saved, run_dir / "adapter")
    print(f"{run_dir}: adapter and head loaded and verified (head sha256 {manifest['head']['sha256'][:12]})")
    return PooledClassifier(peft_model).eval()
