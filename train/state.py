"""Where a fold stands before anything is written: the settings that decide its result, and whether
its run folder is reused, published, scored or trained (from a checkpoint). Every rank of a
data-parallel run reads the same answer from disk."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cli.config import ConfigError, to_dict
from model.files import AdapterError, sha256_file
from model.run import ADAPTER_FILE, partial_dir, run_folder, settings_diff, verify_run
from train.config import TrainConfig, extra_csv_path
from train.distill import teacher_digest


def run_dir_for(cfg: TrainConfig, fold: int) -> Path:
    return Path(cfg.output_dir) / cfg.name / f"fold{fold}-seed{cfg.seed}"


# Keys that locate or drive a run but do not change its result (1 and N workers score identically).
NOT_SETTINGS = {"": ("overwrite", "resume", "name", "output_dir"), "train": ("report_to", "logging_steps", "save_steps"),
                "infer": ("workers",)}


def _digest(path: str) -> str:
    return f"sha256:{sha256_file(Path(path))}" if Path(path).is_file() else f"missing:{path}"


def fold_settings(cfg: TrainConfig, fold: int) -> dict:
    """Everything that decides a fold's result, data files by content: a finished run is reused only for these."""
    raw = to_dict(dataclasses.replace(cfg, fold=str(fold)))
    for section, keys in NOT_SETTINGS.items():
        for key in keys:
            (raw[section] if section else raw).pop(key)
    data = raw["data"]
    data["train_csv"], data["folds_csv"] = _digest(data["train_csv"]), _digest(data["folds_csv"])
    data["extra_csv"] = [_digest(extra_csv_path(p, fold)) for p in data["extra_csv"]]
    data["exclude_prompts_of"] = [_digest(p) for p in data["exclude_prompts_of"]]
    if cfg.train.init_from:
        raw["train"]["init_from"] = _digest(str(run_folder(cfg.train.init_from) / ADAPTER_FILE))
    if cfg.train.distill_from:
        raw["train"]["distill_from"] = teacher_digest(cfg.train.distill_from)
    return raw


def differences(saved: dict, settings: dict) -> list[str]:
    """settings_diff against TrainConfig's defaults: a setting added since a run was made, asked for at its
    default (the code's behaviour before it existed), does not make the run differ."""
    return settings_diff(saved, settings, defaults=to_dict(TrainConfig()))


def _refuse(run: Path, what: str, differ: list[str]) -> ConfigError:
    return ConfigError(f"{run} {what} with other settings:\n  " + "\n  ".join(differ[:20]) +
                       "\nrun with the settings above, pass overwrite=true to retrain (the old run stays until the new "
                       "one is complete), or give this run another name=")


def resume_point(cfg: TrainConfig, work: Path, settings: dict) -> Path | None:
    """The last checkpoint of a killed run of the same settings, or None to start afresh."""
    from transformers.trainer_utils import get_last_checkpoint

    trainer_dir = work / "trainer"
    if cfg.resume != "auto" or not trainer_dir.is_dir():
        return None
    last = get_last_checkpoint(str(trainer_dir))
    if last is None:
        return None
    saved = trainer_dir / "settings.json"
    differ = differences(json.loads(saved.read_text()), settings) if saved.is_file() else ["settings.json: missing"]
    if differ:
        if cfg.overwrite:  # checkpoints of other settings: start afresh
            return None
        raise _refuse(work, "holds checkpoints of a run (different config)", differ)
    return Path(last)


def fold_state(cfg: TrainConfig, fold: int, settings: dict) -> tuple[str, dict | None, Path | None]:
    """(action, manifest, checkpoint) read from disk before anything is written, the same on every rank:
    reuse a finished run | publish a complete .partial | score a trained one | train (from a checkpoint)."""
    run_dir = run_dir_for(cfg, fold)
    work = partial_dir(run_dir)
    # overwrite=true replaces runs of other settings; one of the same settings (finished, trained or
    # checkpointed, e.g. by an earlier overwrite=true that was killed) is reused or resumed either way.
    if run_dir.exists():
        try:
            manifest = verify_run(run_dir, stage="complete")
            differ = differences(manifest.get("settings", {}), settings)
        except AdapterError:
            if not cfg.overwrite:
                raise
            manifest, differ = None, ["the finished run does not verify"]
        if not differ:
            return "reuse", manifest, None
        if not cfg.overwrite:
            raise _refuse(run_dir, "is finished", differ)
    if (work / "manifest.json").is_file():
        try:
            manifest = verify_run(work)
        except AdapterError as err:
            print(f"fold {fold}: {work} cannot be resumed ({err}); training afresh")
            return "train", None, None
        differ = differences(manifest.get("settings", {}), settings)
        if not differ:
            return ("publish" if manifest["stage"] == "complete" else "score"), manifest, None
        if not cfg.overwrite:
            raise _refuse(work, "was trained (not yet scored)", differ)
        return "train", None, None
    return "train", None, resume_point(cfg, work, settings)
