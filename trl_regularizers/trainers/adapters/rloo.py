"""Adapter of ``trl.RLOOTrainer`` (docs/trl_internals.md §5). Line numbers are TRL 1.16's ``rloo_trainer.py``.

RLOO scores each rollout with the policy (L1600), then the reference (L1615 or L1631), and subtracts
``beta * sum_t (old_t - ref_t)`` from the reward before the leave-one-out baseline (L1664-1673). It has no other
insertion point for a reward penalty, so with the KL in the reward the adapter hands TRL a reference ``ref'`` with
``old - ref'`` equal to the wanted per-token penalty, at the penalty's coefficient; TRL's own gather, baseline,
clipping order and ``kl`` metric stay untouched (its own k1: the reference bounded by ``kl_clamp``).

With the KL in the loss, TRL's reward KL is switched off for the rollout (``trl_beta(0)``, which also skips its
reference pass), and ``coef * sum_t kl_t`` (mean over sequences, the scale of the reward penalty) is added to the
loss, from the reference scored at loss time (``score_reference``) for the sequences of TRL's policy call.
"""

from __future__ import annotations

import torch
from trl import RLOOTrainer

from trl_regularizers.core.records import KLRecord
from trl_regularizers.trainers.adapters.online import LogpCall, OnlineAdapter


class RLOOAdapter(OnlineAdapter, RLOOTrainer):
    TRL_CLASSES = ("Trainer", "RLOOTrainer")
    TRL_KL = ("k1", "reward")

    def _generate_and_score_completions(self, inputs):
        kl = self.kl_penalty
        if kl is None or not kl.enabled:
            return super()._generate_and_score_completions(inputs)
        if kl.plan.placement == "loss":
            with self.trl_beta(0.0):
                return super()._generate_and_score_completions(inputs)
        with self.trl_beta(kl.coef), self.logp_recorder.recording(on_call=self._reference_for_trl) as calls:
            output = super()._generate_and_score_completions(inputs)
        if len(calls) != 2:
            raise RuntimeError(f"expected 2 log-prob calls (policy, reference) per RLOO rollout, saw {len(calls)}")
        return output

    def _reference_for_trl(self, call: LogpCall) -> torch.Tensor | None:
        """The ``ref'`` TRL receives from the rollout's second (reference) call; see the module docstring."""
        calls = self.logp_recorder.calls
        if len(calls) != 2:
            return None
        policy, kl = calls[0], self.kl_penalty
        estimate = kl.penalty(KLRecord(policy.logps, call.logps, call.mask, policy.states, call.states), logged_by_trl=True)
        if kl.plan.native:  # TRL logs the mean of sum_t (old - ref')
            return kl.bound_reference(policy.logps, call.logps)
        return policy.logps - estimate

    def _compute_loss(self, model, inputs):
        kl = self.kl_penalty
        if kl is None or not kl.enabled or kl.plan.placement == "reward":
            return super()._compute_loss(model, inputs)
        with self.logp_recorder.recording() as calls:  # the policy call (L1803) is the only one
            loss = super()._compute_loss(model, inputs)
        policy = calls[0]
        reference = self.score_reference(policy)
        record = KLRecord(policy.logps, reference.logps, inputs["completion_mask"], policy.states, reference.states)
        estimate = kl.penalty(record)
        return loss + self.scale_like_parent_loss(kl.coef * estimate.sum(-1).mean())
