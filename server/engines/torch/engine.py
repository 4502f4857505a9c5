"""The PyTorch engine: a transformers causal LM behind the Engine interface.

The model runs in the BatchScheduler's worker thread (continuous batching, see scheduler.py);
this class loads it, tokenizes, and bridges the thread's output to asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import torch

from adapters.loader import check_finite
from server.engines.base import Chunk, EngineCapabilities, EngineStats, GenerationRequest
from server.engines.adapter_slots import AdapterSlots
from server.engines.speculation_config import NgramConfig, QuantizedSelfConfig
from server.engines.torch.dtype_choice import DtypeChoice, choose_dtype
from server.engines.torch.lora import LoRAManager
from server.engines.torch.prefix_cache import PrefixCache
from server.engines.torch.scheduler import BatchScheduler
from server.engines.tokenizing import HFTokenizing
from server.errors import APIError, ConfigError, EngineError, NotFound

log = logging.getLogger(__name__)
DEFAULT_PREFIX_CACHE_BYTES = 256 << 20  # ~5,600 tokens of SmolLM2-135M's KV in fp32
DEFAULT_CHUNK_TOKENS = 256  # prompt tokens per step while rows decode (measured: docs/performance.md)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError("device", str(exc)) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but none is available")
    return device


class TorchEngine(HFTokenizing):
    capabilities = EngineCapabilities(local=True, adapters=True, tokenizer=True)
    def __init__(self, model_id: str, model, tokenizer, *, max_model_len: int, max_num_seqs: int,
                 max_prefill_tokens: int, device: torch.device, source: str = "", quantization: str | None = None,
                 dtype_choice: DtypeChoice | None = None, quantization_kernel: str | None = None,
                 linear_kernel: str | None = None, lookup: NgramConfig | None = None, enable_prefix_caching: bool = True,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, max_num_batched_tokens: int | None = None,
                 compile_decode: bool = False, self_draft=None):
        """`self_draft`: a self_draft.SelfDraft (speculative_config method quantized_self), or None."""
        from compress.load_time import weight_bytes

        self.model_id = model_id
        self.source = source
        self.quantization = quantization
        self.quantization_kernel = quantization_kernel  # int8/int4 on torch's packed kernels: which, in what dtype
        self.linear_kernel = linear_kernel  # full-precision linears: oneDNN prepacked, or None (nn.Linear)
        self.attention_kernel = getattr(model.config, "_attn_implementation", None)  # sdpa, slimserve_grouped, ...
        self.compile_decode = compile_decode  # compiled at start (compiled_decode.py)
        self.decode_step = "eager"  # or "compiled", or why not
        self.dtype_choice = dtype_choice or DtypeChoice(_param_dtype(model), "the model's own dtype (built in process)")
        self.sampling_defaults: dict = {}  # set by the factory from the folder's generation_config
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_len = max_model_len
        self.weight_bytes = weight_bytes(model) + (self_draft.extra_bytes if self_draft is not None else 0)
        self.vocab_size = model.config.get_text_config().vocab_size  # larger prompt ids are refused (limits.admit)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.speculative = None  # SpeculativeDecoder, when a draft model is attached
        self.speculation_judge = None  # SpeculationJudge: whether the draft pays (attach_draft)
        self._grammar_compiler = None  # engines/guided.Grammars, made at the first constrained request
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        self.lora = LoRAManager(model, dtype=_param_dtype(model))
        self.adapter_slots = AdapterSlots(free=self.lora.remove)
        self._scheduler = BatchScheduler(
            model, tokenizer, eos_ids=eos_ids, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens, device=device, pad_id=pad, lora=self.lora,
            slots=self.adapter_slots, lookup=lookup, self_draft=self_draft,
            prefix_cache=PrefixCache(prefix_cache_bytes) if enable_prefix_caching else None,
            chunk_tokens=max_num_batched_tokens or DEFAULT_CHUNK_TOKENS,
        )

    @classmethod
    def load(cls, model_id: str, path: str | Path, *, dtype: str = "auto", device: str = "auto",
             max_model_len: int | None = None, max_num_seqs: int = 32, max_prefill_tokens: int = 8192,
             trust_remote_code: bool = False, quantization: str | None = None,
             lookup: NgramConfig | None = None, prepack_weights: bool = True, grouped_attention: bool = True,
             self_draft: QuantizedSelfConfig | None = None, **batching) -> "TorchEngine":
        """`batching`: enable_prefix_caching, prefix_cache_bytes, max_num_batched_tokens (see __init__).
        `self_draft`: the model's own int4/int8 copy drafts for it (self_draft.py; speculative_config method
        quantized_self); needs a full-precision model on a CPU, refused otherwise.
        `prepack_weights`: full-precision linears on oneDNN-packed weights where measured faster (prepack.py).
        `grouped_attention`: decode-step attention without sdpa's per-group copies of the cache (attention.py).
        `compile_decode` (a batching kwarg): decode steps through torch.compile, compiled at start (compiled_decode.py)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        dev = pick_device(device)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError("model", f"cannot load a model config from {path!s}: {exc}") from exc
        choice = choose_dtype(dtype, getattr(config, "dtype", None), dev)
        torch_dtype = choice.dtype
        kwargs = {}
        prequantized = getattr(config, "quantization_config", None)
        if quantization and prequantized:
            raise ConfigError("quantization", f"{path} is already quantized "
                                              f"({_method_of(prequantized)}); serve it without --quantization")
        # int8/int4 on a CPU: torch's packed kernels, swapped in after loading (quantize_linears.py);
        # elsewhere (and nf4) the transformers quantization_config path (torchao, bitsandbytes)
        torch_kernels = quantization in ("int8", "int4") and dev.type == "cpu"
        kernel = None
        if quantization and not torch_kernels:
            from compress.load_time import QuantizationUnavailable, load_time_config

            try:
                kwargs = {"quantization_config": load_time_config(quantization, torch_dtype),
                          "device_map": str(dev)}
            except QuantizationUnavailable as exc:
                raise ConfigError("quantization", str(exc)) from exc
        from compress.mixed_gptq import is_mixed_gptq, load_dequantized

        try:
            if is_mixed_gptq(config):  # per-layer bits: transformers cannot build it (compress/mixed_gptq.py)
                model = load_dequantized(Path(path), torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                             trust_remote_code=trust_remote_code, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError("model", f"{path!s} is not a loadable causal LM: {exc}") from exc
        if not quantization or torch_kernels:
            model.to(dev)
        draft = None
        if self_draft is not None:  # built before the model's own linears are prepacked (it copies nn.Linear)
            from server.engines.torch.self_draft import SelfDraft

            draft = SelfDraft.for_model(model, self_draft, lookup,
                                        quantization or (prequantized and _method_of(prequantized)), dev)
        lookup = lookup or (self_draft.lookup if self_draft else None)  # quantized_self's prompt lookup first
        if torch_kernels:
            from server.engines.torch.quantize_linears import quantize_linears

            kernel = quantize_linears(model, quantization)["kernel"]
        model.eval()
        linear_kernel = None
        # the full-precision linears of an unquantized model, or those load-time int8/int4 left; never a
        # checkpoint's or transformers' quantized layers (compressed-tensors keeps nn.Linear with other weights)
        if prepack_weights and dev.type == "cpu" and not prequantized and (not quantization or torch_kernels):
            from server.engines.torch.prepack import prepack_linears

            linear_kernel = prepack_linears(model)
        if grouped_attention and dev.type == "cpu":
            from server.engines.torch.attention import use_grouped_attention

            use_grouped_attention(model)
            if draft is not None:
                use_grouped_attention(draft.model)
        limit = getattr(config.get_text_config(), "max_position_embeddings", None) or 2048
        if max_model_len is not None and max_model_len > limit:
            raise ConfigError("max_model_len", f"{max_model_len} is above the model's {limit} positions")
        method = quantization or (_method_of(prequantized) if prequantized else None)
        log.info("loaded %s (%s, %s, quantization %s) on %s; dtype: %s", model_id, path, torch_dtype, method, dev,
                 choice.reason)
        return cls(model_id, model, tokenizer, max_model_len=max_model_len or limit, max_num_seqs=max_num_seqs,
                   max_prefill_tokens=max_prefill_tokens, device=dev, source=str(path), quantization=method,
                   dtype_choice=choice, quantization_kernel=kernel, linear_kernel=linear_kernel, lookup=lookup,
                   self_draft=draft, **batching)

    @property
    def speculation(self) -> str | None:
        """What speculates for this model, for /v1/models (None: nothing)."""
        parts = self._scheduler.drafters()
        if self.speculative is not None:
            parts.append(f"draft model {self.speculative.draft.name_or_path} (lone greedy requests"
                         f"{', while it measures faster' if self.speculation_judge else ''})")
        return "; ".join(parts) or None

    def attach_draft(self, path: str, num_tokens: int, adaptive: bool = True) -> None:
        """`adaptive`: a lone greedy request goes through the draft only while that decodes faster than the
        plain path, both measured on this engine's requests (speculation_judge.py); False: always."""
        from server.engines.torch.speculation_judge import SpeculationJudge
        from server.engines.torch.speculative import SpeculativeDecoder, load_draft

        draft = load_draft(path, self.model, self.tokenizer, _param_dtype(self.model), self.device)
        self.speculative = SpeculativeDecoder(self.model, draft, self.tokenizer, self.eos_ids, num_tokens, self.device)
        self.speculation_judge = SpeculationJudge() if adaptive else None

    # ---- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        path = None  # with a draft attached, a lone greedy request runs "draft" or "plain", measured
        if self.speculative is not None and self._speculate(request):
            path = self.speculation_judge.choose() if self.speculation_judge else "draft"
        chunks = self._generate_speculative(request) if path == "draft" else self._generate_batched(request)
        measure = path is not None and self.speculation_judge is not None
        first = last = None
        decoded = 0  # tokens after the first chunk
        async with aclosing(chunks) as it:
            async for chunk in it:
                if measure and chunk.token_ids:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    else:
                        decoded += len(chunk.token_ids)
                yield chunk
        if measure and first is not None and chunk.finish_reason not in ("abort", None):
            self.speculation_judge.observe(path, decoded, last - first)

    async def _generate_batched(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        slot = None
        matcher = None
        if request.params.guide is not None:  # compiled off the event loop; xgrammar caches the grammar
            matcher = await asyncio.to_thread(self._grammars().matcher, request.params.guide)
        if request.adapter:
            slot = self.adapter_slots.take(request.adapter, request.adapter_slot)
            if slot is None:
                raise NotFound(f"adapter '{request.adapter}' is not loaded", param="model", code="model_not_found")
        try:
            self._scheduler.submit(request, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), slot,
                                   matcher)
        except BaseException:
            if slot is not None:
                self.adapter_slots.release(slot)
            raise
        async with aclosing(_drain(queue, lambda: self._scheduler.abort(request.request_id))) as chunks:
            async for chunk in chunks:
                yield chunk

    def _grammars(self):
        if self._grammar_compiler is None:
            from server.engines.guided import Grammars

            head = self.model.get_output_embeddings()
            vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # int8/int4 heads have no .weight
            self._grammar_compiler = Grammars(self.tokenizer, vocab, self.eos_ids)
        return self._grammar_compiler

    async def run_job(self, fn):
        """Run other torch work (e.g. the learned router's embeddings) on this engine's thread."""
        return await asyncio.wrap_future(self._scheduler.call(fn))

    def _speculate(self, request: GenerationRequest) -> bool:
        from server.engines.torch.speculative import eligible

        running, waiting, _ = self._scheduler.counts()
        return running == 0 and waiting == 0 and eligible(request.params, request.adapter)

    async def _generate_speculative(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """One request alone through assisted generation, run on the engine thread like all torch work."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        aborted = False

        def abort() -> None:
            nonlocal aborted
            aborted = True  # read by the stopping criterion between speculation rounds

        def emit(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            self.lora.begin_step([None])  # no adapter rows: the LoRA wrappers pass through
            self.speculative.run(request, emit, self.max_model_len, lambda: aborted)

        job = asyncio.wrap_future(self._scheduler.call(run))
        job.add_done_callback(lambda f: not f.cancelled() and f.exception() and emit(f.exception()))
        async with aclosing(_drain(queue, abort)) as chunks:
            async for chunk in chunks:
                yield chunk

    # ---- adapters (the registry's backend) ------------------------------------------------------
    def base_shapes(self) -> dict[str, tuple[int, int]]:
        return self.lora.base_shapes()

    async def install_adapter(self, weights) -> None:
        def install() -> None:  # on the engine thread, like every other torch operation
            check_finite(weights)
            self.adapter_slots.install(weights.name, self.lora.add(weights.modules, weights.scale))

        await asyncio.wrap_future(self._scheduler.call(install))

    def uninstall_adapter(self, name: str) -> None:
        self.adapter_slots.uninstall(name)

    def adapter_in_use(self, name: str) -> bool:
        return self.adapter_slots.in_use(name)

    def abort(self, request_id: str) -> None:
        self._scheduler.abort(request_id)

    def health(self) -> bool:
        return self._scheduler.alive()

    def stats(self) -> EngineStats:
        running, waiting, kv = self._scheduler.counts()
        cache = self._scheduler.prefix_cache
        budget = self._scheduler.max_num_seqs * self.max_model_len  # KV rows x context
        return EngineStats(running=running, waiting=waiting, kv_cache_tokens=kv, kv_cache_usage=min(1.0, kv / budget),
                           kv_cache_bytes=self._scheduler.runner.kv_bytes(), aborted=self._scheduler.aborted,
                           running_adapters=self._scheduler.running_with_adapters(),
                           spec_drafts=self._scheduler.spec.drafts, spec_draft_tokens=self._scheduler.spec.proposed,
                           spec_accepted_tokens=self._scheduler.spec.accepted,
                           prefix_cache_queries=cache.queried if cache else 0,
                           prefix_cache_hits=cache.hits if cache else 0)

    async def start(self) -> None:
        from server.engines.torch.openmp import release_idle_team

        release_idle_team()  # the loading thread's idle OpenMP team would slow every step (openmp.py)
        self._scheduler.start()
        if self.compile_decode:  # before the first request, on the engine thread like all torch work
            self.decode_step = await asyncio.wrap_future(self._scheduler.call(self._compile_decode))

    def _compile_decode(self) -> str:
        scheduler = self._scheduler
        drafting = scheduler.lookup is not None or scheduler.self_draft is not None
        compiled, reason = self._compiled(self.model, drafts=drafting)
        if compiled is None:
            log.warning("decode steps run eagerly: %s", reason)
            return f"eager ({reason})"
        scheduler.runner.compiled = compiled
        if scheduler.self_draft is not None:  # the draft copy's own step; eager where it does not compile
            scheduler.self_draft.compiled, why = self._compiled(scheduler.self_draft.model, drafts=False)
            if why:
                log.warning("the self-speculation draft decodes eagerly: %s", why)
        return "compiled"

    def _compiled(self, model, drafts: bool):
        """(CompiledDecode warmed up, None) or (None, why not)."""
        from server.engines.torch.compiled_decode import CompiledDecode, why_not
        from server.engines.torch.runner import ModelRunner

        reason = why_not(model, self.device)
        if reason is not None:
            return None, reason
        try:
            compiled = CompiledDecode(model, drafts=drafts)
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"
        try:
            seconds = compiled.warm_up(ModelRunner(model, self.device, self._scheduler.runner.pad_id))
        except Exception as exc:  # inductor, the C++ compiler, a model it cannot trace: stay eager
            compiled.close()
            return None, f"compiling failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.info("decode step compiled in %.0f s", seconds)
        return compiled, None

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._scheduler.stop)
        for compiled in (self._scheduler.runner.compiled, getattr(self._scheduler.self_draft, "compiled", None)):
            if compiled is not None:
                compiled.close()


async def _drain(queue: asyncio.Queue, abort) -> AsyncIterator[Chunk]:
    """Chunks from the engine thread until the finishing one; an error it sent is raised (as an
    APIError: a 500 names the cause); `abort()` runs when the consumer leaves first (client gone)."""
    finished = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item if isinstance(item, APIError) else EngineError(
                    f"generation failed: {type(item).__name__}: {item}")
            finished = item.finish_reason is not None
            yield item
            if finished:
                return
    finally:
        if not finished:
            abort()


def _param_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _method_of(quantization_config) -> str:
    get = quantization_config.get if isinstance(quantization_config, dict) else (
        lambda k, d=None: getattr(quantization_config, k, d))
    method = get("quant_method", "quantized")
    bits = get("bits")
    return f"{method}-{bits}bit" if bits else str(method)
