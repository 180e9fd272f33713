"""Tokenizer: the paper's recipe (App. R), round trips, special tokens, byte fallback, byte lengths for bpb."""

import pytest

from conftest import SHAKESPEARE_TOKENIZER, synthetic_documents
from data_prep.tokenizer import capped_texts, new_tokenizer, train_tokenizer
from parcae.data.tokenizer import (TextStream, encode_prompt, encode_text, load_tokenizer, max_token_chars,
                                   special_ids, stop_ids, token_byte_lengths)

TEXTS = ["To be, or not to be, that is the question:", "Numbers 1234567 and 3.14159!",
         "Ünïcödé — “quotes”, 漢字 and emoji 🤖 all survive.", "  leading spaces\n\n\ttabs\r\nand CRLF  ", ""]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(SHAKESPEARE_TOKENIZER))


def test_round_trip_is_lossless_including_unseen_characters(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    # byte fallback: characters never seen in training still encode (as bytes), no <unk>
    assert len(tok.encode("漢", add_special_tokens=False).ids) == 3


def test_special_tokens_have_ids_0_1_2_and_are_atomic(tok):
    assert special_ids(tok) == {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2}
    assert tok.encode("<|bos|>hi<|eos|>", add_special_tokens=False).ids[0] == 0
    assert tok.get_vocab_size() == 4096


def test_numbers_split_into_groups_of_at_most_two_digits():
    pieces = [p for p, _ in new_tokenizer().pre_tokenizer.pre_tokenize_str("year 12345")]
    assert pieces[-3:] == ["12", "34", "5"]


def test_token_byte_lengths_count_utf8_bytes_exactly(tok):
    lengths = token_byte_lengths(tok)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[0] == lengths[1] == lengths[2] == 0


def test_training_a_small_tokenizer(tmp_path):
    tok = train_tokenizer(synthetic_documents(200), vocab_size=300, show_progress=False)
    assert tok.get_vocab_size() == 300
    assert special_ids(tok) == {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2}
    path = tmp_path / "t.json"
    tok.save(str(path))
    assert load_tokenizer(str(path)).decode(tok.encode("omega alpha").ids) == "omega alpha"
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_character_caps():
    class D:
        def __init__(self, text):
            self.text = text
    out = list(capped_texts([D("a" * 50), D("b" * 50), D("c" * 50)], max_chars=120, max_doc_chars=40))
    assert [len(t) for t in out] == [40, 40, 40]
    out = list(capped_texts([D("a" * 50), D("b" * 50)], max_chars=70, max_doc_chars=None))
    assert [len(t) for t in out] == [50, 20]


def test_framing_and_streamed_text():
    """One owner of the framing: <|bos|> (id 0) then the text's tokens; generation stops at <|eos|> (id 1); streamed
    pieces never split a multi-byte character, skip special tokens and add up to the decoded text."""
    tok = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
    text = "héllo wörld ✓ 日本"
    ids = encode_text(tok, text)
    assert encode_prompt(tok, text) == [0, *ids] and stop_ids(tok) == [1]
    assert len(ids) > len(text.split())                  # several characters span more than one token
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in [*ids, 1]]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == stream.text == text
    assert pieces[-1] == "" and pieces.count("") >= 3    # <|eos|> adds nothing; partial characters wait


def test_prompt_text_never_becomes_control_tokens(tok):
    """A special token's spelling typed in a prompt is text (it decodes back to what was typed; no special id
    appears); only ``special_tokens=True`` makes it the control token. <|bos|> still comes first."""
    specials = set(special_ids(tok).values())
    for text in ["hi <|eos|> <|bos|>", "<|bos|>", "<|eos|><|pad|>", "a<|pad|>b", "<|eos", "ROMEO:<|eos|>\n"]:
        ids = encode_prompt(tok, text)
        assert ids[0] == 0 and not specials & set(ids[1:]), (text, ids)
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
        assert not specials & set(encode_text(tok, text))
    assert encode_prompt(tok, "hi <|eos|> <|bos|>", special_tokens=True) == [0, *encode_text(tok, "hi"), 223, 1,
                                                                                 223, 0]
    assert encode_prompt(tok, "hi there") == encode_prompt(tok, "hi there", special_tokens=True)  # plain text: same
    assert tok.encode_special_tokens is False   # the shared tokenizer is not changed


def test_max_token_chars_bounds_the_token_count_from_below(tok):
    """No text has fewer tokens than len(text) / max_token_chars: the server refuses an over-long prompt by its
    length alone. The bound is reached by the longest token."""
    bound = max_token_chars(tok)
    text = tok.decode([int(token_byte_lengths(tok).argmax())])
    assert len(text) == bound and len(encode_text(tok, text)) == 1  # a tight bound here (an ASCII token)
    for t in [*TEXTS, "<|bos|>" * 3, text * 5, "x" * 999]:
        for special_tokens in (False, True):
            assert len(encode_text(tok, t, special_tokens=special_tokens)) * bound >= len(t)
