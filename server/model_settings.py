"""The per-model settings: the one list of what a served model may be given.

Each line is one setting: its name, type, default, help and limits. From this list
`server/settings.py` makes the top-level `ServeSettings` fields (the single model, or every model's
default), `server/model_config.py` makes the fields of a `models:` entry in serve.yaml (left out:
the top-level value) and the `quantization:` mapping, `ServeSettings.for_entry` lays an entry over
the top level, and `server/cli.py` makes the `serve --flags`. Adding a per-model setting is one line
here (and the code that acts on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from server.default_model import DEFAULT_MODEL_ID
from server.routing.cost import ModelCost


@dataclass(frozen=True)
class ModelSetting:
    name: str
    type: Any  # the top-level type; in a model entry `type | None`, None meaning "the top-level value"
    default: Any
    help: str
    limits: dict[str, Any] = field(default_factory=dict)  # pydantic constraints, the same wherever it is set
    vllm: bool = False  # passed to vLLM's engine arguments (ServeSettings.vllm_options)
    flag: bool = True  # a `serve --flag` (mappings are set in serve.yaml or SLIMSERVE_* as JSON)
    recipe: str | None = None  # in a model entry, a key of the `quantization:` mapping (the method: "method")
    entry_type: Any = None  # a model entry's own type and default, where they differ from `type | None`, None
    entry_default: Any = None


_DTYPES = Literal["auto", "bfloat16", "float16", "float32"]

MODEL_SETTINGS: tuple[ModelSetting, ...] = (
    ModelSetting("model", str, DEFAULT_MODEL_ID, "model folder or hub id (default: the embedded "
                                                 "SmolLM2-135M-Instruct)"),
    ModelSetting("engine", Literal["torch", "vllm"], "torch", "torch | vllm",
                 entry_type=Literal["torch", "vllm", "remote"], entry_default="torch"),  # an entry may be remote
    ModelSetting("dtype", _DTYPES, "auto", "auto | bfloat16 | float16 | float32"),
    ModelSetting("device", str, "auto", "auto | cpu | cuda | cuda:N"),
    ModelSetting("quantization", str | None, None,
                 "quantize at load: gptq | awq | rtn (calibrated, cached in cache-dir/quantized), int8 | int4 | nf4, "
                 "fp8 (GPU, vllm engine); the vllm engine also takes its own names for checkpoints "
                 "(compressed-tensors ...)", vllm=True, recipe="method"),
    ModelSetting("quant_bits", int, 4, "gptq/awq/rtn at load: bits per weight (2, 3, 4 or 8)", recipe="bits"),
    ModelSetting("quant_group_size", int | None, None,
                 "gptq/awq/rtn at load: weights per scale, -1 one per row (default: the largest of 128, 64, 32 "
                 "that divides every layer)", recipe="group_size"),
    ModelSetting("calib", str, "self", "gptq/awq at load: calibration text, a .txt/.jsonl file, or `self` (the "
                                       "model writes its own from fixed seeded prompts)",
                 limits={"min_length": 1}, recipe="calib"),
    ModelSetting("calib_samples", int, 64, "gptq/awq at load: calibration samples",
                 limits={"ge": 1, "le": 4096}, recipe="calib_samples"),
    ModelSetting("max_model_len", int | None, None, "context length (default: the model's)", limits={"ge": 16}),
    ModelSetting("max_num_seqs", int, 32, "sequences decoded together in one batch", limits={"ge": 1, "le": 1024}),
    ModelSetting("max_prefill_tokens", int, 8192, "padded prompt tokens admitted per prefill step",
                 limits={"ge": 16}),
    ModelSetting("enable_prefix_caching", bool, True, "reuse the KV of prompt prefixes already computed (shared "
                 "system prompts, earlier chat turns); --no-enable-prefix-caching turns it off", vllm=True),
    ModelSetting("prefix_cache_bytes", int, 256 << 20, "torch engine: memory for cached prefixes (least recently "
                 "used evicted)", limits={"ge": 0}),
    ModelSetting("prepack_weights", bool, True, "torch engine on CPU: full-precision linears on weights prepacked "
                 "once for oneDNN where a probe at load measures it faster (--no-prepack-weights: nn.Linear)"),
    ModelSetting("grouped_attention", bool, True, "torch engine on CPU: decode-step attention as grouped fp32 "
                 "matmuls instead of transformers' sdpa, which copies each key/value head per query head "
                 "(--no-grouped-attention: sdpa)"),
    ModelSetting("compile_decode", bool, False, "torch engine on CPU: decode steps through torch.compile "
                 "(Llama, Mistral, Qwen2; compiled at start, ~1-2 min on 2 cores; eager where it cannot)"),
    ModelSetting("max_num_batched_tokens", int | None, None, "prompt tokens prefilled per step while other "
                 "requests decode (chunked prefill; torch default 256, vllm its own)", limits={"ge": 16}, vllm=True),
    ModelSetting("gpu_memory_utilization", float | None, None, "vllm engine (on CPU: share of RAM for KV)",
                 limits={"gt": 0, "le": 1}, vllm=True),
    ModelSetting("kv_cache_memory_bytes", int | None, None, "vllm engine: KV cache size",
                 limits={"ge": 1 << 20}, vllm=True),
    ModelSetting("enforce_eager", bool | None, None, "vllm engine: no graphs/compile", vllm=True),
    ModelSetting("tensor_parallel_size", int | None, None, "vllm engine", limits={"ge": 1}, vllm=True),
    ModelSetting("max_cpu_loras", int | None, None, "vllm engine: adapters cached in CPU memory",
                 limits={"ge": 1}, vllm=True),
    ModelSetting("speculative_config", dict[str, Any] | None, None,
                 'speculative decoding as in vLLM, JSON: \'{"method": "ngram", "num_speculative_tokens": 4, '
                 '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (prompt lookup: both engines; other methods: '
                 'vllm engine)', vllm=True),
    ModelSetting("trust_remote_code", bool, False, "run code shipped in the model folder"),
    ModelSetting("generation_config", Literal["auto", "none"], "auto",
                 "auto: the model folder's generation_config sampling values are the defaults of requests that "
                 "leave them out (as vLLM); none: slimserve's own (temperature 1)"),
    ModelSetting("cost", ModelCost | None, None, "measured cost per output token, {seconds_per_token, weight_bytes, "
                 "kv_bytes_per_token, ...}: what routing saves is reckoned from it (default: the model folder's "
                 "manifest); set per model entry", flag=False),
)

BY_NAME = {s.name: s for s in MODEL_SETTINGS}
RECIPE = tuple(s for s in MODEL_SETTINGS if s.recipe)  # the `quantization:` mapping of a model entry


def not_none(tp: Any) -> Any:
    """`int | None` -> int; a type without None as it is."""
    if get_origin(tp) in (Union, type(int | None)):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return tp
