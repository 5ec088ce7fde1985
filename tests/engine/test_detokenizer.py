"""Incremental detokenization on the real tokenizer: multi-byte characters, stop strings."""
import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.loader import load_tokenizer
from engine.request import Request
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return load_tokenizer(real_model_dir)


def stream(tok, text: str, stop=()):
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    req = Request("r", prompt, SamplingParams(stop=list(stop)))
    d = IncrementalDetokenizer(tok, req)
    pieces, sent, hit = [], 0, None
    for t in ids:
        hit = d.add_token(t)
        now = d.releasable(finished=hit is not None)
        pieces.append(now[sent:])
        sent = len(now)
        if hit:
            break
    return d, pieces, ids, hit


def test_multibyte_characters_split_across_tokens_come_out_whole(tok):
    text = " Café 🌨️ naïve 日本語 ✓"
    d, pieces, ids, _ = stream(tok, text)
    assert len(ids) > len(text.split())  # the emoji and CJK take several byte-level tokens
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_never_emitted_even_partially(tok):
    text = " The answer is 42. END of story, nothing more."
    d, pieces, _, hit = stream(tok, text, stop=["END of"])
    assert hit == "END of"
    assert "".join(pieces) == " The answer is 42. "
    assert not any("END" in p or p.endswith("E") for p in pieces[:-1])
