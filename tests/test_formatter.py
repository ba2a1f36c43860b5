"""The formatter, token by token, on an in-process word-level tokenizer (no downloads).

The pre-tokenizer keeps "\\n" as a token of its own so separators show up in the expected lists;
the tags come out as three pieces each ("<", "prompt", ">:"), as they would with a real BPE.
"""
from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from data.formatter import FormatConfig, Formatter, fill_budgets

WORDS = (
    ["[UNK]", "</s>", "<s>", "[PAD]", "<", "prompt", "response_a", "response_b", ">:", "\n", "x"]
    + [f"p{i}" for i in range(1, 21)]
    + [f"a{i}" for i in range(1, 21)]
    + [f"b{i}" for i in range(1, 21)]
)


def make_tokenizer(post: str = "", pad: bool = False, eos: bool = True) -> PreTrainedTokenizerFast:
    """post: "" (no special tokens added), "bos" (`<s> $A`, Llama-3 style) or "eos" (`$A </s>`)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True)
    if post == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    elif post == "eos":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    kwargs = {"eos_token": "</s>"} if eos else {}
    if pad:
        kwargs["pad_token"] = "[PAD]"
    if post == "bos":
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def fmt(post: str = "", **cfg) -> Formatter:
    return Formatter(make_tokenizer(post), FormatConfig(**cfg))


def tokens(formatter: Formatter, prompt, a, b, **kw) -> list[str]:
    return formatter.tok.convert_ids_to_tokens(formatter.encode(prompt, a, b, **kw))


def words(prefix: str, n: int, start: int = 1) -> str:
    return " ".join(f"{prefix}{i}" for i in range(start, start + n))


def test_tags_template_single_turn():
    f = fmt(template="tags")
    assert tokens(f, ["p1 p2"], ["a1"], ["b1 b2"]) == [
        "<", "prompt", ">:", "p1", "p2", "\n", "\n",
        "<", "response_a", ">:", "a1", "\n", "\n",
        "<", "response_b", ">:", "b1", "b2",
        "</s>",
    ]


def test_tags_template_multi_turn_keeps_every_turn():
    f = fmt(template="tags")
    assert tokens(f, ["p1", "p2"], ["a1", "a2"], ["b1"]) == [
        "<", "prompt", ">:", "p1", "\n", "\n", "p2", "\n", "\n",
        "<", "response_a", ">:", "a1", "\n", "\n", "a2", "\n", "\n",
        "<", "response_b", ">:", "b1",
        "</s>",
    ]


def test_turns_template_interleaves_and_pads_missing_turns_with_empty_text():
    f = fmt(template="turns")
    assert tokens(f, ["p1", "p2"], ["a1", "a2"], ["b1"]) == [
        "<", "prompt", ">:", "p1", "\n", "<", "response_a", ">:", "a1", "\n", "<", "response_b", ">:", "b1",
        "\n", "\n",
        "<", "prompt", ">:", "p2", "\n", "<", "response_a", ">:", "a2", "\n", "<", "response_b", ">:",
        "</s>",
    ]
    assert tokens(f, ["p1"], ["a1", "a2"], ["b1", "b2"]) == [
        "<", "prompt", ">:", "p1", "\n", "<", "response_a", ">:", "a1", "\n", "<", "response_b", ">:", "b1",
        "\n", "\n",
        "<", "prompt", ">:", "\n", "<", "response_a", ">:", "a2", "\n", "<", "response_b", ">:", "b2",
        "</s>",
    ]


def test_empty_and_missing_turns_leave_only_the_tags():
    f = fmt(template="tags")
    assert tokens(f, [""], [], ["b1"]) == [
        "<", "prompt", ">:", "\n", "\n", "<", "response_a", ">:", "\n", "\n", "<", "response_b", ">:", "b1", "</s>",
    ]


ROW = (["p1 p2 p3"], ["a1 a2 a3"], ["b1 b2 b3"])  # 22 body tokens in the tags template


def test_head_truncation_keeps_the_start():
    f = fmt(template="tags", truncation="head", max_length=12)
    assert tokens(f, *ROW) == [
        "<", "prompt", ">:", "p1", "p2", "p3", "\n", "\n", "<", "response_a", ">:", "</s>",
    ]


def test_tail_truncation_keeps_the_end():
    f = fmt(template="tags", truncation="tail", max_length=12)
    assert tokens(f, *ROW) == [
        "a1", "a2", "a3", "\n", "\n", "<", "response_b", ">:", "b1", "b2", "b3", "</s>",
    ]


def test_parts_truncation_splits_content_evenly_and_keeps_tags():
    # 13 tag/separator tokens + EOS leave 6 content tokens: 2 per part.
    f = fmt(template="tags", truncation="parts", max_length=20)
    assert tokens(f, *ROW) == [
        "<", "prompt", ">:", "p1", "p2", "\n", "\n",
        "<", "response_a", ">:", "a1", "a2", "\n", "\n",
        "<", "response_b", ">:", "b1", "b2",
        "</s>",
    ]


def test_parts_truncation_gives_a_short_prompts_budget_to_the_responses():
    # Room 7: the prompt needs 1, the other 6 go to A and B.
    f = fmt(template="tags", truncation="parts", max_length=21)
    assert tokens(f, ["p1"], [words("a", 8)], [words("b", 8)]) == [
        "<", "prompt", ">:", "p1", "\n", "\n",
        "<", "response_a", ">:", "a1", "a2", "a3", "\n", "\n",
        "<", "response_b", ">:", "b1", "b2", "b3",
        "</s>",
    ]


def test_parts_truncation_follows_non_uniform_part_shares():
    # Room 10 with shares 1:2:2 -> 2 / 4 / 4.
    f = fmt(template="tags", truncation="parts", max_length=24, part_shares=[1.0, 2.0, 2.0])
    assert tokens(f, [words("p", 8)], [words("a", 8)], [words("b", 8)]) == [
        "<", "prompt", ">:", "p1", "p2", "\n", "\n",
        "<", "response_a", ">:", "a1", "a2", "a3", "a4", "\n", "\n",
        "<", "response_b", ">:", "b1", "b2", "b3", "b4",
        "</s>",
    ]
    # A 1-token prompt leaves 9 to A and B; the odd token goes to the first of them.
    assert tokens(f, ["p1"], [words("a", 8)], [words("b", 8)]) == [
        "<", "prompt", ">:", "p1", "\n", "\n",
        "<", "response_a", ">:", "a1", "a2", "a3", "a4", "a5", "\n", "\n",
        "<", "response_b", ">:", "b1", "b2", "b3", "b4",
        "</s>",
    ]


def test_parts_truncation_shares_a_parts_budget_between_its_turns():
    # 15 fixed tokens, room 8: B needs 1, prompt 4 and A 3 of the rest; the prompt's 4 are 3 + 1 over its turns.
    f = fmt(template="tags", truncation="parts", max_length=24)
    assert tokens(f, [words("p", 4), "p5"], [words("a", 6)], ["b1"]) == [
        "<", "prompt", ">:", "p1", "p2", "p3", "\n", "\n", "p5", "\n", "\n",
        "<", "response_a", ">:", "a1", "a2", "a3", "\n", "\n",
        "<", "response_b", ">:", "b1",
        "</s>",
    ]


def test_parts_truncation_falls_back_to_head_when_tags_alone_do_not_fit():
    f = fmt(template="tags", truncation="parts", max_length=8)
    assert tokens(f, *ROW) == ["<", "prompt", ">:", "\n", "\n", "<", "response_a", "</s>"]


def test_parts_truncation_in_the_turns_template():
    # 2 turns: 18 tag tokens + 4 + 2 separator tokens; room 4 -> prompt 2 (1 + 1), A 1, B 1.
    f = fmt(template="turns", truncation="parts", max_length=29)
    assert tokens(f, ["p1 p2", "p3 p4"], ["a1 a2", "a3"], ["b1 b2 b3"]) == [
        "<", "prompt", ">:", "p1", "\n", "<", "response_a", ">:", "a1", "\n", "<", "response_b", ">:", "b1",
        "\n", "\n",
        "<", "prompt", ">:", "p3", "\n", "<", "response_a", ">:", "\n", "<", "response_b", ">:",
        "</s>",
    ]


def test_rows_that_fit_are_never_cut():
    for truncation in ("head", "tail", "parts"):
        f = fmt(template="tags", truncation=truncation, max_length=23)
        assert tokens(f, *ROW) == tokens(fmt(template="tags", max_length=1000), *ROW)
        assert len(tokens(f, *ROW)) == 23


def test_inference_uses_infer_max_length():
    f = fmt(template="tags", truncation="head", max_length=12, infer_max_length=16)
    assert tokens(f, *ROW) == [
        "<", "prompt", ">:", "p1", "p2", "p3", "\n", "\n", "<", "response_a", ">:", "</s>",
    ]
    assert tokens(f, *ROW, inference=True) == [
        "<", "prompt", ">:", "p1", "p2", "p3", "\n", "\n", "<", "response_a", ">:", "a1", "a2", "a3", "\n", "</s>",
    ]
    same = fmt(template="tags", truncation="head", max_length=12)
    assert tokens(same, *ROW, inference=True) == tokens(same, *ROW)
    assert f.max_length(inference=True) == 16 and f.max_length(inference=False) == 12


@pytest.mark.parametrize("template", ["tags", "turns"])
def test_swap_exchanges_the_responses_and_keeps_the_tags_in_place(template):
    f = fmt(template=template)
    swapped = tokens(f, ["p1"], ["a1 a2"], ["b1"], swap=True)
    assert swapped == tokens(f, ["p1"], ["b1"], ["a1 a2"])
    if template == "tags":
        assert swapped == [
            "<", "prompt", ">:", "p1", "\n", "\n",
            "<", "response_a", ">:", "b1", "\n", "\n",
            "<", "response_b", ">:", "a1", "a2",
            "</s>",
        ]


def test_swap_with_parts_truncation_budgets_follow_the_slot():
    f = fmt(template="tags", truncation="parts", max_length=24, part_shares=[1.0, 1.0, 3.0])
    # Room 10, shares 1:1:3 -> 2 / 2 / 6 whichever response sits in each slot.
    assert tokens(f, [words("p", 8)], [words("a", 8)], [words("b", 8)], swap=True) == [
        "<", "prompt", ">:", "p1", "p2", "\n", "\n",
        "<", "response_a", ">:", "b1", "b2", "\n", "\n",
        "<", "response_b", ">:", "a1", "a2", "a3", "a4", "a5", "a6",
        "</s>",
    ]


def test_bos_prefix_is_kept_and_counted_in_the_length():
    f = fmt("bos", template="tags", truncation="head", max_length=12)
    assert f.prefix == [f.tok.convert_tokens_to_ids("<s>")]
    assert tokens(f, *ROW) == ["<s>", "<", "prompt", ">:", "p1", "p2", "p3", "\n", "\n", "<", "response_a", "</s>"]
    tail = fmt("bos", template="tags", truncation="tail", max_length=12)
    assert tokens(tail, *ROW) == ["<s>", "a2", "a3", "\n", "\n", "<", "response_b", ">:", "b1", "b2", "b3", "</s>"]


def test_tokenizer_that_appends_eos_itself_gets_exactly_one_eos():
    f = fmt("eos", template="tags")
    assert f.prefix == []
    assert tokens(f, ["p1"], ["a1"], ["b1"]) == [
        "<", "prompt", ">:", "p1", "\n", "\n", "<", "response_a", ">:", "a1", "\n", "\n", "<", "response_b", ">:", "b1",
        "</s>",
    ]


def test_pad_token_defaults_to_eos_and_an_existing_pad_is_kept():
    tok = make_tokenizer()
    assert tok.pad_token is None
    f = Formatter(tok, FormatConfig())
    assert tok.pad_token == "</s>" and f.pad_id == f.eos_id == tok.eos_token_id
    own = Formatter(make_tokenizer(pad=True), FormatConfig())
    assert own.tok.pad_token == "[PAD]" and own.pad_id != own.eos_id


def test_tokenizer_without_eos_is_rejected():
    with pytest.raises(ValueError, match="no eos_token"):
        Formatter(make_tokenizer(eos=False), FormatConfig())


def random_turns(rng: random.Random, prefix: str) -> list[str]:
    pool = [f"{prefix}{i}" for i in range(1, 21)] + ["zzz", "\n", "x"]  # zzz is out of vocabulary
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(0, 3))]


def random_rows(seed: int | str, n: int) -> list[tuple]:
    rng = random.Random(seed)
    return [(random_turns(rng, "p"), random_turns(rng, "a"), random_turns(rng, "b")) for _ in range(n)]


@pytest.mark.parametrize("post", ["", "bos"])
@pytest.mark.parametrize("template", ["tags", "turns"])
@pytest.mark.parametrize("truncation", ["head", "tail", "parts"])
def test_length_limit_eos_and_prefix_hold_for_random_rows(post, template, truncation):
    rng = random.Random(7)
    for k, (p, a, b) in enumerate(random_rows(f"{post}-{template}-{truncation}", 60)):
        max_length = rng.randint(8, 60)
        f = fmt(post, template=template, truncation=truncation, max_length=max_length)
        full = fmt(post, template=template, truncation=truncation, max_length=10_000).encode(p, a, b)
        ids = f.encode(p, a, b, swap=bool(k % 2))
        assert len(ids) <= max_length
        assert ids[-1] == f.eos_id and f.eos_id not in ids[len(f.prefix) : -1]
        assert ids[: len(f.prefix)] == f.prefix
        if len(full) <= max_length and not k % 2:
            assert ids == full
        else:
            assert len(ids) == min(len(full), max_length)


@pytest.mark.parametrize("template, truncation", [("tags", "parts"), ("turns", "tail"), ("tags", "head")])
def test_encode_batch_equals_encoding_each_row_alone(template, truncation):
    f = fmt("bos", template=template, truncation=truncation, max_length=40, infer_max_length=50)
    rows = random_rows(3, 25)
    prompts, a, b = (list(col) for col in zip(*rows))
    for swap in (False, True):
        for inference in (False, True):
            batch = f.encode_batch(prompts, a, b, swap=swap, inference=inference)
            assert batch == [f.encode(*row, swap=swap, inference=inference) for row in rows]
    assert f.encode_batch([], [], []) == []


def test_fill_budgets_literal_cases():
    assert fill_budgets([2, 10, 10], 12, [1, 1, 1]) == [2, 5, 5]
    assert fill_budgets([3, 3, 3], 100, [1, 1, 1]) == [3, 3, 3]
    assert fill_budgets([10, 10, 10], 10, [1, 2, 2]) == [2, 4, 4]
    assert fill_budgets([10, 10, 10], 11, [1, 2, 2]) == [3, 4, 4]
    assert fill_budgets([1, 8, 8], 10, [1, 2, 2]) == [1, 5, 4]
    assert fill_budgets([0, 5, 5], 4, [1, 1, 1]) == [0, 2, 2]
    assert fill_budgets([1, 2, 30], 10, [1, 1, 1]) == [1, 2, 7]
    assert fill_budgets([5, 5], 0, [1, 1]) == [0, 0]
    assert fill_budgets([], 5, []) == []


def test_fill_budgets_never_overspends_or_overfills():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 4)
        demands = [rng.randint(0, 20) for _ in range(n)]
        shares = [rng.choice([0.5, 1.0, 2.0, 3.0]) for _ in range(n)]
        budget = rng.randint(0, 60)
        alloc = fill_budgets(demands, budget, shares)
        assert all(0 <= x <= d for x, d in zip(alloc, demands))
        assert sum(alloc) == min(budget, sum(demands))


@pytest.mark.parametrize("bad, message", [
    ({"template": "chatml"}, "format.template must be one of"),
    ({"truncation": "middle"}, "format.truncation must be one of"),
    ({"part_shares": [1.0, 1.0]}, "part_shares needs 3 positive numbers"),
    ({"part_shares": [1.0, 0.0, 1.0]}, "part_shares needs 3 positive numbers"),
    ({"max_length": 4}, "max_length must be >= 8"),
    ({"infer_max_length": 3}, "infer_max_length 0"),
])
def test_bad_format_config_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        FormatConfig(**bad)
