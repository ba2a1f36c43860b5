"""Write a small synthetic sample in the competition's CSV format (train, test, sample submission).

Usage:
  python -m data.synth out=data/sample n_train=300 n_test=60 seed=0

The sample exists so the whole pipeline (folds, training, inference, submission) can run on a CPU
in seconds, and so that a tiny randomly initialised model has something it can actually learn.

Signal: every response has a hidden quality. A good response mixes words from a small "good"
vocabulary (excellent, correct, clear, ...) with neutral filler, a bad one words from a "bad"
vocabulary (wrong, unclear, sorry, ...). The better response wins; equal quality is a tie. An
empty response loses to a non-empty one, identical responses tie, and `label_noise` of the rows
get a uniformly random label. Prompts repeat (about `rows_per_prompt` rows each, sometimes with
different case or spacing) so folds must group by prompt.

The cells also carry the awkward parts of the real data: multi-turn rows (2-3 turns), rows whose
prompt and response turn counts differ, JSON `null` turns, lone UTF-16 surrogates written as the
escape `\\ud83d`, valid emoji, empty and identical responses. Output is a pure function of the
settings: the same seed writes byte-identical files.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cli.config import cli_config, opt, run_cli
from cli.output import check_output, write_file
from data.io import LABEL_COLS, read_competition_csv

GOOD = ["excellent", "correct", "clear", "helpful", "precise", "accurate", "thorough", "concise", "insightful",
        "detailed", "useful", "relevant", "complete", "friendly", "elegant", "solid"]
BAD = ["wrong", "unclear", "sorry", "confusing", "incorrect", "vague", "irrelevant", "broken", "useless",
       "rude", "sloppy", "messy", "missing", "false", "cannot", "unsure"]
FILLER = ["the", "answer", "is", "here", "this", "that", "it", "we", "can", "so", "and", "then", "you",
          "result", "step", "first", "next", "also", "note", "because", "which", "with", "output", "value",
          "code", "line", "example", "part", "way", "idea"]
PROMPT_WORDS = ["explain", "write", "python", "function", "history", "rome", "summarise", "poem", "list",
                "recipe", "bread", "physics", "sort", "array", "email", "travel", "tips", "compare", "cats",
                "dogs", "why", "how", "what", "is", "the", "a", "of", "in", "to", "for", "my", "please",
                "short", "story", "about", "math", "proof", "prime", "numbers", "translate", "french"]
MODELS = ["alpha-7b", "beta-13b", "gamma-chat", "delta-70b", "epsilon-mini", "zeta-instruct", "eta-large",
          "theta-v2"]
LONE_SURROGATE = "\ud83d"  # the first half of an emoji, cut off: real Arena cells contain these
EMOJI = "\U0001F600"


@dataclasses.dataclass
class SynthConfig:
    out: str = opt("data/sample", "output folder for train.csv, test.csv and sample_submission.csv")
    overwrite: bool = opt(False, "replace those three files where they exist (the committed sample: only to regenerate it)")
    n_train: int = opt(300, "rows in train.csv")
    n_test: int = opt(60, "rows in test.csv")
    seed: int = opt(0, "seed of numpy's default_rng; the same seed gives byte-identical files")
    rows_per_prompt: float = opt(3.0, "average rows sharing one prompt (grouped folds need repeats)")
    multi_turn_rate: float = opt(0.1, "share of rows whose prompt has 2-3 turns")
    same_quality_rate: float = opt(0.24, "chance that B has A's quality in an ordinary row (sets the tie rate)")
    label_noise: float = opt(0.07, "share of rows whose label is replaced by a uniformly random class")
    empty_rate: float = opt(0.035, "share of rows where one response is empty ('' or null turns)")
    identical_rate: float = opt(0.035, "share of rows where both responses are the same text")
    surrogate_rate: float = opt(0.02, "share of rows with a lone UTF-16 surrogate in a response")

    def __post_init__(self) -> None:
        if self.n_train < 10 or self.n_test < 1:
            raise ValueError(f"n_train must be >= 10 and n_test >= 1, got {self.n_train}, {self.n_test}")
        rates = {k: getattr(self, k) for k in ("multi_turn_rate", "same_quality_rate", "label_noise",
                                                "empty_rate", "identical_rate", "surrogate_rate")}
        bad = {k: v for k, v in rates.items() if not 0 <= v <= 1}
        if bad or self.empty_rate + self.identical_rate > 1 or self.rows_per_prompt < 1:
            raise ValueError(f"rates must lie in [0, 1] (empty + identical <= 1), rows_per_prompt >= 1: {rates}")


def _words(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), n)]


def _make_prompts(rng: np.random.Generator, n: int, multi: set[int]) -> list[list[str]]:
    prompts = []
    for i in range(n):
        n_turns = int(rng.integers(2, 4)) if i in multi else 1
        # Whole prompts stay within 5-20 words however many turns, so rows stay short.
        hi = max(6, 20 // n_turns + 1)
        prompts.append([" ".join(_words(rng, PROMPT_WORDS, int(rng.integers(5, hi)))) for _ in range(n_turns)])
    return prompts


def _vary(rng: np.random.Generator, turns: list[str]) -> list[str]:
    """The same prompt as a user might retype it: case and spacing change, prompt_key does not."""
    style = rng.integers(0, 3)
    if style == 0:
        return [t[:1].upper() + t[1:] for t in turns]
    if style == 1:
        return [t.replace(" ", "  ") + " " for t in turns]
    return [t.upper() for t in turns]


def _response(rng: np.random.Generator, good: bool, n_turns: int) -> list[str]:
    turns = []
    hi = max(6, 36 // n_turns + 1)
    for _ in range(n_turns):
        n = int(rng.integers(5, hi))
        words = _words(rng, FILLER, n)
        # At least two quality words per turn keeps the signal readable by a tiny model.
        n_quality = max(2, int(rng.binomial(n, 0.5)))
        for pos, word in zip(rng.choice(n, n_quality, replace=False), _words(rng, GOOD if good else BAD, n_quality)):
            words[pos] = word
        turns.append(" ".join(words))
    return turns


def _pick(rng: np.random.Generator, n: int, rate: float, exclude: set[int]) -> set[int]:
    """Row positions for a special case: a fixed count (at least one when rate > 0), none from `exclude`."""
    free = np.array(sorted(set(range(n)) - exclude))
    k = min(len(free), max(1, round(rate * n))) if rate > 0 else 0
    return set(rng.choice(free, k, replace=False).tolist()) if k else set()


def generate(cfg: SynthConfig, n: int, ids: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """`n` labelled rows with list-valued text columns (None marks a null turn) and a `label` column."""
    n_prompts = max(1, round(n / cfg.rows_per_prompt))
    # Every prompt is used at least once, so the number of distinct prompts is n_prompts.
    which = np.concatenate([rng.permutation(n_prompts)[: min(n, n_prompts)],
                            rng.integers(0, n_prompts, max(0, n - n_prompts))])
    rng.shuffle(which)
    # Multi-turn prompts are picked until they cover multi_turn_rate of the rows (not of the prompts),
    # so the row share does not swing with how often each prompt happened to be reused.
    uses = np.bincount(which, minlength=n_prompts)
    multi: set[int] = set()
    covered = 0
    for p in rng.permutation(n_prompts):
        if covered >= cfg.multi_turn_rate * n:
            break
        multi.add(int(p))
        covered += int(uses[p])
    pool = _make_prompts(rng, n_prompts, multi)
    empty = _pick(rng, n, cfg.empty_rate, set())
    identical = _pick(rng, n, cfg.identical_rate, empty)
    surrogate = _pick(rng, n, cfg.surrogate_rate, empty | identical)
    seen: set[int] = set()
    rows = []
    for pos in range(n):
        prompt = list(pool[which[pos]])
        if which[pos] in seen and rng.random() < 0.3:
            prompt = _vary(rng, prompt)
        seen.add(int(which[pos]))
        n_turns = len(prompt)
        q_a = bool(rng.random() < 0.5)
        q_b = q_a if rng.random() < cfg.same_quality_rate else not q_a
        a, b = _response(rng, q_a, n_turns), _response(rng, q_b, n_turns)
        label = 2 if q_a == q_b else (0 if q_a else 1)
        if pos in empty:
            empty_turn = None if rng.random() < 0.5 else ""
            if rng.random() < 0.5:
                a, label = [empty_turn] * n_turns, 1
            else:
                b, label = [empty_turn] * n_turns, 0
        elif pos in identical:
            b, label = list(a), 2
        elif n_turns > 1 and rng.random() < 0.4:
            # A conversation cut short on one side: turn counts differ, a null marks a lost turn.
            side = a if rng.random() < 0.5 else b
            if rng.random() < 0.5:
                side.pop()
            else:
                side[-1] = None
        if pos in surrogate:
            # Only one side was cut short, so one of the two ends in text.
            side = a if a[-1] else b
            side[-1] = side[-1] + " " + LONE_SURROGATE
        elif pos not in identical and rng.random() < 0.03 and b[-1]:
            b[-1] = b[-1] + " " + EMOJI
        if rng.random() < cfg.label_noise:
            label = int(rng.integers(0, 3))
        model_a, model_b = rng.choice(len(MODELS), 2, replace=False)
        rows.append({"id": int(ids[pos]), "model_a": MODELS[model_a], "model_b": MODELS[model_b],
                     "prompt": prompt, "response_a": a, "response_b": b, "label": label})
    return pd.DataFrame(rows)


def to_cell(turns: list) -> str:
    """JSON list as the competition writes it; text with lone surrogates can only be written escaped."""
    text = json.dumps(turns, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(turns, ensure_ascii=True)
    return text


def build(cfg: SynthConfig) -> dict[str, pd.DataFrame]:
    """The three CSV frames (train, test, sample_submission) with JSON-list text cells."""
    rng = np.random.default_rng(cfg.seed)
    ids = rng.choice(9_000_000, cfg.n_train + cfg.n_test, replace=False) + 1_000_000
    train_ids, test_ids = np.sort(ids[: cfg.n_train]), np.sort(ids[cfg.n_train :])
    frames = {}
    for name, n, part_ids in (("train", cfg.n_train, train_ids), ("test", cfg.n_test, test_ids)):
        df = generate(cfg, n, part_ids, rng)
        for col in ("prompt", "response_a", "response_b"):
            df[col] = df[col].map(to_cell)
        for k, col in enumerate(LABEL_COLS):
            df[col] = (df["label"] == k).astype(int)
        frames[name] = df.drop(columns="label")
    frames["train"] = frames["train"][["id", "model_a", "model_b", "prompt", "response_a", "response_b",
                                       *LABEL_COLS]]
    frames["test"] = frames["test"][["id", "prompt", "response_a", "response_b"]]
    frames["sample_submission"] = pd.DataFrame({"id": test_ids, **{c: 1 / 3 for c in LABEL_COLS}})
    return frames


def write_sample(cfg: SynthConfig) -> dict[str, Path]:
    """Write the three CSVs into cfg.out; returns their paths by name."""
    out = Path(cfg.out)
    frames = build(cfg)
    paths = {name: check_output(out / f"{name}.csv", cfg.overwrite) for name in frames}  # all three before any
    for name, df in frames.items():
        write_file(paths[name], lambda tmp, df=df: df.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8"),
                   cfg.overwrite)
    return paths


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(SynthConfig, __doc__, argv)
    paths = write_sample(cfg)
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    # Read back with the real reader: the sample must parse with no bad rows.
    train, report = read_competition_csv(paths["train"], labels=True)
    print(report.summary())
    shares = train["label"].value_counts(normalize=True).sort_index()
    print("class shares a/b/tie: " + " / ".join(f"{shares.get(k, 0):.1%}" for k in range(3)))
    _, test_report = read_competition_csv(paths["test"], labels=False)
    print(test_report.summary())


if __name__ == "__main__":
    run_cli(main)
