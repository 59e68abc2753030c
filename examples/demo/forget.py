"""Panel (f), "SFT forgets, RL forgets less" (the chapter's "Implicit Regularization", eq. 15).

The **new task** is a fact family the base model never saw: whom each animal meets (``friends``), asked as
"the fox met the" -> " owl.". The base model puts an animal name after "met the" (its stories say "it met the
cat"), so it gets the right one by chance about once in 16 samples: on-policy RL has a signal to start from,
and SFT has something to teach. Its exact score (``new_task_score``) is 1 when the first word of the completion is
the animal's friend. The **prior task** is the 64 facts the base model knows (color, home, food, sound of every
animal), none of them in any new-task data: greedy accuracy and the NLL of their true completions.

Every method trains on the new-task prompts with the package's trainers, as a user would (``FORGET_VARIANTS``):
SFT, SFT + KL(pi_0 || pi) anchor at two strengths, SFT + replay of the pretraining corpus, SFT on the base model's
own samples filtered by the score (RL's Razor's data "close to the base"), and GRPO with the score as reward.
``ForgetProbe`` measures, every few steps, the new-task accuracy, the prior-task accuracy and NLL, and the drift
E_x[KL(pi_0 || pi)] on the new-task prompts (``KLDriftCallback``'s ``drift/kl_forward``).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from datasets import Dataset

from examples.demo.corpus import ANIMALS, ATTRIBUTES, corpus_lines, fact, world
from examples.demo.jobs import quiet_trainer
from examples.demo.runs import DemoSize, common_args
from trl_regularizers.drift import KLDriftCallback

FRIEND_SEED = 5
SFT_LEARNING_RATE = 5e-4
GRPO_LEARNING_RATE = 3e-4
BATCH_SIZE = 8
"""SFT examples per step (of 16 new facts, so the order differs by seed); GRPO prompts per step."""
NUM_GENERATIONS = 16
FILTER_SAMPLES = 64
"""Base-model samples drawn per new-task prompt for the filtered-SFT data; up to ``FILTER_KEEP`` correct ones are kept."""
FILTER_KEEP = 4
COMPLETION_TOKENS = 8
"""Tokens (bytes) of the probe's samples: room for the answer (" owl.") and the end of text."""
GRPO_COMPLETION_TOKENS = 5
"""Tokens (bytes) of GRPO's samples: the longest answer (" lion"), so the reward's credit falls on the answer alone."""
FILTER_TOKENS = 32
"""Tokens of the filter's base samples, cut after their first sentence (samples without one are dropped)."""
MATCH_SCORE = 0.5
"""New-task accuracy at which runs are compared ("trained to comparable new-task scores")."""

FORGET_VARIANTS = {
    "SFT": dict(trainer="sft"),
    "SFT + KL 0.1": dict(trainer="sft", sft_kl_coef=0.1),
    "SFT + KL 1": dict(trainer="sft", sft_kl_coef=1.0),
    "SFT + replay": dict(trainer="sft", ptx_coef=1.0, ptx_batch_size=BATCH_SIZE, ptx_block_size=64),
    "SFT on filtered base samples": dict(trainer="sft", data="filtered"),
    "GRPO": dict(trainer="grpo"),
}
"""Options of each (f) run; SFT runs use ``SFT_LEARNING_RATE``, forward KL, and TRL's completion-only loss; replay
draws ``BATCH_SIZE`` packed 64-token blocks of the pretraining corpus a step."""


def friends(seed: int = FRIEND_SEED) -> dict[str, str]:
    """The new fact family: animal -> the other animal it meets, a derangement (every animal is met by exactly one),
    so no single answer scores on more than one prompt."""
    rng = random.Random(seed)
    while True:
        others = list(ANIMALS)
        rng.shuffle(others)
        if all(a != b for a, b in zip(ANIMALS, others)):
            return dict(zip(ANIMALS, others))


def new_task() -> tuple[list[str], list[str]]:
    """(prompts, answers) of the new task, one per animal."""
    pairs = friends()
    return [f"the {animal} met the" for animal in ANIMALS], [pairs[animal] for animal in ANIMALS]


def prior_task() -> tuple[list[str], list[str]]:
    """(prompts, answers) of the prior task: every fact of the tiny world the base model was pretrained on."""
    facts = world()
    rows = [(fact(animal, attribute, facts[animal][attribute])[0], facts[animal][attribute]) for animal in ANIMALS for attribute in ATTRIBUTES]
    return [p for p, _ in rows], [a for _, a in rows]


_FIRST_WORD = re.compile(r"\s*(\w+)")


def new_task_score(completion: str, answer: str) -> float:
    """1.0 if the first word of ``completion`` is ``answer``, else 0.0 (exact, no partial credit)."""
    match = _FIRST_WORD.match(completion)
    return float(match is not None and match.group(1) == answer)


