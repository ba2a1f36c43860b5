"""The files an export writes for Kaggle: the launcher script kaggle_infer.py and the notebook that runs it.

Both only install the exported wheel offline and call `python -m infer.kaggle` (what runs on Kaggle
lives there); the notebook passes Kaggle's 2xT4 settings explicitly.
"""
from __future__ import annotations

import json

from infer.kaggle import KAGGLE_INPUT, KAGGLE_SUBMISSION

# 2 x T4: one worker per card, 8-bit weights (more exact than 4-bit; in T4 mode 0.96x the NF4 seed on Llama-3 but
# 0.60x on Gemma-2 with random weights, README: Performance), fp16 (no bf16 on a T4). The faster fp16 layer split
# (infer.pipeline=2) is not the default until it has run on two real GPUs.
T4_SETTINGS = ["infer.workers=2", "infer.quantization=8bit", "infer.compute_dtype=float16"]


LAUNCHER = '''"""Kaggle entry of an exported arena-pref dataset: install its wheel offline, then write the submission.

Usage:
    python kaggle_infer.py base=<base model folder> infer.workers=2 infer.quantization=8bit infer.compute_dtype=float16
    python kaggle_infer.py --no-install ...   # the arena-pref package is already importable
    python kaggle_infer.py --help             # every setting of `python -m infer.kaggle`
dataset= defaults to this file's folder; the other settings are those of infer/kaggle.py.
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
    if not any(a.startswith(("dataset=", "--dataset=")) for a in argv):
        argv = [f"dataset={HERE}", *argv]
    from cli.config import run_cli
    from infer.kaggle import main as kaggle_main

    run_cli(lambda: kaggle_main(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
'''


def notebook(slug: str, wheel: str, base_args: list[str], summary: str) -> dict:
    def cell(kind: str, text: str) -> dict:
        extra = {"execution_count": None, "outputs": []} if kind == "code" else {}
        return {"cell_type": kind, "metadata": {}, "source": text.strip().splitlines(keepends=True), **extra}

    base = json.dumps([f"base={','.join(base_args)}"] if base_args else [])
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
            cell("code", f"# base=PATH for every member, or base=NAME=PATH,NAME=PATH per member (attached base model folders)\n"
                 f"BASE_ARGS = {base}\nT4 = {T4_SETTINGS!r}\n"
                 f"subprocess.run([sys.executable, str(DATASET / 'kaggle_infer.py'), '--no-install',\n"
                 f"                *BASE_ARGS, *T4, 'out={KAGGLE_SUBMISSION}'], check=True)"),
            cell("code", f"import pandas as pd\n\npd.read_csv({KAGGLE_SUBMISSION!r}).describe()"),
        ],
    }
