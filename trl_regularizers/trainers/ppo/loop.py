"""The regularized PPO loop, written from the PPO algorithm (Ziegler et al. 2019; Ouyang et al. 2022 for ptx), over
either PPO setup (``standalone.StandalonePPOAdapter``, or TRL 1.12's ``adapters.ppo.PPOAdapter``), one overridable
method per stage:

    collect_rollout (sample, score, KL, shaped rewards, GAE -> Rollout) -> ppo_update (ppo_loss + ptx) -> log_update
    -> end_update (scheduler, callbacks, checkpoint)

The math is ``core.ppo``; the KL estimate, coefficient and controller the ``KLPenalty``; ptx the ``PtxTerm``. With
``kl_estimator="k1"``, a fixed ``kl_coef`` and ``ptx_coef=0`` it reproduces stock ``PPOTrainer`` numerically
(tests/fixtures/ppo_stock_trl112.json). Two stock quirks are fixed (docs/ppo.md): one optimizer step per mini-batch,
and ``train(resume_from_checkpoint=...)`` resumes.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from trl_regularizers.core.ppo import clipped_policy_loss, clipped_value_loss, gae, masked_whiten, shape_rewards
from trl_regularizers.core.records import KLRecord
from trl_regularizers.trainers.ppo.policy import INVALID_LOGPROB
from trl_regularizers.trainers.ppo.rollout import Rollout


class RegularizedPPOLoop:
    """Mixed in before a PPO setup, which provides the model calls (``generate``, ``reference_logits``,
    ``value_estimates``, ``reward_scores``, ``truncated``, ``policy_forward``, ``token_logps``) and checkpoints."""

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
                rollout = self.collect_rollout(queries)
            stats = self.ppo_update(rollout)
            self.log_update(rollout, stats, start_time)
            self.end_update(update)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self.save_trainer_checkpoint()
            self.control = self.callback_handler.on_save(args, self.state, self.control)

    @staticmethod
    def _repeat(dataloader):
        while True:
            yield from dataloader

    def collect_rollout(self, queries: torch.Tensor) -> Rollout:
        """Sample responses, score them, estimate the per-token KL, shape the rewards and estimate advantages."""
        args = self.args
        context_length = queries.shape[1]
        query_responses, logits = self.generate(queries)
        responses = query_responses[:, context_length:]
        logprobs, ref_logprobs, values, kl = self.score_tokens(query_responses, logits, context_length)
        postprocessed, sequence_lengths = self.truncated(responses)
        positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
        padding_mask = positions > sequence_lengths[:, None]  # after the last token
        padding_mask_p1 = positions > sequence_lengths[:, None] + 1  # values also cover one step past it
        scores, contain_eos = self.score(queries, postprocessed)
        kl = kl * (~padding_mask).float()
        coef = self.kl_penalty.coef
        non_score_reward, rewards = shape_rewards(kl, scores, sequence_lengths, coef)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0)
        values = values.masked_fill(padding_mask_p1, 0)
        advantages, returns = gae(rewards, values, args.gamma, args.lam)
        return Rollout(
            queries=queries, query_responses=query_responses, responses=responses, postprocessed=postprocessed,
            sequence_lengths=sequence_lengths, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1,
            logprobs=logprobs.masked_fill(padding_mask, INVALID_LOGPROB), ref_logprobs=ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB),
            values=values, scores=scores, contain_eos=contain_eos, kl=kl, kl_coef=coef, non_score_reward=non_score_reward,
            rewards=rewards, advantages=masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0), returns=returns,
        )

    def score_tokens(self, query_responses: torch.Tensor, logits: torch.Tensor, context_length: int):
        """Per chunk of ``local_rollout_forward_batch_size`` sequences: the sampled tokens' log-probs under the policy and
        the reference, the values, and the KL estimate [B, T] (from the chunk's logits when the estimator needs the
        whole distribution, so no [B, T, V] pair outlives its chunk)."""
        args = self.args
        responses = query_responses[:, context_length:]
        chunks = defaultdict(list)
        for start in range(0, query_responses.shape[0], args.local_rollout_forward_batch_size):
            rows = slice(start, start + args.local_rollout_forward_batch_size)
            ref_logits = self.reference_logits(query_responses[rows], context_length) / (args.temperature + 1e-7)
            logps, ref_logps = self.token_logps(logits[rows], responses[rows]), self.token_logps(ref_logits, responses[rows])
            record = KLRecord(logps, ref_logps, torch.ones_like(logps), logits=logits[rows], ref_logits=ref_logits)
            for name, value in zip(("logps", "ref_logps", "values", "kl"),
                                   (logps, ref_logps, self.value_estimates(query_responses[rows], context_length), self.kl_penalty.estimate(record))):
                chunks[name].append(value)
        return tuple(torch.cat(chunks[name]) for name in ("logps", "ref_logps", "values", "kl"))

    def score(self, queries: torch.Tensor, postprocessed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward-model score [B] of each truncated response, minus ``missing_eos_penalty`` if it has no EOS; and
        whether it has one [B]."""
        chunk = self.args.local_rollout_forward_batch_size
        scores = torch.cat([
            self.reward_scores(torch.cat((queries[start : start + chunk], postprocessed[start : start + chunk]), 1), queries.shape[1])
            for start in range(0, queries.shape[0], chunk)
        ])
        contain_eos = (postprocessed == self.processing_class.eos_token_id).any(-1)
        if self.args.missing_eos_penalty is not None:
            scores[~contain_eos] -= self.args.missing_eos_penalty
        return scores, contain_eos

    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
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
                    with self.micro_batch(last=i == len(micro_batches) - 1):
                        loss, micro_stats = self.ppo_loss(rollout, rows)
                        if self.ptx_term is not None:
                            loss = loss + self.ptx_term.loss(self.language_model())
                        accelerator.backward(loss * scale)
                    for name, value in micro_stats.items():
                        stats[name].append(value)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {name: torch.stack(values) for name, values in stats.items()}

    def ppo_loss(self, rollout: Rollout, rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + ``vf_coef`` * clipped value loss on a micro-batch, and its statistics."""
        args = self.args
        context_length = rollout.queries.shape[1]
        padding_mask, padding_mask_p1 = rollout.padding_mask[rows], rollout.padding_mask_p1[rows]
        logits, values = self.policy_forward(rollout.query_responses[rows])
        logits = logits[:, context_length - 1 : -1] / (args.temperature + 1e-7)
        logprobs = self.token_logps(logits, rollout.responses[rows]).masked_fill(padding_mask, INVALID_LOGPROB)
        values = values[:, context_length - 1 : -1].squeeze(-1).masked_fill(padding_mask_p1, 0)
        vf_loss, vf_stats = clipped_value_loss(values, rollout.values[rows], rollout.returns[rows], ~padding_mask_p1, args.cliprange_value)
        pg_loss, pg_stats = clipped_policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], ~padding_mask, args.cliprange)
        with torch.no_grad():
            entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        stats = {"approxkl": pg_stats.approxkl, "pg_clipfrac": pg_stats.clipfrac, "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
                 "vf_clipfrac": vf_stats.clipfrac, "entropy": entropy.mean(), "ratio": pg_stats.ratio_mean}
        return pg_loss + args.vf_coef * vf_loss, stats

    def log_update(self, rollout: Rollout, stats: dict[str, torch.Tensor], start_time: float) -> None:
        """Log TRL's PPO metrics plus ours (``kl``, ``kl/coef``, ``ptx/nll``), then adapt the KL coefficient."""
        gather = lambda t: self.accelerator.gather_for_metrics(t).mean().item()  # noqa: E731
        kl_per_sequence = rollout.kl.sum(1).mean()
        non_score = rollout.non_score_reward.sum(1).mean()
        entropy = (-rollout.logprobs * (~rollout.padding_mask).float()).sum(1).mean()
        metrics = {
            "eps": int(self.state.episode / (time.time() - start_time)),
            "objective/kl": gather(kl_per_sequence),
            "objective/entropy": gather(entropy),
            "objective/non_score_reward": gather(non_score),
            "objective/rlhf_reward": gather(non_score + rollout.scores.mean()),
            "objective/scores": gather(rollout.scores.mean()),
            "policy/approxkl_avg": gather(stats["approxkl"]),
            "policy/clipfrac_avg": gather(stats["pg_clipfrac"]),
            "loss/policy_avg": gather(stats["pg_loss"]),
            "loss/value_avg": gather(stats["vf_loss"]),
            "val/clipfrac_avg": gather(stats["vf_clipfrac"]),
            "policy/entropy_avg": gather(stats["entropy"]),
            "val/ratio": gather(stats["ratio"]),
            "val/ratio_var": self.accelerator.gather_for_metrics(stats["ratio"]).var().item(),
            "val/num_eos_tokens": (rollout.responses == self.processing_class.eos_token_id).sum().item(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.episode,
        }
        self.log_mean("kl", kl_per_sequence)
        self.log_mean("kl/coef", rollout.kl_coef)
        metrics.update(self.pop_metrics())
        self.kl_penalty.adapt(metrics["kl"], n_steps=self.args.batch_size)
        self.state.epoch = self.state.episode / self.train_dataset_len
        self.state.global_step += 1
        self.log(metrics)

    def end_update(self, update: int) -> None:
        """Scheduler step, sample generations, ``on_step_end``, and a checkpoint when the callbacks ask for one."""
        args = self.args
        self.lr_scheduler.step()
        every = max(1, args.num_total_batches // max(1, args.num_sample_generations))  # as TRL 1.12's sample_generations_freq
        if args.num_sample_generations > 0 and (update - 1) % every == 0:
            self.generate_completions(sampling=True)  # before saving, so the saved RNG state is the next rollout's
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.control.should_save:
            self.save_trainer_checkpoint()
            self.control = self.callback_handler.on_save(args, self.state, self.control)
