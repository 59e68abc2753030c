"""``KLPenalty``: the KL penalty of a trainer, built once from its config and the estimator registry.

Its ``KLPlan`` (estimator entry, direction, placement, clamp; whether the TRL trainer computes this KL itself) is
fixed at construction; its controller owns the coefficient (fixed, or adaptive toward ``kl_target``, Ziegler et al.
2019). Adapters hand it ``KLRecord``s and take back the per-token estimate (for a loss term or a reward column) or a
bounded reference; it logs ``kl``, ``kl/k1``, ``kl/k3``, ``kl/coef`` and, in training, collects the per-sequence KL
that ``end_step`` feeds the adaptive controller.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
from accelerate.utils import DistributedType

from trl_regularizers.components.metrics import MetricSink
from trl_regularizers.core.control import AdaptiveKLController, KLController, make_kl_controller
from trl_regularizers.core.kl import KLEstimator, bound_reference, kl_estimate, kl_estimator_info, per_token_kl, unbiased_estimators
from trl_regularizers.core.records import KLRecord
from trl_regularizers.models import causal_lm, gathered, why_logits_are_not_a_product

KL_OPTIONS = ("kl_estimator", "kl_placement", "kl_direction", "kl_clamp", "kl_horizon")
"""The ``KLArguments`` fields that mean nothing while the coefficient is 0 (``kl_target`` then is an error)."""


@dataclass(frozen=True)
class KLPlan:
    """What the penalty computes and where it goes, fixed at construction."""

    estimator: KLEstimator
    direction: str
    placement: str
    clamp: float | None
    native: bool
    """The TRL trainer computes exactly this KL itself: the adapter only bounds the reference TRL reads."""

    @property
    def needs_distribution(self) -> bool:
        return self.estimator.needs_distribution


class KLPenalty:
    """The configured KL estimate, its coefficient and its metrics. ``enabled`` is False when the coefficient is 0."""

    def __init__(self, plan: KLPlan, controller: KLController, metrics: MetricSink):
        self.plan, self.controller, self.metrics = plan, controller, metrics
        self.enabled = controller.value != 0.0
        self._window = torch.zeros(2, dtype=torch.float64)  # (sum of per-sequence KL, sequences) since the last step

    @classmethod
    def from_config(cls, args, coef: float, trl_kl: tuple[str, str], metrics: MetricSink, trainer_name: str) -> KLPenalty:
        """From ``KLArguments`` and the coefficient ``coef``; ``trl_kl`` is the (estimator, placement) the TRL trainer
        computes itself. Warns when the options cannot act (coefficient 0) or give a biased reverse-KL gradient."""
        plan = KLPlan(
            estimator=kl_estimator_info(args.kl_estimator),
            direction=args.kl_direction,
            placement=args.kl_placement,
            clamp=args.kl_clamp,
            native=(args.kl_estimator, args.kl_placement, args.kl_direction) == (*trl_kl, "reverse"),
        )
        penalty = cls(plan, make_kl_controller(coef, args.kl_target, args.kl_horizon), metrics)
        if penalty.enabled:
            _warn_if_biased(plan, bool(getattr(args, "use_bias_correction_kl", False)))
        else:
            _warn_if_options_unused(args, trainer_name)
        return penalty

    @property
    def coef(self) -> float:
        return self.controller.value

    @property
    def adaptive(self) -> bool:
        return isinstance(self.controller, AdaptiveKLController)

    def bound_reference(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """``ref_logps`` [B, T] moved to within ``kl_clamp`` of ``logps`` (``core.kl.bound_reference``)."""
        return bound_reference(logps, ref_logps, self.plan.clamp)

    def estimate(self, record: KLRecord) -> torch.Tensor:
        """Per-token estimate [B, T], zero outside ``record.mask``, checked finite (no logging)."""
        plan = self.plan
        heads = [states.weight for states in (record.policy_states, record.ref_states) if states is not None]
        with gathered(*heads):  # ZeRO-3 (reward placement only): the partitioned LM heads, gathered
            return kl_estimate(record, plan.estimator.name, plan.direction, plan.clamp)

    def penalty(self, record: KLRecord, logged_by_trl: bool = False) -> torch.Tensor:
        """``estimate`` plus its metrics (``kl`` unless TRL logs it, ``kl/k1``, ``kl/k3``, ``kl/coef``) and, in
        training, the per-sequence sums for the adaptive controller. Collective: every rank calls it."""
        estimate = self.estimate(record)
        self.report(record, estimate, logged_by_trl)
        return estimate

    def report(self, record: KLRecord, estimate: torch.Tensor, logged_by_trl: bool = False) -> None:
        """The metrics and controller observations of an ``estimate`` of ``record`` (see ``penalty``)."""
        logps, direction, clamp = record.logps.detach(), self.plan.direction, self.plan.clamp
        sums = [estimate.detach().sum()]
        for name in ("k1", "k3"):
            sums.append((per_token_kl(logps, record.ref_logps, name, direction, clamp) * record.mask).sum())
        sums = self.metrics.reduce_sum(torch.stack([*sums, record.mask.sum().float()]))
        count = sums[3].clamp(min=1.0)
        if not logged_by_trl:
            self.metrics.log_value("kl", (sums[0] / count).item())
        self.metrics.log_value("kl/k1", (sums[1] / count).item())
        self.metrics.log_value("kl/k3", (sums[2] / count).item())
        self.metrics.log_value("kl/coef", self.coef)
        if self.adaptive and self.metrics.training:
            self.observe(estimate.detach().sum(-1))

    def observe(self, kl_per_sequence: torch.Tensor) -> None:
        """Record this process's per-sequence KL values [B] for the current optimizer step."""
        values = kl_per_sequence.detach().to(torch.float64).cpu()
        self._window += torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64)])

    def end_step(self) -> None:
        """After an optimizer step: move an adaptive coefficient toward ``kl_target`` with the mean per-sequence KL
        the step saw on all processes (none seen: unchanged). Collective; a no-op for a fixed coefficient."""
        if not self.adaptive:
            return
        totals = self.metrics.reduce_sum(self._window).cpu()
        self._window.zero_()
        if totals[1] > 0:
            self.adapt((totals[0] / totals[1]).item())

    def adapt(self, observed_kl: float, n_steps: int = 1) -> None:
        """Move an adaptive coefficient by the KL observed over the last ``n_steps`` steps (PPO: episodes, as Ziegler
        et al.); the same value on every process. A no-op for a fixed coefficient."""
        self.controller.update(observed_kl, n_steps=n_steps)


