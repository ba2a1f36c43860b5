"""What `python -m train` records in wandb (train.report_to=wandb; through infer.tracking: offline unless
WANDB_MODE says otherwise, wandb never imported with report_to=none). Every run is grouped by the config
name (`group=name`), rank 0 alone records.

- job type `train-fold`, one run per fold (name `<name>-fold<k>-seed<s>`, as the Trainer named it): the
  resolved config (the run folder's config.yaml, verified), the Trainer's training loss, and in the
  summary the fold's metrics as the manifest records them: `oof_log_loss`, `prior_log_loss`, `rows`
  (+ `accuracy`, `log_loss_2class` on tie-free labels), `reused` and `stage`.
- A fold that is not trained in this process is never logged as if it were: a finished run reused with
  the same settings (every file verified) gets a short run tagged `reused` with `reused=true`, its verified
  metrics and its own config.yaml (keys outside the settings, e.g. train.report_to, are those it was
  trained with), no training curve; one resumed at OOF scoring or publishing (a kill after its adapter
  was saved) is tagged `resumed`, its summary `stage` says where (`score` or `publish`).
- job type `cv` (fold=all only), name `<name>-cv-seed<s>`: the CV table as a wandb.Table `cv_table` (per fold
  and `all`: rows, log_loss, prior, + the two tie-free columns when the table has them) and the overall
  `oof_log_loss`, `prior_log_loss`, `rows` in the summary.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from cli.config import to_dict
from infer.tracking import Tracker, start
from train.config import TrainConfig
from train.distributed import dist_rank
from train.state import run_dir_for

TWO_CLASS = ("accuracy", "log_loss_2class")


def _config(cfg: TrainConfig, fold: int | str) -> dict:
    return to_dict(dataclasses.replace(cfg, fold=str(fold)))  # what save_run writes to config.yaml


def _fold_summary(metrics: dict, stage: str) -> dict:
    out = {"fold": metrics["fold"], "rows": metrics["rows"], "oof_log_loss": metrics["log_loss"],
           "prior_log_loss": metrics["prior_log_loss"], "reused": stage == "reuse", "stage": stage}
    return out | {k: metrics[k] for k in TWO_CLASS if k in metrics}


def fold_run(cfg: TrainConfig, fold: int, action: str, rank: int | None = None) -> Tracker:
    """The fold's run, started before its Trainer (which then logs its loss into it); action as
    train.state.fold_state gives it. A no-op Tracker off rank 0 or without wandb."""
    if (dist_rank()[0] if rank is None else rank) != 0:
        return Tracker()
    tags = {"train": [], "reuse": ["reused"]}.get(action, ["resumed"])
    return start(cfg.train.report_to, group=cfg.name, job_type="train-fold", name=f"{cfg.name}-fold{fold}-seed{cfg.seed}",
                 config=_config(cfg, fold), tags=tags)


def finish_fold(track: Tracker, run_dir: Path, metrics: dict, action: str) -> dict:
    """Record the finished (verified) run folder's config.yaml and metrics, finish the run; returns `metrics`."""
    if track:
        # Last word on the config: the Trainer's own `output_dir` and `seed` went over the resolved ones.
        track.config(yaml.safe_load((run_dir / "config.yaml").read_text()))
        track.summary(_fold_summary(metrics, action))
        track.finish()
    return metrics


def log_reused_fold(cfg: TrainConfig, fold: int, manifest: dict) -> None:
    """A finished fold reused without training: its verified config and metrics, tagged `reused`, nothing else."""
    finish_fold(fold_run(cfg, fold, "reuse"), run_dir_for(cfg, fold), manifest["metrics"], "reuse")


def cv_rows(summary: dict) -> list[dict]:
    """The CV table (infer.metrics.cv_table's numbers) as rows: per fold, then `all` (prior and the
    tie-free columns row-weighted, as cv_table does)."""
    folds = summary["folds"]
    extra = [k for k in TWO_CLASS if folds and all(k in m for m in folds)]
    rows = [{"fold": str(m["fold"]), "rows": m["rows"], "log_loss": m["log_loss"], "prior": m["prior_log_loss"],
             **{k: m[k] for k in extra}} for m in folds]
    total = summary["rows"]
    rows.append({"fold": "all", "rows": total, "log_loss": summary["oof_log_loss"], "prior": summary["prior_log_loss"],
                 **{k: sum(m[k] * m["rows"] for m in folds) / total for k in extra}})
    return rows


def log_cv(cfg: TrainConfig, summary: dict) -> None:
    """fold=all: the CV summary (as cv-seed<s>.json holds it) in a run of job type `cv`."""
    with start(cfg.train.report_to, group=cfg.name, job_type="cv", name=f"{cfg.name}-cv-seed{cfg.seed}",
               config=_config(cfg, "all")) as track:
        track.table("cv_table", cv_rows(summary))
        track.summary({"oof_log_loss": summary["oof_log_loss"], "prior_log_loss": summary["prior_log_loss"],
                       "rows": summary["rows"]})
