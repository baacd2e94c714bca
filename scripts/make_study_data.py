"""Writes the bundled miniature study's data: studies/data/mixed-tiny/*.jsonl.

A mixed training set with the contrast UAL is about, at a size the bundled tiny model
(models/tiny) learns in minutes on two CPU cores:

- low entropy, one correct answer: successor drills ("What number comes after 347?" ->
  "347 + 1 = 348\\n#### 348"). The Llama tokenizer writes numbers digit by digit, so the
  answer is a copy with the last digit raised (and a carry one time in ten): a rule a 2-layer
  model can learn, and one a held-out question tests without repeating a training one.
  Scored uncertainty 1.
- high entropy, many acceptable answers: open-ended requests built from slots ("Name a fruit.",
  "Suggest a name for a puppy.", "Write a sentence about a river."), each answered in
  training by one of many acceptable responses drawn at random. Scored uncertainty 9.

The scores are by construction (the generator knows which family a line belongs to), not
elicited from an LLM; `ual annotate` is how a user's own data gets them.

Files:
- train.jsonl: 320 drills + 160 open-ended lines, shuffled;
- low.jsonl: 80 new drills (the low-entropy split: exact match and held-out NLL);
- high.jsonl: 12 new open-ended prompts, each with 4 references (`references`), whose slot
  values (3 categories, 3 pets, 6 places) never occur in training (held-out NLL on unseen references, sampled diversity);
- eval.jsonl: the first 40 drills and every high prompt with its first reference, the
  held-out set the runs' curves are drawn on.

Needs only the standard library: python scripts/make_study_data.py
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "studies" / "data" / "mixed-tiny"

CATEGORIES = {
    "fruit": ["apple", "mango", "pear", "banana", "cherry", "plum", "peach", "lemon", "grape", "kiwi"],
    "animal": ["horse", "tiger", "rabbit", "otter", "zebra", "camel", "fox", "wolf", "goat", "bear"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "teal", "pink", "brown", "grey"],
    "country": ["France", "Kenya", "Peru", "Japan", "Canada", "Norway", "Chile", "India", "Egypt", "Spain"],
    "vegetable": ["carrot", "leek", "onion", "potato", "pea", "cabbage", "radish", "turnip", "bean", "kale"],
    "bird": ["robin", "crow", "owl", "swan", "heron", "eagle", "parrot", "finch", "gull", "wren"],
    "instrument": ["piano", "violin", "flute", "drum", "guitar", "harp", "cello", "trumpet", "oboe", "banjo"],
    "sport": ["tennis", "rugby", "hockey", "cricket", "golf", "rowing", "boxing", "skiing", "judo", "polo"],
    "tree": ["oak", "pine", "birch", "maple", "willow", "cedar", "elm", "ash", "beech", "yew"],
    "flower": ["rose", "tulip", "daisy", "lily", "poppy", "iris", "orchid", "violet", "lotus", "aster"],
    "metal": ["iron", "copper", "tin", "zinc", "silver", "gold", "lead", "nickel", "cobalt", "steel"],
}
NAME_TEMPLATES = ["How about {n}?", "{n} would be a good name.", "You could call it {n}.", "I would choose {n}."]
NAMES = ["Milo", "Luna", "Biscuit", "Pepper", "Olive", "Ziggy", "Maple", "Rocco", "Hazel", "Juniper",
         "Clover", "Dusty", "Poppy", "Basil", "Nova", "Ginger", "Otis", "Willow", "Pickle", "Sunny"]
PETS_TRAIN = ["puppy", "kitten", "hamster", "goldfish", "parrot", "pony"]
PETS_HELD = ["tortoise", "ferret", "lamb"]
THINGS_TRAIN = ["river", "mountain", "garden", "city", "train", "library", "storm", "market", "forest", "beach"]
THINGS_HELD = ["lighthouse", "bakery", "desert", "bridge", "harbour", "castle"]
SENTENCES = [
    "The {t} was quiet in the early morning.",
    "I still remember the {t} from my childhood.",
    "Everyone loves a walk near the {t}.",
    "A {t} can look different in every season.",
    "The old {t} was full of surprises.",
    "We spent the whole afternoon at the {t}.",
]


def drill(n):
    return {"instruction": f"What number comes after {n}?", "output": f"{n} + 1 = {n + 1}\n#### {n + 1}",
            "uncertainty": 1}


def category_line(category, rng):
    item = rng.choice(CATEGORIES[category])
    article = "An" if item[0] in "aeiouAEIOU" else "A"
    answers = {
        "colour": f"{item.capitalize()} is a colour.",
        "country": f"{item} is a country.",
        "metal": f"{item.capitalize()} is a metal.",
    }
    return answers.get(category, f"{article} {item} is a {category}.")


def open_ended(rng, categories, pets, things):
    kind = rng.randrange(3)
    if kind == 0:
        category = rng.choice(categories)
        return f"Name a {category}.", lambda: category_line(category, rng)
    if kind == 1:
        pet = rng.choice(pets)
        return (f"Suggest a name for a {pet}.",
                lambda: rng.choice(NAME_TEMPLATES).format(n=rng.choice(NAMES)))
    thing = rng.choice(things)
    article = "an" if thing[0] in "aeiou" else "a"
    return f"Write a sentence about {article} {thing}.", lambda: rng.choice(SENTENCES).format(t=thing)


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(7)
    numbers = rng.sample(range(10, 999), 400)
    drills = [drill(n) for n in numbers]
    train_categories, held_categories = list(CATEGORIES)[:8], list(CATEGORIES)[8:]
    high_train = []
    for _ in range(160):
        instruction, answer = open_ended(rng, train_categories, PETS_TRAIN, THINGS_TRAIN)
        high_train.append({"instruction": instruction, "output": answer(), "uncertainty": 9})
    held = ([(f"Name a {c}.", lambda c=c: category_line(c, rng)) for c in held_categories]
            + [(f"Suggest a name for a {p}.",
                lambda: rng.choice(NAME_TEMPLATES).format(n=rng.choice(NAMES))) for p in PETS_HELD]
            + [(f"Write a sentence about {'an' if t[0] in 'aeiou' else 'a'} {t}.",
                lambda t=t: rng.choice(SENTENCES).format(t=t)) for t in THINGS_HELD])
    high_held = []
    for instruction, answer in held:
        references = []
        while len(references) < 4:
            r = answer()
            if r not in references:
                references.append(r)
        high_held.append({"instruction": instruction, "output": references[0],
                          "references": references, "uncertainty": 9})
    train = drills[:320] + high_train
    rng.shuffle(train)
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT / "train.jsonl", train)
    write(OUT / "low.jsonl", drills[320:])
    write(OUT / "high.jsonl", high_held)
    write(OUT / "eval.jsonl", drills[320:360] + [{k: v for k, v in h.items() if k != "references"}
                                                 for h in high_held])


if __name__ == "__main__":
    main()
