"""Kaggle inference entry: an exported dataset (see `python -m train.export`) -> submission.csv.

Usage (on Kaggle the dataset's kaggle_infer.py installs the wheel and passes --dataset for you):
    python -m infer.kaggle --dataset DIR --base BASE_MODEL_DIR [--workers 2]
    python -m infer.kaggle --dataset DIR --base gemma2-9b-qlora=/path/a --base llama3-8b-qlora=/path/b
    python -m infer.kaggle --help

Reads test.csv and sample_submission.csv from `--competition`, checks every dataset file against
its manifest.json (sha256), scores each run member with `infer.predict` (the CV code: load_run
with inference-time overrides, predict_frame over the member's runs) and each length member with
`train.length.predict_length`, combines the members with the dataset's recipe.json
(`infer.ensemble.apply_recipe`) or, without one, their plain mean, orders the rows like
sample_submission, checks that every row sums to 1 and writes the CSV.
Options are `--key value`, `--key=value` or `key=value`; `--base` may be repeated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import typing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from data.config import ConfigError, UserError, build_config, format_help, opt, run_cli, split_argv

# The only Kaggle paths in the repo: where Kaggle mounts inputs and expects the submission.
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_COMPETITION_DIR = f"{KAGGLE_INPUT}/lmsys-chatbot-arena"
KAGGLE_SUBMISSION = "/kaggle/working/submission.csv"
MANIFEST = "manifest.json"
DATASET_FORMAT = 1


@dataclasses.dataclass
class KaggleConfig:
    dataset: str = opt("", "exported dataset folder (manifest.json, members/, optional recipe.json); kaggle_infer.py passes its own folder")
    competition: str = opt(KAGGLE_COMPETITION_DIR, "folder holding test.csv and sample_submission.csv")
    out: str = opt(KAGGLE_SUBMISSION, "submission CSV to write")
    base: list[str] = opt([], "base model folder: PATH for every run member, or NAME=PATH for member NAME (repeatable)")
    workers: int = opt(2, "workers per run: one per GPU (Kaggle: 2 x T4), or CPU processes")
    quantization: str = opt("8bit", "4bit | 8bit | none for the base model; empty: as trained")
    compute_dtype: str = opt("float16", "float16 (T4 has no bf16) | bfloat16 | float32; empty: as trained")
    fp8: bool = opt(False, "fp8 projections (infer.fp8): needs quantization=none compute_dtype=bfloat16 and "
                           "compute capability >= 8.9; Kaggle's T4 has no fp8")
    tta: str = opt("true", "swap TTA: true | false | run (as each run's config says)")
    device: str = opt("", "auto | cpu | cuda; empty: as each run's config says")
    verify: bool = opt(True, "check every dataset file's sha256 against manifest.json before predicting")


class DatasetError(UserError, RuntimeError):
    """An exported dataset folder that is incomplete or does not match its manifest."""


def gnu_argv(cls: type, argv: list[str]) -> list[str]:
    """`--key value` / `--key=value` / `--flag` -> `key=value`; repeated list options are joined with commas."""
    hints = typing.get_type_hints(cls)
    out, lists = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and arg != "--help":
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                following = argv[i + 1] if i + 1 < len(argv) else "--"
                is_bool = hints.get(key) is bool
                takes_value = following.lower() in ("true", "false") if is_bool else not following.startswith("--")
                value = argv[i + 1] if takes_value else "true"
                i += takes_value
            if typing.get_origin(hints.get(key)) is list:
                lists.setdefault(key, []).append(value)
            else:
                out.append(f"{key}={value}")
        else:
            out.append(arg)
        i += 1
    return out + [f"{key}={','.join(values)}" for key, values in lists.items()]


def parse_cli(cls: type, doc: str, argv: list[str]) -> tuple[object, list[str]]:
    """(config, positional words) like data.config.cli_config, accepting GNU-style options."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(doc.strip() + "\n\nSettings (--key value or key=value):\n" + format_help(cls))
        raise SystemExit(0)
    yaml_path, overrides, words = split_argv(gnu_argv(cls, argv))
    try:
        if yaml_path is not None:
            raise ConfigError(f"{yaml_path}: no config file is read here; use --key value")
        return build_config(cls, None, overrides), words
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """relative path -> {sha256, size} for every file under `root` but the manifest itself."""
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def read_manifest(dataset: Path) -> dict:
    path = dataset / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{dataset}: no {MANIFEST}; is this a folder written by `python -m train.export`?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path}: dataset format {manifest.get('format')!r}, this code reads {DATASET_FORMAT}")
    return manifest


