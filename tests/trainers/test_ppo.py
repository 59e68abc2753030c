"""RegularizedPPOTrainer on every TRL: parity with stock PPOTrainer (live on TRL 1.12; against a fixture recorded
from stock TRL 1.12 on the newest TRL), KL options, adaptive control + resume, ptx, PEFT.

Tiny local policy/value/reward models, 2-3 PPO updates of 4 episodes each.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tests.fixtures.make_ppo_fixture import FIXTURE, SCENARIOS, build_models, checksums
from tests.fixtures.make_ppo_fixture import train as train_scenario
from tests.trl_versions import HAS_PPO, requires_trl_ppo
from trl_regularizers.components.kl import KLPenalty
from trl_regularizers.core.ppo import shape_rewards
from trl_regularizers.core.records import KLRecord
from trl_regularizers.trainers.ppo import RegularizedPPOConfig, RegularizedPPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(tokenizer, n=16):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [tokenizer(f"q{i} " + "ab" * (i % 3))["input_ids"] for i in range(n)]})


def _config(config_cls, output_dir, **overrides):
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, total_episodes=8,
        num_ppo_epochs=2, response_length=8, local_rollout_forward_batch_size=4, num_sample_generations=0,
        learning_rate=1e-3, bf16=False, report_to="none", seed=0, save_strategy="no", stop_token="eos",
        missing_eos_penalty=1.0, gradient_checkpointing=False, disable_tqdm=True,
    )
    options.update(overrides)
    return config_cls(**options)


def _trainer(trainer_cls, args, lm_path, rm_path, **extra):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    tokenizer.padding_side = "left"
    return trainer_cls(
        args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(lm_path), ref_model=None,
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm_path), train_dataset=_prompts(tokenizer),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm_path), **extra,
    )


def _regularized(tmp_path, lm_path, rm_path, pretrain_dataset=None, **overrides):
    args = _config(RegularizedPPOConfig, tmp_path, **overrides)
    return _trainer(RegularizedPPOTrainer, args, lm_path, rm_path, pretrain_dataset=pretrain_dataset)


PRETRAIN_TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog. " * 2 for i in range(6)]
PTX = dict(ptx_coef=0.5, ptx_block_size=16, ptx_batch_size=2)


@requires_trl_ppo
def test_parity_with_stock_ppo_trainer(tmp_path, tiny_lm_path, tiny_rm_path):
    """k1, fixed kl_coef, no ptx, same seed: every logged metric of both updates equals stock PPOTrainer's."""
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    stock = _trainer(PPOTrainer, _config(PPOConfig, tmp_path / "stock"), tiny_lm_path, tiny_rm_path)
    stock.train()
    ours = _regularized(tmp_path / "ours", tiny_lm_path, tiny_rm_path)
    ours.train()

    assert len(stock.state.log_history) == len(ours.state.log_history) == 2
    for expected, got in zip(stock.state.log_history, ours.state.log_history):
        for name, value in expected.items():
            if name != "eps":  # episodes per second: wall-clock
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
        assert got["kl"] == pytest.approx(expected["objective/kl"], rel=1e-6, abs=1e-7)
        assert got["kl/coef"] == pytest.approx(0.05)
    assert ours.state.log_history[1]["loss/policy_avg"] != ours.state.log_history[0]["loss/policy_avg"]


def _hand_rollout():
    """Two responses: the first ends at index 1 (index 2 is padding), the second fills all 3 positions."""
    return {
        "logprobs": torch.tensor([[-1.0, -2.0, 1.0], [-0.5, -3.0, -1.0]]),
        "ref_logprobs": torch.tensor([[-1.5, -1.0, 1.0], [-0.5, -1.0, -4.0]]),
        "padding_mask": torch.tensor([[False, False, True], [False, False, False]]),
        "padding_mask_p1": torch.zeros(2, 3, dtype=torch.bool),
        "sequence_lengths": torch.tensor([1, 2]),
        "scores": torch.tensor([2.0, -1.0]),
    }


