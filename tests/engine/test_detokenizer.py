"""Incremental detokenization: streamed pieces add up to the full decode; stop strings cut it."""

from server.engine.detokenizer import IncrementalDetokenizer
from tests.engine.tiny import byte_level_tokenizer

TOK = byte_level_tokenizer()


def stream(text: str, stop=()):
    detok = IncrementalDetokenizer(TOK, stop)
    pieces = []
    for token in TOK.encode(text):
        pieces.append(detok.push(token))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_pieces_add_up_and_never_split_utf8():
    text = "héllo wörld — ✓ 日本"
    pieces, _ = stream(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_excluded_and_never_streamed():
    pieces, detok = stream("the answer is 42. END of story", stop=("END",))
    assert "".join(pieces) == "the answer is 42. "
    assert detok.stopped
    assert not any("E" in p for p in pieces), "the start of a stop string is held back, not streamed"


def test_false_start_of_stop_string_is_released():
    pieces, detok = stream("ENTER the END", stop=("END",))
    assert "".join(pieces) == "ENTER the "
    assert detok.stopped


def test_earliest_of_several_stop_strings_wins():
    pieces, _ = stream("abc STOP def HALT", stop=("HALT", "STOP"))
    assert "".join(pieces) == "abc "
