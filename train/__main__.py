"""Train QLoRA 3-class preference models fold by fold and report CV log loss.

Usage:
    python -m train configs/gemma2-9b-qlora.yaml fold=0
    python -m train configs/gemma2-9b-qlora.yaml fold=all seed=7 train.lr=1e-4
    torchrun --nproc_per_node=2 -m train configs/gemma2-9b-qlora.yaml fold=all    # DDP, one GPU per process
    python -m train --help

Each fold trains on the other folds (plus `data.extra_csv` rows), saves a self-contained run
folder, and scores its held-out rows with `infer` (the code the submission uses): oof.csv and
the fold's log loss land in the run folder. `fold=all` runs every fold and prints the CV table
(per fold and overall OOF log loss, next to the class prior of the training folds).
Under torchrun every process trains on its share of each step's rows (train.batch_size is per
process) and rank 0 alone writes the run folder, the OOF file and the CV summary.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from cli.config import cli_config, run_cli, split_argv
from cli.output import check_output
from data.io import LABEL_COLS, targets_by_id
from infer.metrics import cv_table, log_loss
from infer.predict import write_predictions
from train.config import TrainConfig
from train.distributed import dist_rank
from train.fold import fold_rows, load_rows, train_fold
from train.state import run_dir_for
from train.tracking import log_cv


def cv_summary(cfg: TrainConfig, results: list[dict], df: pd.DataFrame) -> str:
    """The CV table; with fold=all also the all-fold OOF file and cv-seed<s>.json."""
    oof = pd.concat([pd.read_csv(run_dir_for(cfg, m["fold"]) / "oof.csv") for m in results], ignore_index=True)
    overall = log_loss(targets_by_id(df, oof["id"]), oof[list(LABEL_COLS)].to_numpy())
    table, prior = cv_table(results, overall, len(oof))
    if cfg.fold == "all":  # a single-fold run must not replace the summary of a complete CV
        summary = {"folds": results, "oof_log_loss": overall, "prior_log_loss": prior, "rows": len(oof)}
        out = Path(cfg.output_dir) / cfg.name
        (out / f"cv-seed{cfg.seed}.json").write_text(json.dumps(summary, indent=2))
        write_predictions(oof, out / f"oof-seed{cfg.seed}.csv")
        log_cv(cfg, summary)  # wandb (train.report_to): the CV table in a run of job type cv
    return table


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = cli_config(TrainConfig, __doc__, argv)
    yaml_path, _, _ = split_argv(argv)
    if not cfg.name:
        if yaml_path is None:
            raise SystemExit("config error: give a config file or name=")
        cfg = dataclasses.replace(cfg, name=yaml_path.stem)
    # Run folders have their own contract (model.run); the folder must take files before any work.
    check_output(Path(cfg.output_dir) / cfg.name, overwrite=True, folder=True)
    df, excluded = load_rows(cfg)
    folds = sorted(int(f) for f in set(df["fold"]))
    if cfg.fold == "all":
        todo = folds
    elif cfg.fold.lstrip("-").isdigit() and int(cfg.fold) in folds:
        todo = [int(cfg.fold)]
    else:
        raise SystemExit(f"config error: fold={cfg.fold!r} is neither `all` nor one of {folds}")
    rows = fold_rows(cfg, df, excluded, todo)  # every file read, every teacher probability joined: no model loaded yet
    rank, _ = dist_rank()
    results = []
    for fold in todo:
        metrics = train_fold(cfg, fold, *rows[fold])
        if rank == 0:
            print(f"fold {fold}: log loss {metrics['log_loss']:.4f} (class prior {metrics['prior_log_loss']:.4f})")
        results.append(metrics)
    if rank == 0:
        print("\nCV (OOF log loss vs class prior of the training folds)\n" + cv_summary(cfg, results, df))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
