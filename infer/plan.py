"""Estimate the wall time of an `infer predict` job before running it.

Usage:
    python -m infer plan runs=runs/gemma2-9b-qlora/fold0-seed42,runs/llama3-8b-qlora/fold0-seed42 \\
        csv=input/test.csv [hardware=t4x2] [budget_hours=9] [infer.tta=false] [throughput=1170]

Each run (ensemble member) is read without its model: its saved tokenizer and formatter settings
format every row of the CSV exactly as `infer predict` would (inference max length; both passes
when swap TTA is on), and the rows are cut into batches as inference cuts them (the run's
token_budget and max_rows), which gives the padded token count. Minutes = tokens / (tokens per
second) / 60, members one after another as `infer predict` scores them. The rate comes from
throughput= or from the throughput table (infer/throughput.yaml), keyed by hardware= and the
base model: its `model_type` and size (from its config.json or GGUF header), or family= when that
cannot be read; where the table has no figure, the error says how to measure one. The table's rates count real (unpadded) tokens; count=padded divides the padded count
instead, for a rate measured that way. Over budget_hours a WARN line is printed with the minutes
each knob would save (infer.tta=false, infer predict's infer_max_length at the 90th percentile of row lengths,
dropping the slowest member); the exit code stays 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from cli.config import ConfigError, cli_config, opt
from data.io import read_competition_csv
from infer.predict import score_passes
from infer.scoring import plan_batches
from model.factory import resolve_path
from model.hardware import T4_CAPABILITY, resolve_components
from model.run import Run, load_run
from model.settings import InferSettings
from model.tokens import encode_rows

DEFAULT_TABLE = Path(__file__).with_name("throughput.yaml")
COUNTS = ("real", "padded")


@dataclasses.dataclass
class PlanConfig:
    runs: list[str] = opt([], "run folders, as for infer predict (members are scored one after another)")
    csv: str = opt("", "competition-format CSV that will be scored (test.csv)")
    hardware: str = opt("t4x2", "throughput-table key for the whole machine (t4x2: Kaggle's 2xT4, infer.workers=2)")
    throughput: float = opt(0.0, "tokens per second for every member; 0: look it up in the throughput table")
    throughput_file: str = opt("", "YAML table {hardware: {family: tokens_per_s}}; empty: infer/throughput.yaml")
    family: str = opt("", "model family for the table when a base model's config.json cannot be read (gemma2, llama)")
    count: str = opt("real", "which tokens the rate counts: real (unpadded, as the table) or padded")
    budget_hours: float = opt(9.0, "time budget (a Kaggle GPU notebook: 9 h); over it, WARN and the knobs to turn")
    infer: InferSettings = dataclasses.field(default_factory=InferSettings, metadata={
        "help": "inference settings (tta, token_budget, layout, ...); only the keys given override each run's saved ones"})


def read_run(path: Path, infer: dict | None = None) -> Run:
    """A run folder's saved settings and tokenizer (verified); the base model is not needed."""
    return load_run(Path(path), infer, need_base=False)


def member_name(run: Run) -> str:
    return f"{run.path.parent.name}/{run.path.name}"


def model_info(run: Run) -> tuple[str, float] | None:
    """(model_type, non-embedding parameters in billions) of the run's base, from its config (config.json or
    the GGUF header); None where it cannot be read. Parameters: attention q/k/v/o and three MLP matrices
    per layer (the Llama / Gemma-2 layout), which sets the FLOPs per token and so the rate."""
    from transformers import AutoConfig

    try:
        folder = resolve_path(run.model.path)
        gguf = {"gguf_file": run.model.gguf_file} if run.model.gguf_file else {}
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **gguf)
    except (ConfigError, OSError, ValueError):
        return None
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * config.intermediate_size
    return config.model_type, config.num_hidden_layers * per_layer / 1e9


SIZE_TOLERANCE = 0.3  # a rate serves models within 30 % of the size it was measured with


