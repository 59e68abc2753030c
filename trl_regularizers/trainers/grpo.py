"""``RegularizedGRPOTrainer``: ``trl.GRPOTrainer`` with a choice of KL estimator, placement, direction and clamp,
adaptive beta and pretraining mixing.

Swap ``GRPOTrainer``/``GRPOConfig`` for ``RegularizedGRPOTrainer``/``RegularizedGRPOConfig``. At the defaults
(k3 in the loss, reverse) TRL computes its own KL (times the importance ratio when ``use_bias_correction_kl``)
from reference log-probs bounded to ``|r| <= kl_clamp``: the same numbers as TRL unless the bound is active.

* other estimators/directions in the loss: TRL's k3 is switched off (``beta`` is 0 while the parent computes its
  loss) and ``beta * estimate`` (times the same ratio) is added, aggregated exactly like ``loss_type``.
* ``kl_placement="reward"``: a ``kl_penalty`` reward column ``-beta * sum_t estimate_t`` (weight 1) joins the
  reward functions, so it is summed into the reward *before* the group normalization (``reward`` then includes
  it; ``rewards/<func>/mean`` stay the task rewards).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from trl_regularizers.core.kl import FULL_VOCAB_ESTIMATOR
from trl_regularizers.ptx import PtxMixin
from trl_regularizers.trainers.kl_wiring import REF_HIDDEN_KEY, KLWiringMixin

KL_REWARD_NAME = "kl_penalty"


class RegularizedGRPOTrainer(KLWiringMixin, PtxMixin, GRPOTrainer):
    """Drop-in ``GRPOTrainer`` configured by ``RegularizedGRPOConfig`` (see ``KLArguments``)."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_ptx(pretrain_dataset)
        self._setup_kl(parent_kl=("k3", "loss"), ratio_in_loss=self.args.use_bias_correction_kl)
        self._kl_in_reward = self.beta != 0.0 and self.args.kl_placement == "reward"
        self._full_kl_in_loss = self.beta != 0.0 and self.args.kl_placement == "loss" and self.args.kl_estimator == FULL_VOCAB_ESTIMATOR
        if self._kl_in_reward:
            if self.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError(
                    "kl_placement='reward' needs multi_objective_aggregation='sum_then_normalize': with "
                    f"{self.multi_objective_aggregation!r} the KL column would be normalized on its own, which "
                    "removes its scale (beta would no longer mean anything)."
                )
            self.reward_funcs.append(self._kl_reward)
            self.reward_func_names.append(KL_REWARD_NAME)
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])

    def _generate_and_score_completions(self, inputs):
        if not (self._kl_in_reward or self._full_kl_in_loss):
            return super()._generate_and_score_completions(inputs)
        with self._capturing_logps() as calls:
            output = super()._generate_and_score_completions(inputs)
        if self._full_kl_in_loss:  # keep the reference's hidden states (not its logits) for the loss
            output[REF_HIDDEN_KEY] = next(call.hidden for call in calls if call.logps is output["ref_per_token_logps"])
        return output

    def _kl_reward(self, completion_ids, **kwargs) -> list[float]:
        """The ``kl_penalty`` reward: ``-beta * sum_t estimate_t`` per completion of this process."""
        *old, ref = self._kl_capture  # the reference call is the last one
        if old:  # TRL already scored the rollout with the policy (old_per_token_logps)
            policy = old[0]
        else:
            with torch.no_grad():
                self._get_per_token_logps_and_entropies(self.model, *ref.args, **ref.kwargs)
            policy = self._kl_capture.pop()
        mask = ref.args[1][:, -ref.args[2] :].to(policy.logps.dtype)  # completion part of the attention mask
        estimate = self._kl_estimate(policy, ref.logps, mask, ref.hidden)
        self._log_kl(estimate, policy.logps, ref.logps, mask)
        return (-self.beta * estimate.sum(-1)).tolist()

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        if self._kl_in_reward:  # keep completions that no task reward could score unscorable (TRL zeroes them)
            unscorable = torch.isnan(rewards_per_func[:, :-1]).all(dim=1)
            rewards_per_func[unscorable, -1] = torch.nan
        return rewards_per_func

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ptx = self._ptx_loss(model)  # None in eval or without pretrain_dataset
        return loss if ptx is None else loss + ptx

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)  # buffered batches are reused when num_iterations > 1: never modify them
        ref_logps = inputs["ref_per_token_logps"]

        def bound_ref(logps):  # runs before TRL reads the reference, so its own k3 sees |r| <= kl_clamp
            inputs["ref_per_token_logps"] = self._bounded_ref(logps, ref_logps)

        beta = self.beta
        if not self._kl_native:
            self.beta = 0.0  # switch off TRL's k3: ours is added below (loss) or already in the advantages (reward)
        try:
            with self._capturing_logps(on_call=bound_ref) as calls:
                loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
        if self.args.kl_placement == "reward":
            return loss
        policy = calls[0]
        logps = policy.logps
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        estimate = self._kl_estimate(policy, ref_logps, mask, inputs.get(REF_HIDDEN_KEY))
        if self.args.use_bias_correction_kl:
            estimate = estimate * self._importance_ratio(logps, inputs, mask)
        self._log_kl(estimate, logps, ref_logps, mask, parent_logs_kl=self._kl_native)
        if self._kl_native:
            return loss
        return loss + beta * self._aggregate_like_loss(estimate, mask, inputs)

    def _importance_ratio(self, logps, inputs, mask):
        """pi / pi_old per token (or per sequence), as GRPO multiplies its KL by it (``use_bias_correction_kl``)."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _aggregate_like_loss(self, per_token, mask, inputs):
        """Reduce a [B, T] term exactly as GRPO reduces its per-token loss for ``loss_type`` (GA-scaled)."""
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        masked = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (masked.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normalizer
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        raise ValueError(f"RegularizedGRPOTrainer does not know how to aggregate loss_type={self.loss_type!r}.")
