"""Adapter of ``trl.GRPOTrainer`` (docs/trl_internals.md §4). Line numbers are TRL 1.16's ``grpo_trainer.py``.

Insertion points used by ``KLRegularizer``:
* the reference log-probs TRL reads in ``_compute_loss`` are bounded (``bound_reference``) before it reads them;
* ``placement="loss"`` with another estimator: TRL's k3 is switched off and ``beta * kl_penalty`` (times GRPO's
  importance ratio when ``use_bias_correction_kl``) is added, reduced like TRL's per-token loss;
* ``placement="reward"``: a ``kl_penalty`` reward column ``-beta * sum_t kl_t`` (weight 1) joins the reward
  functions, so it is summed into the reward before the group normalization.
"""

from __future__ import annotations

import torch
import trl
from trl import GRPOTrainer

from trl_regularizers.trainers.adapters.base import REF_HIDDEN_KEY, LogpCall, OnlineAdapter
from trl_regularizers.trainers.records import HiddenStates, KLRecord

KL_REWARD_NAME = "kl_penalty"


def grpo_aggregations(trainer) -> dict:
    """``loss_type`` -> the reduction of a [B, T] per-token term, GA-scaled, as ``_compute_loss`` reduces its
    per-token loss (L3153-3184). GRPO has no function for it, so each TRL release's rules are listed here;
    ``tests/test_trl_contract.py`` fails when a release adds a ``loss_type`` missing from this table."""
    accumulation = lambda: trainer.current_gradient_accumulation_steps if trainer.model.training else 1.0  # noqa: E731

    def token_normalized(masked, mask, inputs):  # cispo/dapo/vespo: tokens of the whole generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if trainer.model.training:
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return masked.sum() / normalizer

    sequence_mean = lambda masked, mask, inputs: (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation()  # noqa: E731
    return {
        "grpo": sequence_mean,
        "sapo": sequence_mean,
        "bnpo": lambda masked, mask, inputs: masked.sum() / mask.sum().clamp(min=1.0) / accumulation(),
        "dr_grpo": lambda masked, mask, inputs: masked.sum() / (masked.size(0) * trainer.max_completion_length) / accumulation(),
        "cispo": token_normalized,
        "dapo": token_normalized,
        "vespo": token_normalized,
        "luspo": lambda masked, mask, inputs: masked.sum(-1).mean() / accumulation(),
    }


class GRPOAdapter(OnlineAdapter, GRPOTrainer):
    trl_kl_placement = "loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plan = self.kl_plan()
        changes_kl = not plan.native or getattr(self.args, "kl_target", None) is not None
        if hasattr(GRPOTrainer, "compute_liger_loss") and self.args.use_liger_kernel and self.beta != 0.0 and changes_kl:
            # TRL 1.12-1.13 route compute_loss to compute_liger_loss (L3030 in 1.12), which computes its own KL
            raise ValueError(
                f"use_liger_kernel=True replaces GRPO's loss with Liger's in TRL {trl.__version__}, which computes its own "
                "KL: the KL options would be ignored. Set use_liger_kernel=False, or upgrade TRL."
            )
        if self.beta != 0.0 and not plan.native and plan.placement == "loss" and self.loss_type not in grpo_aggregations(self):
            raise ValueError(
                f"loss_type={self.loss_type!r} is new to this adapter: it does not know how TRL {GRPOTrainer.__module__} "
                "reduces that loss, so a KL term in the loss cannot be added like TRL's. Use kl_placement='reward', "
                "or the default kl_estimator='k3'."
            )
        if self.beta != 0.0 and plan.placement == "reward":
            if self.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError(
                    "kl_placement='reward' needs multi_objective_aggregation='sum_then_normalize': with "
                    f"{self.multi_objective_aggregation!r} the KL column would be normalized on its own, which "
                    "removes its scale (beta would no longer mean anything)."
                )
            # _calculate_rewards (called at L2753) runs each reward function (L1626); L2763 weighs the columns.
            self.reward_funcs.append(self._kl_reward_column)
            self.reward_func_names.append(KL_REWARD_NAME)
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])

    def _generate_and_score_completions(self, inputs):
        plan = self.kl_plan()
        if self.beta == 0.0 or not (plan.placement == "reward" or plan.needs_states):
            return super()._generate_and_score_completions(inputs)
        with self.recording_logp_calls() as calls:
            output = super()._generate_and_score_completions(inputs)
        if plan.placement == "loss":  # keep the reference's hidden states (not its logits) for the loss
            output[REF_HIDDEN_KEY] = next(call.states.hidden for call in calls if call.logps is output["ref_per_token_logps"])
        return output

    def _kl_reward_column(self, completion_ids, **kwargs) -> list[float]:
        """The ``kl_penalty`` reward of each completion of this process: ``-beta * sum_t kl_t``."""
        # The rollout scores the policy (L2646, only when TRL needs old log-probs) and then the reference (L2712 or
        # L2728) before the reward functions run (L2753): the last recorded call is the reference.
        *old, ref = self._logp_calls
        policy = old[0] if old else self.score_like(ref)
        record = KLRecord(policy.logps, ref.logps, ref.mask, policy.states, ref.states)
        return (-self.beta * self.kl_penalty(record, logged_by_trl=False).sum(-1)).tolist()

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        if KL_REWARD_NAME in self.reward_func_names:  # keep completions no task reward could score unscorable (L2759)
            unscorable = torch.isnan(rewards_per_func[:, :-1]).all(dim=1)
            rewards_per_func[unscorable, -1] = torch.nan
        return rewards_per_func

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        plan = self.kl_plan()
        inputs = dict(inputs)  # buffered batches are reused when num_iterations > 1: never modify them
        ref_logps = inputs["ref_per_token_logps"]

        def bound_ref(call: LogpCall) -> None:  # the policy call (L3030) comes before TRL reads the reference (L3099)
            inputs["ref_per_token_logps"] = self.bound_reference(call.logps, ref_logps)

        beta = self.beta
        if not plan.native:
            # TRL adds beta * k3 whenever self.beta != 0 (L3098-3150) and has no switch for it: hold beta at 0 while
            # it computes its loss; ours is added below (loss) or is already in the advantages (reward).
            self.beta = 0.0
        try:
            with self.recording_logp_calls(on_call=bound_ref) as calls:
                loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
        if plan.placement == "reward":
            return loss
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        policy = calls[0]
        ref_states = None
        if plan.needs_states:
            ref_weight = self.lm_head_weight(self.model if self.ref_model is None else self.ref_model, trainable=False)
            ref_states = HiddenStates(inputs[REF_HIDDEN_KEY], ref_weight, self.temperature)
        record = KLRecord(policy.logps, ref_logps, mask, policy.states, ref_states)
        estimate = self.kl_penalty(record, logged_by_trl=plan.native)
        if plan.native:
            return loss
        if self.args.use_bias_correction_kl:  # TRL multiplies its KL by the importance ratio (L3104-3105)
            estimate = estimate * self._importance_ratio(policy.logps, inputs, mask)
        return loss + beta * grpo_aggregations(self)[self.loss_type](estimate * mask, mask, inputs)

    def _importance_ratio(self, logps, inputs, mask):
        """pi / pi_old per token (or per sequence), as TRL computes ``coef_1`` (L3065-3095)."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)
