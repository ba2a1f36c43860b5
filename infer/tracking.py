"""Experiment tracking (wandb) for every entry point that records runs: `python -m train` (folds, CV
table; train/tracking.py says what) and `python -m infer report` (its plots).

Off unless asked (`report_to=wandb`); then offline unless WANDB_MODE says otherwise, so nothing leaves
the machine by default (`wandb sync <WANDB_DIR>/wandb/offline-run-*` uploads later). Runs go to the
project WANDB_PROJECT (default arena-pref), grouped by the config name, one job type per kind of run.
wandb is imported only when tracking is on: with report_to=none it is never imported.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT = "arena-pref"


def wanted(report_to: str | list[str]) -> bool:
    """Whether a `report_to` setting (`wandb`, `none`, `tensorboard`, or a list of them) asks for wandb."""
    return "wandb" in ([report_to] if isinstance(report_to, str) else report_to)


class Tracker:
    """One wandb run, or nothing (every method a no-op) when tracking is off. As a context manager it
    finishes the run, marked failed (exit code 1) when the block raised."""

    def __init__(self, run=None):
        self.run = run

    def __bool__(self) -> bool:
        return self.run is not None

    def config(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def table(self, key: str, rows: list[dict]) -> None:
        """rows: dicts with the same keys (the columns, in the first row's order); logged as a wandb.Table."""
        if self.run is not None and rows:
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})

    def images(self, paths: list[Path], prefix: str) -> None:
        """Each PNG as wandb.Image under `prefix/<file stem>`, all in one step."""
        if self.run is not None and paths:
            import wandb

            self.run.log({f"{prefix}/{Path(p).stem}": wandb.Image(str(p)) for p in paths})

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


def start(report_to: str | list[str], *, group: str, job_type: str, name: str, config: dict | None = None,
          tags: tuple[str, ...] | list[str] = ()) -> Tracker:
    """A new run (a no-op Tracker unless `report_to` asks for wandb). A run a failed caller left open is
    finished first, so nothing of this run lands in another one."""
    if not wanted(report_to):
        return Tracker()
    os.environ.setdefault("WANDB_MODE", "offline")  # no network on the training boxes by default
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), group=group, job_type=job_type, name=name,
                     config=config or {}, tags=list(tags), reinit="finish_previous")
    return Tracker(run)
