"""Per-row LoRA in the PyTorch engine, checked by equivalence (greedy, float32)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapter_factory import make_adapter
from engine_run import greedy_tokens
from adapters.loader import load_lora
from server.engines.torch.engine import TorchEngine

PROMPTS = ["Hello, world!", "The capital of France is", "Numbers: 1 2 3", "Servers batch requests together."]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-engine")
    return {name: make_adapter(tiny_model_dir, root / name, seed=i + 1, rank=4 + 4 * i)
            for i, name in enumerate(["a", "b"])}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dirs):
    eng = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    asyncio.run(eng.start())
    for name, folder in adapter_dirs.items():
        asyncio.run(eng.install_adapter(load_lora(name, folder, eng.base_shapes(), max_rank=64)))
    yield eng
    asyncio.run(eng.shutdown())


def test_adapter_output_equals_peft(engine, tiny_model_dir, adapter_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dirs["a"]).eval()
    ids = torch.tensor([engine.encode(PROMPTS[1])])
    with torch.no_grad():
        ref = peft_model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1]:]
    ours = greedy_tokens(engine, [(PROMPTS[1], "a")])[0]
    assert ours == ref.tolist()
    assert ours != greedy_tokens(engine, [(PROMPTS[1], None)])[0], "the adapter should change the output"


def test_mixed_batch_rows_equal_rows_alone(engine):
    items = [(p, a) for p in PROMPTS for a in (None, "a", "b")]
    alone = [greedy_tokens(engine, [item])[0] for item in items]
    together = greedy_tokens(engine, items)
    assert together == alone
    assert len({tuple(t) for t in together}) > len(PROMPTS), "adapters should make rows differ"


def test_replace_keeps_running_request_and_frees_old_slot(engine, adapter_dirs):
    before = engine.adapter_slots.resident_slots()
    asyncio.run(engine.install_adapter(load_lora("a", adapter_dirs["b"], engine.base_shapes(), max_rank=64)))
    assert engine.adapter_slots.resident_slots() == before  # old slot freed at once: nobody used it
    assert greedy_tokens(engine, [(PROMPTS[0], "a")]) == greedy_tokens(engine, [(PROMPTS[0], "b")])
    asyncio.run(engine.install_adapter(load_lora("a", adapter_dirs["a"], engine.base_shapes(), max_rank=64)))
