"""Writes the bundled UAL dataset of the tiny model: models/tiny/data/{train,eval}.jsonl.

Two kinds of sample, the contrast UAL is about:
- arithmetic drills ("What is 37 + 48?" -> "37 + 48 = 85\\n#### 85"), deterministic, so scored
  uncertainty 1 (low entropy, little smoothing); the tiny model was pre-trained on GSM8K
  solutions (models/README.md), so it knows the numbers and the "#### N" ending but not this
  format, which is what a short LoRA run can visibly learn;
- open-ended instructions written for ual (scripts/open_ended.jsonl), uncertainty 8-10.

The held-out set is drawn from the same two distributions (new drills, the last open-ended
items), so the held-out NLL measures what the run learned, not memorised lines.

Needs only the standard library: python scripts/make_tiny_data.py
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "models" / "tiny" / "data"


def drill(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"instruction": f"What is {a} {op} {b}?", "output": f"{a} {op} {b} = {c}\n#### {c}",
            "uncertainty": 1}


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(1)
    open_ended = [json.loads(l) for l in open(ROOT / "scripts" / "open_ended.jsonl")]
    drills = []
    seen = set()
    while len(drills) < 460:
        d = drill(rng)
        if d["instruction"] not in seen:  # no held-out question repeats a training one
            seen.add(d["instruction"])
            drills.append(d)
    train = drills[:400] + open_ended[:30]
    rng.shuffle(train)
    write(DATA / "train.jsonl", train)
    write(DATA / "eval.jsonl", drills[400:] + open_ended[30:])


if __name__ == "__main__":
    main()
