"""lm-eval (EleutherAI's harness) through slimserve: a multiple-choice task scored by `local-completions`.

`local-completions` scores each choice with one /v1/completions request: the token ids of context +
choice as `prompt`, `echo: true`, `logprobs: 1`, `max_tokens: 1`, and sums `token_logprobs[ctxlen:-1]`
(the prompt's logprobs from the choice on; the last entry, the generated token, is dropped). The
accuracy and every choice's loglikelihood must equal lm-eval's own in-process `hf` run on the same
model folder. The task is a local JSONL with a YAML config, written at test time: nothing comes
from a hub. lm-eval lives in its own environment (.venv-lmeval, built by .ci/install from
tests/requirements-lmeval.txt); SLIMSERVE_LM_EVAL names another `lm_eval` executable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = Path(os.environ.get("SLIMSERVE_LM_EVAL") or ROOT / ".venv-lmeval" / "bin" / "lm_eval")
TASK = "slimserve_mc"
# Loglikelihoods (sums over a few tokens) differ by float32 rounding between the server's forward
# pass and lm-eval's own: measured at most 1e-5 (torch engine) and 2.4e-5 (vLLM) on the tiny model.
# A token scored at the wrong position is off by nats.
LL_ABS_TOL = 2e-3
SMOLLM2_ROWS = 16  # the real model's run scores the first rows only, to keep the suite's time down

# Checked at collection, so that without lm-eval no server starts for these tests.
pytestmark = pytest.mark.skipif(
    not LM_EVAL.exists(),
    reason=f"lm-eval is not installed at {LM_EVAL} (.ci/install builds .venv-lmeval: python3 -m venv .venv-lmeval "
           "&& .venv-lmeval/bin/pip install -r tests/requirements-lmeval.txt)")

# (context, choices, index of the right one); each context ends without a space, target_delimiter adds it.
ROWS = [
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("The capital of Germany is", ["Rome", "Berlin", "Vienna", "Paris"], 1),
    ("The capital of Italy is", ["Madrid", "Lisbon", "Rome", "Athens"], 2),
    ("The capital of Spain is", ["Barcelona", "Porto", "Lyon", "Madrid"], 3),
    ("The capital of Japan is", ["Tokyo", "Beijing", "Seoul", "Bangkok"], 0),
    ("The capital of the United Kingdom is", ["Dublin", "London", "Edinburgh", "Cardiff"], 1),
    ("The capital of Russia is", ["Kyiv", "Minsk", "Moscow", "Warsaw"], 2),
    ("The capital of Egypt is", ["Tunis", "Nairobi", "Lagos", "Cairo"], 3),
    ("The quick brown fox jumps over the lazy", ["dog", "car", "moon", "table"], 0),
    ("Two plus two equals", ["seven", "four", "nine", "one"], 1),
    ("The sun rises in the", ["west", "north", "east", "south"], 2),
    ("Water freezes at zero degrees", ["Fahrenheit", "Kelvin", "Rankine", "Celsius"], 3),
    ("A week has seven", ["days", "hours", "months", "years"], 0),
    ("The opposite of hot is", ["warm", "cold", "red", "loud"], 1),
    ("Cats and dogs are", ["plants", "rocks", "animals", "planets"], 2),
    ("The color of the clear sky is", ["green", "purple", "orange", "blue"], 3),
    ("Hello, world! How are you", ["today?", "yesterday!", "green.", "seven,"], 0),
    ("The largest planet in our solar system is", ["Mars", "Jupiter", "Mercury", "Venus"], 1),
    ("Bees make", ["milk", "silk", "honey", "wool"], 2),
    ("The first month of the year is", ["March", "June", "December", "January"], 3),
    ("Ice is frozen", ["water", "sand", "iron", "glass"], 0),
    ("We see with our", ["ears", "eyes", "hands", "feet"], 1),
    ("The number after nine is", ["eight", "eleven", "ten", "one"], 2),
    ("A triangle has three", ["circles", "wheels", "legs", "sides"], 3),
    ("Paris is a city in", ["France", "Brazil", "Canada", "India"], 0),
    ("The chemical symbol for gold is", ["Ag", "Au", "Fe", "Pb"], 1),
    ("Shakespeare wrote Romeo and", ["Hamlet", "Macbeth", "Juliet", "Othello"], 2),
    ("The Earth orbits the", ["Moon", "Mars", "comet", "Sun"], 3),
    ("Low-rank adapters specialise a base", ["model", "river", "shoe", "cloud"], 0),
    ("Quantization stores weights in fewer", ["colors", "bits", "rooms", "songs"], 1),
]


def _write_task(folder: Path) -> Path:
    """A multiple-choice task over a local JSONL (`dataset_path: json`), in its own include folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ROWS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
    return folder


