"""Tokenizer: byte-level round trip, single-digit tokens, one-token verdicts, save/load."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slimforge import SlimforgeError
from slimforge.tokenizer import build_tokenizer


@pytest.mark.parametrize("text", ["12+34=46", "Is this correct?\n9*62=558\nAnswer: yes",
                                  "héllo wörld ✓ 日本語 \t tabs", "  leading and trailing  "])
def test_round_trip_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345+678=13023", add_special_tokens=False))
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits and all(len(t) == 1 for t in digits)


def test_verdicts_single_and_special_ids(tokenizer):
    for v in (" yes", " no", " A", " B"):
        assert len(tokenizer.encode(v, add_special_tokens=False)) == 1
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_save_load_as_fast_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    text = "7*86=602 ünïcode"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert loaded.eos_token == tokenizer.eos_token


def test_verdict_that_would_split_is_refused():
    with pytest.raises(SlimforgeError, match="splits ' zebra'"):
        build_tokenizer(["1+1=2"] * 10, 262, must_be_single=[" zebra"])