E = torch.e
# log-ratios r = log pi - log pi_ref: [[0.5, -1.0, pad], [0.0, -2.0, 3.0]]
HAND_KL = {
    ("k1", "reverse", None): [[0.5, -1.0, 0.0], [0.0, -2.0, 3.0]],
    ("k2", "reverse", None): [[0.125, 0.5, 0.0], [0.0, 2.0, 4.5]],
    ("k3", "reverse", None): [[E**-0.5 - 0.5, E - 2.0, 0.0], [0.0, E**2 - 3.0, E**-3 + 2.0]],
    ("abs", "reverse", None): [[0.5, 1.0, 0.0], [0.0, 2.0, 3.0]],
    # forward: rho * k(s) with s = -r, rho = exp(s)
    ("k1", "forward", None): [[-0.5 * E**-0.5, E, 0.0], [0.0, 2.0 * E**2, -3.0 * E**-3]],
    # clamp bounds r to [-1.5, 1.5] before the estimator
    ("k2", "reverse", 1.5): [[0.125, 0.5, 0.0], [0.0, 1.125, 1.125]],
}


def _hand_penalty(tmp_path, **kl) -> KLPenalty:
    """The KL penalty RegularizedPPOTrainer builds from its config (coefficient ``kl_coef``)."""
    config = _config(RegularizedPPOConfig, tmp_path, kl_coef=0.1, **kl)
    return KLPenalty.from_config(config, config.kl_coef, RegularizedPPOTrainer.TRL_KL, metrics=None, trainer_name="RegularizedPPOTrainer")


@pytest.mark.parametrize(("estimator", "direction", "clamp"), list(HAND_KL))
def test_kl_options_per_token_values(tmp_path, estimator, direction, clamp):
    """PPO's KL penalty gives the hand-computed per-token estimate, zero on padding, for every sampled-token option."""
    penalty = _hand_penalty(tmp_path, kl_estimator=estimator, kl_direction=direction, kl_clamp=clamp)
    rollout = _hand_rollout()
    kl = penalty.estimate(KLRecord(rollout["logprobs"], rollout["ref_logprobs"], (~rollout["padding_mask"]).float()))
    torch.testing.assert_close(kl, torch.tensor(HAND_KL[estimator, direction, clamp]), rtol=1e-6, atol=1e-6)


