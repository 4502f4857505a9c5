"""Speculative decoding for the PyTorch engine: a small draft model (the distilled student) proposes
tokens, the served model checks them all in one forward pass (transformers assisted generation).
Greedy output is the served model's own; the saving is fewer sequential forward passes of it.

Assisted generation decodes one sequence at a time, so the engine uses it only for greedy requests
that find the batch empty (low load, where latency matters); under load, batching wins and
requests take the usual continuous-batching path."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from server.engines.base import Chunk, GenerationRequest, SamplingParams
from server.engines.torch.acceptance import TokenAcceptor
from server.errors import ConfigError

log = logging.getLogger(__name__)


def eligible(params: SamplingParams, adapter: str | None) -> bool:
    """What assisted generation reproduces exactly: greedy, no adapter, no logprobs or penalties."""
    return (params.greedy and adapter is None and params.logprobs is None and params.prompt_logprobs is None
            and params.max_tokens > 0 and not params.ignore_eos and params.guide is None and not params.logit_bias
            and params.presence_penalty == 0 and params.frequency_penalty == 0 and params.repetition_penalty == 1)


def load_draft(path: str | Path, target_model, tokenizer, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft_tok = AutoTokenizer.from_pretrained(path)
    if draft_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("draft", f"{path} uses a different tokenizer than the model it drafts for; speculative "
                                   "decoding needs the same vocabulary (a student distilled from this model)")
    draft = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    log.info("speculative draft %s loaded (%d blocks)", path, draft.config.get_text_config().num_hidden_layers)
    return draft


class _Streamer:
    """transformers streamer -> engine Chunks, each token accepted as the batch scheduler accepts it."""

    def __init__(self, req: GenerationRequest, tokenizer, eos_ids: set[int], emit, max_model_len: int):
        self.req, self.emit, self.eos_ids = req, emit, eos_ids | set(req.params.stop_token_ids)
        self.acceptor = TokenAcceptor(tokenizer, req.params, eos_ids, len(req.prompt_token_ids), max_model_len)
        self.prompt_seen = False
        self.finish: str | None = None
        self.count = 0
        self._pending: tuple[str, list[int]] = ("", [])

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        now = time.perf_counter()
        text, ids = "", []
        for token in value.reshape(-1).tolist():
            if self.finish is not None:
                break
            ids.append(token)
            self.count += 1
            self.req.stats.token_emitted(now)
            piece, self.finish = self.acceptor.accept(token)
            text += piece
        if ids and self.finish is None:
            self.emit(Chunk(text, ids))
        elif ids:
            self._pending = (text, ids)  # sent with the finish reason

    def end(self) -> None:
        pass

    def final_chunk(self, max_tokens_reached: bool) -> Chunk:
        text, ids = self._pending
        if self.finish is None:  # generate() stopped on its own: release what is held back
            text += self.acceptor.flush()
        reason = self.finish or ("length" if max_tokens_reached else "stop")
        return Chunk(text, ids, finish_reason=reason)


class SpeculativeDecoder:
    def __init__(self, model, draft, tokenizer, eos_ids: set[int], num_tokens: int, device: torch.device):
        self.model, self.draft, self.tokenizer = model, draft, tokenizer
        self.eos_ids, self.num_tokens, self.device = eos_ids, num_tokens, device
        self.requests = 0  # served through this path (a test and the benchmark read it)

    def run(self, req: GenerationRequest, emit, max_model_len: int, is_aborted) -> None:
        """On the engine thread: generate to the end, emitting chunks as tokens are accepted."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        streamer = _Streamer(req, self.tokenizer, self.eos_ids, emit, max_model_len)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = streamer.finish is not None or is_aborted()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        prompt = req.prompt_token_ids
        budget = min(req.params.max_tokens, max_model_len - len(prompt))
        ids = torch.tensor([prompt], device=self.device)
        req.stats.scheduled = time.perf_counter()
        self.requests += 1
        self.draft.generation_config.num_assistant_tokens = self.num_tokens
        self.draft.generation_config.num_assistant_tokens_schedule = "constant"
        with torch.inference_mode():
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), assistant_model=self.draft, do_sample=False,
                max_new_tokens=budget, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]),
                eos_token_id=sorted(streamer.eos_ids), pad_token_id=self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None else min(self.eos_ids),
                temperature=None, top_p=None, top_k=None,
            )
        if is_aborted():
            chunk = Chunk("", [], finish_reason="abort")
        else:
            chunk = streamer.final_chunk(streamer.count >= budget)
        req.stats.finish_reason = chunk.finish_reason
        req.stats.finished = time.perf_counter()
        emit(chunk)
