"""Benchmark prompts: read from a file, or generated offline from an embedded word list with a fixed seed.

The generated prompts need no download and no tokenizer: each is an instruction followed by a
passage of common English words (almost all one BPE token each with their leading space), sized
to about `input_len` tokens. The real prompt token counts come back in the server's `usage`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from server.errors import ConfigError

# Common English words; with a leading space each is one token in GPT-2/Llama-style BPE vocabularies.
WORDS = """the of and to in is was he for it with as his on be at by had are but from or have an they which
one you were all we her she there would their will when who him been has more if no out do so can what
up said about other into than its time only could new them man some these then two first may any like now
my such make over our even most me state after also made many did must before back see through way where
get much go well your know should down work year because come people just say each those take day good how
long own too little use us very great still men here life both between old under last never place same
another think house while high right might came off find states since used give against three himself
look few general hand school part small american again world upon home war around however house point form
water light city river mountain tree field garden road bridge market village morning evening night summer
winter spring autumn rain snow wind cloud sun moon star sea ship boat harbour island forest stone bread
milk cheese apple fruit flower grass bird horse dog cat fish sheep cattle farmer teacher doctor child
mother father brother sister friend king queen soldier story letter book song music paper table chair
window door wall floor kitchen room street station train music colour red green blue white black warm cold
quiet loud early late small large young open close begin end travel carry build write read learn teach
""".split()

INSTRUCTIONS = [
    "Summarise the following notes in a few sentences:",
    "Write a short story that uses these words:",
    "Explain what connects the following ideas:",
    "Turn these words into a poem:",
    "Describe a scene that contains the following:",
    "List the main themes in this text:",
]


def synthetic_prompts(n: int, input_len: int, seed: int = 0) -> list[str]:
    """`n` prompts of about `input_len` tokens each, the same for the same seed on every machine."""
    if n < 1 or input_len < 1:
        raise ConfigError("num_prompts" if n < 1 else "input_len", "must be at least 1")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        head = rng.choice(INSTRUCTIONS)
        body_len = max(1, input_len - len(head.split()) - 2)
        prompts.append(head + " " + " ".join(rng.choice(WORDS) for _ in range(body_len)) + ".")
    return prompts


def load_prompts(path: Path) -> list[str | list[dict]]:
    """Prompts from a file: plain text (one prompt per non-empty line) or JSONL rows with
    `prompt` (text) or `messages` (a chat conversation)."""
    if not path.is_file():
        raise ConfigError("prompts", f"no such file: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return lines
    out: list[str | list[dict]] = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("prompts", f"{path}:{i}: not JSON ({exc.msg})") from exc
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            out.append(row["messages"])
        else:
            raise ConfigError("prompts", f"{path}:{i}: a row needs `prompt` (text) or `messages`")
    if not out:
        raise ConfigError("prompts", f"{path} holds no prompts")
    return out


def pick(prompts: list, n: int, seed: int = 0) -> list:
    """`n` prompts from a loaded list: shuffled with the seed, repeated in that order when too few."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]