def check_distribution_setup(penalty: KLPenalty, trainer_name: str, accelerator, models: list[torch.nn.Module]) -> None:
    """A distribution estimator recomputes logits as ``hidden @ W.T / temperature`` outside the forward: refuse setups
    where that is not the logits, or where the LM-head weight cannot be read there (``models.full_weight``,
    ``models.gathered``)."""
    if not (penalty.enabled and penalty.plan.needs_distribution):
        return
    estimator, state = penalty.plan.estimator.name, accelerator.state
    if state.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            f"kl_estimator={estimator!r} in {trainer_name} needs the whole LM-head weight outside the forward; FSDP1 keeps "
            "it in flat sharded parameters. Use FSDP2 (fsdp_version: 2), DDP or DeepSpeed ZeRO-1/2."
        )
    if state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3 and penalty.plan.placement == "loss":
        raise ValueError(
            f"kl_estimator={estimator!r} with kl_placement='loss' in {trainer_name} is not supported under DeepSpeed "
            "ZeRO-3: its gradient would reach an LM head that ZeRO-3 partitions outside the engine's forward. Use "
            "kl_placement='reward' (the head is gathered without gradient), FSDP2, or ZeRO-1/2."
        )
    for model in models:
        reason = why_logits_are_not_a_product(causal_lm(accelerator.unwrap_model(model)))
        if reason is not None:
            raise ValueError(f"kl_estimator={estimator!r} in {trainer_name} recomputes the logits as hidden @ W.T, but {reason}.")


def _warn_if_biased(plan: KLPlan, times_ratio: bool) -> None:
    unbiased = unbiased_estimators(plan.placement, "reverse", times_ratio)
    if plan.direction == "reverse" and plan.estimator.name not in unbiased:
        other = "reward" if plan.placement == "loss" else "loss"
        warnings.warn(
            f"kl_estimator={plan.estimator.name!r} with kl_placement={plan.placement!r} gives a biased gradient of the "
            f"reverse KL. Unbiased alternatives: kl_estimator in {unbiased} with this placement, or "
            f"{unbiased_estimators(other, 'reverse', times_ratio)} with the other one. See docs/kl_estimators.md.",
            UserWarning,
            stacklevel=4,
        )


def _warn_if_options_unused(args, trainer_name: str) -> None:
    """A KL option set away from its default while the coefficient is 0 does nothing: say so (TRL's GRPO defaults
    to ``beta=0.0``, so setting only ``kl_estimator`` trains with no KL at all)."""
    defaults = {f.name: f.default for f in fields(type(args)) if f.name in KL_OPTIONS}
    changed = [f"{name}={getattr(args, name)!r}" for name in KL_OPTIONS if getattr(args, name) != defaults[name]]
    if changed:
        coefficient = getattr(type(args), "KL_COEFFICIENT", "beta")
        warnings.warn(
            f"{', '.join(changed)} set, but {coefficient}=0.0, so {trainer_name} applies no KL penalty. Set {coefficient} > 0.",
            UserWarning,
            stacklevel=4,
        )


class KLAnchor(KLPenalty):
    """The KL of SFT to its base model on the trained (data) tokens, from ``SFTKLArguments``: a distribution estimator
    (the data tokens are no samples of the policy), in the loss, logged as ``kl/<direction>`` (mean per trained token)
    and ``kl/coef``; an adaptive coefficient observes the per-token values."""

    @classmethod
    def from_config(cls, args, metrics: MetricSink) -> KLAnchor:
        plan = KLPlan(kl_estimator_info(args.sft_kl_estimator), args.sft_kl_direction, "loss", None, native=False)
        return cls(plan, make_kl_controller(args.sft_kl_coef, args.sft_kl_target, args.sft_kl_horizon), metrics)

    def report(self, record: KLRecord, estimate: torch.Tensor, logged_by_trl: bool = False) -> None:
        values = estimate.detach()[record.mask.bool()]
        totals = self.metrics.reduce_sum(torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)]))
        self.metrics.log_value(f"kl/{self.plan.direction}", (totals[0] / totals[1].clamp(min=1.0)).item())
        self.metrics.log_value("kl/coef", self.coef)
        if self.adaptive and self.metrics.training:
            self.observe(values)
