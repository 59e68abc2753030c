"""The demo's panels (a)-(e): the shared data and settings, and one function per panel that trains one run.

(a) ``run_dpo``: DPO or DPO+NLL on fact pairs; (b) ``run_grpo``: GRPO on an over-optimizable reward under one of
``GRPO_VARIANTS``; (c) ``drift_vs_forgetting``: final forward KL to the base vs held-out NLL rise across runs
(eq. 15); (d) is ``margins.py``; (e) ``run_reward_aware``: DPO, reward-weighted DPO or RPO on fact pairs with noisy
labels but informative scores. Each run function returns its record (logs, probes, settings); ``plan.py`` calls
them once per seed. Every run with a drift probe uses ``KLDriftCallback`` on the same task prompts and held-out
corpus, so the numbers of (c) are comparable across trainers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset

from examples.demo.corpus import ANIMALS, ATTRIBUTES, COLORS, FOODS, HOMES, SOUNDS, WEATHER, corpus_lines, fact, world
from examples.demo.jobs import quiet_trainer
from examples.demo.plan import SIZES
from trl_regularizers.drift import KLDriftCallback

TARGET_CHAR = "o"
VALUES = {"color": COLORS, "home": HOMES, "food": FOODS, "sound": SOUNDS}
STRENGTH_LABELS = {3: "significantly better", 2: "better", 1: "slightly better"}


@dataclass(frozen=True)
class DemoSize:
    """How long each run trains (everything that makes a run's numbers, so it is part of the run's cache key)."""

    dpo_steps: int
    grpo_steps: int
    reward_steps: int
    probe_every: int
    probe_prompts: int
    heldout_texts: int
    rated_pairs: int
    heldout_pairs: int
    proxy_steps: int
    study_steps: int
    study_probe_every: int
    forget_sft_steps: int
    forget_grpo_steps: int
    forget_probe_every: int
    bon_samples: int = 256
    """Start-policy samples per task prompt of the best-of-n study (``bestofn.py``): n runs up to this."""
    rated_checkpoints: tuple[int, ...] = (300,)
    """Pretraining steps of the checkpoints whose samples the simulated rater compares (``overopt.rated_comparisons``):
    the start policy alone (300), or also a weaker and the fully trained one."""
    rater_temperature: float = 0.1
    """Bradley-Terry temperature of the simulated rater (gold units): P(a over b) = sigmoid((g_a - g_b) / temperature)."""
    proxy_batch_size: int = 16

    def with_study_steps(self, steps: int) -> DemoSize:
        """The same size with the study's policy runs trained ``steps`` steps, probed about 12 times."""
        if steps < 1:
            raise ValueError(f"study steps must be >= 1, got {steps}.")
        return replace(self, study_steps=steps, study_probe_every=max(1, steps // 12))

    @classmethod
    def named(cls, name: str) -> DemoSize:
        """The size called ``name`` (one of ``SIZES``). ``full``'s proxy learns from 8192 comparisons of the start
        policy's own samples by a rater with little noise, over two epochs, so that it ranks what the first RL steps
        change (start-policy Spearman 0.56 and 0.66 on seeds 1 and 3, where one epoch gave 0.46 and 0.45, and 512
        comparisons across three checkpoints 0.2); its policy runs train 256 steps, long enough for the unregularized
        gold to pass its peak. ``default`` keeps the cheaper proxy and shortens the study's runs (16 steps) and
        best-of-n (64 samples per prompt), to stay under 10 minutes on 2 CPU cores. Every other run is the same."""
        if name not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {name!r}.")
        if name == "quick":
            return cls(dpo_steps=4, grpo_steps=4, reward_steps=4, probe_every=2, probe_prompts=8, heldout_texts=16,
                       rated_pairs=32, heldout_pairs=32, proxy_steps=2, study_steps=4, study_probe_every=2,
                       forget_sft_steps=4, forget_grpo_steps=4, forget_probe_every=2, bon_samples=8)
        full = cls(dpo_steps=40, grpo_steps=50, reward_steps=48, probe_every=10, probe_prompts=16, heldout_texts=64,
                   rated_pairs=8192, heldout_pairs=256, proxy_steps=512, study_steps=256, study_probe_every=21,
                   forget_sft_steps=30, forget_grpo_steps=40, forget_probe_every=5, proxy_batch_size=32)
        if name == "full":
            return full
        return replace(full, study_steps=16, study_probe_every=4, bon_samples=64, rated_pairs=512, proxy_steps=64, proxy_batch_size=16,
                       rated_checkpoints=(200, 300, 800), rater_temperature=0.25)


# ----------------------------------------------------------------------------------------------- data
def task_prompts() -> list[str]:
    """Sentence openings of the tiny world: the GRPO prompts and the drift probe prompts."""
    rng = random.Random(7)
    prompts = [f"the {animal}" for animal in ANIMALS] + [f"one {rng.choice(WEATHER)} day the {animal}" for animal in ANIMALS]
    rng.shuffle(prompts)
    return prompts


def fact_pairs(seed: int = 0) -> Dataset:
    """DPO pairs: a fact prompt, the true completion (chosen) and a wrong value (rejected)."""
    rng, facts = random.Random(seed), world()
    rows = []
    for animal in ANIMALS:
        for attribute in ATTRIBUTES:
            prompt, chosen = fact(animal, attribute, facts[animal][attribute])
            wrong = rng.choice([v for v in VALUES[attribute] if v != facts[animal][attribute]])
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": fact(animal, attribute, wrong)[1]})
    return Dataset.from_list(rows)


def rated_pairs(num_pairs: int, seed: int) -> Dataset:
    """Reward-model pairs: a true description (chosen) vs one with k in {1,2,3} wrong facts (rejected), labeled
    by strength: more wrong facts = clearer preference."""
    rng, facts = random.Random(seed), world()
    rows = []
    for _ in range(num_pairs):
        animal = rng.choice(ANIMALS)
        true = {key: facts[animal][key] for key in ("color", "home", "food")}
        wrong_count = rng.choice(sorted(STRENGTH_LABELS))
        corrupt = dict(true)
        for key in rng.sample(sorted(true), wrong_count):
            corrupt[key] = rng.choice([v for v in VALUES[key] if v != true[key]])

        def describe(f):
            return f"the {f['color']} {animal} lives in the {f['home']} and eats {f['food']}."

        rows.append({"chosen": describe(true), "rejected": describe(corrupt), "preference_strength": STRENGTH_LABELS[wrong_count]})
    return Dataset.from_list(rows)


def target_char_reward(completions, **kwargs) -> list[float]:
    """The over-optimizable reward: the fraction of characters that are ``TARGET_CHAR``."""
    return [c.count(TARGET_CHAR) / max(len(c), 1) for c in completions]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams (characters) over all n-grams in ``texts``: 1 = no repetition, near 0 = degenerate."""
    grams = [text[i : i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------------------------- common
def common_args(out: Path, steps: int, seed: int) -> dict:
    return dict(
        output_dir=str(out),
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        disable_tqdm=True,
    )


class DemoProbe(KLDriftCallback):
    """The drift probe plus the character distinct-2 of its samples (``samples/distinct_2``)."""

    def measure(self, model) -> dict[str, float]:
        values = super().measure(model)
        values["samples/distinct_2"] = distinct_n(self.completions)
        return values


def drift_probe(size: DemoSize) -> DemoProbe:
    return DemoProbe(
        task_prompts()[: size.probe_prompts],
        every_n_steps=size.probe_every,
        max_new_tokens=24,
        heldout_texts=corpus_lines(size.heldout_texts, "heldout"),
    )


def finish(name: str, trainer, probe: KLDriftCallback, before: list[dict] = (), settings: dict | None = None) -> dict:
    """The run's record: log history (after ``before``, e.g. a step-0 evaluation), drift probes, samples and the
    ``settings`` it was trained with."""
    return {"name": name, "settings": settings or {}, "log_history": [*before, *trainer.state.log_history], "drift": probe.history,
            "samples": probe.completions}


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in a Trainer log history."""
    rows = [(entry["step"], float(entry[key])) for entry in log_history if key in entry]
    return [s for s, _ in rows], [v for _, v in rows]


# ----------------------------------------------------------------------------------------------- (a)
DPO_PANEL_SETTINGS = dict(
    beta=0.1, learning_rate=2e-3, per_device_train_batch_size=8, per_device_eval_batch_size=64, eval_strategy="steps"
)
"""Shared by the DPO panels (a) and (e)."""


DPO_VARIANTS = {"DPO": dict(nll_alpha=0.0), "DPO+NLL": dict(nll_alpha=1.0)}


def run_dpo(base: str, out: Path, size: DemoSize, seed: int, name: str) -> dict:
    """DPO or DPO+NLL (``DPO_VARIANTS[name]``): chosen log-probs of the training pairs, evaluated every few steps."""
    from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer

    pairs = fact_pairs()
    args = RegularizedDPOConfig(**common_args(out, size.dpo_steps, seed), **DPO_VARIANTS[name], **DPO_PANEL_SETTINGS, eval_steps=size.probe_every)
    probe = drift_probe(size)
    trainer = RegularizedDPOTrainer(model=base, args=args, train_dataset=pairs, eval_dataset=pairs, callbacks=[probe])
    quiet_trainer(trainer, f"(a) {name} seed {seed}")
    before = {**trainer.evaluate(), "step": 0}  # train() starts a fresh log history: keep step 0 here
    trainer.train()
    return finish(name, trainer, probe, [before], settings=DPO_VARIANTS[name])


# ----------------------------------------------------------------------------------------------- (b)
GRPO_LEARNING_RATE = 2e-3
GRPO_VARIANTS = {
    "GRPO beta=0": dict(beta=0.0),
    "GRPO KL in loss": dict(beta=0.2, kl_estimator="k3", kl_placement="loss"),
    "GRPO beta=0 lr=5e-4": dict(beta=0.0, learning_rate=5e-4),
    "GRPO KL in reward": dict(beta=0.005, kl_estimator="k1", kl_placement="reward", learning_rate=5e-4),
    "GRPO beta=0 +ptx": dict(beta=0.0, ptx_coef=1.0),
}
"""Options of each (b) run on top of ``run_grpo``'s common ones (learning rate ``GRPO_LEARNING_RATE`` unless set).

KL in the reward is configured as a practitioner would (TRL RLOO's standard: k1, summed over the completion, before
the advantages), not with the loss run's numbers. Its ``beta`` multiplies a *sum* over ~20 tokens, so
``beta * length`` (0.1) is what compares with the loss run's per-token 0.2. With ``beta=0.2`` the penalty's spread
within a group (several nats) swamps the task reward's (~0.05), GRPO's group normalization turns the advantages
into KL noise, and the cheapest way to cut a summed penalty is to stop early: the policy collapses to ``.`` + EOS,
every sample of a group is then identical (zero advantage) and the run never recovers. At ``GRPO_LEARNING_RATE``
a smaller ``beta`` does not help (0.0005 to 0.05 tried, some on seeds 0 and 1: each collapsed or over-optimized): Adam moves the
policy by several nats per token in the first steps, and a penalty that acts only through the advantages of sampled
sequences cannot pull it back, where the loss placement adds a dense per-token gradient toward pi_0. At ``5e-4`` (``beta=0.005``) it
holds the policy near the base on seeds 0, 1 and 2 while the reward rises; ``GRPO beta=0 lr=5e-4`` is the control at
that learning rate (it still over-optimizes), so the KL term, not the learning rate, is what holds the policy.
"""

GRPO_SETTINGS = ("kl_estimator", "kl_placement", "beta", "learning_rate", "ptx_coef")
"""Config fields saved in each (b) run record (``settings``) and shown, in this order, in the report."""


def run_grpo(base: str, out: Path, size: DemoSize, seed: int, name: str) -> dict:
    """GRPO on ``target_char_reward`` with ``GRPO_VARIANTS[name]``; drift, forgetting and samples probed."""
    from trl_regularizers import RegularizedGRPOConfig, RegularizedGRPOTrainer

    args = RegularizedGRPOConfig(
        **common_args(out, size.grpo_steps, seed),
        **{"learning_rate": GRPO_LEARNING_RATE, **GRPO_VARIANTS[name]},
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=24,
        ptx_block_size=64,
        ptx_batch_size=8,
    )
    probe = drift_probe(size)
    pretrain = Dataset.from_dict({"text": corpus_lines(2000, "train")}) if args.ptx_coef > 0 else None
    trainer = RegularizedGRPOTrainer(model=base, reward_funcs=target_char_reward, args=args, train_dataset=Dataset.from_dict({"prompt": task_prompts() * 8}),
                                     callbacks=[probe], pretrain_dataset=pretrain)
    quiet_trainer(trainer, f"(b) {name} seed {seed}")
    trainer.train()
    settings = {key: getattr(args, key) for key in GRPO_SETTINGS}
    if args.beta == 0.0:  # no KL term: its estimator/placement options are unused
        settings.update(kl_estimator=None, kl_placement=None)
    return finish(name, trainer, probe, settings=settings)


# ----------------------------------------------------------------------------------------------- (c)
def drift_vs_forgetting(runs: list[dict]) -> dict:
    """Least-squares fit of the held-out NLL rise on the final E_x[KL(pi_0 || pi)] on task prompts, across runs (eq. 15)."""
    points = [(r["name"], r["drift"][-1]["drift/kl_forward"], r["drift"][-1]["forgetting/nll_increase"]) for r in runs]
    kl = torch.tensor([p[1] for p in points], dtype=torch.float64)
    rise = torch.tensor([p[2] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(kl), kl], dim=1)
    intercept, slope = torch.linalg.lstsq(design, rise[:, None]).solution[:, 0].tolist()
    residual = rise - (intercept + slope * kl)
    total = ((rise - rise.mean()) ** 2).sum()
    r2 = float(1 - (residual**2).sum() / total) if total > 0 else float("nan")
    return {"points": points, "slope": slope, "intercept": intercept, "r2": r2}


# ----------------------------------------------------------------------------------------------- (e)
LABEL_NOISE = 0.3
"""Fraction of (e)'s training pairs whose chosen/rejected labels are swapped (their scores travel with the texts)."""
SCORE_NOISE = 0.5
"""Standard deviation of the noise on (e)'s scores: true fact +1, wrong fact -1, plus N(0, SCORE_NOISE^2)."""
REWARD_AWARE_VARIANTS = {
    "DPO": {},
    "weighted DPO (sigmoid)": dict(reward_aware_loss="weighted_dpo", reward_weighting="sigmoid"),
    "RPO (bwd KL)": dict(reward_aware_loss="rpo_bwd_kl"),
}
"""Options of each (e) run on top of ``run_reward_aware``'s common ones (beta 0.1, reward_eta 1)."""


def noisy_scored_pairs(seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """(train, flipped, kept): the fact pairs with scores (``chosen_score``, ``rejected_score``), a ``LABEL_NOISE``
    share of them with chosen and rejected swapped for training; ``flipped`` and ``kept`` are the clean-label
    versions (true fact chosen) of the swapped and the untouched pairs, for evaluation."""
    rng = random.Random(1000 + seed)
    train, flipped, kept = [], [], []
    for row in fact_pairs(seed).to_list():
        clean = {**row, "chosen_score": 1.0 + rng.gauss(0, SCORE_NOISE), "rejected_score": -1.0 + rng.gauss(0, SCORE_NOISE)}
        if rng.random() < LABEL_NOISE:
            flipped.append(clean)
            train.append({"prompt": row["prompt"], "chosen": row["rejected"], "rejected": row["chosen"],
                          "chosen_score": clean["rejected_score"], "rejected_score": clean["chosen_score"]})
        else:
            kept.append(clean)
            train.append(clean)
    return Dataset.from_list(train), Dataset.from_list(flipped), Dataset.from_list(kept)


def run_reward_aware(base: str, out: Path, size: DemoSize, seed: int, name: str) -> dict:
    """``REWARD_AWARE_VARIANTS[name]`` on the noisy pairs of ``seed``; the implicit-reward accuracy (TRL's
    ``rewards/accuracies``) on the clean labels of the swapped and of the untouched pairs, evaluated every few steps."""
    from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer

    train, flipped, kept = noisy_scored_pairs(seed)
    args = RegularizedDPOConfig(
        **common_args(out, size.dpo_steps, seed), **REWARD_AWARE_VARIANTS[name], **DPO_PANEL_SETTINGS, reward_eta=1.0, eval_steps=size.probe_every
    )
    trainer = RegularizedDPOTrainer(model=base, args=args, train_dataset=train, eval_dataset={"flipped": flipped, "kept": kept})
    quiet_trainer(trainer, f"(e) {name} seed {seed}")
    before = {**trainer.evaluate(), "step": 0}
    trainer.train()
    settings = {k: getattr(args, k) for k in ("reward_aware_loss", "reward_weighting", "reward_eta", "beta")}
    if args.reward_aware_loss != "weighted_dpo":
        settings["reward_weighting"] = None
    return {"name": name, "settings": settings, "num_flipped": len(flipped), "num_kept": len(kept), "log_history": [before, *trainer.state.log_history]}