def verify_files(dataset: Path, manifest: dict) -> int:
    """Every listed file exists with its size and sha256; files added since the export are ignored."""
    bad = []
    for rel, want in manifest["files"].items():
        path = dataset / rel
        if not path.is_file():
            bad.append(f"{rel}: missing")
        elif path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
            bad.append(f"{rel}: content differs from the manifest")
    if bad:
        raise DatasetError(f"{dataset}: {len(bad)} file(s) do not match {MANIFEST}:\n  " + "\n  ".join(bad[:20]))
    return len(manifest["files"])


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


def _predict_overrides(cfg: KaggleConfig, base: str):
    from infer.predict import PredictConfig

    if cfg.tta not in ("true", "false", "run"):
        raise ConfigError(f"tta must be true, false or run, got {cfg.tta!r}")
    return PredictConfig(
        base_path=base, quantization=cfg.quantization, compute_dtype=cfg.compute_dtype, workers=cfg.workers,
        fp8=cfg.fp8, tta=None if cfg.tta == "run" else cfg.tta == "true", device=cfg.device,
    )


def predict_members(dataset: Path, manifest: dict, cfg: KaggleConfig, rows) -> dict:
    """member name -> DataFrame(id + 3 probabilities) in `rows` order."""
    from infer.predict import load_run, predict_frame

    members = manifest["members"]
    bases = parse_bases(cfg.base, [n for n, m in members.items() if m["kind"] == "runs"])
    preds = {}
    for name, member in members.items():
        start = time.time()
        folder = dataset / "members" / name
        if member["kind"] == "length":
            from train.length import predict_length

            preds[name] = predict_length(json.loads((folder / member["model"]).read_text()), rows)
        else:
            try:
                runs = [load_run(folder / r, _predict_overrides(cfg, bases.get(name, ""))) for r in member["predict"]]
            except ConfigError as err:
                hint = f"; pass --base {name}=<base model folder>" if "model.path" in str(err) else ""
                raise ConfigError(f"member {name}: {err}{hint}") from None
            preds[name] = predict_frame(runs, rows)
        print(f"member {name}: {len(rows)} rows in {time.time() - start:.0f} s")
    return preds


def combine(dataset: Path, manifest: dict, preds: dict, rows):
    from data.io import LABEL_COLS
    from infer.predict import merge_by_id

    if manifest.get("recipe"):
        from infer.ensemble import apply_recipe, load_recipe

        pred = apply_recipe(load_recipe(dataset / manifest["recipe"]), preds, rows)
    else:
        pred = merge_by_id(list(preds.values()), rows["id"])
    probs = pred[list(LABEL_COLS)].to_numpy()
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise DatasetError(f"{dataset}: combined probabilities are not finite rows summing to 1 (recipe or member bug)")
    return pred


LAUNCHER = '''"""Kaggle entry of an exported arena-pref dataset: install its wheel offline, then write the submission.

Usage:
    python kaggle_infer.py --base <base model folder> [--workers 2] [--quantization 8bit] ...
    python kaggle_infer.py --no-install ...   # the arena-pref package is already importable
    python kaggle_infer.py --help             # every option of `python -m infer.kaggle`
--dataset defaults to this file's folder; the other defaults live in infer/kaggle.py.
"""
import importlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pip_install(wheels):
    # --no-index --no-deps: Kaggle runs offline; dependencies come from the image or wheels/.
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--force-reinstall", "--quiet"]
    subprocess.run(cmd + [str(w) for w in wheels], check=True)
    importlib.invalidate_caches()


def main(argv):
    if "--no-install" in argv:
        argv = [a for a in argv if a != "--no-install"]
    else:
        own = sorted(HERE.glob("*.whl"))
        if len(own) != 1:
            raise SystemExit(f"{HERE}: expected one .whl next to kaggle_infer.py, found {[w.name for w in own]}")
        pip_install(sorted((HERE / "wheels").glob("*.whl")) + own)
    if not any(a == "--dataset" or a.startswith(("--dataset=", "dataset=")) for a in argv):
        argv = ["--dataset", str(HERE), *argv]
    from data.config import run_cli
    from infer.kaggle import main as kaggle_main

    run_cli(lambda: kaggle_main(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
'''


