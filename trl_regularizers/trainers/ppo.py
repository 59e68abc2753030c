"""PPO with KL options, adaptive KL control and PPO-ptx, on every supported TRL (1.12 through the newest).

The implementation is picked once, here, by TRL version: on TRL 1.12 ``RegularizedPPOTrainer`` subclasses
``trl.experimental.ppo.PPOTrainer`` (``adapters/ppo.py``: the stock constructor, a drop-in and ``isinstance`` of
it); on TRL >= 1.13, which has no PPO, it stands on the package's own setup (``adapters/ppo_standalone.py``:
config fields, constructor and metric names of TRL 1.12's, written from the algorithm, no TRL code). Both feed
the same loop, written from the PPO algorithm (Ziegler et al. 2019; Ouyang et al. 2022 for ptx), one overridable
method per stage; the math is ``core.ppo``, the KL estimate ``trainers.kl.estimate_kl``, ptx the shared
``PtxRegularizer`` and the checkpointed state the shared ``regularizer_state``:

    rollout -> score -> compute_kl -> compute_rewards -> compute_advantages -> ppo_update (ppo_loss + ptx) -> log_update
    -> end_update (scheduler, callbacks, checkpoint)

With ``kl_estimator="k1"``, a fixed ``kl_coef`` and ``ptx_coef=0`` it reproduces stock ``PPOTrainer`` numerically,
on TRL 1.12 and on the newest TRL alike (tests/fixtures/ppo_stock_trl112.json). Two stock quirks are fixed (see
docs/ppo.md): one optimizer step per mini-batch (stock steps once per ``gradient_accumulation_steps``
micro-batches, whatever ``num_mini_batches`` is, and on every micro-batch of the update that ends a pass over the
dataloader), and ``train(resume_from_checkpoint=...)`` resumes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import trl
from packaging.version import Version

from trl_regularizers.configs import KLArguments, PtxArguments, _at_least, _choice, _positive, check_finite_numbers, regularized_config
from trl_regularizers.core.control import make_kl_controller
from trl_regularizers.core.kl import kl_estimator_info, kl_estimator_names
from trl_regularizers.core.ppo import clipped_policy_loss, clipped_value_loss, gae, masked_whiten, shape_rewards
from trl_regularizers.trainers.adapters.ppo_standalone import INVALID_LOGPROB, StandalonePPOAdapter
from trl_regularizers.trainers.kl import estimate_kl
from trl_regularizers.trainers.ptx import PtxRegularizer
from trl_regularizers.trainers.records import KLRecord

STOCK_PPO = Version(trl.__version__).release < (1, 13)
"""TRL 1.12 still has ``trl.experimental.ppo``: subclass it. Newer TRL: the package's own implementation."""
if STOCK_PPO:
    from trl_regularizers.trainers.adapters.ppo import PPOAdapter, PPOConfig
else:
    from trl_regularizers.trainers.adapters.ppo_standalone import PPOConfig
    PPOAdapter = StandalonePPOAdapter


@dataclass
class RegularizedPPOConfig(PtxArguments, KLArguments, PPOConfig):
    r"""
    The fields of TRL 1.12's [`~trl.experimental.ppo.PPOConfig`] (its subclass on TRL 1.12; the same fields with
    the same defaults on newer TRL) plus a choice of KL estimator, direction, clamp and adaptive control
    ([`KLArguments`], coefficient = `kl_coef`), and PPO-ptx ([`PtxArguments`]).

    The KL penalty is per token in the reward, as PPO does: `r_t = -kl_coef * KL_t`, plus the score on the
    last token. Defaults (`k1`, reverse, fixed `kl_coef`, no ptx) reproduce stock PPO.

    kl_estimator (`str`, *optional*, defaults to `"k1"`):
        `"k1"`, `"k2"`, `"k3"`, `"abs"` (per sampled token) or `"full"` (exact KL over the vocabulary at
        each position, from the rollout's policy and reference logits, computed in chunks).
    kl_placement (`str`, *optional*, defaults to `"reward"`):
        Only `"reward"`: PPO's KL penalty is part of the per-token reward.
    kl_target (`float` or `None`, *optional*, defaults to `None`):
        If set, `kl_coef` adapts after every PPO update toward this KL per sequence (summed over tokens)
        ([Ziegler et al. 2019](https://huggingface.co/papers/1909.08593)). Its state is saved in checkpoints.
    kl_horizon (`float`, *optional*, defaults to `10000`):
        Horizon of the adaptive controller in episodes (sequences), as in Ziegler et al.: each update moves
        the coefficient by `clip(KL / kl_target - 1, ±0.2) * batch_size / kl_horizon`.
    """

    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator.", "choices": list(kl_estimator_names())})
    kl_placement: str = field(default="reward", metadata={"help": "Where the KL penalty goes (PPO: reward only).", "choices": ["reward"]})

    def __post_init__(self):
        check_finite_numbers(self)
        super().__post_init__()
        self.validate_regularizers()

    def validate_regularizers(self) -> None:
        _choice("kl_placement", self.kl_placement, ("reward",))
        _at_least("kl_coef", self.kl_coef, 0.0)
        if self.kl_target is not None and not self.kl_coef > 0:
            raise ValueError(f"kl_target={self.kl_target} needs kl_coef > 0 to adapt from, got kl_coef={self.kl_coef}.")
        self._validate_kl(self.kl_coef)
        self._validate_ptx()
        self._validate_ppo()

    def _validate_ppo(self) -> None:
        """PPO's own numbers, in range (finiteness is checked for every field)."""
        for name in ("num_ppo_epochs", "num_mini_batches", "response_length", "local_rollout_forward_batch_size"):
            _at_least(name, getattr(self, name), 1)
        _at_least("total_episodes", self.total_episodes, 1, allow_none=True)
        _at_least("num_sample_generations", self.num_sample_generations, 0)
        for name in ("temperature", "cliprange", "cliprange_value"):
            _positive(name, getattr(self, name))
        _at_least("vf_coef", self.vf_coef, 0.0)
        _at_least("missing_eos_penalty", self.missing_eos_penalty, 0.0, allow_none=True)
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}.")


