"""A generated "tiny world" corpus: a few facts about animals, told in short sentences and stories.

Every animal has one color, home, food and sound, so a model trained on the corpus *knows* something
that can be probed ("the fox eats" -> "berries"). The text is generated from a seed, so the training
split, the held-out split (the "prior" text of the forgetting probe) and the preference data are
reproducible without shipping any file.
"""

from __future__ import annotations

import random

ANIMALS = ("fox", "cat", "dog", "owl", "frog", "bear", "duck", "wolf", "goat", "hen", "mole", "crab", "bee", "seal", "deer", "lion")
COLORS = ("red", "black", "brown", "white", "green", "grey", "yellow", "blue")
HOMES = ("forest", "barn", "river", "cave", "pond", "field", "hill", "sea")
FOODS = ("berries", "fish", "seeds", "grass", "bugs", "apples", "nuts", "honey")
SOUNDS = ("yip", "meow", "woof", "hoot", "croak", "growl", "quack", "howl")
WEATHER = ("sunny", "cold", "windy", "rainy", "warm", "dark")
FEELINGS = ("happy", "sleepy", "hungry", "calm", "proud", "tired")
ATTRIBUTES = ("color", "home", "food", "sound")


def world(seed: int = 0) -> dict[str, dict[str, str]]:
    """The facts: animal -> {color, home, food, sound}, fixed by ``seed``."""
    rng = random.Random(seed)
    return {
        animal: {"color": rng.choice(COLORS), "home": rng.choice(HOMES), "food": rng.choice(FOODS), "sound": rng.choice(SOUNDS)}
        for animal in ANIMALS
    }


def fact(animal: str, attribute: str, value: str) -> tuple[str, str]:
    """(prompt, completion) stating one fact, e.g. ("the fox eats", " berries.")."""
    prompts = {
        "color": (f"the {animal} is", f" {value}."),
        "home": (f"the {animal} lives in the", f" {value}."),
        "food": (f"the {animal} eats", f" {value}."),
        "sound": (f"the {animal} says", f" {value}."),
    }
    return prompts[attribute]


def sentence(rng: random.Random, facts: dict[str, dict[str, str]]) -> str:
    """One line of the corpus: a fact, a compound fact, or a three-sentence story."""
    animal = rng.choice(ANIMALS)
    f = facts[animal]
    kind = rng.random()
    if kind < 0.4:
        attribute = rng.choice(ATTRIBUTES)
        return "".join(fact(animal, attribute, f[attribute]))
    if kind < 0.7:
        return f"the {f['color']} {animal} lives in the {f['home']} and eats {f['food']}."
    other = rng.choice(ANIMALS)
    return (
        f"one {rng.choice(WEATHER)} day the {animal} went to the {facts[other]['home']}. "
        f"it met the {other}, who said {facts[other]['sound']}. "
        f"the {animal} ate {f['food']} and felt {rng.choice(FEELINGS)}."
    )


def corpus_lines(num_lines: int, split: str = "train", world_seed: int = 0) -> list[str]:
    """``num_lines`` lines of text; ``split="heldout"`` draws different lines about the same world."""
    splits = {"train": 1, "heldout": 2, "prefs": 3}
    if split not in splits:
        raise ValueError(f"split={split!r} is not valid. Allowed values: {', '.join(splits)}.")
    rng = random.Random(1000 * world_seed + splits[split])
    facts = world(world_seed)
    return [sentence(rng, facts) for _ in range(num_lines)]
