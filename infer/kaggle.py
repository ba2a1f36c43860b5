"""Kaggle inference entry: an exported dataset (see `python -m train.export`) -> submission.csv.

Usage (on Kaggle the dataset's kaggle_infer.py installs the wheel and passes dataset= for you):
    python -m infer.kaggle dataset=DIR base=BASE_MODEL_DIR infer.workers=2 infer.quantization=8bit infer.compute_dtype=float16
    python -m infer.kaggle dataset=DIR base=gemma2-9b-qlora=/path/a,llama3-8b-qlora=/path/b
    python -m infer.kaggle --help

Reads test.csv and sample_submission.csv from `competition`, checks every dataset file against
its manifest.json (sha256), scores each run member with `infer.predict` (the CV code: load_run
with the infer.* overrides given here, predict_frame over the member's runs) and each length
member with `infer.length.predict_length`, combines the members with the dataset's recipe.json
(`infer.ensemble.apply_recipe`) or, without one, their plain mean, orders the rows like
sample_submission, checks the probabilities (`infer.metrics.check_probs`) and writes the CSV.
"""
from __future__ import annotations

import dataclasses
import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cli.config import ConfigError, UserError, cli_config, opt, run_cli
from cli.output import check_output
from model.run import MANIFEST, verify_files
from model.run import read_manifest as read_run_manifest
from model.settings import InferSettings

# The only Kaggle paths in the repo: where Kaggle mounts inputs and expects the submission.
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_COMPETITION_DIR = f"{KAGGLE_INPUT}/lmsys-chatbot-arena"
KAGGLE_SUBMISSION = "/kaggle/working/submission.csv"
DATASET_FORMAT = 1


@dataclasses.dataclass
class KaggleConfig:
    dataset: str = opt("", "exported dataset folder (manifest.json, members/, optional recipe.json); kaggle_infer.py passes its own folder")
    competition: str = opt(KAGGLE_COMPETITION_DIR, "folder holding test.csv and sample_submission.csv")
    out: str = opt(KAGGLE_SUBMISSION, "submission CSV to write")
    overwrite: bool = opt(False, "replace `out` if it exists")
    base: list[str] = opt([], "base model folder: PATH for every run member, or NAME=PATH for member NAME (comma-separated)")
    verify: bool = opt(True, "check every dataset file's sha256 against manifest.json before predicting")
    infer: InferSettings = dataclasses.field(default_factory=InferSettings, metadata={
        "help": "inference settings for every run member; only the keys given override each run's saved ones "
                "(the exported notebook passes Kaggle's T4 settings: infer.workers=2, infer.quantization=8bit, infer.compute_dtype=float16)"})


class DatasetError(UserError, RuntimeError):
    """An exported dataset folder that is incomplete or does not match its manifest."""


def read_manifest(dataset: Path) -> dict:
    manifest = read_run_manifest(dataset, DatasetError)  # the same file list and checks as a run folder's
    if manifest.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{dataset / MANIFEST}: dataset format {manifest.get('format')!r}, this code reads {DATASET_FORMAT}")
    return manifest


def parse_bases(items: list[str], members: list[str]) -> dict[str, str]:
    """`PATH` (every member) and `NAME=PATH` items -> member name -> base folder."""
    shared, named = "", {}
    for item in items:
        name, eq, path = item.partition("=")
        if eq and "/" not in name:  # NAME=PATH; a path may hold "=" only after a "/"
            if name not in members:
                raise ConfigError(f"base {item!r}: no run member {name!r}; members: {members}")
            named[name] = path
        else:
            shared = item
    return {m: named.get(m, shared) for m in members if named.get(m, shared)}


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def predict_members(dataset: Path, manifest: dict, cfg: KaggleConfig, infer: dict, rows) -> dict:
    """member name -> DataFrame(id + 3 probabilities) in `rows` order; `infer`: the infer.* keys given."""
    from infer.length import predict_length
    from infer.predict import load_run, predict_frame

    members = manifest["members"]
    bases = parse_bases(cfg.base, [n for n, m in members.items() if m["kind"] == "runs"])
    runs = {}
    for name, member in members.items():  # every member's runs checked before hours of scoring, not between
        if member["kind"] == "runs":
            overrides = {**infer, **({"base_path": bases[name]} if name in bases else {})}
            try:
                runs[name] = [load_run(dataset / "members" / name / r, overrides) for r in member["predict"]]
            except ConfigError as err:
                hint = f"; pass base={name}=<base model folder>" if "model.path" in str(err) else ""
                raise ConfigError(f"member {name}: {err}{hint}") from None
    preds = {}
    for name, member in members.items():
        start = time.time()
        if member["kind"] == "length":
            preds[name] = predict_length(json.loads((dataset / "members" / name / member["model"]).read_text()), rows)
        else:
            preds[name] = predict_frame(runs[name], rows)
        print(f"member {name}: {len(rows)} rows in {time.time() - start:.0f} s")
    return preds


def combine(dataset: Path, manifest: dict, preds: dict, rows):
    from infer.metrics import check_probs
    from infer.predict import merge_by_id

    if manifest.get("recipe"):
        from infer.ensemble import apply_recipe, load_recipe

        pred = apply_recipe(load_recipe(dataset / manifest["recipe"]), preds, rows)
    else:
        pred = merge_by_id(list(preds.values()), rows["id"])
    return check_probs(pred, f"{dataset}: the combined predictions (recipe or member bug)")


def main(argv: list[str] | None = None) -> None:
    from data.io import read_competition_csv, read_sample_submission
    from infer.metrics import check_probs
    from infer.predict import merge_by_id, write_predictions

    cfg, given = cli_config(KaggleConfig, __doc__, argv, given=True)
    if not cfg.dataset:
        raise ConfigError("dataset= is required: the exported dataset folder (kaggle_infer.py passes its own)")
    start = time.time()
    out = check_output(cfg.out, cfg.overwrite)
    dataset, competition = Path(cfg.dataset), Path(cfg.competition)
    manifest = read_manifest(dataset)
    for name, exported in manifest["packages"].items():
        here = installed_version(name)
        if here != exported:  # informational: the runs' own training versions are in manifest["runs"]
            print(f"note: {name} {here or 'not installed'} here, {exported} where the dataset was exported")
    if cfg.verify:
        print(f"{dataset}: {verify_files(dataset, manifest['files'], DatasetError)} files match {MANIFEST}")
    rows, report = read_competition_csv(competition / "test.csv", labels=False)
    print(report.summary())
    order = read_sample_submission(competition / "sample_submission.csv", rows["id"])["id"]
    pred = combine(dataset, manifest, predict_members(dataset, manifest, cfg, given.get("infer") or {}, rows), rows)
    pred = check_probs(merge_by_id([pred], order), "submission")  # sample_submission order; its ids must equal test.csv's
    write_predictions(pred, out, cfg.overwrite)
    print(f"wrote {len(pred)} rows to {cfg.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