def run_lm_eval(work: Path, model: str, model_args: str, extra: list[str] = (), limit: int | None = None
                ) -> tuple[float, dict]:
    """Run `lm_eval run` on the task; return its accuracy and {doc_id: [loglikelihood per choice]}."""
    tasks = _write_task(work / "tasks")
    out = work / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false",
        "OPENAI_API_KEY": "", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    env.pop("VIRTUAL_ENV", None)
    argv = [str(LM_EVAL), "run", "--model", model, "--model_args", model_args, "--tasks", TASK,
            "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *extra,
            *(["--limit", str(limit)] if limit else [])]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=work)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"lm_eval {model} exited {proc.returncode}:\n{log}"
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    assert results and samples, f"lm_eval {model} wrote no results under {out}:\n{log}"
    acc = json.loads(results[-1].read_text())["results"][TASK]["acc,none"]
    lls = {}
    for line in samples[-1].read_text().splitlines():
        s = json.loads(line)
        lls[s["doc_id"]] = [float(ll) for ll, _greedy in s["filtered_resps"]]
    assert len(lls) == (limit or len(ROWS)), f"{len(lls)} samples for {limit or len(ROWS)} rows"
    return acc, lls


def hf_reference(work: Path, model_dir: Path, limit: int | None = None) -> tuple[float, dict]:
    return run_lm_eval(work, "hf", f"pretrained={model_dir},dtype=float32", ["--device", "cpu"], limit)


def through_slimserve(work: Path, base_url: str, served_name: str, model_dir: Path, limit: int | None = None
                      ) -> tuple[float, dict]:
    return run_lm_eval(work, "local-completions",
                       f"model={served_name},base_url={base_url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={model_dir},num_concurrent=1,max_retries=1,timeout=120", limit=limit)


def assert_same_scores(served: tuple[float, dict], reference: tuple[float, dict]) -> None:
    (acc, lls), (ref_acc, ref_lls) = served, reference
    print(f"lm-eval accuracy: slimserve {acc:.4f}, hf {ref_acc:.4f} over {len(ref_lls)} rows")  # pytest -s
    far = [(doc, i, lls[doc][i], ref_lls[doc][i]) for doc in sorted(ref_lls) for i in range(len(ref_lls[doc]))
           if not math.isclose(lls[doc][i], ref_lls[doc][i], rel_tol=1e-5, abs_tol=LL_ABS_TOL)]
    assert not far, f"{len(far)} loglikelihoods differ (doc, choice, slimserve, hf), first: {far[:5]}"
    assert acc == ref_acc


@pytest.fixture(scope="module")
def tiny_reference(tiny_model_dir, tmp_path_factory):
    return hf_reference(tmp_path_factory.mktemp("lmeval-hf-tiny"), tiny_model_dir)


def test_lm_eval_multiple_choice_matches_hf(tiny_reference, server, tiny_model_dir, tmp_path):
    from conftest import TINY

    assert_same_scores(through_slimserve(tmp_path, server.base_url, TINY, tiny_model_dir), tiny_reference)


@pytest.mark.slow
def test_lm_eval_multiple_choice_smollm2(start_server, tmp_path_factory):
    from server.default_model import default_model_dir
    from server.settings import _default_cache_dir

    cache = Path(os.environ["SLIMSERVE_CACHE_DIR"]) if "SLIMSERVE_CACHE_DIR" in os.environ else _default_cache_dir()
    folder = default_model_dir(cache)
    reference = hf_reference(tmp_path_factory.mktemp("lmeval-hf-smollm2"), folder, SMOLLM2_ROWS)
    smollm = start_server(["--model", str(folder), "--served-model-name", "smollm2", "--dtype", "float32"],
                          timeout=300)
    served = through_slimserve(tmp_path_factory.mktemp("lmeval-smollm2"), smollm.base_url, "smollm2", folder,
                               SMOLLM2_ROWS)
    assert_same_scores(served, reference)
    assert reference[0] >= 0.8  # the real model knows most of these; a wrong task setup scores ~0.25