class ThroughputTable:
    """Callable run -> tokens/s from a {hardware: {model key: tokens_per_s}} YAML; `used` says what was looked up.

    A model key is a family (`model_type`), or family-<size> for another size of it; the table's
    `sizes` section gives each key's non-embedding parameters, and a run's base must be within
    SIZE_TOLERANCE of them (a 135M Llama is not timed like an 8B one). Without `sizes`, keys are families.
    """

    def __init__(self, path: Path, hardware: str, family: str = ""):
        if not Path(path).is_file():
            raise ConfigError(f"throughput table {path} not found; pass throughput=TOKENS_PER_S")
        table = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ConfigError(f"{path}: expected {{hardware: {{model: tokens_per_s}}}}")
        self.sizes = table.pop("sizes", {})
        self.path, self.table, self.hardware, self.family = Path(path), table, hardware, family
        self.used: dict[str, str] = {}

    def key_for(self, run: Run) -> tuple[str, str | None, str]:
        """(family, table key or None when no size fits, how it was found) for the run's base model."""
        info = model_info(run)
        if info is None:
            if not self.family:
                raise ConfigError(f"{run.path}: cannot tell the model family (no readable config in model.path="
                                  f"{run.model.path}); pass family=NAME (e.g. gemma2, llama) or throughput=TOKENS_PER_S")
            return self.family, self.family, "family="
        family, params = info
        if not self.sizes:
            return family, family, "config"
        fits = [k for k, size in self.sizes.items()
                if k.split("-")[0] == family and abs(params / size - 1) <= SIZE_TOLERANCE]
        return family, (fits[0] if fits else None), f"config: {family}, {params:.3g} B non-embedding parameters"

    def how_to_measure(self, run: Run, key: str) -> str:
        return (f"measure it on {self.hardware}: `python -m infer predict runs={run.path} csv=<rows> infer.tta=false` "
                "prints each worker's tokens/s after its first batch; add their sum as "
                f"{self.hardware}: {{{key}: <tokens/s>}} to {self.path} (a new size also under `sizes`), "
                "or pass throughput=TOKENS_PER_S")

    def __call__(self, run: Run) -> float:
        family, key, origin = self.key_for(run)
        known = {hw: sorted(k for k, v in keys.items() if v is not None) for hw, keys in self.table.items()}
        if self.hardware not in self.table or key is None:
            why = "no such key: no rates for that hardware" if self.hardware not in self.table else f"no model key of that size (sizes: {self.sizes})"
            raise ConfigError(f"{self.path}: no tokens/s for hardware={self.hardware}, family={family} (from {origin}; "
                              f"{why}; measured: {known}); {self.how_to_measure(run, key or family + '-<size>')}")
        value = self.table[self.hardware].get(key)
        if value is None:
            why = "not measured yet" if key in self.table[self.hardware] else "no such key"
            raise ConfigError(f"{self.path}: no tokens/s for hardware={self.hardware}, family={key} (from {origin}; "
                              f"{why}; measured: {known}); {self.how_to_measure(run, key)}")
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{self.path}: {self.hardware}.{key} must be a positive number, got {value!r}")
        self.used[member_name(run)] = f"{key} ({origin}) on {self.hardware}: {value} tokens/s"
        return float(value)


def row_lengths(run: Run, df: pd.DataFrame, passes: list[dict]) -> list[list[int]]:
    """Per pass (infer.predict.score_passes): the token count of every row as `infer predict` formats it for
    this run (its ids stay in the token cache, where predict finds them)."""
    formatter = run.formatter()
    return [list(map(len, encode_rows(formatter, df, inference=True, desc="rows to plan", **kw))) for kw in passes]


def pass_name(kw: dict) -> str:
    return f"side {kw['side']}" if "side" in kw else "swap" if kw["swap"] else "plain"


def _tokenizer_key(run: Run) -> str:
    digest = hashlib.sha1()
    for f in sorted(p for p in (run.path / "tokenizer").iterdir() if p.is_file()):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest() + json.dumps(dataclasses.asdict(run.format), sort_keys=True)


