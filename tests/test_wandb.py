"""wandb tracking, read back from the offline run files on disk: `python -m train` with
train.report_to=wandb (fold runs, the CV run, a reused fold) and `infer report report_to=wandb`;
train.report_to=none never imports wandb.

Offline runs write their media (PNGs, table JSON) under files/media/, but config, summary, group, job
type and tags only into the binary run-<id>.wandb log, which wandb 0.31 has no public reader for:
`wandb_records` below reads it.
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import SAMPLE, train_args

NAME = "tiny-llama"  # the config's stem: the group of every run
FAST = ("model.quantization=none", "train.max_steps=2", "train.logging_steps=1", "train.swap_aug=false",
        "infer.tta=false", "data.max_train_rows=32")


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file (a LevelDB-style log): a 7-byte header (b':W&B', magic 0xBEE1,
    version), then 32 KiB blocks of chunks, each behind a 7-byte header (crc32 of type + data, length,
    type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a chunk header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, head = path.read_bytes(), 32768, 7
    assert struct.unpack("<4sHB", data[:head])[:2] == (b":W&B", 0xBEE1), path
    pos, parts = head, b""
    while pos + head <= len(data):
        if block - pos % block < head:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        if kind == 0:  # zero fill
            break
        chunk = data[pos + head:pos + head + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos, parts = pos + head + length, parts + chunk
        if kind in (1, 4):
            yield Record.FromString(parts)
            parts = b""


def merge(target: dict, items) -> dict:
    """Config / summary / history items (`key`, or a `nested_key` path, and `value_json`) into a dict."""
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
    return target


def read_run(run_dir: Path) -> dict:
    """One offline run: name, group, job type, tags, merged config and summary, history rows, media files."""
    out = {"dir": run_dir, "config": {}, "summary": {}, "history": [], "exit": False,
           "media": sorted(p.relative_to(run_dir / "files").as_posix() for p in (run_dir / "files").rglob("media/**/*.*"))}
    for rec in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                       tags=list(rec.run.tags))
            merge(out["config"], rec.run.config.update)
        elif kind == "config":
            merge(out["config"], rec.config.update)
        elif kind == "summary":
            merge(out["summary"], rec.summary.update)
        elif kind == "history":
            out["history"].append(merge({}, rec.history.item))
        elif kind == "exit":
            out["exit"] = True
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_llama, sample_folds):
    """fold 0 with report_to=none (wandb unimportable), then fold=all with wandb (fold 0 reused, fold 1
    trained, the CV run), then the report of its OOF file with wandb; the runs read back from disk."""
    from infer.report import main as report_main
    from train.__main__ import main as train_main

    tmp = tmp_path_factory.mktemp("wandb")
    folds = tmp / "folds.csv"  # two folds: two small trainings
    pd.read_csv(sample_folds).assign(fold=lambda f: f["fold"] % 2).to_csv(folds, index=False)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            mp.setenv(var, str(tmp / var.lower()))  # nothing lands in $HOME
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.delenv("WANDB_PROJECT", raising=False)
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()  # an earlier test's settings (WANDB_MODE=disabled) would stay
        with pytest.MonkeyPatch.context() as blocked:
            blocked.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
            train_main(train_args("tiny-llama.yaml", tiny_llama, folds, tmp, "fold=0", "train.report_to=none", *FAST))
        offline = tmp / "wandb_dir" / "wandb"
        assert not offline.exists()
        train_main(train_args("tiny-llama.yaml", tiny_llama, folds, tmp, "fold=all", "train.report_to=wandb", *FAST))
        report_main([f"oof={tmp / NAME / 'oof-seed42.csv'}", f"labels={SAMPLE / 'train.csv'}", f"folds={folds}",
                     f"out={tmp / 'report'}", "report_to=wandb"])
        import wandb

        wandb.teardown()  # flushes the run files, and the next wandb user reads its own settings
    runs = [read_run(d) for d in sorted(offline.glob("offline-run-*"))]
    return tmp, runs


def by_job(runs: list[dict], job_type: str) -> list[dict]:
    return [r for r in runs if r["job_type"] == job_type]


def test_runs_are_grouped_by_name_with_job_types(tracked):
    _, runs = tracked
    assert sorted(r["job_type"] for r in runs) == ["cv", "report", "train-fold", "train-fold"]
    assert {r["group"] for r in runs} == {NAME} and all(r["exit"] for r in runs)
    assert sorted(r["name"] for r in runs) == [f"{NAME}-cv-seed42", f"{NAME}-fold0-seed42", f"{NAME}-fold1-seed42",
                                                f"{NAME}-report"]


def test_fold_runs_hold_the_resolved_config_and_oof_metrics(tracked):
    tmp, runs = tracked
    for run in by_job(runs, "train-fold"):
        fold = run["summary"]["fold"]
        folder = tmp / NAME / f"fold{fold}-seed42"
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert {k: run["config"][k] for k in saved} == saved  # the resolved config, as config.yaml holds it
        metrics = json.loads((folder / "metrics.json").read_text())
        assert run["summary"]["oof_log_loss"] == pytest.approx(metrics["log_loss"])
        assert run["summary"]["prior_log_loss"] == pytest.approx(metrics["prior_log_loss"])
        assert run["summary"]["rows"] == metrics["rows"]


def test_trained_fold_logs_its_loss_and_reused_fold_is_marked(tracked):
    _, runs = tracked
    folds = {r["summary"]["fold"]: r for r in by_job(runs, "train-fold")}
    trained, reused = folds[1], folds[0]  # fold 0 was trained earlier with report_to=none
    assert trained["summary"]["reused"] is False and trained["tags"] == []
    assert any("train/loss" in h for h in trained["history"])
    assert reused["summary"]["reused"] is True and reused["tags"] == ["reused"]
    assert reused["summary"]["stage"] == "reuse" and not reused["history"]  # nothing trained, nothing re-logged


def test_cv_run_holds_the_cv_table(tracked):
    tmp, runs = tracked
    (cv,) = by_job(runs, "cv")
    summary = json.loads((tmp / NAME / "cv-seed42.json").read_text())
    assert cv["config"]["fold"] == "all"
    assert cv["summary"]["oof_log_loss"] == pytest.approx(summary["oof_log_loss"])
    assert cv["summary"]["prior_log_loss"] == pytest.approx(summary["prior_log_loss"])
    (table_file,) = [m for m in cv["media"] if m.endswith(".table.json")]
    assert cv["summary"]["cv_table"]["path"] == table_file
    table = json.loads((cv["dir"] / "files" / table_file).read_text())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert table["columns"][:4] == ["fold", "rows", "log_loss", "prior"] and list(rows) == ["0", "1", "all"]
    for m in summary["folds"]:
        assert rows[str(m["fold"])]["log_loss"] == pytest.approx(m["log_loss"])
        assert rows[str(m["fold"])]["prior"] == pytest.approx(m["prior_log_loss"])
    assert rows["all"]["rows"] == summary["rows"] == 300
    assert rows["all"]["prior"] == pytest.approx(summary["prior_log_loss"])


def test_report_run_holds_the_plots(tracked):
    tmp, runs = tracked
    (report,) = by_job(runs, "report")
    pngs = sorted(p.stem for p in (tmp / "report").glob("*.png"))
    assert pngs and sorted(k for k in report["summary"] if k.startswith("report/")) == [f"report/{s}" for s in pngs]
    for stem in pngs:
        image = report["summary"][f"report/{stem}"]
        assert image["_type"] == "image-file" and image["path"] in report["media"]
        assert (report["dir"] / "files" / image["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
