"""Teacher vs students on SmolLM2: prune half the blocks, then train the pruned student three ways
at equal steps (CE only, logit KD with forward KL at T=2, sequence-level KD on teacher answers) and
compare them with `compress eval`.

    python -m tests.bench.distill_compare --work /tmp/distill [--steps 100]

Data (offline): training text is Debian `fortunes` plus KJV Genesis-Deuteronomy (`bible-kjv`);
held-out text is the Gospel of John, disjoint from both; the sequence-KD prompts are fortunes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

TEACHER = "smollm2-135m-instruct"


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def fortunes() -> list[str]:
    texts = []
    for f in sorted(Path("/usr/share/games/fortunes").glob("*")):
        if f.suffix or f.is_dir():
            continue
        for part in f.read_text(errors="ignore").split("\n%\n"):
            part = part.strip()
            if 40 < len(part) < 600:
                texts.append(part)
    return texts


def kjv(refs: str) -> str:
    out = subprocess.run(["bible", "-f", refs], capture_output=True, text=True, check=True).stdout
    return "\n".join(line.split(" ", 1)[1] for line in out.splitlines() if " " in line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=256)
    args = ap.parse_args(argv)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    f = fortunes()
    rng.shuffle(f)
    (w / "train.txt").write_text("\n\n".join(f[:3000]) + "\n\n" + kjv("Gen1:1-Deu34:12"))
    (w / "heldout.txt").write_text(kjv("Jn1:1-Jn21:25"))
    prompts = [{"prompt": "Tell me something in the spirit of this saying: " + " ".join(t.split()[:10])}
               for t in f[3000:3000 + args.prompts]]
    (w / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    cli = [sys.executable, "-m", "server"]
    common = ["--max-steps", str(args.steps), "--batch-size", "8", "--seq-len", "128", "--lr", "1e-4"]
    if not (w / "pruned").exists():
        sh(*cli, "compress", "prune", TEACHER, str(w / "pruned"), "--keep-ratio", "0.5", "--calib",
           str(w / "train.txt"))
    runs = {"ce": ["--data", str(w / "train.txt"), "--loss", "ce"],
            "kd": ["--data", str(w / "train.txt"), "--loss", "forward_kl", "--temperature", "2"],
            "seqkd": ["--data", str(w / "prompts.jsonl"), "--generate", "--max-new-tokens", "96"]}
    for name, extra in runs.items():
        if not (w / name / "slimserve.json").exists():
            sh(*cli, "compress", "distill", str(w / name), "--teacher", TEACHER, "--student", str(w / "pruned"),
               *extra, *common)
    sh(*cli, "compress", "eval", TEACHER, str(w / "pruned"), str(w / "ce"), str(w / "kd"), str(w / "seqkd"),
       "--text", str(w / "heldout.txt"), "--out", str(w / "eval"), "--max-tokens", "8192")
    for name in runs:
        m = json.loads((w / name / "slimserve.json").read_text())
        print(f"{name}: steps {m['steps']}, tokens {m['tokens']}, KL to teacher {m['held_out_kl_to_teacher']}, "
              f"{m['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
