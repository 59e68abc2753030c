"""The gold reward of the over-optimization study: what the tiny world's author actually wants.

The corpus generator knows every fact, so a completion can be graded exactly: each distinct claim it makes
about an animal's color, home, food or sound counts +1 if true and -1 if false, and a fluency term
``FLUENCY_WEIGHT * max(mean log pi_0(token), FLUENCY_FLOOR)`` (the base model's per-token log-likelihood of the
completion) penalizes text the base model finds implausible. The policy never sees this score; it is
optimized against a reward model trained on a few hundred noisy comparisons of it (``overopt.py``).
"""

from __future__ import annotations

import re

import torch

from examples.demo.corpus import ANIMALS, world

FLUENCY_WEIGHT = 0.5
FLUENCY_FLOOR = -8.0
"""Per-token log-likelihood below this counts as this (garbage is garbage, however improbable)."""

_ANIMAL = "(" + "|".join(ANIMALS) + ")"
_VALUE = r"(\w+)(?=[ .,!?])"  # a whole word: one cut off by the length limit states nothing
CLAIM_PATTERNS = (
    (re.compile(rf"\bthe (\w+) {_ANIMAL} lives in the (\w+) and eats {_VALUE}"), ("color", "home", "food"), (2, 1, 3, 4)),
    (re.compile(rf"\bthe {_ANIMAL} is {_VALUE}"), ("color",), (1, 2)),
    (re.compile(rf"\bthe {_ANIMAL} lives in the {_VALUE}"), ("home",), (1, 2)),
    (re.compile(rf"\bthe {_ANIMAL} (?:eats|ate) {_VALUE}"), ("food",), (1, 2)),
    (re.compile(rf"\bthe {_ANIMAL}(?: says|, who said) {_VALUE}"), ("sound",), (1, 2)),
)
"""(pattern, attributes, groups): ``groups`` = the animal's group, then one group per attribute's value."""


def claims(text: str) -> set[tuple[str, str, str]]:
    """The distinct (animal, attribute, value) claims stated in ``text``, in the corpus's sentence forms."""
    found = set()
    for pattern, attributes, (animal_group, *value_groups) in CLAIM_PATTERNS:
        for match in pattern.finditer(text):
            for attribute, group in zip(attributes, value_groups):
                found.add((match.group(animal_group), attribute, match.group(group)))
    return found


def fact_score(prompt: str, completion: str) -> tuple[int, int]:
    """(true, false) counts of the claims that ``completion`` adds to ``prompt`` (a claim may span both)."""
    facts = world()
    new = claims(prompt + completion) - claims(prompt)
    true = sum(facts[animal][attribute] == value for animal, attribute, value in new)
    return true, len(new) - true


class GoldReward:
    """``gold(prompts, completions) -> list[float]``: true claims - false claims + the fluency term.

    Args:
        base_model: the base (pre-RL) causal LM whose per-token log-likelihood is the fluency term.
        tokenizer: its tokenizer (completions are scored with their EOS, as the policy emits it).
    """

    __name__ = "gold"

    def __init__(self, base_model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = base_model.eval(), tokenizer, batch_size

    @torch.no_grad()
    def fluency(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Mean log pi_0 per completion token (EOS included), floored at ``FLUENCY_FLOOR``."""
        tok, values = self.tokenizer, []
        for start in range(0, len(prompts), self.batch_size):
            rows = []
            for prompt, completion in zip(prompts[start : start + self.batch_size], completions[start : start + self.batch_size]):
                prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                rows.append((prompt_ids + completion_ids, len(prompt_ids)))
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), tok.pad_token_id)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for row, (ids, _) in enumerate(rows):
                input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
            device = next(self.model.parameters()).device
            logps = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float().log_softmax(-1)
            token_logps = logps.gather(-1, input_ids[:, 1:, None].to(device))[..., 0].cpu()
            for row, (ids, prompt_len) in enumerate(rows):
                mean = token_logps[row, prompt_len - 1 : len(ids) - 1].mean().item()
                values.append(max(mean, FLUENCY_FLOOR))
        return values

    def components(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        """Per completion: ``true`` and ``false`` claim counts, ``fluency`` and the ``gold`` total."""
        counts = [fact_score(p, c) for p, c in zip(prompts, completions)]
        fluency = self.fluency(prompts, completions)
        gold = [t - f + FLUENCY_WEIGHT * fl for (t, f), fl in zip(counts, fluency)]
        return {"true": [float(t) for t, _ in counts], "false": [float(f) for _, f in counts], "fluency": fluency, "gold": gold}

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return self.components(prompts, completions)["gold"]