def score_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """GRPO reward: ``new_task_score`` of each completion against its prompt's ``answer`` column."""
    return [new_task_score(c, a) for c, a in zip(completions, answer)]


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, samples: int = 0, seed: int = 0) -> list[str]:
    """Greedy completions (``samples=0``) or ``samples`` sampled completions per prompt (temperature 1, prompt-major)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    sampling = dict(do_sample=True, top_k=0, top_p=1.0, num_return_sequences=samples) if samples else dict(do_sample=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def completion_nll(model, tokenizer, prompts: list[str], completions: list[str]) -> float:
    """Mean over examples of the per-token NLL (nats) of ``completion`` + EOS given ``prompt``."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], len(prompt_ids)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for row, (ids, prompt_len) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    mask = (input_ids != tokenizer.pad_token_id) | (labels != -100)
    logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.long().to(model.device)).logits[:, :-1].float()
    target = labels[:, 1:].to(model.device)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    counts = (target != -100).sum(-1)
    return float((per_token.sum(-1) / counts).mean())


class ForgetProbe(KLDriftCallback):
    """The drift probe on the new-task prompts, plus ``new/accuracy``, ``prior/accuracy`` and ``prior/nll``."""

    def measure(self, model) -> dict[str, float]:
        values = super().measure(model)
        new_prompts, new_answers = new_task()
        prior_prompts, prior_answers = prior_task()
        was_training = model.training
        model.eval()
        try:
            greedy = complete(model, self.tokenizer, new_prompts + prior_prompts)
            values["prior/nll"] = completion_nll(model, self.tokenizer, prior_prompts, [f" {a}." for a in prior_answers])
        finally:
            model.train(was_training)
        scores = [new_task_score(c, a) for c, a in zip(greedy, new_answers + prior_answers)]
        values["new/accuracy"] = sum(scores[: len(new_prompts)]) / len(new_prompts)
        values["prior/accuracy"] = sum(scores[len(new_prompts) :]) / len(prior_prompts)
        return values


def filtered_base_samples(model, tokenizer, seed: int) -> tuple[Dataset, int]:
    """RL's Razor's "close to the base" SFT data: ``FILTER_SAMPLES`` base-model samples per new-task prompt, each cut
    after its first sentence, the first ``FILTER_KEEP`` distinct ones with score 1 kept. Returns the dataset and how many prompts got none."""
    prompts, answers = new_task()
    samples = complete(model, tokenizer, prompts, max_new_tokens=FILTER_TOKENS, samples=FILTER_SAMPLES, seed=seed)
    sentences = [c[: c.index(".") + 1] if "." in c else None for c in samples]
    rows, missing = [], 0
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        mine = sentences[i * FILTER_SAMPLES : (i + 1) * FILTER_SAMPLES]
        kept = list(dict.fromkeys(c for c in mine if c is not None and new_task_score(c, answer) == 1.0))
        missing += not kept
        rows += [{"prompt": prompt, "completion": c} for c in kept[:FILTER_KEEP]]
    return Dataset.from_list(rows), missing


def run_forget(base: str, out: Path, size: DemoSize, seed: int, name: str) -> dict:
    """Train ``FORGET_VARIANTS[name]`` from ``base`` on the new task; the record holds the probes and the settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = dict(FORGET_VARIANTS[name])
    trainer_kind, data = options.pop("trainer"), options.pop("data", "answers")
    prompts, answers = new_task()
    probe = ForgetProbe(prompts, every_n_steps=size.forget_probe_every, max_new_tokens=COMPLETION_TOKENS,
                        heldout_texts=corpus_lines(size.heldout_texts, "heldout"), seed=seed)
    extra: dict = {}
    if trainer_kind == "grpo":
        from trl_regularizers import RegularizedGRPOConfig, RegularizedGRPOTrainer

        args = RegularizedGRPOConfig(**common_args(out, size.forget_grpo_steps, seed), learning_rate=GRPO_LEARNING_RATE, beta=0.0,
                                     per_device_train_batch_size=BATCH_SIZE * NUM_GENERATIONS, num_generations=NUM_GENERATIONS,
                                     max_completion_length=GRPO_COMPLETION_TOKENS, **options)
        train = Dataset.from_dict({"prompt": prompts * 64, "answer": answers * 64})
        trainer = RegularizedGRPOTrainer(model=base, reward_funcs=score_reward, args=args, train_dataset=train, callbacks=[probe])
        settings = {"learning_rate": args.learning_rate, "beta": args.beta, "num_generations": args.num_generations}
    else:
        from trl_regularizers import RegularizedSFTConfig, RegularizedSFTTrainer

        if data == "filtered":
            model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
            train, missing = filtered_base_samples(model.eval(), tokenizer, seed)
            extra = {"filtered_examples": len(train), "filtered_prompts_without_sample": missing, "filtered_data": train.to_list()}
        else:
            train = Dataset.from_dict({"prompt": prompts, "completion": [f" {a}." for a in answers]})
        args = RegularizedSFTConfig(**common_args(out, size.forget_sft_steps, seed), learning_rate=SFT_LEARNING_RATE,
                                    per_device_train_batch_size=BATCH_SIZE, max_length=64, **options)
        pretrain = Dataset.from_dict({"text": corpus_lines(2000, "train")}) if args.ptx_coef > 0 else None
        trainer = RegularizedSFTTrainer(model=base, args=args, train_dataset=train, callbacks=[probe], pretrain_dataset=pretrain)
        settings = {"learning_rate": args.learning_rate, "sft_kl_coef": args.sft_kl_coef, "ptx_coef": args.ptx_coef, "data": data}
    quiet_trainer(trainer, f"(f) {name} seed {seed}")
    trainer.train()
    return {"name": name, "settings": settings, "probes": probe.history, "samples": probe.completions, **extra}
