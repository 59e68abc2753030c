"""Adapter of ``trl.RLOOTrainer`` (docs/trl_internals.md §5). Line numbers are TRL 1.16's ``rloo_trainer.py``.

RLOO scores each rollout with the policy (L1600), then the reference (L1615 or L1631), and subtracts
``beta * sum_t (old_t - ref_t)`` from the reward before the leave-one-out baseline (L1664-1673). It has no other
insertion point for a reward penalty, so the adapter hands TRL a reference ``ref'`` with ``old - ref'`` equal to
the wanted per-token penalty; TRL's own gather, baseline, clipping order and ``kl`` metric stay untouched:
* ``placement="reward"``: ``ref' = old - kl_penalty`` (native k1: the reference bounded by ``bound_reference``);
* ``placement="loss"``: ``ref' = old`` (no KL in the reward) and ``beta * sum_t kl_t`` (mean over sequences, the
  scale of the reward penalty) is added to the loss, from the real reference kept in the batch.
"""

from __future__ import annotations

import torch
from trl import RLOOTrainer

from trl_regularizers.trainers.adapters.base import REF_HIDDEN_KEY, LogpCall, OnlineAdapter
from trl_regularizers.trainers.records import HiddenStates, KLRecord


class RLOOAdapter(OnlineAdapter, RLOOTrainer):
    trl_kl_estimator = "k1"
    trl_kl_placement = "reward"

    def _generate_and_score_completions(self, inputs):
        if self.beta == 0.0:
            return super()._generate_and_score_completions(inputs)
        with self.recording_logp_calls(on_call=self._reference_for_trl) as calls:
            output = super()._generate_and_score_completions(inputs)
        if len(calls) != 2:
            raise RuntimeError(f"expected 2 log-prob calls (policy, reference) per RLOO rollout, saw {len(calls)}")
        if self.kl_plan().placement == "loss":
            self.drop_last_metric("kl")  # TRL logged its (zero) reward KL; ours comes with the loss
            output["ref_per_token_logps"] = calls[1].logps
            if calls[1].states is not None:
                output[REF_HIDDEN_KEY] = calls[1].states.hidden
        return output

    def _reference_for_trl(self, call: LogpCall) -> torch.Tensor | None:
        """The ``ref'`` TRL receives from the rollout's second (reference) call; see the module docstring."""
        if len(self._logp_calls) != 2:
            return None
        policy = self._logp_calls[0]
        plan = self.kl_plan()
        if plan.placement == "loss":
            return policy.logps
        record = KLRecord(policy.logps, call.logps, call.mask, policy.states, call.states)
        estimate = self.kl_penalty(record, logged_by_trl=True)  # TRL logs the mean of sum_t (old - ref')
        if plan.native:
            return self.bound_reference(policy.logps, call.logps)
        return policy.logps - estimate

    def _compute_loss(self, model, inputs):
        plan = self.kl_plan()
        if self.beta == 0.0 or plan.placement == "reward":
            return super()._compute_loss(model, inputs)
        with self.recording_logp_calls() as calls:  # the policy call (L1803) is the only one
            loss = super()._compute_loss(model, inputs)
        policy, mask = calls[0], inputs["completion_mask"]
        ref_states = None
        if plan.needs_states:
            ref_weight = self.lm_head_weight(self.model if self.ref_model is None else self.ref_model, trainable=False)
            ref_states = HiddenStates(inputs[REF_HIDDEN_KEY], ref_weight, self.temperature)
        estimate = self.kl_penalty(KLRecord(policy.logps, inputs["ref_per_token_logps"], mask, policy.states, ref_states), logged_by_trl=False)
        return loss + self.scale_like_parent_loss(self.beta * estimate.sum(-1).mean())