class RegularizedPPOLoop(PtxRegularizer):
    """The regularized PPO loop over any PPO adapter (``PPOAdapter`` below, or ``StandalonePPOAdapter``)."""

    def __init__(self, args: RegularizedPPOConfig, processing_class, model, ref_model, reward_model, train_dataset, value_model, *rest, **kwargs):
        if args is not None and not isinstance(args, RegularizedPPOConfig) and not STOCK_PPO:
            raise TypeError(f"args must be a RegularizedPPOConfig, got {type(args).__name__}.")
        args = regularized_config(args, RegularizedPPOConfig, model, "PPO")
        data_collator = rest[0] if rest else kwargs.get("data_collator")
        padding_side = getattr(getattr(processing_class, "tokenizer", processing_class), "padding_side", "left")
        if data_collator is None and padding_side != "left":
            # Responses are generated after the padded prompt: right padding puts pad tokens before them.
            raise ValueError(
                f"PPO pads the prompts with the tokenizer and generates after them, so they must be left-padded; got "
                f"padding_side={padding_side!r}. Load it with padding_side=\"left\" (as TRL's PPO examples do) or pass a data_collator."
            )
        super().__init__(args, processing_class, model, ref_model, reward_model, train_dataset, value_model, *rest, **kwargs)
        self.kl_controller = make_kl_controller(args.kl_coef, args.kl_target, args.kl_horizon)
        self.regularizer_state.register("kl_controller", self.kl_controller)

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Run ``num_total_batches`` PPO updates, optionally continuing from a checkpoint of this trainer."""
        args = self.args
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        self.begin_training()
        batches = self._repeat(self.dataloader)
        if checkpoint is not None:
            self.restore_checkpoint(checkpoint, batches)
        self.model.train()
        start_time = time.time()
        for update in range(self.state.global_step + 1, args.num_total_batches + 1):
            self.state.episode += args.batch_size
            queries = next(batches)["input_ids"].to(self.accelerator.device)
            with torch.no_grad():
                rollout = self.rollout(queries)
                self.score(rollout)
                rollout["kl"] = self.compute_kl(rollout)
                self.compute_rewards(rollout)
                self.compute_advantages(rollout)
            stats = self.ppo_update(rollout)
            self.log_update(rollout, stats, start_time)
            self.end_update(update)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self.save_checkpoint()
            self.control = self.callback_handler.on_save(args, self.state, self.control)

    @staticmethod
    def _repeat(dataloader):
        while True:
            yield from dataloader

    def rollout(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample responses; compute sampled-token log-probs, reference log-probs, values and masks."""
        args = self.args
        context_length = queries.shape[1]
        query_responses, logits = self.generate(queries)
        responses = query_responses[:, context_length:]
        chunks = defaultdict(list)
        for start in range(0, queries.shape[0], args.local_rollout_forward_batch_size):
            rows = slice(start, start + args.local_rollout_forward_batch_size)
            ref_logits = self.reference_logits(query_responses[rows], context_length) / (args.temperature + 1e-7)
            chunks["logprobs"].append(self.token_logps(logits[rows], responses[rows]))
            chunks["ref_logprobs"].append(self.token_logps(ref_logits, responses[rows]))
            if kl_estimator_info(args.kl_estimator).needs_logits:  # exact KL per chunk: no [B, T, V] pair is kept
                record = KLRecord(chunks["logprobs"][-1], chunks["ref_logprobs"][-1], torch.ones_like(chunks["logprobs"][-1]),
                                  logits=logits[rows], ref_logits=ref_logits)
                chunks["full_kl"].append(estimate_kl(record, args.kl_estimator, args.kl_direction, None))
            chunks["values"].append(self.value_estimates(query_responses[rows], context_length))
        rollout = {name: torch.cat(parts) for name, parts in chunks.items()}
        postprocessed, sequence_lengths = self.truncated(responses)
        positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
        padding_mask = positions > sequence_lengths[:, None]  # after the last token
        padding_mask_p1 = positions > sequence_lengths[:, None] + 1  # values also cover one step past it
        rollout.update(queries=queries, query_responses=query_responses, responses=responses, postprocessed=postprocessed,
                       sequence_lengths=sequence_lengths, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)
        rollout["logprobs"] = rollout["logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
        rollout["ref_logprobs"] = rollout["ref_logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
        rollout["values"] = rollout["values"].masked_fill(padding_mask_p1, 0)
        return rollout

    def score(self, rollout: dict[str, torch.Tensor]) -> None:
        """Reward-model score of each truncated response, minus ``missing_eos_penalty`` if it has no EOS."""
        queries, postprocessed, chunk = rollout["queries"], rollout["postprocessed"], self.args.local_rollout_forward_batch_size
        scores = torch.cat([
            self.reward_scores(torch.cat((queries[start : start + chunk], postprocessed[start : start + chunk]), 1), queries.shape[1])
            for start in range(0, queries.shape[0], chunk)
        ])
        rollout["contain_eos"] = (postprocessed == self.processing_class.eos_token_id).any(-1)
        if self.args.missing_eos_penalty is not None:
            scores[~rollout["contain_eos"]] -= self.args.missing_eos_penalty
        rollout["scores"] = scores

    def compute_kl(self, rollout: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token KL estimate [B, T] (zero after the response) with the configured estimator/direction/clamp."""
        args, mask = self.args, (~rollout["padding_mask"]).float()
        if kl_estimator_info(args.kl_estimator).needs_logits:
            return rollout["full_kl"] * mask
        record = KLRecord(rollout["logprobs"], rollout["ref_logprobs"], mask)
        return estimate_kl(record, args.kl_estimator, args.kl_direction, args.kl_clamp)

    def compute_rewards(self, rollout: dict[str, torch.Tensor]) -> None:
        """Per-token reward ``-kl_coef * KL_t`` plus the score after the last response token (``core.ppo.shape_rewards``)."""
        rollout["kl_coef"] = coef = self.kl_controller.value
        rollout["non_score_reward"], rewards = shape_rewards(rollout["kl"], rollout["scores"], rollout["sequence_lengths"], coef)
        if self.args.whiten_rewards:
            rewards = masked_whiten(rewards, ~rollout["padding_mask_p1"], shift_mean=False).masked_fill(rollout["padding_mask_p1"], 0)
        rollout["rewards"] = rewards

    def compute_advantages(self, rollout: dict[str, torch.Tensor]) -> None:
        """GAE (``core.ppo.gae``); advantages whitened over the response tokens."""
        advantages, rollout["returns"] = gae(rollout["rewards"], rollout["values"], self.args.gamma, self.args.lam)
        rollout["advantages"] = masked_whiten(advantages, ~rollout["padding_mask"]).masked_fill(rollout["padding_mask"], 0)

    def ppo_update(self, rollout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``num_ppo_epochs`` passes over shuffled mini-batches; one optimizer step per mini-batch."""
        args, accelerator = self.args, self.accelerator
        stats = defaultdict(list)
        for _ in range(args.num_ppo_epochs):
            order = np.random.permutation(args.local_batch_size)
            for mini_start in range(0, args.local_batch_size, args.local_mini_batch_size):
                mini_batch = order[mini_start : mini_start + args.local_mini_batch_size]
                micro_batches = [mini_batch[i : i + args.per_device_train_batch_size]
                                 for i in range(0, len(mini_batch), args.per_device_train_batch_size)]
                scale = accelerator.gradient_accumulation_steps / len(micro_batches)  # backward divides by GA steps
                for i, rows in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    accelerator.sync_gradients = last
                    with nullcontext() if last else accelerator.no_sync(self.model):
                        loss, micro_stats = self.ppo_loss(rollout, rows)
                        ptx = self.ptx_loss(self.language_model())
                        accelerator.backward((loss if ptx is None else loss + ptx) * scale)
                    for name, value in micro_stats.items():
                        stats[name].append(value)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {name: torch.stack(values) for name, values in stats.items()}

    def ppo_loss(self, rollout: dict[str, torch.Tensor], rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + ``vf_coef`` * clipped value loss on a micro-batch, and its statistics."""
        args = self.args
        context_length = rollout["queries"].shape[1]
        padding_mask, padding_mask_p1 = rollout["padding_mask"][rows], rollout["padding_mask_p1"][rows]
        logits, values = self.policy_forward(rollout["query_responses"][rows])
        logits = logits[:, context_length - 1 : -1] / (args.temperature + 1e-7)
        logprobs = self.token_logps(logits, rollout["responses"][rows]).masked_fill(padding_mask, INVALID_LOGPROB)
        values = values[:, context_length - 1 : -1].squeeze(-1).masked_fill(padding_mask_p1, 0)
        vf_loss, vf_stats = clipped_value_loss(values, rollout["values"][rows], rollout["returns"][rows], ~padding_mask_p1, args.cliprange_value)
        pg_loss, pg_stats = clipped_policy_loss(logprobs, rollout["logprobs"][rows], rollout["advantages"][rows], ~padding_mask, args.cliprange)
        with torch.no_grad():
            entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        stats = {"approxkl": pg_stats.approxkl, "pg_clipfrac": pg_stats.clipfrac, "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
                 "vf_clipfrac": vf_stats.clipfrac, "entropy": entropy.mean(), "ratio": pg_stats.ratio_mean}
        return pg_loss + args.vf_coef * vf_loss, stats

    def log_update(self, rollout: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], start_time: float) -> None:
        """Log TRL's PPO metrics plus ours (``kl``, ``kl/coef``, ``ptx/nll``), then adapt the KL coefficient."""
        gather = lambda t: self.accelerator.gather_for_metrics(t).mean().item()  # noqa: E731
        kl_per_sequence = rollout["kl"].sum(1).mean()
        non_score = rollout["non_score_reward"].sum(1).mean()
        entropy = (-rollout["logprobs"] * (~rollout["padding_mask"]).float()).sum(1).mean()
        metrics = {
            "eps": int(self.state.episode / (time.time() - start_time)),
            "objective/kl": gather(kl_per_sequence),
            "objective/entropy": gather(entropy),
            "objective/non_score_reward": gather(non_score),
            "objective/rlhf_reward": gather(non_score + rollout["scores"].mean()),
            "objective/scores": gather(rollout["scores"].mean()),
            "policy/approxkl_avg": gather(stats["approxkl"]),
            "policy/clipfrac_avg": gather(stats["pg_clipfrac"]),
            "loss/policy_avg": gather(stats["pg_loss"]),
            "loss/value_avg": gather(stats["vf_loss"]),
            "val/clipfrac_avg": gather(stats["vf_clipfrac"]),
            "policy/entropy_avg": gather(stats["entropy"]),
            "val/ratio": gather(stats["ratio"]),
            "val/ratio_var": self.accelerator.gather_for_metrics(stats["ratio"]).var().item(),
            "val/num_eos_tokens": (rollout["responses"] == self.processing_class.eos_token_id).sum().item(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.episode,
        }
        self.log_metric("kl", kl_per_sequence)
        self.log_metric("kl/coef", rollout["kl_coef"])
        metrics.update(self.pop_metrics())
        self.kl_controller.update(metrics["kl"], n_steps=self.args.batch_size)
        self.state.epoch = self.state.episode / self.train_dataset_len
        self.state.global_step += 1
        self.log(metrics)

    def end_update(self, update: int) -> None:
        """Scheduler step, sample generations, ``on_step_end``, and a checkpoint when the callbacks ask for one."""
        args = self.args
        self.lr_scheduler.step()
        if args.num_sample_generations > 0 and (update - 1) % self.sample_generations_freq == 0:
            self.generate_completions(sampling=True)  # before saving, so the saved RNG state is the next rollout's
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.control.should_save:
            self.save_checkpoint()
            self.control = self.callback_handler.on_save(args, self.state, self.control)


class RegularizedPPOTrainer(RegularizedPPOLoop, PPOAdapter):
    """Drop-in ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12's constructor) with KL options, adaptive KL control and
    PPO-ptx, on every supported TRL.

    Takes the stock arguments plus ``pretrain_dataset=`` for ``ptx_coef > 0``. ``train(resume_from_checkpoint=...)``
    restores policy, value model, optimizer, scheduler, step, RNG, KL controller and ptx stream.
    """
