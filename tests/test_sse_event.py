"""An SSE data line stays one line for clients that split lines as str.splitlines does (httpx's
aiter_lines): a token whose text holds U+0085, U+2028 or U+2029 (JSON leaves those raw) cut a chunk's
JSON in two in the short soak (a random tiny model sampling at temperature 0.7)."""

from __future__ import annotations

import json

from server.routes.sse import event


def test_a_tokens_text_cannot_cut_a_data_line():
    text = "a\x85b\u2028c\u2029d\x0be\x1cf\ng\r\u00e9\u4e2d"
    out = event({"choices": [{"delta": {"content": text}}]})
    assert out.startswith("data: ") and out.endswith("\n\n")
    assert len(out[:-2].splitlines()) == 1
    assert json.loads(out[len("data: "):-2])["choices"][0]["delta"]["content"] == text
    assert "\u00e9\u4e2d" in out  # other text stays as it is (not escaped to ASCII)
