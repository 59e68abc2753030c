"""The over-optimization study: a proxy reward model, the gold reward it imitates, and what each regularizer buys.

1. ``rated_comparisons``: pairs of completions of the task prompts sampled from the start policy (or from several
   checkpoints, ``DemoSize.rated_checkpoints``), labeled by a simulated rater who prefers the higher gold score
   with Bradley-Terry noise (P(a over b) = sigmoid((g_a - g_b) / DemoSize.rater_temperature)).
2. ``train_proxy``: a reward model trained on them with ``RegularizedRewardTrainer`` (its held-out accuracy
   against the gold order is reported): finite data, so it is exploitable.
3. ``run_policy``: GRPO, RLOO or PPO against the proxy under each of ``STUDY_VARIANTS``. ``StudyProbe`` samples
   the task prompts every few steps and logs the proxy and gold rewards of those samples with the drift probe's
   sequence-level KL(pi || pi_0), the ``d = sqrt(KL)`` of Gao et al. 2022.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from statistics import fmean

import torch
from datasets import Dataset

from examples.demo.corpus import corpus_lines
from examples.demo.gold import GoldReward
from examples.demo.jobs import quiet_trainer
from examples.demo.runs import DemoProbe, DemoSize, common_args, task_prompts

COMPLETION_LENGTH = 48
"""Tokens (bytes) per completion: room for two or three facts."""
PROXY_LEARNING_RATE = 1e-3
POLICY_LEARNING_RATE = 2e-4
POLICY_BATCH_SIZE = 32
"""Completions per step: 4 prompts x 8 samples."""
START_CHECKPOINT = 300
"""Pretraining steps of the policy's starting point (``PretrainSettings(steps=...)``): the 300-step model states a
fact in about half its completions and gets many wrong, so there is room to improve; the fully trained 800-step
model is the gold reward's fluency judge and the proxy's initialization."""
PROXY_KEY = "probe/proxy"
GOLD_KEY = "probe/gold"


def load_base(base: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int = COMPLETION_LENGTH) -> list[str]:
    """One sampled completion (temperature 1, no truncation of the distribution) per prompt."""
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def rated_comparisons(sources: list[str], judge: str, seed: int, num_pairs: int, temperature: float) -> Dataset:
    """``num_pairs`` rows: a task ``prompt``, two completions each sampled from a random one of the ``sources``
    checkpoints, as ``chosen``/``rejected`` the way a rater with Bradley-Terry ``temperature`` labeled them, and
    both gold scores (fluency judged by ``judge``)."""
    gold = GoldReward(*load_base(judge))
    rng = random.Random(seed)
    prompts = [rng.choice(task_prompts()) for _ in range(num_pairs)]
    picks = [(rng.randrange(len(sources)), rng.randrange(len(sources))) for _ in prompts]
    samples: list[list[str | None]] = [[None, None] for _ in prompts]
    for index, source in enumerate(sources):
        model, tokenizer = load_base(source)
        for side in (0, 1):
            rows = [row for row, pick in enumerate(picks) if pick[side] == index]
            texts = sample_completions(model, tokenizer, [prompts[row] for row in rows], seed=seed * 10 + 2 * index + side)
            for row, text in zip(rows, texts):
                samples[row][side] = text
    first, second = [a for a, _ in samples], [b for _, b in samples]
    gold_first, gold_second = gold(prompts, first), gold(prompts, second)
    rows = []
    for prompt, a, b, ga, gb in zip(prompts, first, second, gold_first, gold_second):
        a_wins = rng.random() < 1 / (1 + math.exp(-(ga - gb) / temperature))
        (chosen, gc), (rejected, gr) = ((a, ga), (b, gb)) if a_wins else ((b, gb), (a, ga))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_gold": gc, "rejected_gold": gr})
    return Dataset.from_list(rows)


def train_proxy(sources: list[str], judge: str, out: Path, size: DemoSize, seed: int) -> dict:
    """Train the proxy reward model of ``seed`` into ``out / "model"``; record its held-out accuracy (pairs whose
    gold scores differ by more than 0.1, judged by the gold order, not the rater's labels)."""
    from trl_regularizers import RegularizedRewardConfig, RegularizedRewardTrainer
    from trl_regularizers.scoring import RewardScorer, pair_texts

    train = rated_comparisons(sources, judge, 100 + seed, size.rated_pairs, size.rater_temperature)
    heldout = rated_comparisons(sources, judge, 200 + seed, size.heldout_pairs, size.rater_temperature)
    heldout = heldout.filter(lambda r: abs(r["chosen_gold"] - r["rejected_gold"]) > 0.1)
    args = RegularizedRewardConfig(**common_args(out, size.proxy_steps, seed), learning_rate=PROXY_LEARNING_RATE,
                                   per_device_train_batch_size=size.proxy_batch_size)
    trainer = RegularizedRewardTrainer(model=judge, args=args, train_dataset=train.remove_columns(["chosen_gold", "rejected_gold"]))
    quiet_trainer(trainer, f"proxy reward model seed {seed}")
    trainer.train()
    trainer.model.eval()
    scorer = RewardScorer(trainer.model, trainer.processing_class)
    texts = [pair_texts(row, scorer.tokenizer) for row in heldout]
    chosen, rejected = scorer.score_texts([c for c, _ in texts]), scorer.score_texts([r for _, r in texts])
    gold_order = [(c > r) == (gc > gr) for c, r, gc, gr in zip(chosen, rejected, heldout["chosen_gold"], heldout["rejected_gold"])]
    label_agreement = sum(c > r for c, r in zip(train["chosen_gold"], train["rejected_gold"])) / len(train)
    trainer.save_model(str(out / "model"))
    return {
        "name": "proxy reward model",
        "heldout_accuracy": sum(gold_order) / len(gold_order) if gold_order else float("nan"),
        "heldout_pairs": len(gold_order),
        "train_pairs": len(train),
        "rated_checkpoints": list(size.rated_checkpoints),
        "rater_temperature": size.rater_temperature,
        "train_label_agreement": label_agreement,
        "log_history": trainer.state.log_history,
    }


class ProxyReward:
    """The trained proxy as a TRL reward function: ``proxy(prompts, completions) -> list[float]`` (text + EOS, as
    ``RewardTrainer`` trained it)."""

    __name__ = "proxy"

    def __init__(self, model_dir: str | Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from trl_regularizers.scoring import RewardScorer

        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.scorer = RewardScorer(model, AutoTokenizer.from_pretrained(model_dir))

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        eos = self.scorer.tokenizer.eos_token
        return self.scorer.score_texts([p + c + eos for p, c in zip(prompts, completions)])


class StudyProbe(DemoProbe):
    """The drift probe plus the mean proxy (``probe/proxy``) and gold (``probe/gold``) rewards of its samples,
    and the gold reward's parts (``probe/true_claims``, ``probe/false_claims``, ``probe/fluency``). ``scored``
    keeps every probe's completions with their proxy and gold scores, one entry per ``history`` entry."""

    def __init__(self, *args, proxy: ProxyReward, gold: GoldReward, **kwargs):
        super().__init__(*args, **kwargs)
        self.proxy, self.gold = proxy, gold
        self.scored: list[dict[str, list]] = []

    def measure(self, model) -> dict[str, float]:
        values = super().measure(model)
        parts = self.gold.components(self.prompts, self.completions)
        proxy = self.proxy(self.prompts, self.completions)
        self.scored.append({"completions": list(self.completions), "proxy": proxy, "gold": parts["gold"]})
        values[PROXY_KEY] = fmean(proxy)
        values[GOLD_KEY] = fmean(parts["gold"])
        values.update({"probe/true_claims": fmean(parts["true"]), "probe/false_claims": fmean(parts["false"]), "probe/fluency": fmean(parts["fluency"])})
        return values


STUDY_VARIANTS = {
    "GRPO": {
        "no KL": dict(beta=0.0),
        "k3 in loss, beta=0.5": dict(beta=0.5, kl_estimator="k3", kl_placement="loss"),
        "k1 in reward, beta=0.05": dict(beta=0.05, kl_estimator="k1", kl_placement="reward"),
        "adaptive k3 in loss": dict(beta=0.1, kl_estimator="k3", kl_placement="loss", kl_target=1.0, kl_horizon=100.0),
        "ptx": dict(beta=0.0, ptx_coef=1.0),
    },
    "RLOO": {
        "no KL": dict(beta=0.0),
        "k1 in reward, beta=0.05": dict(beta=0.05, kl_estimator="k1", kl_placement="reward"),
        "k3 in loss, beta=0.5": dict(beta=0.5, kl_estimator="k3", kl_placement="loss"),
    },
    "PPO": {
        "no KL": dict(kl_coef=0.0),
        "k1 in reward, kl_coef=0.05": dict(kl_coef=0.05, kl_estimator="k1"),
        "adaptive k1 in reward": dict(kl_coef=0.05, kl_estimator="k1", kl_target=1.0, kl_horizon=100.0),
        "ptx": dict(kl_coef=0.0, ptx_coef=1.0),
    },
}
"""Trainer -> run name -> config options on top of ``run_policy``'s common ones. ``beta`` of k1 in the reward
(GRPO, RLOO) multiplies the KL summed over the ~20-token completion; in the loss, the per-token KL. PPO puts
``kl_coef`` times the per-token KL into the per-token reward. The adaptive runs start from ``beta=0.1`` (GRPO) or
``kl_coef=0.05`` (PPO) and adapt toward a ``kl_target`` per sequence; a fixed ``beta=0.1`` k3 GRPO run tracked the
adaptive one within its interval at every probe (3 seeds), so it is left out to keep the demo under 10 minutes."""


def run_policy(start: str, judge: str, proxy_dir: Path, out: Path, size: DemoSize, seed: int, trainer_name: str, name: str) -> dict:
    """Optimize the policy against the proxy with ``trainer_name`` ("GRPO", "RLOO" or "PPO") and
    ``STUDY_VARIANTS[trainer_name][name]``: the same prompts, learning rate, completions per step and probe."""
    import trl_regularizers as package

    options = STUDY_VARIANTS[trainer_name][name]
    proxy = ProxyReward(proxy_dir)
    probe = StudyProbe(
        task_prompts() * 2,
        every_n_steps=size.study_probe_every,
        max_new_tokens=COMPLETION_LENGTH,
        heldout_texts=corpus_lines(size.heldout_texts, "heldout"),
        batch_size=64,
        proxy=proxy,
        gold=GoldReward(*load_base(judge)),
    )
    config = getattr(package, f"Regularized{trainer_name}Config")(
        **common_args(out, size.study_steps, seed),
        **{"learning_rate": POLICY_LEARNING_RATE, **options},
        **(ppo_options(size) if trainer_name == "PPO" else dict(num_generations=8, max_completion_length=COMPLETION_LENGTH)),
        per_device_train_batch_size=POLICY_BATCH_SIZE,
        ptx_block_size=64,
        ptx_batch_size=8,
    )
    pretrain = Dataset.from_dict({"text": corpus_lines(2000, "train")}) if config.ptx_coef > 0 else None
    prompts = Dataset.from_dict({"prompt": task_prompts() * 16})
    trainer_class = getattr(package, f"Regularized{trainer_name}Trainer")
    if trainer_name == "PPO":
        trainer = ppo_trainer(trainer_class, config, start, proxy_dir, prompts, probe, pretrain)
    else:
        trainer = trainer_class(model=start, reward_funcs=proxy, args=config, train_dataset=prompts, callbacks=[probe], pretrain_dataset=pretrain)
    quiet_trainer(trainer, f"{trainer_name} {name} seed {seed}")
    trainer.train()
    return {"trainer": trainer_name, "settings": options, "log_history": trainer.state.log_history, "drift": probe.history, "samples": probe.completions,
            "probe_prompts": probe.prompts, "probe_samples": [{"step": h["step"], **scored} for h, scored in zip(probe.history, probe.scored)]}


def ppo_options(size: DemoSize) -> dict:
    """PPO's own fields: ``study_steps`` rollouts of ``POLICY_BATCH_SIZE`` prompts (one sample each), sampled at
    temperature 1 like GRPO and RLOO, one optimizer step per rollout, and ``missing_eos_penalty=1`` as TRL's PPO
    example sets it. PPO scores a response that hit ``response_length`` without EOS at its last token, a position the
    proxy never learned (``RewardTrainer`` appends EOS to every text, and ``ProxyReward`` scores text + EOS); about
    half of the start policy's 48-token samples have no EOS, and without the penalty PPO's score of those rose to 1.12
    while the same texts + EOS scored 0.51 (seed 0, step 23; ``docs/overoptimization.md``)."""
    return dict(total_episodes=size.study_steps * POLICY_BATCH_SIZE, response_length=COMPLETION_LENGTH, temperature=1.0, stop_token="eos",
                missing_eos_penalty=1.0, num_ppo_epochs=1, num_mini_batches=1, num_sample_generations=0,
                local_rollout_forward_batch_size=POLICY_BATCH_SIZE)


def ppo_trainer(trainer_class, config, start: str, proxy_dir: Path, prompts: Dataset, probe, pretrain):
    """PPO with the proxy as reward model and a copy of it as the value model (as TRL's examples start it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start, padding_side="left")
    return trainer_class(
        args=config,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(start),
        ref_model=AutoModelForCausalLM.from_pretrained(start),
        reward_model=AutoModelForSequenceClassification.from_pretrained(proxy_dir),
        value_model=AutoModelForSequenceClassification.from_pretrained(proxy_dir),
        train_dataset=prompts.map(lambda row: tokenizer(row["prompt"], add_special_tokens=False), remove_columns=["prompt"]),
        callbacks=[probe],
        pretrain_dataset=pretrain,
    )