def batch_widths(lengths: list[int], infer: InferSettings, layout: str) -> list[float]:
    """Per row: the tokens computed for it, padding included (plan_batches, as inference batches).

    Padded layout: the width of its batch. Packed: its length plus its share of the bin's tail.
    """
    widths = [0.0] * len(lengths)
    batches, costs = plan_batches(lengths, infer, layout)
    for batch, cost in zip(batches, costs):
        real = sum(lengths[i] for i in batch)
        for i in batch:
            widths[i] = cost * lengths[i] / real if layout == "packed" else lengths[batch[0]]
    return widths


def minutes(passes: list[list[int]], infer: InferSettings, layout: str, rate: float, count: str) -> float:
    """Minutes to score one member: its passes are batched together, as score_run does."""
    lengths = [n for p in passes for n in p]
    tokens = sum(batch_widths(lengths, infer, layout)) if count == "padded" else sum(lengths)
    return tokens / rate / 60


def target_settings(run: Run, hardware: str) -> tuple[str, InferSettings]:
    """(layout, inference settings) `infer predict` will batch with on `hardware`: model.hardware.resolve_components
    (its one rule) at that hardware's compute capability (t4*: 7.5, so the T4 profile's padded batches and eager
    score budget; cpu*: none; any other: Ampere or newer)."""
    capability = None if hardware.startswith("cpu") else T4_CAPABILITY if hardware.startswith("t4") else (8, 0)
    info = model_info(run)
    components = resolve_components(capability, info[0] if info else "", run.model, run.infer)
    return components.layout, components.infer


def plan(runs: list[Run], df: pd.DataFrame, throughput_for: Callable[[Run], float], budget_hours: float,
         count: str = "real", hardware: str = "t4x2") -> tuple[pd.DataFrame, list[str]]:
    """One row per member and pass (rows, tokens, padded tokens, tokens/s, minutes) and budget warnings."""
    if count not in COUNTS:
        raise ConfigError(f"count must be one of {COUNTS}, got {count!r}")
    rates = [float(throughput_for(run)) for run in runs]  # a missing rate stops before the slow part
    cache: dict[str, dict[str, list[int]]] = {}  # the folds of one config share tokenizer and format
    rows, members = [], []
    for run, rate in zip(runs, rates):
        names = {pass_name(kw): kw for kw in score_passes(run)}
        known = cache.setdefault(_tokenizer_key(run), {})
        todo = [name for name in names if name not in known]
        if todo:
            known.update(zip(todo, row_lengths(run, df, [names[name] for name in todo])))
        passes = [known[name] for name in names]
        flat = [n for p in passes for n in p]
        layout, infer = target_settings(run, hardware)
        widths = batch_widths(flat, infer, layout)
        for j, name in enumerate(names):
            tokens, padded = sum(passes[j]), sum(widths[j * len(df) : (j + 1) * len(df)])
            rows.append({"member": member_name(run), "pass": name, "rows": len(df),
                         "tokens": tokens, "padded_tokens": round(padded), "tokens_per_s": rate,
                         "minutes": (padded if count == "padded" else tokens) / rate / 60})
        members.append({"run": run, "rate": rate, "passes": passes, "layout": layout, "infer": infer,
                        "minutes": minutes(passes, infer, layout, rate, count)})
    table = pd.DataFrame(rows)
    return table, budget_warnings(members, budget_hours, count)


