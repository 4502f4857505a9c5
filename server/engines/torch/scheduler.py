"""Continuous batching for the PyTorch engine, run in one worker thread.

Each loop: run queued jobs, admit waiting requests (admission.py), look up each new prompt's cached
prefix (prefix_cache.py), prefill the next chunk of the prompts still prefilling together (chunking.py:
a token budget per step while rows decode, so a long prompt never stalls them for its whole length),
merge the KV rows of those done into the running batch (runner.py), then run one decode step for every running
sequence and accept each row's token (acceptance.py). With speculation on, the step also feeds each
row its draft (draft_stage.py) and accepts, per row, the tokens the model agrees with. Finished and
aborted sequences leave the batch between steps. The event loop only ever sees Chunks pushed through
`call_soon_threadsafe`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engines.base import Chunk, GenerationRequest, TokenLogprob
from server.engines.torch.acceptance import TokenAcceptor
from server.engines.speculation_config import NgramConfig
from server.engines.torch.admission import Admission
from server.engines.torch.draft_stage import DraftStage, SpecCounts
from server.engines.torch.frame_headroom import run_with_headroom
from server.engines.torch.openmp import release_idle_team
from server.engines.torch.prefill_stage import PrefillStage
from server.engines.torch.prefix_cache import PrefixCache
from server.engines.torch.prompt_lookup import AcceptanceChance, RowDraft, StepCost, eligible as lookup_eligible
from server.engines.torch.self_draft import PRIOR_CHANCE
from server.engines.torch.runner import ModelRunner
from server.engines.torch.sampling import Picked, RowState, pick_tokens
from server.errors import EngineError, Overloaded

log = logging.getLogger(__name__)
Emit = Callable[[Chunk | BaseException], None]


@dataclass
class Sequence:
    req: GenerationRequest
    emit: Emit
    row: RowState
    acceptor: TokenAcceptor
    aborted: bool = False
    done: bool = False
    slot: int | None = None  # LoRA slot, held from submit to finish
    prompt_logprobs: list[TokenLogprob] | None = None  # scored at prefill, sent with the first chunk
    draft: RowDraft | None = None  # prompt lookup, for rows it applies to
    chance: AcceptanceChance | None = None  # self-speculation: the row's acceptance, for rows it applies to
    computed: int = 0  # prompt tokens whose KV is known (cached prefix, earlier chunks)
    kv: torch.Tensor | None = None  # that KV, [layers, 2, heads, computed, dim], until the row joins the batch

    @property
    def prompt_len(self) -> int:
        return len(self.row.prompt_ids)

    @property
    def position(self) -> int:
        """Position of the last token, the one fed to the next decode step."""
        return len(self.row.prompt_ids) + len(self.row.output_ids) - 1


class BatchScheduler(PrefillStage, DraftStage):
    def __init__(self, model, tokenizer, *, eos_ids: set[int], max_model_len: int, max_num_seqs: int,
                 max_prefill_tokens: int, device: torch.device, pad_id: int, lora=None, slots=None,
                 lookup: NgramConfig | None = None, prefix_cache: PrefixCache | None = None,
                 chunk_tokens: int = 256, self_draft=None):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.pad_id = pad_id
        self.lora = lora  # LoRAManager: which rows use which adapter
        self.slots = slots  # AdapterSlots: reference counts released when a sequence ends
        self.queue = Admission(max_num_seqs, max_prefill_tokens)
        self.runner = ModelRunner(model, device, pad_id)
        self._rows: list[Sequence] = []
        self._admitting: list[Sequence] = []  # left the queue, not yet in the batch
        self._prefilling: list[Sequence] = []  # prompts being prefilled, chunk by chunk, in arrival order
        self.prefix_cache = prefix_cache  # None: off
        self.chunk_tokens = chunk_tokens  # prompt tokens per step while rows decode
        self._shared_gen = torch.Generator(device="cpu")
        self._shared_gen.seed()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.aborted = 0  # sequences stopped early because their client went away
        self.lookup = lookup  # prompt-lookup speculation, when configured
        self.self_draft = self_draft  # self_draft.SelfDraft: the model's quantized copy drafts, when configured
        self.spec = SpecCounts()
        self.step_cost = StepCost()  # forward seconds vs tokens, for the draft width

    # ---- called from the event loop -------------------------------------------------------------
    def submit(self, req: GenerationRequest, emit: Emit, slot: int | None = None, matcher=None) -> None:
        gen = None
        if req.params.seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(req.params.seed)
        seq = Sequence(req=req, emit=emit, row=RowState(req.params, gen, [], list(req.prompt_token_ids), matcher),
                       acceptor=TokenAcceptor(self.tokenizer, req.params, self.eos_ids, len(req.prompt_token_ids),
                                              self.max_model_len), slot=slot)
        if self.lookup is not None and lookup_eligible(req.params):
            seq.draft = RowDraft(self.lookup)
        if self.self_draft is not None and lookup_eligible(req.params):
            seq.chance = AcceptanceChance(PRIOR_CHANCE)
        if self._thread is not None and not self._thread.is_alive():
            raise Overloaded("the engine is not running; the server needs a restart", code="engine_dead")
        if self.queue.stopping:
            raise EngineError("engine is shutting down")
        self.queue.add(seq)

    def abort(self, request_id: str) -> None:
        self.queue.abort(request_id)

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between steps. All torch work belongs on that one thread:
        OpenMP slows every later step by ~40% once a second long-lived thread runs parallel ops."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.queue.stopping or not self.alive():
            future.set_exception(EngineError("engine is not running"))
            return future
        self.queue.add_job((fn, future))
        return future

    def counts(self) -> tuple[int, int, int]:
        rows = len(self._rows)
        return rows + len(self._prefilling), self.queue.waiting(), self.runner.kv_tokens(rows)

    def running_with_adapters(self) -> int:
        return sum(1 for s in list(self._rows) if s.slot is not None)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slimserve-torch-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.queue.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            run_with_headroom(self._loop)  # no frame-stack chunk churn under the steps (frame_headroom.py)
        finally:  # stopped, or died: nothing may wait forever on a thread that is gone
            queued, jobs = self.queue.drain()
            self._fail(queued + self._admitting + self._prefilling + self._rows, EngineError("the engine stopped"))
            for _, future in jobs:
                future.set_exception(EngineError("the engine stopped"))

    def _loop(self) -> None:
        while True:
            # before waiting for work, let idle OpenMP threads go (openmp.py)
            step = self.queue.next_step(len(self._rows) + len(self._prefilling), on_idle=release_idle_team)
            if step is None:
                break
            jobs, new, dropped = step
            self._admitting = new
            for seq in dropped:  # aborted while waiting
                self._finish(seq, Chunk("", [], finish_reason="abort"))
            for seq in new:
                seq.req.stats.scheduled = time.perf_counter()
            for fn, future in jobs:
                try:
                    with torch.inference_mode():
                        future.set_result(fn())
                except BaseException as exc:  # the caller gets the error; the engine goes on
                    future.set_exception(exc)
            self._inject(new, "kill")
            try:
                with torch.inference_mode():
                    self._begin_prefill(new)
                    self._prefill_step()
                    self._drop_finished()
                    if self._rows:
                        self._decode()
                        self._drop_finished()
                self.steps += 1
            except Exception as exc:  # a failed decode step fails the sequences in it; the engine goes on
                log.exception("engine step failed")
                self._fail(new + self._prefilling + self._rows, exc)

    def _decode(self) -> None:
        rows = self._rows
        self._inject(rows, "step")
        self._route_adapters(rows)
        started = time.perf_counter()  # with speculation on, whole steps are timed (StepCost)
        own_draft = self.self_draft is not None and self.self_draft.usable and self._base_rows_only
        drafts, judges, drafting = self._drafts(rows, own_draft)
        if any(drafts):
            self._decode_drafts(rows, drafts, judges, started + drafting)  # the check's time, apart from drafting
            return
        logits = self.runner.decode([s.row.output_ids[-1] for s in rows], [s.position for s in rows],
                                    compiled=self._base_rows_only)
        self._accept(rows, self._pick(logits.float(), rows))
        self._timed_plain(len(rows), time.perf_counter() - started - drafting, own_draft)

    @property
    def _base_rows_only(self) -> bool:
        """No running row has an adapter: the compiled step (which models the base model only) may run."""
        return self.lora is None or self.lora.mask is None

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> Picked:
        """Sample the batch; if that fails, sample row by row and fail only the rows that fail. The retry
        starts from the generators' states before the failed try: a seeded row draws once a token."""
        generators = {id(g): g for g in [self._shared_gen, *(s.row.generator for s in seqs)] if g is not None}
        states = [(g, g.get_state()) for g in generators.values()] if len(generators) > 1 else None
        try:
            self._inject(seqs, "sample")
            return pick_tokens(logits, [s.row for s in seqs], self._shared_gen)
        except Exception:
            log.exception("batched sampling failed; sampling row by row")
        for generator, state in states or []:
            generator.set_state(state)
        tokens, logprobs = [], []
        for i, seq in enumerate(seqs):
            try:
                self._inject([seq], "sample")
                one = pick_tokens(logits[i:i + 1], [seq.row], self._shared_gen)
                tokens.append(one.tokens[0])
                logprobs.append(one.logprobs[0])
            except Exception as exc:
                self._fail([seq], exc, keep_rows=True)  # leaves the batch in _drop_finished
                tokens.append(self.pad_id)
                logprobs.append(None)
        return Picked(tokens, logprobs)

    @staticmethod
    def _inject(seqs: list[Sequence], point: str) -> None:
        """Test-only fault injection: a request sent with `x-slimserve-fault: POINT` (honoured only
        with settings.fault_inject) raises here. `kill` ends the engine thread itself."""
        for seq in seqs:
            if seq.req.fault == point:
                if point == "kill":
                    raise _InjectedDeath(f"injected fault: {point}")
                raise RuntimeError(f"injected fault: {point}")

    def _route_adapters(self, seqs: list[Sequence]) -> None:
        if self.lora is not None:
            self.lora.begin_step([s.slot for s in seqs])

    def _accept(self, seqs: list[Sequence], picked) -> None:
        now = time.perf_counter()
        for seq, token, lp in zip(seqs, picked.tokens, picked.logprobs):
            if seq.aborted or seq.done:
                continue
            try:
                self._accept_one(seq, token, lp, now)
            except Exception as exc:  # this request's detokenize/stop check: only it fails
                log.exception("request %s failed", seq.req.request_id)
                self._fail([seq], exc, keep_rows=True)

    def _accept_one(self, seq: Sequence, token: int, lp, now: float) -> None:
        seq.row.output_ids.append(token)
        self._inject([seq], "detokenize")
        matcher = seq.row.matcher
        if matcher is not None and not matcher.accept_token(token):
            raise RuntimeError(f"token {token} is outside the request's grammar")
        text, finish = seq.acceptor.accept(token)
        if finish is None and matcher is not None and matcher.is_terminated():  # the grammar is complete
            finish, text = "stop", text + seq.acceptor.flush()
        seq.req.stats.token_emitted(now)
        chunk = Chunk(text, [token], self._logprobs(token, lp) if lp is not None else None, finish,
                      prompt_logprobs=seq.prompt_logprobs)
        seq.prompt_logprobs = None
        if finish is not None:
            self._finish(seq, chunk)
        else:
            seq.emit(chunk)

    def _logprobs(self, token: int, lp) -> list[TokenLogprob]:
        value, top = lp
        dec = self.tokenizer.decode
        return [TokenLogprob(dec([token]), value, [(dec([t]), v) for t, v in top])]

    def _finish(self, seq: Sequence, chunk: Chunk) -> None:
        if chunk.finish_reason == "abort":
            self.aborted += 1
        seq.done = True
        self._release(seq)
        seq.req.stats.finish_reason = chunk.finish_reason
        seq.req.stats.finished = time.perf_counter()
        self.queue.forget(seq.req.request_id)
        seq.emit(chunk)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None and self.slots is not None:
            self.slots.release(seq.slot)
            seq.slot = None

    def _drop_finished(self) -> None:
        for seq in self._rows:
            if seq.aborted and not seq.done:
                self._finish(seq, Chunk("", [], finish_reason="abort"))
        keep = [i for i, s in enumerate(self._rows) if not s.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self.runner.keep(keep)

    def _fail(self, seqs: list[Sequence], exc: BaseException, keep_rows: bool = False) -> None:
        """Fail `seqs` with a 500. keep_rows: they stay in the batch (done) until _drop_finished
        removes them with their KV rows; otherwise they leave now, and must be all the rows or none."""
        error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        for seq in seqs:
            if not seq.done:
                seq.done = True
                self._release(seq)
                seq.req.stats.finish_reason = "error"
                self.queue.forget(seq.req.request_id)
                seq.emit(error)
        if keep_rows:
            return
        failed = {id(s) for s in seqs}
        self._prefilling = [s for s in self._prefilling if id(s) not in failed]
        self._rows = [s for s in self._rows if id(s) not in failed]
        if not self._rows:
            self.runner.clear()


class _InjectedDeath(BaseException):
    """Raised only by fault injection (`kill`): not an Exception, so it ends the engine thread."""
