"""Chat prompts for the router measurement (issue #7): a diverse, offline, seeded prompt set.

Kinds: capitals, arithmetic, definitions/synonyms/antonyms, "one sentence about X", short how-to
questions, "explain this saying" over Debian fortunes (`/usr/share/games/fortunes`) and "what does
this verse mean" over the KJV (Debian `bible-kjv`, `bible -f`). Prompts are deduplicated, shuffled
and split into `train.jsonl` and `heldout.jsonl` (no held-out prompt is in train), rows
`{"prompt": ..., "kind": ...}`.

    python -m tests.bench.router_prompts [OUT_DIR] [--train 500 --heldout 200 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "Austria": "Vienna", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo",
    "Morocco": "Rabat", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "South Africa": "Pretoria", "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar",
    "Tanzania": "Dodoma", "Uganda": "Kampala", "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul",
    "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Jordan": "Amman",
    "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Mongolia": "Ulaanbaatar", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "United States": "Washington, D.C.", "Mexico": "Mexico City",
    "Cuba": "Havana", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Bolivia": "Sucre", "Paraguay": "Asuncion", "Jamaica": "Kingston", "Kazakhstan": "Astana",
}
CAPITAL_T = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
             "What's the capital of {c}? Answer in one word.", "Tell me the capital of {c} and one fact about it."]

WORDS = ["happy", "big", "fast", "cold", "brave", "quiet", "bright", "ancient", "angry", "clever", "tired",
         "strong", "gentle", "rich", "empty", "honest", "curious", "difficult", "beautiful", "calm", "generous",
         "lazy", "loud", "narrow", "polite", "rare", "simple", "smooth", "strange", "weak", "wise", "begin",
         "build", "choose", "destroy", "explain", "forget", "gather", "hide", "improve", "laugh", "protect",
         "borrow", "whisper", "wander", "journey", "harvest", "library", "mountain", "ocean", "freedom", "justice",
         "courage", "memory", "patience", "friendship", "knowledge", "energy", "gravity", "democracy",
         "photosynthesis", "metaphor", "algorithm", "volcano", "habitat", "economy", "climate", "ambiguous",
         "meticulous", "resilient", "ephemeral", "benevolent", "candid", "diligent", "frugal", "nostalgia"]
WORD_T = ["Define the word \"{w}\".", "What does \"{w}\" mean?", "Give a synonym for \"{w}\".",
          "What is the opposite of \"{w}\"?", "Use the word \"{w}\" in a sentence.",
          "Give two synonyms for the word {w}."]

TOPICS = ["the moon", "coffee", "elephants", "the internet", "rain", "bicycles", "the ocean", "libraries",
          "volcanoes", "honey bees", "chess", "the Roman Empire", "electricity", "winter", "music", "friendship",
          "the Sahara desert", "penguins", "trains", "gardening", "the human heart", "robots", "bread", "football",
          "mountains", "the sun", "cats", "dogs", "recycling", "the printing press", "photography", "rainbows",
          "the Amazon rainforest", "airplanes", "mathematics", "tea", "dinosaurs", "the Eiffel Tower", "owls",
          "solar power", "autumn", "snow", "a lighthouse", "whales", "the piano", "history", "cheese", "ants",
          "the Great Wall of China", "clouds", "vaccines", "the stock market", "poetry", "a city at night",
          "a rainy Monday", "learning a new language", "kindness", "the wheel", "sleep", "a summer picnic"]
TOPIC_T = ["Write one sentence about {t}.", "Write a short sentence about {t}.", "Tell me one fact about {t}.",
           "Describe {t} in one sentence.", "Write a haiku about {t}."]

HOWTO = ["boil an egg", "make a cup of tea", "tie a shoelace", "plant a tree", "change a flat bicycle tyre",
         "save money each month", "fall asleep faster", "learn to swim", "write a good email", "clean a laptop screen",
         "make pancakes", "start running", "study for an exam", "remove a coffee stain", "cook rice",
         "water a cactus", "focus while working", "make a paper airplane", "introduce myself at a meeting",
         "back up my phone", "keep a plant alive indoors", "stop procrastinating", "fold a shirt", "brew coffee",
         "prepare for a job interview", "make new friends", "bake bread", "read faster", "calm down when stressed",
         "wash wool sweaters", "sharpen a knife", "pack for a weekend trip", "train a puppy to sit",
         "write a thank-you note", "reduce plastic waste", "choose a good password", "learn to play guitar",
         "make a budget", "build a campfire safely", "memorize a speech"]
HOWTO_T = ["How do I {h}?", "What is the best way to {h}?", "Give me three quick steps to {h}.",
           "Briefly, how can I {h}?"]

FORTUNE_FILES = ["wisdom", "platitudes", "fortunes", "people", "literature", "education", "science", "work"]
FORTUNE_T = ["Explain this saying: \"{s}\"", "What does this quote mean? \"{s}\"",
             "Explain in simple words: \"{s}\""]
VERSE_RANGES = ["Pro1:1-Pro31:31", "Mat5:1-Mat7:29", "Psa1:1-Psa34:22", "Ecc1:1-Ecc12:14", "Jn1:1-Jn3:36"]
VERSE_T = ["What does this verse mean: \"{v}\"", "Explain this Bible verse: \"{v}\"",
           "What is the meaning of \"{v}\"?"]


def fortunes(folder: Path = Path("/usr/share/games/fortunes")) -> list[str]:
    out = []
    for name in FORTUNE_FILES:
        path = folder / name
        if not path.exists():
            continue
        for entry in path.read_text(errors="replace").split("\n%\n"):
            text = re.split(r"\n\s*--", entry)[0]           # drop the attribution
            text = " ".join(text.split())
            if 25 <= len(text) <= 140 and not re.search(r"[|<>_=#]|:\s*$|^\w+:", text):
                out.append(text)
    return sorted(set(out))


def verses() -> list[str]:
    out = []
    for refs in VERSE_RANGES:
        run = subprocess.run(["bible", "-f", refs], capture_output=True, text=True, check=True)
        for line in run.stdout.splitlines():
            if " " in line:
                text = line.split(" ", 1)[1].strip()
                if 30 <= len(text) <= 160:
                    out.append(text)
    return sorted(set(out))


def arithmetic(rng: random.Random, n: int) -> list[str]:
    out = []
    while len(out) < n:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = rng.randrange(6)
        if kind == 0:
            out.append(f"What is {a} + {b}?")
        elif kind == 1:
            out.append(f"What is {max(a, b)} minus {min(a, b)}?")
        elif kind == 2:
            out.append(f"Compute {a % 13 + 2} times {b % 12 + 2}.")
        elif kind == 3:
            out.append(f"If I have {a} apples and give away {min(a, b) // 2}, how many are left?")
        elif kind == 4:
            out.append(f"What is {a * (b % 9 + 2)} divided by {b % 9 + 2}?")
        else:
            out.append(f"A book costs {a} dollars. How much do {b % 5 + 2} books cost?")
    return out


def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []

    def add(kind: str, prompts):
        rows.extend({"prompt": p, "kind": kind} for p in prompts)

    add("capital", [rng.choice(CAPITAL_T).format(c=c) for c in CAPITALS] +
        [rng.choice(CAPITAL_T).format(c=c) for c in rng.sample(sorted(CAPITALS), 30)])
    add("arithmetic", arithmetic(rng, 110))
    add("word", [t.format(w=w) for w in WORDS for t in rng.sample(WORD_T, 2)][:110])
    add("sentence", [rng.choice(TOPIC_T).format(t=t) for t in TOPICS] +
        [rng.choice(TOPIC_T).format(t=t) for t in rng.sample(TOPICS, 40)])
    add("howto", [rng.choice(HOWTO_T).format(h=h) for h in HOWTO] +
        [rng.choice(HOWTO_T).format(h=h) for h in rng.sample(HOWTO, 35)])
    f = fortunes()
    add("saying", [rng.choice(FORTUNE_T).format(s=s) for s in rng.sample(f, min(120, len(f)))])
    v = verses()
    add("verse", [rng.choice(VERSE_T).format(v=s) for s in rng.sample(v, min(120, len(v)))])

    seen, unique = set(), []
    for r in rows:                      # exact-duplicate prompts would leak held-out into train
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            unique.append(r)
    rng.shuffle(unique)
    return unique


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("/tmp/router"))
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = build(args.seed)
    if len(rows) < args.train + args.heldout:
        raise SystemExit(f"only {len(rows)} unique prompts; asked for {args.train} + {args.heldout}")
    heldout, train = rows[:args.heldout], rows[args.heldout:args.heldout + args.train]
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("heldout", heldout)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        kinds = {}
        for r in part:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        print(f"{name}: {len(part)} prompts -> {args.out / f'{name}.jsonl'} {dict(sorted(kinds.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
