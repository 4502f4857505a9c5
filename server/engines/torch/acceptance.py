"""Accepting one generated token into a sequence's output: stop tokens, detokenizing, stop strings and
the length limit. Shared by the batch scheduler and speculative decoding, so both end sequences the
same way."""

from __future__ import annotations

from server.engines.base import SamplingParams
from server.engines.torch.detokenize import IncrementalDetokenizer, StopStrings


class TokenAcceptor:
    def __init__(self, tokenizer, params: SamplingParams, eos_ids: set[int], prompt_len: int, max_model_len: int):
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.max_tokens = params.max_tokens
        self.room = max_model_len - prompt_len  # tokens the context still holds
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(params.stop)
        self.generated = 0

    def accept(self, token: int) -> tuple[str, str | None]:
        """The text this token releases, and the finish reason when it ends the sequence."""
        self.generated += 1
        text, hit, finish = "", False, None
        if token in self.stop_ids:
            finish = "stop"
        else:
            delta = self.detok.add(token)
            text, hit = self.stops.check(self.detok.text, len(delta))
            if hit:
                finish = "stop"
        if finish is None and (self.generated >= self.max_tokens or self.generated >= self.room):
            finish = "length"
        if finish is not None and not hit:  # release text held back for a stop string
            text += self.flush()
        return text, finish

    def flush(self) -> str:
        """Text still held back (half characters, a possible stop-string start), at the end."""
        self.detok.finish()
        return self.stops.flush(self.detok.text)
