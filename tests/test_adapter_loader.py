"""The adapter loader refuses every hostile or mismatched folder with a message that says why."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from adapter_factory import make_adapter
from adapters.cache import AdapterLRU, NoRoom
from adapters.loader import AdapterError, check_name, load_lora, resolve_inside


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("loader") / "good", rank=4)


@pytest.fixture(scope="module")
def shapes(tiny_model_dir):
    from server.engines.torch.engine import TorchEngine

    return TorchEngine.load("tiny", tiny_model_dir, dtype="float32").base_shapes()


def _copy(good, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


def _reason(folder, shapes, max_rank=64, name="x"):
    with pytest.raises(AdapterError) as err:
        load_lora(name, folder, shapes, max_rank)
    return err.value.reason, str(err.value)


def test_good_adapter_loads(good, shapes):
    w = load_lora("good", good, shapes, max_rank=64)
    assert w.rank == 4 and w.scale == 2.0
    assert all(a.shape[0] == 4 and b.shape[1] == 4 for a, b in w.modules.values())


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "", "x" * 65, "sp ace", "é", None, 5])
def test_bad_names(name):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        check_name(name)


def test_good_names():
    for name in ["a", "support-bot", "v1.2_final", "A" * 64]:
        assert check_name(name) == name


def test_paths_must_stay_inside_roots(good, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    inside = _copy(good, root, "inside")
    assert resolve_inside(inside, [root]) == inside.resolve()
    with pytest.raises(AdapterError) as err:
        resolve_inside(good, [root])
    assert err.value.status == 403 and err.value.reason == "outside_root"
    (root / "escape").symlink_to(good, target_is_directory=True)
    with pytest.raises(AdapterError, match="outside"):
        resolve_inside(root / "escape", [root])
    with pytest.raises(AdapterError, match="outside"):
        resolve_inside(root / os.path.relpath(good, root), [root])  # ../../ traversal
    with pytest.raises(AdapterError) as err:
        resolve_inside(root / "missing", [root])
    assert err.value.status == 404
    with pytest.raises(AdapterError) as err:
        resolve_inside(inside, [])
    assert err.value.reason == "no_root"


def test_symlinked_weights_file_escaping_is_refused(good, shapes, tmp_path):
    folder = _copy(good, tmp_path)
    os.remove(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").symlink_to(good / "adapter_model.safetensors")
    assert _reason(folder, shapes)[0] == "outside_root"


def test_pickle_weights_are_refused(good, shapes, tmp_path):
    folder = _copy(good, tmp_path)
    os.rename(folder / "adapter_model.safetensors", folder / "adapter_model.bin")
    reason, msg = _reason(folder, shapes)
    assert reason == "pickle_refused" and "pickle" in msg


def test_missing_files(good, shapes, tmp_path):
    folder = _copy(good, tmp_path, "nocfg")
    os.remove(folder / "adapter_config.json")
    assert _reason(folder, shapes)[0] == "missing_config"
    folder = _copy(good, tmp_path, "noweights")
    os.remove(folder / "adapter_model.safetensors")
    assert _reason(folder, shapes)[0] == "missing_weights"


@pytest.mark.parametrize("payload", [
    b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"nope",
    struct.pack("<Q", 2) + b"[]",
    struct.pack("<Q", 80) + json.dumps({"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [4, 4],
                                        "data_offsets": [0, 9999]}}).encode().ljust(80),
    struct.pack("<Q", 80) + json.dumps({"base_model.model.x.lora_A.weight": {"dtype": "I64", "shape": [1],
                                        "data_offsets": [0, 8]}}).encode().ljust(80) + b"\0" * 8,
])
def test_corrupt_safetensors(good, shapes, tmp_path, payload):
    folder = _copy(good, tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    assert _reason(folder, shapes)[0] == "corrupt_weights"


@pytest.mark.parametrize("change, reason", [
    ({"r": 1000}, "rank_too_large"), ({"r": "4"}, "bad_config"), ({"r": 0}, "bad_config"),
    ({"lora_alpha": -1}, "bad_config"), ({"use_dora": True}, "unsupported"), ({"peft_type": "IA3"}, "unsupported"),
    ({"target_modules": []}, "bad_config"), ({"modules_to_save": ["lm_head"]}, "unsupported"),
    ({"bias": "all"}, "unsupported"),
])
def test_bad_config_values(good, shapes, tmp_path, change, reason):
    folder = _copy(good, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert _reason(folder, shapes)[0] == reason


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_malformed_config(good, shapes, tmp_path, text):
    folder = _copy(good, tmp_path)
    (folder / "adapter_config.json").write_bytes(text.encode("latin-1"))
    assert _reason(folder, shapes)[0] == "bad_config"


def test_rank_above_server_limit(good, shapes):
    reason, msg = _reason(good, shapes, max_rank=2)
    assert reason == "rank_too_large" and "max_lora_rank 2" in msg


def test_target_module_missing_from_base(good, shapes):
    trimmed = {k: v for k, v in shapes.items() if not k.endswith("q_proj")}
    reason, msg = _reason(good, trimmed)
    assert reason == "missing_module" and "q_proj" in msg


def test_shapes_of_another_base_are_refused(good, shapes):
    other = {k: (i + 8, o) for k, (i, o) in shapes.items()}  # same names, a wider model
    reason, msg = _reason(good, other)
    assert reason == "shape_mismatch" and "another base model" in msg


def test_lru_evicts_least_recent_and_spares_pinned_and_busy():
    lru = AdapterLRU(2)
    lru.add("p", pinned=True)
    lru.add("a", pinned=False)
    assert lru.victims_for("b", busy=lambda n: False) == ["a"]
    assert lru.victims_for("a", busy=lambda n: False) == []  # replacing in place
    with pytest.raises(NoRoom):
        lru.victims_for("b", busy=lambda n: n == "a")
    lru = AdapterLRU(2)
    lru.add("x", False)
    lru.add("y", False)
    lru.touch("x")
    assert lru.victims_for("z", busy=lambda n: False) == ["y"]
