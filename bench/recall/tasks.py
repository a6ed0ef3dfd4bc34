#!/usr/bin/env python3
"""Seeded long-range recall tasks with verifiable answers.

Each task states one fact near the start of the prompt (a passkey, the name of a character, an item
of a short list), follows it with varied filler prose that never contains the answer, and ends with
a question whose answer is that fact. The prompt reaches the question only after the filler, so
whatever the KV cache evicted while reading the filler decides whether the fact is still there.

    python bench/recall/tasks.py --seed 1 --count 48 --out bench/recall/tasks.tsv

Output: one task per line, tab-separated: id, kind, answer, head, tail. head holds the fact, tail
the filler and the question; the prompt is head + tail (newlines written as a backslash and n).
The seed names the split: the evaluation set uses --seed 1 and calibration never uses it.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from dataclasses import dataclass

# Answers come from these lists and nothing else; the filler vocabulary below is disjoint from them
# (checked by the tests), so an answer cannot be copied from the filler by chance.
NAMES = [
    "Marisol", "Theodric", "Oksana", "Bartholomew", "Ingrid", "Casimir", "Lucinda", "Evander",
    "Rosalind", "Leopold", "Anneliese", "Florian", "Genevieve", "Ignatius", "Philippa", "Thaddeus",
    "Ottoline", "Severin", "Beatrix", "Cornelius", "Wilhelmina", "Augustin", "Clementine",
    "Percival", "Henrietta", "Lysander", "Imogen", "Barnaby", "Octavia", "Rupert",
]
ROLES = [
    "lighthouse keeper", "baker", "ship's captain", "village doctor", "clockmaker", "librarian",
    "blacksmith", "beekeeper", "stationmaster", "cartographer",
]
LIST_KINDS = {
    "shopping list": ["lemons", "candles", "rope", "flour", "soap", "matches", "honey", "nails",
                      "vinegar", "string", "batteries", "cinnamon"],
    "packing list": ["compass", "blanket", "lantern", "scarf", "kettle", "notebook", "umbrella",
                     "gloves", "whistle", "thermos", "sandals", "binoculars"],
}
ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}

# The filler: short declarative sentences drawn from a small grammar.
SUBJECTS = [
    "The farmer", "A small boat", "The old library", "Our neighbour", "The river", "A tired horse",
    "The committee", "An early train", "The garden", "A quiet student", "The market", "The wind",
    "A stray cat", "The orchestra", "The bridge", "A young teacher", "The bakery down the road",
    "The mountain path", "A group of hikers", "The museum",
]
VERBS = [
    "waited for", "walked past", "talked about", "looked at", "forgot about", "painted",
    "repaired", "counted", "followed", "noticed", "described", "carried", "visited", "ignored",
    "measured", "cleaned", "photographed", "remembered",
]
OBJECTS = [
    "the wooden fence", "a long letter", "the evening clouds", "the empty square", "a blue jacket",
    "the broken clock", "the tall trees", "a heavy suitcase", "the narrow street", "the harbour",
    "a basket of apples", "the afternoon light", "the stone wall", "a folded map", "the quiet lake",
    "the crowded platform", "a paper kite", "the winter coats", "the open window",
]
TAILS = [
    "before lunch", "in the rain", "after a while", "without a word", "on the way home",
    "for a long time", "again and again", "at dawn", "near the station", "late in the evening",
    "with great care", "as usual", "once more", "in silence", "by the old gate",
]
CONNECTIVES = ["Later,", "Meanwhile,", "After that,", "Then", "Soon", "Still,", "Elsewhere,"]


@dataclass
class Task:
    id: str
    kind: str
    answer: str
    head: str
    tail: str

    def prompt(self) -> str:
        return self.head + self.tail


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
    if rng.random() < 0.3:
        c = rng.choice(CONNECTIVES)
        s = f"{c} {s[0].lower()}{s[1:]}"
    return s


def filler(rng: random.Random, words: int) -> str:
    paragraphs, para, n = [], [], 0
    while n < words:
        s = sentence(rng)
        para.append(s)
        n += len(s.split())
        if len(para) >= rng.randint(4, 7):
            paragraphs.append(" ".join(para))
            para = []
    if para:
        paragraphs.append(" ".join(para))
    return "\n\n".join(paragraphs)


INTRO = "Read these notes carefully. A question about them comes at the end.\n\n"


def make_task(rng: random.Random, index: int, kind: str, filler_words: int) -> Task:
    if kind == "passkey":
        answer = str(rng.randint(10000, 99999))
        fact = f"Important: the passkey is {answer}. Remember it."
        question = "What is the passkey? Answer with the number only."
    elif kind == "name":
        answer = rng.choice(NAMES)
        role = rng.choice(ROLES)
        fact = f"The {role} in this story is named {answer}."
        question = f"What is the name of the {role}? Answer with the name only."
    elif kind == "list":
        title = rng.choice(sorted(LIST_KINDS))
        items = rng.sample(LIST_KINDS[title], 5)
        k = rng.randint(1, 5)
        answer = items[k - 1]
        fact = f"Here is the {title}: " + ", ".join(items) + "."
        question = f"What is the {ORDINALS[k]} item on the {title}? Answer with the item only."
    else:
        raise ValueError(f"unknown kind {kind!r}")
    head = INTRO + fact
    tail = "\n\n" + filler(rng, filler_words) + "\n\n" + question
    return Task(f"{kind}-{index:03d}", kind, answer, head, tail)


KINDS = ("passkey", "name", "list")


def make_tasks(seed: int, count: int, filler_words: int = 480,
               kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """count tasks, the kinds in turn."""
    rng = random.Random(seed)
    return [make_task(rng, i, kinds[i % len(kinds)], filler_words) for i in range(count)]


def answer_matches(answer: str, text: str) -> bool:
    """The answer as a whole word of the generated text, case-insensitive (bench/recall/recall.cc
    applies the same rule)."""
    return re.search(r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])",
                     text.lower()) is not None


def escape(s: str) -> str:
    if "\t" in s or "\\n" in s:
        raise ValueError("task text must not hold tabs or a literal backslash-n")
    return s.replace("\n", "\\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--filler_words", type=int, default=480,
                    help="words of filler between the fact and the question")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, taken in turn")
    ap.add_argument("--out", default="-")
    a = ap.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds {a.kinds!r}: each of {', '.join(KINDS)}")
    lines = ["# id\tkind\tanswer\thead\ttail (seed %d, %d filler words)" % (a.seed,
                                                                           a.filler_words)]
    for t in make_tasks(a.seed, a.count, a.filler_words, kinds):
        lines.append("\t".join([t.id, t.kind, t.answer, escape(t.head), escape(t.tail)]))
    text = "\n".join(lines) + "\n"
    if a.out == "-":
        sys.stdout.write(text)
    else:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