def notebook(slug: str, wheel: str, base_args: list[str], summary: str) -> dict:
    def cell(kind: str, text: str) -> dict:
        extra = {"execution_count": None, "outputs": []} if kind == "code" else {}
        return {"cell_type": kind, "metadata": {}, "source": text.strip().splitlines(keepends=True), **extra}

    base = json.dumps([a for item in base_args for a in ("--base", item)])
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python"}},
        "cells": [
            cell("markdown", f"# arena-pref submission\n\n{summary}\n\nAttach the competition, this dataset "
                 "and every base model as inputs; internet off; accelerator GPU T4 x2."),
            cell("code", f"import subprocess, sys\nfrom pathlib import Path\n\nDATASET = Path({KAGGLE_INPUT!r}) / {slug!r}\n"
                 f"if not DATASET.is_dir():  # mount layouts differ between Kaggle versions\n"
                 f"    DATASET = next(Path({KAGGLE_INPUT!r}).glob('**/{wheel}')).parent\n"
                 f"wheels = sorted((DATASET / 'wheels').glob('*.whl')) + [DATASET / {wheel!r}]\n"
                 "subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-index', '--no-deps', '--force-reinstall',\n"
                 "                '--quiet', *map(str, wheels)], check=True)"),
            cell("code", f"# --base PATH for every member, or --base NAME=PATH per member (attached base model folders)\n"
                 f"BASE_ARGS = {base}\nsubprocess.run([sys.executable, str(DATASET / 'kaggle_infer.py'), '--no-install',\n"
                 f"                *BASE_ARGS, '--workers', '2', '--out', {KAGGLE_SUBMISSION!r}], check=True)"),
            cell("code", f"import pandas as pd\n\npd.read_csv({KAGGLE_SUBMISSION!r}).describe()"),
        ],
    }


def main(argv: list[str] | None = None) -> None:
    from data.io import LABEL_COLS, read_competition_csv, read_sample_submission
    from infer.predict import merge_by_id, write_predictions

    cfg, words = parse_cli(KaggleConfig, __doc__, sys.argv[1:] if argv is None else argv)
    if words:
        raise ConfigError(f"unexpected argument(s) {words} (see --help)")
    if not cfg.dataset:
        raise ConfigError("--dataset is required: the exported dataset folder (kaggle_infer.py passes its own)")
    start = time.time()
    dataset, competition = Path(cfg.dataset), Path(cfg.competition)
    manifest = read_manifest(dataset)
    for name, exported in manifest["packages"].items():
        here = installed_version(name)
        if here != exported:  # informational: the runs' own training versions are in manifest["runs"]
            print(f"note: {name} {here or 'not installed'} here, {exported} where the dataset was exported")
    if cfg.verify:
        print(f"{dataset}: {verify_files(dataset, manifest)} files match {MANIFEST}")
    rows, report = read_competition_csv(competition / "test.csv", labels=False)
    print(report.summary())
    order = read_sample_submission(competition / "sample_submission.csv")["id"]
    pred = combine(dataset, manifest, predict_members(dataset, manifest, cfg, rows), rows)
    pred = merge_by_id([pred], order)  # sample_submission order; its id set must equal test.csv's
    sums = pred[list(LABEL_COLS)].sum(axis=1).to_numpy()
    if not np.allclose(sums, 1.0, atol=1e-9):
        raise DatasetError(f"row sums deviate from 1 by up to {np.abs(sums - 1).max():.3g}")
    write_predictions(pred, Path(cfg.out))
    print(f"wrote {len(pred)} rows to {cfg.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
