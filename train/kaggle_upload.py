"""Upload an exported dataset folder with the Kaggle API (create, or add a version).

Used by `python -m train.export ... --upload`. The kaggle package is imported only here and only
after `upload_problems()` found nothing missing: importing it without credentials exits the
process (SystemExit, which `except Exception` does not catch).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from cli.config import UserError


class UploadError(UserError, RuntimeError):
    """The Kaggle API refused or failed an upload."""


def credentials_problem() -> str | None:
    """What is missing for the Kaggle API to authenticate (None: nothing), without importing kaggle.

    Accepted, as current kaggle releases read them: an API token in KAGGLE_API_TOKEN (or the file it
    names) or in ~/.kaggle/access_token; the older KAGGLE_USERNAME + KAGGLE_KEY; the older kaggle.json.
    """
    token = os.environ.get("KAGGLE_API_TOKEN", "").strip()
    if token:
        if token.startswith(("/", "~")) and not Path(token).expanduser().is_file():
            return f"KAGGLE_API_TOKEN names the file {token}, which does not exist"
        return None
    if any(Path(f).expanduser().is_file() and Path(f).expanduser().read_text().strip()
           for f in ("~/.kaggle/access_token", "~/.kaggle/access_token.txt")):
        return None
    env = {k: bool(os.environ.get(k)) for k in ("KAGGLE_USERNAME", "KAGGLE_KEY")}
    if all(env.values()):
        return None
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR")
    files = [Path(config_dir) / "kaggle.json"] if config_dir else [Path.home() / ".kaggle/kaggle.json", Path.home() / ".config/kaggle/kaggle.json"]
    for file in files:
        if file.is_file():
            try:
                if {"username", "key"} <= set(json.loads(file.read_text())):
                    return None
            except (json.JSONDecodeError, TypeError):
                pass
            return f"{file} exists but is not JSON with \"username\" and \"key\""
    unset = [k for k, ok in env.items() if not ok]
    return ("no Kaggle credentials. Create an API token at https://www.kaggle.com/settings (API), then give it in "
            "one of three ways: (1) export KAGGLE_API_TOKEN=<token> (or save it as ~/.kaggle/access_token); "
            f"(2) export KAGGLE_USERNAME=<user> KAGGLE_KEY=<key> ({' and '.join(unset)} not set); (3) the older "
            f"kaggle.json saved as {' or '.join(map(str, files))} (chmod 600)")


def upload_problems() -> list[str]:
    problems = [] if importlib.util.find_spec("kaggle") else ["the kaggle package is not installed: pip install kaggle"]
    return problems + [p for p in [credentials_problem()] if p]


def upload(out: Path, dataset_id: str, notes: str, public: bool) -> None:
    # importing kaggle authenticates at import time, so this runs only after upload_problems() came back empty
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    try:
        api.dataset_status(dataset_id)
        exists = True
    except Exception as err:  # the API raises its HTTP client's error type; only "not found" means new
        if "404" not in str(err) and "not found" not in str(err).lower():
            raise UploadError(f"cannot tell whether {dataset_id} exists: {err}") from None
        exists = False
    if exists:
        result = api.dataset_create_version(str(out), version_notes=notes, convert_to_csv=False, dir_mode="zip")
    else:
        result = api.dataset_create_new(str(out), public=public, convert_to_csv=False, dir_mode="zip")
    if str(getattr(result, "status", "")).lower() != "ok":
        raise UploadError(f"upload of {out} as {dataset_id} failed: {getattr(result, 'error', result)}")
    print(f"{'new version of' if exists else 'created'} {dataset_id}: {getattr(result, 'url', '')}")
