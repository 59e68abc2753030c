"""``RegularizedRLOOTrainer``: ``trl.RLOOTrainer`` with a choice of KL estimator, placement, direction and clamp,
adaptive beta and pretraining mixing.

Swap ``RLOOTrainer``/``RLOOConfig`` for ``RegularizedRLOOTrainer``/``RegularizedRLOOConfig``; with the new options
at their defaults (k1 summed over the completion and subtracted from the reward) the run is TRL's, with the
log-ratio bounded by ``kl_clamp``.

RLOO scores each rollout with the policy, then the reference, and subtracts ``beta * sum_t (old_t - ref_t)``
from the reward before the leave-one-out baseline (TRL_NOTES §5). This trainer hands TRL a reference log-prob
``ref'`` such that ``old - ref'`` is the chosen estimate, so TRL's own reward shaping, baseline and clipping
order stay untouched:

* ``kl_placement="reward"``: ``ref' = old - estimate``;
* ``kl_placement="loss"``: ``ref' = old`` (no KL in the reward) and ``beta * sum_t estimate_t`` (mean over
  sequences, the scale of the reward penalty) is added to the loss from the real reference log-probs.
"""

from __future__ import annotations

import torch
from trl import RLOOTrainer

from trl_regularizers.ptx import PtxMixin
from trl_regularizers.trainers.common import mode_of, scale_like_parent_loss
from trl_regularizers.trainers.kl_wiring import REF_HIDDEN_KEY, KLWiringMixin


class RegularizedRLOOTrainer(KLWiringMixin, PtxMixin, RLOOTrainer):
    """Drop-in ``RLOOTrainer`` configured by ``RegularizedRLOOConfig`` (see ``KLArguments``)."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_ptx(pretrain_dataset)
        self._setup_kl(parent_kl=("k1", "reward"))

    def _generate_and_score_completions(self, inputs):
        if self.beta == 0.0:
            return super()._generate_and_score_completions(inputs)
        with self._capturing_logps() as calls:
            output = super()._generate_and_score_completions(inputs)
        if len(calls) != 2:
            raise RuntimeError(f"expected 2 log-prob calls (policy, reference) per RLOO rollout, saw {len(calls)}")
        if self.args.kl_placement == "loss":
            self._metrics[mode_of(self)]["kl"].pop()  # TRL logged its (zero) reward KL; ours comes with the loss
            output["ref_per_token_logps"] = calls[1].logps
            if calls[1].hidden is not None:  # kl_estimator="full"
                output[REF_HIDDEN_KEY] = calls[1].hidden
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        calls = self._kl_capture
        if calls is None or len(calls) != 2 or torch.is_grad_enabled():
            return logps, entropies, aux_loss
        # This is the reference call of a rollout: hand TRL the ref' described in the module docstring.
        policy, old_logps = calls[0], calls[0].logps
        if self.args.kl_placement == "loss":
            return old_logps, entropies, aux_loss
        mask = attention_mask[:, -logits_to_keep:].to(logps.dtype)
        estimate = self._kl_estimate(policy, logps, mask, calls[1].hidden)
        self._log_kl(estimate, old_logps, logps, mask, parent_logs_kl=True)  # TRL logs the mean of old - ref'
        if self._kl_native:  # TRL's own k1: only bound the reference
            return self._bounded_ref(old_logps, logps), entropies, aux_loss
        return old_logps - estimate, entropies, aux_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ptx = self._ptx_loss(model)  # None in eval or without pretrain_dataset
        return loss if ptx is None else loss + ptx

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0 or self.args.kl_placement == "reward":
            return super()._compute_loss(model, inputs)
        with self._capturing_logps() as calls:
            loss = super()._compute_loss(model, inputs)
        policy, ref_logps, mask = calls[0], inputs["ref_per_token_logps"], inputs["completion_mask"]
        estimate = self._kl_estimate(policy, ref_logps, mask, inputs.get(REF_HIDDEN_KEY))
        self._log_kl(estimate, policy.logps, ref_logps, mask)
        return loss + scale_like_parent_loss(self, self.beta * estimate.sum(-1).mean())
