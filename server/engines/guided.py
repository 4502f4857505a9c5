"""Constrained decoding with xgrammar (the library vLLM's own structured outputs use by default, so both
engines accept the same schemas). `check` refuses a schema before any work starts; `Grammars` gives
each constrained row of the PyTorch engine its own matcher."""

from __future__ import annotations

import functools

from server.engines.base import Guide
from server.errors import BadRequest


# xgrammar 0.2.8 writes a length-bounded JSON string's characters as [^"\\\r\n], which lets raw
# control characters through (invalid JSON; found with a 135M model). Its unbounded strings exclude them.
_BOUNDED_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_CHARS = '[^\\0-\\x1f\\"\\\\\\r\\n]'


@functools.lru_cache(maxsize=256)
def grammar_text(guide: Guide) -> str:
    """The guide as an EBNF grammar: compact JSON (no free whitespace, as vLLM's disable_any_whitespace),
    strings without raw control characters. Both engines compile this same text."""
    import xgrammar as xgr

    if guide.json_object:
        return str(xgr.Grammar.builtin_json_grammar())
    grammar = xgr.Grammar.from_json_schema(guide.json_schema, any_whitespace=False)
    return str(grammar).replace(_BOUNDED_CHARS, _JSON_CHARS)


def check(guide: Guide | None, param: str) -> None:
    """Refuse a schema the grammar compiler does not take (a 400 naming the field), tokenizer-free."""
    if guide is None:
        return
    try:
        grammar_text(guide)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the converter's reason
        raise BadRequest(f"the JSON schema cannot be enforced: {str(exc).split('] ')[-1]}", param=param) from None


class Grammars:
    """Compiles guides for one tokenizer (xgrammar caches compiled grammars) and makes matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)  # the engine has the cores

    def matcher(self, guide: Guide):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self._compiler.compile_grammar(grammar_text(guide)))