def budget_warnings(members: list[dict], budget_hours: float, count: str) -> list[str]:
    """Empty within budget; else a WARN line and what each knob would save, computed from the lengths."""
    total, budget = sum(m["minutes"] for m in members), budget_hours * 60
    if total <= budget:
        return []

    def outcome(new_total: float) -> str:
        verdict = "fits" if new_total <= budget else "still over"
        return f"saves {total - new_total:.1f} min -> {new_total:.1f} min total ({verdict})"

    out = [f"WARN: estimated {total:.1f} min ({total / 60:.2f} h) exceeds budget_hours={budget_hours:g} ({budget:.0f} min)"]
    if any(len(m["passes"]) > 1 for m in members):
        plain = sum(minutes(m["passes"][:1], m["infer"], m["layout"], m["rate"], count) for m in members)
        out.append(f"  infer.tta=false: {outcome(plain)}")
    capped, changes = 0.0, {}
    for m in members:
        limit = m["run"].format.infer_max_length or m["run"].format.max_length
        # A row longer than the new limit comes out of the formatter exactly that long, any truncation mode.
        cap = max(8, math.ceil(np.percentile(m["passes"][0], 90)))
        if cap < limit:
            changes[f"{member_name(m['run'])} {limit} -> {cap}"] = None  # dict: a member listed twice is named once
            capped += minutes([[min(n, cap) for n in p] for p in m["passes"]], m["infer"], m["layout"], m["rate"], count)
        else:
            capped += m["minutes"]
    if changes:
        out.append(f"  infer_max_length at the 90th percentile of row lengths ({', '.join(changes)}; "
                   f"a key of infer predict): {outcome(capped)}")
    if len(members) > 1:
        slowest = max(members, key=lambda m: m["minutes"])
        out.append(f"  drop the slowest member {member_name(slowest['run'])} "
                   f"({slowest['minutes']:.1f} min): {outcome(total - slowest['minutes'])}")
    return out


def format_table(table: pd.DataFrame) -> str:
    width = max(len("member"), *(len(m) for m in table["member"]))
    head = f"{'member':<{width}} {'pass':<5} {'rows':>7} {'tokens':>11} {'padded':>11} {'tokens/s':>9} {'minutes':>8}"
    lines = [head]
    for r in table.itertuples(index=False):
        lines.append(f"{r.member:<{width}} {r[1]:<5} {r.rows:>7} {r.tokens:>11} {r.padded_tokens:>11} "
                     f"{r.tokens_per_s:>9.0f} {r.minutes:>8.1f}")
    lines.append(f"{'total':<{width}} {'':<5} {table['rows'].sum():>7} {table['tokens'].sum():>11} "
                 f"{table['padded_tokens'].sum():>11} {'':>9} {table['minutes'].sum():>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg, given = cli_config(PlanConfig, __doc__, argv, given=True)
    if not cfg.runs or not cfg.csv:
        raise ConfigError("runs= and csv= are required (see python -m infer plan --help)")
    if cfg.throughput < 0 or cfg.budget_hours <= 0:
        raise ConfigError(f"throughput must be >= 0 and budget_hours > 0, got {cfg.throughput}, {cfg.budget_hours}")
    runs = [read_run(Path(r), (given.get("infer") or {})) for r in cfg.runs]
    if cfg.throughput:
        throughput_for, source = (lambda run: cfg.throughput), [f"throughput={cfg.throughput:g} tokens/s for every member"]
    else:
        throughput_for = ThroughputTable(Path(cfg.throughput_file or DEFAULT_TABLE), cfg.hardware, cfg.family)
        source = []
        for run in runs:  # a missing rate stops here, before the CSV is parsed
            throughput_for(run)
    df, report = read_competition_csv(cfg.csv, labels=False)
    print(report.summary())
    table, warnings = plan(runs, df, throughput_for, cfg.budget_hours, cfg.count, cfg.hardware)
    if isinstance(throughput_for, ThroughputTable):
        source = [f"{name}: {text} from {throughput_for.path}" for name, text in throughput_for.used.items()]
    print("\n".join(source))
    print(f"minutes = {cfg.count} tokens / tokens/s / 60; padded = tokens computed including padding "
          f"(rows x longest row per batch, or packed width per batch)")
    print(format_table(table))
    total = table["minutes"].sum()
    print("\n".join(warnings) if warnings else f"within budget: {total:.1f} of {cfg.budget_hours * 60:.0f} min")
