"""Token ids of formatted rows, made once through `datasets` and kept on disk.

Every reader of token ids (training, OOF scoring, `infer predict`, `infer plan`) calls `encode_rows`.
Rows are stored under a key of their content (prompt and both responses), in a folder named by all
else that decides their ids: formatter name, version and settings, the tokenizer, swap and the
length limit. So `fold=all` tokenises each row once for all folds, OOF scoring reads the ids its
training made (the same limit unless format.infer_max_length differs), and a second predict of the
same file tokenises nothing. Missing rows go through `Dataset.map` (batched; several processes for
large inputs; a progress bar), saved as one part, written beside its final name and renamed when
whole. Each part's files are checked against their sha256 at every use: a damaged part is an error
that names the folder to delete, never ids passed on.
Cache folder: $ARENA_PREF_CACHE/tokens, else ~/.cache/arena-pref/tokens.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import datasets
import pandas as pd
from datasets.fingerprint import Hasher

from cli.output import as_if_created
from data.formatter import Formatter
from model.files import MANIFEST, AdapterError, file_table, verify_files
from model.gguf import cache_root

# Processes only pay off with enough rows each: starting one and sending it the tokenizer costs ~1 s.
ROWS_PER_PROCESS = 2000
TEXT_COLS = ("prompt", "response_a", "response_b")


def settings_key(formatter: Formatter, swap: bool, inference: bool, side: str) -> dict:
    """Everything besides a row's text that decides its ids (max_length only through the limit used)."""
    settings = {k: v for k, v in formatter.describe().items() if k not in ("max_length", "infer_max_length")}
    return {**settings, "limit": formatter.max_length(inference), "swap": swap, "side": side,
            "tokenizer": tokenizer_key(formatter)}


def tokenizer_key(formatter: Formatter) -> str:
    """The tokenizer by what it computes (its rules, and the ids the formatter adds), so the copy a run folder
    saved hashes like the one training loaded; datasets' Hasher, which pickles the whole object, is the
    fallback for a tokenizer without a tokenizers backend."""
    backend = getattr(formatter.tok, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else Hasher.hash(formatter.tok)
    return hashlib.sha256(json.dumps([rules, formatter.prefix, formatter.eos_id, formatter.pad_id]).encode()).hexdigest()


def row_keys(df: pd.DataFrame) -> list[str]:
    return [hashlib.blake2b(json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            for row in zip(*(df[c] for c in TEXT_COLS))]


def encode_rows(formatter: Formatter, df: pd.DataFrame, *, swap: bool = False, inference: bool = False,
                side: str = "", desc: str = "") -> list[list[int]]:
    """formatter.encode_batch of every row of `df`, in order, each row tokenised at most once per settings;
    side="a" or "b": formatter.encode_sides of the prompt with that response alone."""
    if side not in ("", "a", "b") or (side and swap):
        raise ValueError(f"side must be '', 'a' or 'b' (and side rows have no swap), got side={side!r} swap={swap}")
    start = time.perf_counter()
    settings = settings_key(formatter, swap, inference, side)
    folder = cache_root() / "tokens" / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    keys = row_keys(df)
    parts, where = _read_parts(folder)
    first = {}
    for i, k in enumerate(keys):
        if k not in where:
            first.setdefault(k, i)
    if first:
        part = _tokenise(formatter, df.iloc[list(first.values())], list(first), settings, folder, inference, desc)
        parts.append(part)
        where.update({k: (len(parts) - 1, i) for i, k in enumerate(first)})  # the part holds them in this order
    ids: list[list[int] | None] = [None] * len(keys)
    wanted: dict[int, list[tuple[int, int]]] = {}
    for pos, k in enumerate(keys):
        j, i = where[k]
        wanted.setdefault(j, []).append((pos, i))
    for j, pairs in wanted.items():
        rows = parts[j].select([i for _, i in pairs]).with_format("arrow")["input_ids"].to_pylist()
        for (pos, _), row in zip(pairs, rows):
            ids[pos] = row
    cached = len(set(keys)) - len(first)
    what = f"side {side}" if side else f"swap={swap}"
    print(f"{desc or 'tokens'}: {len(keys)} rows ({what}, limit {settings['limit']}), {cached} unique from the cache, "
          f"{len(first)} tokenised, {time.perf_counter() - start:.1f} s ({folder})")
    return ids


@contextlib.contextmanager
def _quiet_save() -> Iterator[None]:
    """No "Saving the dataset" bar (a copy of what was just tokenised, under a second) for this block only."""
    was_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def in_memory(columns: dict, fingerprint: str = "") -> datasets.Dataset:
    """A Dataset of Python columns with a given fingerprint: datasets would otherwise make one by pickling the
    whole table (slow for large data, and failing on Python 3.12 with pyarrow 26: "Can't pickle MonthDayNano")."""
    table = datasets.table.InMemoryTable.from_pydict(columns)
    return datasets.Dataset(table, fingerprint=fingerprint or uuid.uuid4().hex)


def _column(part: datasets.Dataset, name: str) -> list:
    return part.with_format("arrow")[name].to_pylist()  # one Arrow conversion, not one Python row at a time


def _read_parts(folder: Path) -> tuple[list[datasets.Dataset], dict[str, tuple[int, int]]]:
    """The verified parts of a settings folder and where each key lives (part, row)."""
    parts, where = [], {}
    if not folder.is_dir():
        return parts, where
    for part_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            verify_files(part_dir, json.loads((part_dir / MANIFEST).read_text())["files"])
        except (AdapterError, OSError, ValueError, KeyError) as err:
            raise AdapterError(f"token cache: {err}; delete {part_dir} and its rows are tokenised again") from None
        part = datasets.load_from_disk(str(part_dir))
        for i, k in enumerate(_column(part, "key")):
            where.setdefault(k, (len(parts), i))
        parts.append(part)
    return parts, where


def _tokenise(formatter: Formatter, rows: pd.DataFrame, keys: list[str], settings: dict, folder: Path,
              inference: bool, desc: str) -> datasets.Dataset:
    """Format and tokenise `rows` with Dataset.map and save them as a new part of `folder`."""
    name = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]
    table = in_memory({"key": keys, **{c: list(rows[c]) for c in TEXT_COLS}}, name)
    procs = max(1, min(os.cpu_count() or 1, len(keys) // ROWS_PER_PROCESS))
    swap, side = settings["swap"], settings["side"]

    def encode(batch: dict) -> dict:
        if side:
            return {"input_ids": formatter.encode_sides(batch["prompt"], batch[f"response_{side}"], inference=inference)}
        return {"input_ids": formatter.encode_batch(batch["prompt"], batch["response_a"], batch["response_b"],
                                                    swap=swap, inference=inference)}

    features = datasets.Features({"key": datasets.Value("string"), "input_ids": datasets.List(datasets.Value("int32"))})
    encoded = table.map(encode, batched=True, batch_size=256, num_proc=procs if procs > 1 else None,
                        remove_columns=list(TEXT_COLS), features=features, keep_in_memory=True,
                        desc=f"{desc or 'tokenising'} ({f'side {side}' if side else f'swap={swap}'})",
                        new_fingerprint=name + "-ids")
    target = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "settings.json").is_file():
        (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    tmp = as_if_created(Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=".partial")))
    try:
        with _quiet_save():
            encoded.save_to_disk(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps({"rows": len(keys), "files": file_table(tmp)}, indent=1))
        try:
            tmp.rename(target)
        except OSError:  # another process (a DDP rank) saved the same rows first: theirs serve
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))
