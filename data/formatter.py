"""The one formatter: (prompt turns, response A turns, response B turns, swap) -> token ids.

Training, OOF scoring and the Kaggle submission all call `Formatter.encode_batch`; A/B swap is a
parameter, never a second copy of the prompt code. Every text piece (tags and each turn) is
tokenised on its own, so truncation can cut content without ever cutting a tag, and the result
does not depend on how other rows were batched.

Templates
  tags   `<prompt>: p1\n\np2\n\n<response_a>: a1\n\na2\n\n<response_b>: b1\n\nb2`
  turns  per turn i: `<prompt>: pi\n<response_a>: ai\n<response_b>: bi`, turns joined by `\n\n`
         (a side with fewer turns contributes "" for the missing ones)
One side (`encode_sides`, for Bradley-Terry reward models that score each response alone) uses the
same templates and truncation with the parts prompt and `<response>: `.
Truncation (the sequence is the tokenizer's own prefix such as BOS, the body, then EOS)
  head   keep the first tokens of the body
  tail   keep the last tokens of the body (the end of long conversations)
  parts  tags are kept; the content budget is shared between prompt / A / B by `part_shares`,
         budget a short part leaves unused goes to the others, and within a part the turns share
         its budget the same way; each turn keeps its first tokens. If the tags alone do not fit,
         the body is finally cut to its head.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from cli.config import opt

FORMATTER_NAME = "arena-pref"
# Bump when the token ids produced for the same input and config change: adapters record it.
FORMATTER_VERSION = "1"
TEMPLATES = ("tags", "turns")
TRUNCATIONS = ("head", "tail", "parts")
PARTS = ("prompt", "a", "b")
SIDE_PARTS = ("prompt", "response")  # one response alone (a Bradley-Terry reward model scores each side)
TAG = {"prompt": "<prompt>: ", "a": "<response_a>: ", "b": "<response_b>: ", "response": "<response>: "}


@dataclasses.dataclass
class FormatConfig:
    template: str = opt("tags", "tags: one block per part; turns: one block per turn interleaving prompt, A and B")
    truncation: str = opt("parts", "head (keep start) | tail (keep end) | parts (per-part budgets, tags kept)")
    max_length: int = opt(1024, "max tokens per row in training, BOS and EOS included")
    infer_max_length: int = opt(0, "max tokens per row at inference; 0 means the training max_length")
    part_shares: list[float] = opt([1.0, 1.0, 1.0], "parts truncation: relative budget of prompt, A, B (e.g. 1,2,2)")

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"format.template must be one of {TEMPLATES}, got {self.template!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"format.truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if len(self.part_shares) != 3 or min(self.part_shares) <= 0:
            raise ValueError(f"format.part_shares needs 3 positive numbers, got {self.part_shares}")
        if self.max_length < 8 or not (self.infer_max_length == 0 or self.infer_max_length >= 8):
            raise ValueError(
                f"format.max_length must be >= 8 and format.infer_max_length 0 (= max_length) or >= 8, "
                f"got {self.max_length}, {self.infer_max_length}"
            )


def fill_budgets(demands: Sequence[int], budget: int, shares: Sequence[float]) -> list[int]:
    """Water-filling: split `budget` by `shares`; what a part does not need goes to the others."""
    alloc = [0] * len(demands)
    active = [i for i, d in enumerate(demands) if d > 0]
    while active and budget > 0:
        total = sum(shares[i] for i in active)
        fair = {i: int(budget * shares[i] / total) for i in active}
        satisfied = [i for i in active if demands[i] <= fair[i]]
        if not satisfied:
            for i in active:
                alloc[i] = fair[i]
            leftover = budget - sum(fair.values())
            for i in active[:leftover]:  # rounding remainder, first parts first
                alloc[i] += 1
            return alloc
        for i in satisfied:
            alloc[i] = demands[i]
            budget -= demands[i]
            active.remove(i)
    return alloc


class Formatter:
    def __init__(self, tokenizer, cfg: FormatConfig):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token: the formatter appends EOS to every row")
        if tokenizer.pad_token_id is None:
            # Llama-3 style tokenizers have no pad token; padding is masked out and pooling uses the
            # attention mask, so reusing EOS as filler cannot be mistaken for the last token.
            tokenizer.pad_token = tokenizer.eos_token
        self.tok = tokenizer
        self.cfg = cfg
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.prefix = self._special_prefix()
        self.fixed = {t: self._ids(t) for t in (*TAG.values(), "\n", "\n\n")}

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _special_prefix(self) -> list[int]:
        """What the tokenizer itself puts in front of text (BOS for Llama-3 / Gemma, nothing for others)."""
        with_special = self.tok("x", add_special_tokens=True)["input_ids"]
        plain = self._ids("x")
        for k in range(len(with_special) - len(plain) + 1):
            if with_special[k : k + len(plain)] == plain:
                return with_special[:k]
        return []

    def describe(self) -> dict:
        return {"name": FORMATTER_NAME, "version": FORMATTER_VERSION, **dataclasses.asdict(self.cfg)}

    def max_length(self, inference: bool) -> int:
        return (self.cfg.infer_max_length or self.cfg.max_length) if inference else self.cfg.max_length

    def encode_batch(self, prompts, responses_a, responses_b, *, swap: bool = False, inference: bool = False):
        """Token ids for each row; `swap=True` puts response B in the A slot and A in the B slot."""
        if swap:
            responses_a, responses_b = responses_b, responses_a
        return self._encode(list(zip(prompts, responses_a, responses_b)), PARTS, inference)

    def encode_sides(self, prompts, responses, *, inference: bool = False) -> list[list[int]]:
        """Token ids of each (prompt, one response): the same template and truncation with the parts
        prompt and `<response>`, which share the budget by part_shares' first two numbers."""
        return self._encode(list(zip(prompts, responses)), SIDE_PARTS, inference)

    def _encode(self, rows: list[tuple], parts: tuple[str, ...], inference: bool) -> list[list[int]]:
        flat = [turn for row in rows for part in row for turn in part]
        ids = iter(self.tok(flat, add_special_tokens=False)["input_ids"] if flat else [])
        limit = self.max_length(inference)
        out = []
        for row in rows:
            content = {p: [next(ids) for _ in turns] for p, turns in zip(parts, row)}
            out.append(self._assemble(content, parts, limit))
        return out

    def encode(self, prompt, response_a, response_b, *, swap: bool = False, inference: bool = False) -> list[int]:
        return self.encode_batch([prompt], [response_a], [response_b], swap=swap, inference=inference)[0]

    def _layout(self, content: dict, parts: tuple[str, ...]) -> list:
        """The body as a list of fixed token lists and (part, turn) content slots."""
        if self.cfg.template == "tags":
            items = []
            for p in parts:
                if items:
                    items.append(self.fixed["\n\n"])
                items.append(self.fixed[TAG[p]])
                for t in range(len(content[p])):
                    if t:
                        items.append(self.fixed["\n\n"])
                    items.append((p, t))
            return items
        items = []
        n_turns = max(1, *(len(content[p]) for p in parts))
        for t in range(n_turns):
            if t:
                items.append(self.fixed["\n\n"])
            for j, p in enumerate(parts):
                if j:
                    items.append(self.fixed["\n"])
                items.append(self.fixed[TAG[p]])
                if t < len(content[p]):
                    items.append((p, t))
        return items

    def _assemble(self, content: dict, parts: tuple[str, ...], limit: int) -> list[int]:
        items = self._layout(content, parts)
        budget = limit - len(self.prefix) - 1  # room for the body; EOS always stays
        if self.cfg.truncation == "parts":
            keep = self._part_budgets(content, items, parts, budget)
            content = {p: [ids[: keep[p][t]] for t, ids in enumerate(turns)] for p, turns in content.items()}
        body = [tok for item in items for tok in (content[item[0]][item[1]] if isinstance(item, tuple) else item)]
        if len(body) > budget:
            body = body[len(body) - budget :] if self.cfg.truncation == "tail" else body[:budget]
        return self.prefix + body + [self.eos_id]

    def _part_budgets(self, content: dict, items: list, parts: tuple[str, ...], budget: int) -> dict:
        fixed = sum(len(item) for item in items if not isinstance(item, tuple))
        room = max(0, budget - fixed)
        demands = [sum(map(len, content[p])) for p in parts]
        per_part = fill_budgets(demands, room, self.cfg.part_shares[: len(parts)])
        return {
            p: fill_budgets([len(ids) for ids in content[p]], per_part[i], [1.0] * len(content[p]))
            for i, p in enumerate(parts)
        }
