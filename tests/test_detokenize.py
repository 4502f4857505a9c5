"""Incremental detokenization and stop-string hold-back."""

from __future__ import annotations

from server.engines.torch.detokenize import IncrementalDetokenizer, StopStrings


def test_incremental_text_equals_full_decode(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello, world! Quantization stores weights in fewer bits. café ünïcode ✓"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids]
    d.finish()
    assert "".join(pieces) + "" == d.text[: len("".join(pieces))]
    assert d.text == tok.decode(ids)


def test_stop_string_split_across_chunks_is_held_back():
    s = StopStrings(["STOP"])
    text = ""
    sent = []
    for piece in ["Hello ", "ST", "O", "P more"]:
        text += piece
        out, hit = s.check(text, len(piece))
        sent.append(out)
        if hit:
            break
    assert sent == ["Hello ", "", "", ""]
    assert hit


def test_false_alarm_is_released():
    s = StopStrings(["STOP"])
    out1, _ = s.check("a ST", 4)
    out2, hit = s.check("a STAR", 2)
    assert out1 == "a " and out2 == "STAR" and not hit


def test_flush_releases_the_tail():
    s = StopStrings(["END"])
    out, _ = s.check("the E", 5)
    assert out == "the "
    assert s.flush("the E") == "E"