def test_kl_penalty_enters_per_token_reward(tmp_path):
    """rewards_t = -kl_coef * KL_t, plus the score one past the last token (or on it when the response is full)."""
    penalty = _hand_penalty(tmp_path, kl_estimator="k2", kl_clamp=None)
    rollout = _hand_rollout()
    kl = penalty.estimate(KLRecord(rollout["logprobs"], rollout["ref_logprobs"], (~rollout["padding_mask"]).float()))
    _, rewards = shape_rewards(kl, rollout["scores"], rollout["sequence_lengths"], penalty.coef)
    expected = [[-0.0125, -0.05, 2.0], [0.0, -0.2, -0.45 - 1.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_vocab_kl_matches_naive_kl_of_rollout_logits(tmp_path, tiny_lm_path, tiny_rm_path, direction):
    """kl_estimator='full': the per-token KL equals a naive log-softmax KL between re-computed policy and reference
    next-token distributions (at the sampling temperature) at every response position."""
    def forward(model, query_responses, pad):  # naive: a plain forward of the left-padded sequences
        mask = query_responses != pad
        return model(input_ids=query_responses.masked_fill(~mask, 0), attention_mask=mask, position_ids=mask.cumsum(1) - mask.long())

    trainer = _regularized(tmp_path, tiny_lm_path, tiny_rm_path, kl_estimator="full", kl_direction=direction, temperature=0.7)
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    with torch.no_grad():
        for parameter in policy.model.layers[-1].parameters():  # make the policy differ from the reference copy
            parameter.add_(0.3 * torch.randn_like(parameter))
        queries = next(iter(trainer.dataloader))["input_ids"]
        rollout = trainer.collect_rollout(queries)
        context, pad = queries.shape[1], trainer.processing_class.pad_token_id
        logp = (forward(policy, rollout.query_responses, pad).logits[:, context - 1 : -1] / 0.7).log_softmax(-1)
        logq = (forward(trainer.ref_model, rollout.query_responses, pad).logits[:, context - 1 : -1] / 0.7).log_softmax(-1)
    naive = (logp.exp() * (logp - logq)).sum(-1) if direction == "reverse" else (logq.exp() * (logq - logp)).sum(-1)
    naive = naive.masked_fill(rollout.padding_mask, 0)
    kl = rollout.kl
    assert naive.abs().max() > 1e-2  # the perturbation is visible
    torch.testing.assert_close(kl, naive, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_placement": "loss"}, "kl_placement='loss' is not valid. Allowed values: reward"),
        ({"kl_estimator": "k9"}, "kl_estimator='k9' is not valid. Allowed values: k1, k2, k3"),
        ({"kl_target": 6.0, "kl_coef": 0.0}, "kl_target=6.0 needs kl_coef > 0"),
        ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
        ({"ptx_coef": -1.0}, "ptx_coef must be >= 0"),
        ({"gamma": 1.5}, "gamma must be in [0, 1], got 1.5"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"num_ppo_epochs": 0}, "num_ppo_epochs must be >= 1, got 0"),
        ({"cliprange": float("nan")}, "cliprange must be a finite number"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty must be >= 0 or None, got -1.0"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(RegularizedPPOConfig, tmp_path, **overrides)


def test_resume_restores_adaptive_kl_coefficient_and_training_state(tmp_path, tiny_lm_path, tiny_rm_path):
    """3 updates straight vs 2 + resume from checkpoint-2: the third update logs the same metrics (ptx/nll included)
    and the same adapted kl_coef: policy, value model, optimizer, scheduler, data order, RNG, KL controller and
    ptx stream are all restored."""
    adaptive = dict(total_episodes=12, kl_target=1e-3, kl_horizon=8.0, save_strategy="steps", save_steps=1, **PTX)
    straight = _regularized(tmp_path / "straight", tiny_lm_path, tiny_rm_path, PRETRAIN_TEXTS, **adaptive)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    with open(checkpoint / "trl_regularizers_state.json") as handle:
        saved_state = json.load(handle)
    saved = saved_state["kl_controller"]
    assert saved_state["ptx"]["block"] == 2 * 4 * 2  # 2 updates x 4 micro-batches x ptx_batch_size blocks

    resumed = _regularized(tmp_path / "resumed", tiny_lm_path, tiny_rm_path, PRETRAIN_TEXTS, **adaptive)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    expected, got = straight.state.log_history[2], resumed.state.log_history[2]
    assert len(resumed.state.log_history) == 3 and resumed.state.global_step == 3
    assert saved["type"] == "adaptive" and got["kl/coef"] == pytest.approx(saved["value"])
    assert got["kl/coef"] != pytest.approx(0.05)  # the coefficient did adapt, so a reset would show
    for name, value in expected.items():
        if name != "eps":
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert resumed.kl_penalty.coef == straight.kl_penalty.coef


def test_ptx_nll_is_mixed_into_each_micro_batch(tmp_path, tiny_lm_path, tiny_rm_path):
    """One update, one epoch, GA=2: both micro-batches see the initial policy, so the logged ptx/nll is the mean NLL
    of the initial policy on the stream's first two batches; and the ptx gradient changes the trained policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_regularizers.core.losses import ptx_nll
    from trl_regularizers.ptx import PtxStream

    one_update = dict(total_episodes=4, num_ppo_epochs=1)
    with_ptx = _regularized(tmp_path / "ptx", tiny_lm_path, tiny_rm_path, PRETRAIN_TEXTS, **one_update, **PTX)
    with_ptx.train()
    without = _regularized(tmp_path / "no_ptx", tiny_lm_path, tiny_rm_path, **one_update)
    without.train()

    stream = PtxStream(PRETRAIN_TEXTS, AutoTokenizer.from_pretrained(tiny_lm_path), block_size=16, batch_size=2)
    policy = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    with torch.no_grad():
        expected = sum(ptx_nll(policy(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits, b["labels"]).item()
                       for b in (stream.next_batch(), stream.next_batch())) / 2
    logs, baseline = with_ptx.state.log_history[0], without.state.log_history[0]
    assert logs["ptx/nll"] == pytest.approx(expected, rel=1e-5)
    assert with_ptx.ptx_term.stream.state_dict()["block"] == 2 * 2  # two micro-batches x ptx_batch_size
    assert logs["objective/scores"] == baseline["objective/scores"]  # same rollout ...
    trained = [p.detach() for p in with_ptx.accelerator.unwrap_model(with_ptx.model).policy.parameters()]
    plain = [p.detach() for p in without.accelerator.unwrap_model(without.model).policy.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(trained, plain)) > 1e-6  # ... different update


def test_right_padded_prompts_are_refused(tmp_path, tiny_lm_path, tiny_rm_path):
    """Generation continues after the padded prompt, so right padding would put pad tokens inside every rollout."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="left-padded"):
        RegularizedPPOTrainer(
            args=_config(RegularizedPPOConfig, tmp_path), processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(tiny_lm_path),
            ref_model=None, reward_model=AutoModelForSequenceClassification.from_pretrained(tiny_rm_path), train_dataset=_prompts(tokenizer),
            value_model=AutoModelForSequenceClassification.from_pretrained(tiny_rm_path),
        )


def test_ptx_coef_without_pretrain_dataset_fails_before_training(tmp_path, tiny_lm_path, tiny_rm_path):
    with pytest.raises(ValueError, match="ptx_coef=0.5 > 0 needs pretraining data: pass pretrain_dataset= to RegularizedPPOTrainer"):
        _regularized(tmp_path, tiny_lm_path, tiny_rm_path, **PTX)


def test_one_optimizer_step_per_mini_batch(tmp_path, tiny_lm_path, tiny_rm_path):
    """num_mini_batches=2: 2 updates x 2 epochs x 2 mini-batches = 8 optimizer steps (on TRL 1.12, stock PPOTrainer
    takes 4, one per gradient_accumulation_steps micro-batches, whatever num_mini_batches is)."""
    kinds = [("ours", RegularizedPPOTrainer, RegularizedPPOConfig)]
    if HAS_PPO:
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        kinds.append(("stock", PPOTrainer, PPOConfig))
    counts = {}
    for name, trainer_cls, config_cls in kinds:
        trainer = _trainer(trainer_cls, _config(config_cls, tmp_path / name, num_mini_batches=2), tiny_lm_path, tiny_rm_path)
        counts[name] = 0
        trainer.optimizer.optimizer.register_step_post_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
        trainer.train()
    assert counts == ({"stock": 4, "ours": 8} if HAS_PPO else {"ours": 8})


# ---- the same numbers on every TRL: stock TRL 1.12 recorded by tests/fixtures/make_ppo_fixture.py

def _standalone_trainer_cls():
    """The package's own PPO implementation (what RegularizedPPOTrainer is on TRL >= 1.13), on any TRL."""
    from trl_regularizers.components.kl import KLPenalty
    from trl_regularizers.trainers.ppo.loop import RegularizedPPOLoop
    from trl_regularizers.trainers.ppo.standalone import StandalonePPOAdapter

    class StandaloneRegularizedPPOTrainer(RegularizedPPOLoop, StandalonePPOAdapter):
        def __init__(self, *args, **kwargs):  # RegularizedPPOTrainer's construction, without ptx (no scenario uses it)
            super().__init__(*args, **kwargs)
            self.attach(kl=KLPenalty.from_config(self.args, self.args.kl_coef, RegularizedPPOTrainer.TRL_KL, self, type(self).__name__))

    return StandaloneRegularizedPPOTrainer


@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory):
    recorded = json.loads(FIXTURE.read_text())
    lm_path, rm_path = build_models(tmp_path_factory.mktemp("fixture_models"))
    assert checksums(lm_path, rm_path) == recorded["model_checksums"], (
        "the tiny models differ from the ones the fixture was recorded with (torch/transformers init changed?): "
        "regenerate it with `.venv-trl112/bin/python -m tests.fixtures.make_ppo_fixture`"
    )
    return recorded, lm_path, rm_path


IMPLEMENTATIONS = ["RegularizedPPOTrainer", "standalone"]
# The fixture was recorded on another machine: a BLAS that orders float32 sums differently moves each metric by
# about eps32 (1.2e-7) times the size of the terms it adds up, not of the result. Most metrics are means of terms of
# size ~1 that cancel (whitened advantages, ratios near 1): measured up to 2e-7 absolute, so 1e-6 absolute and 1e-5
# relative. The KL sums add <= 8 log-prob differences of |logp| ~ 5 (the entropy per token): ~0 while the policy is
# the reference, up to 8 * 5 * 1.2e-7 = 5e-6 apart (measured: 4e-7), so 1e-5. A wrong loss or KL moves them by >1e-3.
_KL_SUMS = {"objective/kl", "objective/non_score_reward"}
_ABSOLUTE_TOLERANCE = {"kl_sum": 1e-5, "mean": 1e-6}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_metrics_match_stock_trl112_fixture(tmp_path, fixture_models, scenario, implementation):
    """Same tiny models, prompts and seed: every metric stock TRL 1.12 logged is logged with the same value, on this
    TRL. Expected exact on the recording machine (same torch/transformers ops in the same order, same RNG draws); the
    tolerance only absorbs a BLAS that reorders sums (``_ABSOLUTE_TOLERANCE``)."""
    from trl_regularizers.trainers.ppo import STOCK_PPO

    if implementation == "standalone" and not STOCK_PPO:
        pytest.skip("On TRL >= 1.13 RegularizedPPOTrainer is the standalone implementation (the other parameter).")
    recorded, lm_path, rm_path = fixture_models
    entry = recorded["scenarios"][scenario]
    assert entry["options"] == SCENARIOS[scenario], f"{FIXTURE.name} is stale: rerun tests/fixtures/make_ppo_fixture.py"
    trainer_cls = RegularizedPPOTrainer if implementation == "RegularizedPPOTrainer" else _standalone_trainer_cls()
    logs, trainer = train_scenario(trainer_cls, RegularizedPPOConfig, scenario, lm_path, rm_path, str(tmp_path))
    assert len(logs) == len(entry["logs"]) == trainer.args.num_total_batches
    for expected, got in zip(entry["logs"], logs):
        for name, value in expected.items():
            if value != value:  # NaN (a variance over one number): NaN too
                assert got[name] != got[name], name
            else:
                tolerance = _ABSOLUTE_TOLERANCE["kl_sum" if name in _KL_SUMS else "mean"]
                assert got[name] == pytest.approx(value, rel=1e-5, abs=tolerance), (scenario, expected["step"], name)
    assert logs[1]["loss/policy_avg"] != logs[0]["loss/policy_avg"]


def test_peft_reference_is_the_policy_with_its_adapter_disabled(tmp_path, tiny_lm_path, tiny_rm_path):
    """LoRA, ref_model=None: the reference is the base model (adapter off). The adapter starts as a no-op (B = 0),
    so the first rollout's KL is ~0; training moves only the LoRA and value weights, and the reference stays the
    untouched base model."""
    from peft import LoraConfig


    args = _config(RegularizedPPOConfig, tmp_path, total_episodes=8, num_ppo_epochs=2)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(RegularizedPPOTrainer, args, tiny_lm_path, tiny_rm_path, peft_config=peft)
    assert trainer.ref_model is None and trainer.is_peft_model
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    trainer.train()
    first, second = trainer.state.log_history
    assert abs(first["objective/kl"]) < 1e-4 and abs(second["objective/kl"]) > 1e-4
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        queries = next(iter(trainer.dataloader))["input_ids"]
        query_responses = torch.cat([queries, queries[:, -3:]], 1)
        reference = trainer.reference_logits(query_responses, queries.shape[1])
        with policy.disable_adapter():
            base = policy(input_ids=query_responses).logits[:, queries.shape[1] - 1 : -1]
    mask = (queries != trainer.processing_class.pad_token_id).all(1)  # unpadded rows: plain and padded forwards agree
    torch.testing.assert_close(reference[mask], base[mask], rtol=1e-5, atol=1e-5)


def test_config_has_stock_trl112_ppo_fields(tmp_path):
    """A TRL 1.12 PPO script's config keeps working: every PPOConfig field of TRL 1.12 exists with its default."""
    from dataclasses import fields

    from trl_regularizers.trainers.ppo.config import PPOConfig

    ours = {f.name: f for f in fields(RegularizedPPOConfig)}
    for name, default in STOCK_PPO_DEFAULTS.items():
        assert name in ours, name
        if name != "kl_estimator":
            assert getattr(PPOConfig(output_dir=str(tmp_path), bf16=False), name) == default, name
    config = _config(RegularizedPPOConfig, tmp_path)
    assert config.kl_estimator == "k1" and config.logging_steps == 10 and config.learning_rate == 1e-3


STOCK_PPO_DEFAULTS = dict(
    learning_rate=3e-6, logging_steps=10, gradient_checkpointing=True, dataset_num_proc=None, num_mini_batches=1, total_episodes=None,
    local_rollout_forward_batch_size=64, num_sample_generations=10, response_length=53, stop_token=None, stop_token_id=None,
    temperature=0.7, missing_eos_penalty=None, sft_model_path="EleutherAI/pythia-160m", world_size=None, num_total_batches=None,
    micro_batch_size=None, local_batch_size=None, batch_size=None, local_mini_batch_size=None, mini_batch_size=None,
    push_to_hub=False, reward_model_path="EleutherAI/pythia-160m", model_adapter_name=None, ref_adapter_name=None,
    num_ppo_epochs=4, whiten_rewards=False, kl_coef=0.05, kl_estimator="k1", cliprange=0.2, vf_coef=0.1, cliprange_value=0.2,
    gamma=1.0, lam=0.95, ds3_gather_for_generation=True,
)
"""TRL 1.12's ``PPOConfig`` fields and defaults (tests/test_trl_contract.py checks them against TRL 1.12 itself)."""


def test_drift_callback_probes_the_policy_inside_ppo(tmp_path, tiny_lm_path, tiny_rm_path):
    """KLDriftCallback gets PPO's policy-and-value module: it probes the policy, whose KL to its start grows."""
    from trl_regularizers import KLDriftCallback

    drift = KLDriftCallback(["q1 ab", "q2 abab"], every_n_steps=1, max_new_tokens=6)
    trainer = _regularized(tmp_path, tiny_lm_path, tiny_rm_path, kl_coef=0.0)
    trainer.add_callback(drift)
    trainer.train()
    assert [h["step"] for h in drift.history] == [0, 1, 2]
    assert drift.history[0]["drift/kl_reverse"] == 0.0 and drift.history[-1]["drift/kl_reverse"] > 0.0
    assert not hasattr(drift.base_model, "value_model")  # the frozen copy is of the policy alone
