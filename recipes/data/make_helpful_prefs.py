"""Generate the quickstart's preference pairs: helpful vs unhelpful answers to simple instructions.

Written for trl-plus (no text copied from any dataset). Every pair has the same user instruction; the chosen answer
does what was asked, the rejected one dodges, refuses or gets it wrong. Train and held-out pairs use disjoint
instructions. Deterministic: ``python recipes/data/make_helpful_prefs.py`` rewrites both files identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Sweden", "Stockholm"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Russia", "Moscow"),
    ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"), ("Australia", "Canberra"),
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"),
    ("old", "young"), ("rich", "poor"), ("hard", "soft"), ("high", "low"), ("thick", "thin"), ("near", "far"),
]  # fmt: skip
ANIMALS = [
    ("cow", "moos"), ("dog", "barks"), ("cat", "meows"), ("duck", "quacks"), ("sheep", "bleats"), ("lion", "roars"),
    ("horse", "neighs"), ("pig", "oinks"), ("owl", "hoots"), ("snake", "hisses"), ("frog", "croaks"), ("bee", "buzzes"),
]  # fmt: skip
TIPS = [
    ("Give me one tip for sleeping better.", "Go to bed and wake up at the same time every day, even on weekends."),
    ("How can I remember new words in a foreign language?", "Review them a few minutes each day and use each new word in a sentence of your own."),
    ("How do I keep bread fresh longer?", "Store it in a paper bag or a bread box at room temperature, or freeze slices you will not eat within two days."),
    ("What should I do before a job interview?", "Read about the company, prepare two or three examples of your work, and plan to arrive ten minutes early."),
    ("How can I save money on groceries?", "Plan your meals for the week, write a shopping list, and stick to it."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag in a cup, wait three to five minutes, then remove the bag."),
    ("Give me a tip for writing a clear email.", "Put the main request in the first sentence and keep the email short."),
    ("How can I drink more water during the day?", "Keep a filled bottle on your desk and refill it every time it is empty."),
    ("How do I stop procrastinating on a big task?", "Split it into small steps and start with one step that takes less than ten minutes."),
    ("What is a good way to start running?", "Begin with short runs of ten to fifteen minutes, three times a week, and increase slowly."),
    ("How can I keep my houseplants alive?", "Check the soil with a finger and water only when the top few centimetres are dry."),
    ("How do I clean a stained coffee mug?", "Scrub it with a paste of baking soda and a little water, then rinse."),
    ("How should I prepare for a long flight?", "Drink water, wear comfortable clothes, and stand up to stretch every hour or two."),
    ("How can I make my passwords safer?", "Use a long, unique password for every account and keep them in a password manager."),
    ("What can I do when I feel stressed?", "Take a few slow, deep breaths and go for a short walk if you can."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
]  # fmt: skip
DODGES = [
    "I don't know.", "Why do you want to know that?", "That is not something I can help with.",
    "Figure it out yourself.", "Let's talk about something else.", "Hmm, hard to say.", "Ask someone else.",
    "I would rather not answer that.", "Who cares?", "Maybe. Maybe not.",
]  # fmt: skip


def _pairs(rng: random.Random) -> list[tuple[str, str, str]]:
    pairs = []
    for country, capital in CAPITALS:
        wrong = rng.choice([c for _, c in CAPITALS if c != capital])
        bad = rng.choice([f"The capital of {country} is {wrong}.", rng.choice(DODGES)])
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}.", bad))
    for word, opposite in OPPOSITES:
        pairs.append((f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opposite}'.",
                      rng.choice([f"The opposite of '{word}' is '{word}'.", rng.choice(DODGES)])))
    for animal, sound in ANIMALS:
        pairs.append((f"What sound does a {animal} make?", f"A {animal} {sound}.", rng.choice(DODGES)))
    for question, answer in TIPS:
        pairs.append((question, answer, rng.choice(DODGES)))
    for _ in range(70):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        kind = rng.randrange(3)
        if kind == 0:
            q, good, wrong = f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.choice([-2, -1, 1, 3])}."
        elif kind == 1:
            q, good, wrong = f"How many minutes are in {b} hours?", f"There are {60 * b} minutes in {b} hours.", f"There are {b + 60} minutes in {b} hours."
        else:
            q, good = f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}." if a != b else f"They are equal: both are {a}."
            wrong = f"{min(a, b)} is larger than {max(a, b)}." if a != b else f"{a} is larger."
        pairs.append((q, good, rng.choice([wrong, rng.choice(DODGES)])))
    return pairs


def row(prompt: str, chosen: str, rejected: str) -> dict:
    """One conversational preference row (the chat template of the model is applied by the trainer)."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def main() -> None:
    rng = random.Random(0)
    pairs = list(dict.fromkeys(_pairs(rng)))  # unique, in order
    rng.shuffle(pairs)
    held_out = 40
    here = Path(__file__).parent
    for name, part in (("helpful_prefs_eval.jsonl", pairs[:held_out]), ("helpful_prefs.jsonl", pairs[held_out:])):
        (here / name).write_text("".join(json.dumps(row(*p)) + "\n" for p in part))
        print(f"{name}: {len(part)} pairs")


if __name__ == "__main__":
    main()
