"""The token cache (model.tokens): the same ids as the formatter, each row tokenised once, damage refused."""
from __future__ import annotations

import pytest

from data.formatter import FormatConfig, Formatter
from model.files import AdapterError
from model.tokens import encode_rows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_PREF_CACHE", str(tmp_path))
    return tmp_path / "tokens"


def direct(formatter, df, swap=False, inference=False):
    return formatter.encode_batch(df["prompt"], df["response_a"], df["response_b"], swap=swap, inference=inference)


def tokenised(capsys) -> list[int]:
    """The `N tokenised` counts of the log lines printed since the last call."""
    return [int(line.split(" tokenised")[0].rsplit(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()
            if " tokenised," in line]


def test_same_ids_as_the_formatter_and_each_row_tokenised_once(cache, tiny_tokenizer, sample_rows, capsys):
    formatter = Formatter(tiny_tokenizer, FormatConfig(max_length=64, infer_max_length=96))
    df = sample_rows.head(40)
    for swap in (False, True):
        for inference in (False, True):
            assert encode_rows(formatter, df, swap=swap, inference=inference) == direct(formatter, df, swap, inference)
    assert tokenised(capsys) == [40, 40, 40, 40]  # four settings folders: swap x length limit
    # A fold's subset, and the rows again in another order: nothing tokenised, ids in the asked order
    part = df.iloc[[7, 3, 30, 3]].reset_index(drop=True)
    assert encode_rows(formatter, part, swap=True) == direct(formatter, part, swap=True)
    wider = sample_rows.head(50)
    assert encode_rows(formatter, wider) == direct(formatter, wider)
    assert tokenised(capsys) == [0, 10]
    assert len(list(cache.iterdir())) == 4


def test_settings_that_change_ids_get_their_own_folder(cache, tiny_tokenizer, sample_rows, capsys):
    df = sample_rows.head(10)
    base = Formatter(tiny_tokenizer, FormatConfig(max_length=64))
    encode_rows(base, df)
    # The inference limit equals the training one here: OOF scoring reads the ids training made
    encode_rows(base, df, inference=True)
    for other in (FormatConfig(max_length=48), FormatConfig(max_length=64, template="turns"),
                  FormatConfig(max_length=64, part_shares=[1.0, 2.0, 2.0])):
        f = Formatter(tiny_tokenizer, other)
        assert encode_rows(f, df) == direct(f, df)
    assert tokenised(capsys) == [10, 0, 10, 10, 10]


def test_a_damaged_part_is_refused_with_the_folder_to_delete(cache, tiny_tokenizer, sample_rows):
    formatter = Formatter(tiny_tokenizer, FormatConfig(max_length=64))
    df = sample_rows.head(10)
    encode_rows(formatter, df)
    (arrow,) = cache.glob("*/*/*.arrow")
    data = bytearray(arrow.read_bytes())
    data[-20] ^= 0xFF
    arrow.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=f"sha256 differs.*delete {arrow.parent}"):
        encode_rows(formatter, df)


def test_duplicate_rows_and_an_empty_frame(cache, tiny_tokenizer, sample_rows, capsys):
    formatter = Formatter(tiny_tokenizer, FormatConfig(max_length=64))
    df = sample_rows.iloc[[1, 1, 2, 1]].reset_index(drop=True)
    assert encode_rows(formatter, df) == direct(formatter, df)
    assert encode_rows(formatter, df.iloc[:0]) == []
    assert tokenised(capsys) == [2, 0]


def test_a_run_folders_saved_tokenizer_finds_the_ids_training_made(cache, tiny_tokenizer, sample_rows, tmp_path, capsys):
    from transformers import AutoTokenizer

    df = sample_rows.head(12)
    encode_rows(Formatter(tiny_tokenizer, FormatConfig(max_length=64)), df)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    reloaded = Formatter(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), FormatConfig(max_length=64))
    assert encode_rows(reloaded, df, inference=True) == direct(reloaded, df, inference=True)
    assert tokenised(capsys) == [12, 0]
