"""Adapter of ``trl.GRPOTrainer`` (docs/trl_internals.md §4). Line numbers are TRL 1.16's ``grpo_trainer.py``.

Where an attached ``KLPenalty`` goes:
* its own KL (k3 in the loss, reverse; ``plan.native``): TRL computes it with the penalty's coefficient, from the
  reference log-probs bounded by ``kl_clamp`` right after the policy call of ``_compute_loss`` (L3030), before TRL
  reads them (L3099);
* another estimator in the loss: TRL's k3 is switched off (``trl_beta(0)``) and ``coef * estimate`` (times GRPO's
  importance ratio when ``use_bias_correction_kl``) is added, reduced like TRL's per-token loss
  (``grpo_aggregations``). A distribution estimator scores the reference at loss time with its hidden states (TRL's
  rollout skips its own reference pass then), so no [B, T, H] tensor rides in TRL's batch;
* the reward: a ``kl_penalty`` reward column ``-coef * sum_t kl_t`` (weight 1) joins the reward functions, so it is
  summed into the reward before the group normalization; TRL's k3 is switched off in the loss.
"""

from __future__ import annotations

import torch
import trl
from trl import GRPOTrainer

from trl_regularizers.core.records import KLRecord
from trl_regularizers.trainers.adapters.online import LogpCall, OnlineAdapter

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
    TRL_CLASSES = ("Trainer", "GRPOTrainer")
    TRL_KL = ("k3", "loss")

    def attach(self, kl=None, ptx=None) -> None:
        super().attach(kl, ptx)
        if kl is None or not kl.enabled:
            return
        plan = kl.plan
        if hasattr(GRPOTrainer, "compute_liger_loss") and self.args.use_liger_kernel and (not plan.native or kl.adaptive):
            # TRL 1.12-1.13 route compute_loss to compute_liger_loss (L3030 in 1.12), which computes its own KL
            raise ValueError(
                f"use_liger_kernel=True replaces GRPO's loss with Liger's in TRL {trl.__version__}, which computes its own "
                "KL: the KL options would be ignored. Set use_liger_kernel=False, or upgrade TRL."
            )
        if not plan.native and plan.placement == "loss" and self.loss_type not in grpo_aggregations(self):
            raise ValueError(
                f"loss_type={self.loss_type!r} is new to this adapter: it does not know how TRL {trl.__version__} reduces "
                "that loss, so a KL term in the loss cannot be added like TRL's. Use kl_placement='reward', or the "
                "default kl_estimator='k3'."
            )
        if plan.placement == "reward":
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
        kl = self.kl_penalty
        if kl is None or not kl.enabled:
            return super()._generate_and_score_completions(inputs)
        if kl.plan.placement == "reward":
            with self.logp_recorder.recording():  # the KL reward column reads the calls of this rollout
                return super()._generate_and_score_completions(inputs)
        if kl.plan.needs_distribution:
            with self.trl_beta(0.0):  # the loss scores the reference with its hidden states: skip TRL's pass (L2710)
                return super()._generate_and_score_completions(inputs)
        return super()._generate_and_score_completions(inputs)

    def _kl_reward_column(self, completion_ids, **kwargs) -> list[float]:
        """The ``kl_penalty`` reward of each completion of this process: ``-coef * sum_t kl_t``."""
        # The rollout scores the policy (L2646, only when TRL needs old log-probs) and then the reference (L2712 or
        # L2728) before the reward functions run (L2753): the last recorded call is the reference.
        *old, reference = self.logp_recorder.calls
        policy = old[0] if old else self.score_policy(reference)
        estimate = self.kl_penalty.penalty(KLRecord(policy.logps, reference.logps, reference.mask, policy.states, reference.states))
        return (-self.kl_penalty.coef * estimate.sum(-1)).tolist()

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        if KL_REWARD_NAME in self.reward_func_names:  # keep completions no task reward could score unscorable (L2759)
            unscorable = torch.isnan(rewards_per_func[:, :-1]).all(dim=1)
            rewards_per_func[unscorable, -1] = torch.nan
        return rewards_per_func

    def _compute_loss(self, model, inputs):
        kl = self.kl_penalty
        if kl is None or not kl.enabled:
            return super()._compute_loss(model, inputs)
        plan = kl.plan
        if plan.placement == "reward":
            with self.trl_beta(0.0):  # the KL is in the advantages already: drop TRL's k3 (L3098-3150)
                return super()._compute_loss(model, inputs)
        if plan.native:
            return self._native_loss(model, inputs)
        with self.trl_beta(0.0), self.logp_recorder.recording() as calls:  # TRL's k3 off; ours is added below
            loss = super()._compute_loss(model, inputs)
        policy = calls[0]  # the policy call of _compute_loss (L3030) is its only one
        mask = self._loss_mask(inputs)
        if plan.needs_distribution:
            reference = self.score_reference(policy)
            record = KLRecord(policy.logps, reference.logps, mask, policy.states, reference.states)
        else:
            record = KLRecord(policy.logps, inputs["ref_per_token_logps"], mask)
        estimate = kl.penalty(record)
        if self.args.use_bias_correction_kl:  # TRL multiplies its KL by the importance ratio (L3104-3105)
            estimate = estimate * self._importance_ratio(policy.logps, inputs, mask)
        return loss + kl.coef * grpo_aggregations(self)[self.loss_type](estimate * mask, mask, inputs)

    def _native_loss(self, model, inputs):
        """TRL's own k3 at the penalty's coefficient, from the reference bounded by ``kl_clamp``; the penalty logs it."""
        inputs = dict(inputs)  # buffered batches are reused when num_iterations > 1: never modify them
        ref_logps = inputs["ref_per_token_logps"]

        def bound_reference(call: LogpCall) -> None:  # the policy call (L3030) comes before TRL reads the reference (L3099)
            inputs["ref_per_token_logps"] = self.kl_penalty.bound_reference(call.logps, ref_logps)

        with self.trl_beta(self.kl_penalty.coef), self.logp_recorder.recording(on_call=bound_reference) as calls:
            loss = super()._compute_loss(model, inputs)
        self.kl_penalty.penalty(KLRecord(calls[0].logps, ref_logps, self._loss_mask(inputs)), logged_by_trl=True)
        return loss

    @staticmethod
    def _loss_mask(inputs) -> torch.Tensor:
        """The tokens TRL's loss counts: the completion, without tool-call tokens (L3040)."""
        return inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]

    def _importance_ratio(self, logps, inputs, mask):
        """pi / pi_old per token (or per sequence), as TRL computes ``coef_1`` (L3065-3095)."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)
