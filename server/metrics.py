"""Every Prometheus object slimserve exposes. Code hands this class stats; it alone touches prometheus_client."""

from __future__ import annotations

import os

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engines.base import EngineStats, RequestStats
from server.gpu_memory import GpuMemory

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("slimserve_requests", "Finished requests by model, adapter and HTTP status.",
                                ["model", "adapter", "status"], registry=r)
        self.finish = Counter("slimserve_request_finish", "Finished generations by finish reason.",
                              ["model", "reason"], registry=r)
        self.e2e = Histogram("slimserve_e2e_request_latency_seconds", "Arrival to last token.",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("slimserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slimserve_inter_token_latency_seconds", "Time between consecutive tokens.",
                             ["model"], buckets=_TOKEN_BUCKETS, registry=r)
        self.queue = Histogram("slimserve_request_queue_time_seconds", "Arrival to leaving the waiting queue.",
                               ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("slimserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("slimserve_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.running = Gauge("slimserve_num_requests_running", "Sequences in the running batch.", ["model"], registry=r)
        self.waiting = Gauge("slimserve_num_requests_waiting", "Requests waiting to be scheduled.", ["model"],
                             registry=r)
        self.kv_usage = Gauge("slimserve_kv_cache_usage_perc", "KV-cache utilisation, 0..1 of the engine's budget "
                              "(read by the Gateway API Inference Extension).", ["model"], registry=r)
        self.preemptions = Counter("slimserve_num_preemptions", "Requests preempted by the engine.", ["model"],
                                   registry=r)
        self.lora_info = Gauge("slimserve_lora_requests_info", "Running/waiting requests on adapters, max adapters "
                               "(shaped like vllm:lora_requests_info for the Inference Extension).",
                               ["model", "running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self._seen_preemptions: dict[str, int] = {}
        self.kv_tokens = Gauge("slimserve_kv_cache_tokens", "Token slots held in the KV cache.", ["model"],
                               registry=r)
        self.rss = Gauge("slimserve_process_resident_memory_bytes", "Resident memory of the server process.",
                         registry=r)
        self.model_info = Gauge("slimserve_model_info", "Served models: engine and quantization (value 1).",
                                ["model", "engine", "quantization"], registry=r)
        self.weights = Gauge("slimserve_model_weight_bytes", "Bytes of weights of each loaded model.", ["model"],
                             registry=r)
        self.adapter_loads = Counter("slimserve_adapter_loads", "Adapters loaded.", ["model"], registry=r)
        self.adapter_unloads = Counter("slimserve_adapter_unloads", "Adapters removed, by reason (unload, evict).",
                                       ["model", "reason"], registry=r)
        self.adapter_failures = Counter("slimserve_adapter_load_failures", "Adapter loads refused, by reason.",
                                        ["model", "reason"], registry=r)
        self.adapter_load_time = Histogram("slimserve_adapter_load_seconds", "Validate and install one adapter.",
                                           ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.adapters_resident = Gauge("slimserve_adapters_resident", "Adapters resident per base model.",
                                       ["model"], registry=r)
        self.adapter_bytes = Gauge("slimserve_adapter_bytes", "Bytes of resident adapter weights per base model.",
                                   ["model"], registry=r)
        self._adapter_bytes: dict[tuple[str, str], int] = {}
        self.engine_aborts = Counter("slimserve_engine_aborted_sequences", "Sequences the engine stopped early "
                                     "because their client went away.", ["model"], registry=r)
        self._seen_aborts: dict[str, int] = {}
        self.route_decisions = Counter("slimserve_route_decisions", "Requests for `auto`, by policy, the target that "
                                       "answered and the kind of reason.", ["policy", "target", "reason"], registry=r)
        self.route_escalations = Counter("slimserve_route_escalations", "Cascade answers handed to the teacher.",
                                         ["policy"], registry=r)
        self.route_fallbacks = Counter("slimserve_route_fallbacks", "Targets skipped (unhealthy, queue full, "
                                       "unreachable) and the target tried instead.", ["policy", "skipped", "to", "why"],
                                       registry=r)
        self.cascade_confidence = Histogram("slimserve_cascade_confidence", "Student confidence (token logprob) seen "
                                            "by cascade policies.", ["policy"], registry=r,
                                            buckets=(-5, -3, -2, -1.5, -1, -0.75, -0.5, -0.3, -0.2, -0.1, -0.05, 0))
        self.route_score = Histogram("slimserve_route_learned_score", "Learned router: predicted probability that "
                                     "the student's answer is good enough.", ["policy"], registry=r,
                                     buckets=tuple(i / 10 for i in range(11)))
        self.route_reference_cost = Counter("slimserve_route_reference_cost_seconds", "Routed requests: what the "
                                            "policy's reference (its teacher) would have spent on the output tokens "
                                            "served, in device-seconds (its cost per token x tokens).", ["policy"],
                                            registry=r)
        self.route_spent_cost = Counter("slimserve_route_spent_cost_seconds", "Routed requests: device-seconds the "
                                        "targets spent (an escalated cascade pays the student's tokens and the "
                                        "teacher's).", ["policy", "target"], registry=r)
        self.route_cost_saved = Gauge("slimserve_route_cost_saved_seconds", "Routed requests: reference minus spent "
                                      "device-seconds, running total (falls when escalations cost more than routing "
                                      "saves).", ["policy"], registry=r)
        self.load_progress = Gauge("slimserve_model_load_progress", "Start-up of each model: 0..1 of each stage "
                                   "(converting, calibrating, quantizing, loading, ...); 1 once passed.",
                                   ["model", "stage"], registry=r)
        self.kv_bytes = Gauge("slimserve_kv_cache_bytes", "Bytes of KV cache the cached tokens occupy (vLLM: its "
                              "usage share of the pool it reserved).", ["model"], registry=r)
        self.spec_drafts = Counter("slimserve_spec_decode_num_drafts", "Speculative decoding: drafts the model "
                                   "checked (as vllm:spec_decode_num_drafts).", ["model"], registry=r)
        self.spec_draft_tokens = Counter("slimserve_spec_decode_num_draft_tokens", "Speculative decoding: tokens "
                                         "proposed (prompt lookup or a draft model).", ["model"], registry=r)
        self.spec_accepted_tokens = Counter("slimserve_spec_decode_num_accepted_tokens", "Speculative decoding: "
                                            "proposed tokens the model accepted.", ["model"], registry=r)
        self._seen_spec: dict[str, tuple[int, int, int]] = {}
        self.prefix_queries = Counter("slimserve_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache (as vllm:prefix_cache_queries).", ["model"], registry=r)
        self.prefix_hits = Counter("slimserve_prefix_cache_hits", "Prompt tokens found in the prefix cache: their "
                                   "keys and values reused, not computed (as vllm:prefix_cache_hits).", ["model"],
                                   registry=r)
        self._seen_prefix: dict[str, tuple[int, int]] = {}
        self.gpu_memory = GpuMemory(r)  # no series at all where no GPU exists
        self._process = psutil.Process(os.getpid())

    # adapter events (the registry calls these)
    def adapter_loaded(self, base: str, name: str, seconds: float, nbytes: int) -> None:
        self.adapter_loads.labels(base).inc()
        self.adapter_load_time.labels(base).observe(seconds)
        self._adapter_bytes[(base, name)] = nbytes
        self._refresh_adapters(base)

    def adapter_unloaded(self, base: str, name: str, reason: str) -> None:
        self.adapter_unloads.labels(base, reason).inc()
        self._adapter_bytes.pop((base, name), None)
        self._refresh_adapters(base)

    def adapter_failed(self, base: str, reason: str) -> None:
        self.adapter_failures.labels(base, reason).inc()

    def _refresh_adapters(self, base: str) -> None:
        sizes = [b for (m, _), b in self._adapter_bytes.items() if m == base]
        self.adapters_resident.labels(base).set(len(sizes))
        self.adapter_bytes.labels(base).set(sum(sizes))

    def model_loaded(self, model: str, weight_bytes: int, engine: str = "", quantization: str | None = None) -> None:
        self.weights.labels(model).set(weight_bytes)
        self.model_info.labels(model, engine, quantization or "none").set(1)

    def route_cost(self, policy: str, reference_seconds: float, spent: dict[str, float]) -> None:
        """One routed request's estimated cost: the reference's, and each target's that generated for it."""
        self.route_reference_cost.labels(policy).inc(reference_seconds)
        for target, seconds in spent.items():
            self.route_spent_cost.labels(policy, target).inc(seconds)
        self.route_cost_saved.labels(policy).inc(reference_seconds - sum(spent.values()))

    def refused(self, model: str, adapter: str, status: int) -> None:
        """A generation request answered before any engine work (400, 401, 404, 413, 429, ...)."""
        self.requests.labels(model, adapter, str(status)).inc()

    def record(self, choices: list[RequestStats], status: int) -> None:
        """Record one finished HTTP request (success, error or abort) from the stats of its choices."""
        first = choices[0]
        m = first.model
        self.requests.labels(m, first.adapter, str(status)).inc()
        for stats in choices:
            if stats.finish_reason:
                self.finish.labels(m, stats.finish_reason).inc()
            self.prompt_tokens.labels(m).inc(stats.prompt_tokens)
            self.generation_tokens.labels(m).inc(stats.completion_tokens)
            for gap in stats.inter_token:
                self.itl.labels(m).observe(gap)
        if first.scheduled is not None:
            self.queue.labels(m).observe(first.scheduled - first.arrival)
        firsts = [s.first_token for s in choices if s.first_token is not None]
        if firsts:
            self.ttft.labels(m).observe(min(firsts) - first.arrival)
        ends = [s.finished or s.last_token for s in choices]
        if status == 200 and all(e is not None for e in ends):
            self.e2e.labels(m).observe(max(ends) - first.arrival)

    def text(self) -> bytes:
        """The exposition as it stands (no engine figures), e.g. while the models are still loading."""
        return generate_latest(self.registry)

    def render(self, engines: dict[str, EngineStats], max_loras: int = 0) -> bytes:
        """Refresh the gauges read at scrape time, then render the text exposition."""
        for model, s in engines.items():
            self.running.labels(model).set(s.running)
            self.waiting.labels(model).set(s.waiting)
            self.kv_tokens.labels(model).set(s.kv_cache_tokens)
            self.engine_aborts.labels(model).inc(max(0, s.aborted - self._seen_aborts.get(model, 0)))
            self._seen_aborts[model] = s.aborted
            self.kv_usage.labels(model).set(s.kv_cache_usage)
            self.kv_bytes.labels(model).set(s.kv_cache_bytes)
            self.preemptions.labels(model).inc(max(0, s.preemptions - self._seen_preemptions.get(model, 0)))
            self._seen_preemptions[model] = s.preemptions
            seen = self._seen_spec.get(model, (0, 0, 0))
            now = (s.spec_drafts, s.spec_draft_tokens, s.spec_accepted_tokens)
            for counter, before, after in zip((self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens),
                                              seen, now):
                counter.labels(model).inc(max(0, after - before))
            self._seen_spec[model] = now
            seen = self._seen_prefix.get(model, (0, 0))
            now = (s.prefix_cache_queries, s.prefix_cache_hits)
            for counter, before, after in zip((self.prefix_queries, self.prefix_hits), seen, now):
                counter.labels(model).inc(max(0, after - before))
            self._seen_prefix[model] = now
        self.lora_info.clear()
        for model, s in engines.items():
            self.lora_info.labels(model, str(s.running_adapters), str(s.waiting_adapters), str(max_loras)).set(1)
        self.rss.set(self._process.memory_info().rss)
        self.gpu_memory.refresh()
        return generate_latest(self.registry)
