"""Shared base of the adapters: what every TRL trainer does alike (docs/trl_internals.md §1).

``TrainerAdapter``: the gradient-accumulation rule for added loss terms, metric logging, checkpointed regularizer
state. ``OnlineAdapter`` (GRPO, RLOO): records the per-token log-prob calls both trainers make through
``_get_per_token_logps_and_entropies`` (called with ``model, input_ids, attention_mask, logits_to_keep`` as its
first positional arguments and returning ``(logps, entropies, aux)`` in every supported TRL; 1.14 declares them
as ``*args``), with the final hidden states when an estimator needs the whole distribution. The LM head read outside
its forward, as TRL reads its fused head (docs/trl_internals.md §1.5): ``why_logits_are_not_a_product``,
``full_weight`` (FSDP2), ``gathered`` (ZeRO-3), ``run_inside_forward``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from trl_regularizers.data import check_dataset
from trl_regularizers.trainers.records import HiddenStates, KLRecord
from trl_regularizers.trainers.state import RegularizerState

REF_HIDDEN_KEY = "ref_hidden_states"
"""Rollout-batch key of the reference's final hidden states (estimators that need logits, in the loss): the
rollout keeps them, not [B, T, V] logits."""
TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA = hasattr(Trainer, "loss_is_scaled_for_ga")
"""transformers >= 5.19 reads ``Trainer.loss_is_scaled_for_ga``; older versions ignore the attribute."""


LOGIT_SCALING_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
"""Model-config fields that change the logits after the LM-head product (the ones TRL 1.16's fused head reads,
trl/trainer/utils.py L1578-1593): with any of them set, the logits are not ``hidden @ W.T``."""


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def why_logits_are_not_a_product(model: torch.nn.Module) -> str | None:
    """None when the logits of the causal LM ``model`` are exactly ``final hidden @ lm_head.weight.T``; else why not
    (an LM head that is not a bias-free ``nn.Linear``, e.g. a bias or a PEFT adapter on it, or a logit scaling)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"its LM head is {head!r}, not a bias-free nn.Linear (a bias or an adapter on it would be left out)"
    config = model.config.get_text_config()
    for attribute in LOGIT_SCALING_ATTRIBUTES:
        if getattr(config, attribute, None) not in (None, 1.0):
            return f"its config sets {attribute}={getattr(config, attribute)!r}, which changes the logits after the LM head"
    return None


def full_weight(weight: torch.Tensor, trainable: bool) -> torch.Tensor:
    """``weight`` as a whole tensor: FSDP2 shows a sharded parameter as a ``DTensor`` (a root module's parameters stay
    unsharded after its forward, a separately wrapped LM head does not). Trainable: gradients reach the shards.

    TRL 1.16 gathers its fused head with ``full_tensor()`` (trl/trainer/utils.py L1636-1637), whose gradient placement
    defaults to Replicate: each rank would keep its own, unreduced gradient. The gradient is declared ``Partial("avg")``
    here, so the backward reduce-scatters it and averages over ranks as FSDP2 does for every other gradient.
    """
    if not isinstance(weight, DTensor):
        return weight  # not detached: a detached alias of a ZeRO-3 parameter would miss its gathered values
    if not trainable:
        return weight.detach().full_tensor()
    return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)


def gathered(*params: torch.Tensor) -> AbstractContextManager:
    """Under DeepSpeed ZeRO-3, a block in which the partitioned ``params`` hold their full values (read only), as
    TRL's ``maybe_gather_lm_head_ctx`` gathers its fused head (trl/trainer/utils.py L200-233 in 1.16, L189 in 1.12):
    each parameter once, skipping those already available (a tied head that ``embed_tokens`` holds). Otherwise a
    null context."""
    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = {id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(partitioned.values())) if partitioned else nullcontext()


def run_inside_forward(wrapped: torch.nn.Module, module: torch.nn.Module, method: Callable, *args):
    """``method(*args)`` run as the forward of ``module``, called through its distributed wrapper ``wrapped``: the
    wrapper's hooks run around it (DDP prepares the gradient sync, FSDP2 unshards the root's parameters). The "forward
    redirection" TRL uses for its fused losses (``trl/models/utils.py`` L330 in 1.12, L345 in 1.16)."""
    patched = "forward" in vars(module)  # e.g. TRL 1.16's fused head or accelerate's autocast wrapper
    original = module.forward

    def restore():
        if patched:
            module.forward = original
        else:
            vars(module).pop("forward", None)

    def redirected(*inner_args):
        restore()
        return method(*inner_args)

    module.forward = redirected
    try:
        return wrapped(*args)
    finally:
        restore()


class TrainerAdapter:
    """Mixed in before a TRL trainer class; owns ``regularizer_state`` and the shared insertion helpers."""

    dataset_formats: list[tuple[str, ...]] | None = None
    """Column sets the TRL trainer accepts (one must be present); None: no check."""

    def __init__(self, *args, **kwargs):
        self.regularizer_state = RegularizerState()
        if self.dataset_formats is not None:  # TRL reads the data in its __init__ (a missing column is a KeyError)
            given = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
            for name in ("train", "eval"):
                check_dataset(given.get(f"{name}_dataset"), self.dataset_formats, name, type(self).__name__)
        super().__init__(*args, **kwargs)

    @property
    def mode(self) -> str:
        """``"train"`` or ``"eval"``, as TRL decides it (docs/trl_internals.md §1.2)."""
        return "train" if self.model.training else "eval"

    def language_model(self) -> torch.nn.Module:
        """The policy's causal LM (PPO's adapter skips its value head)."""
        return self.model

    def lm_head_weight(self, model: torch.nn.Module, trainable: bool = True) -> torch.Tensor:
        """The LM-head weight of ``model`` as a whole tensor (``full_weight``); under ZeRO-3, read it in ``gathered``."""
        return full_weight(causal_lm(self.accelerator.unwrap_model(model)).get_output_embeddings().weight, trainable)

    def trainer_divides_by_ga(self) -> bool:
        """True when the HF Trainer divides ``compute_loss``'s result by the GA steps (docs/trl_internals.md §1.1):
        DPO/Reward/RLOO yes, GRPO no (it scales its own loss)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None) if TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA else None
        if scaled is None:
            scaled = bool(getattr(self, "model_accepts_loss_kwargs", False)) or self.compute_loss_func is not None
        return not scaled

    def scale_like_parent_loss(self, term: torch.Tensor) -> torch.Tensor:
        """Scale an added loss term the way the parent's loss is scaled, so gradient accumulation sums it right."""
        if self.model.training and not self.trainer_divides_by_ga():
            return term / self.current_gradient_accumulation_steps
        return term

    def log_metric(self, name: str, value: torch.Tensor | float) -> float:
        """Log the mean of ``value`` over all processes under ``name`` and return it. Collective: call on every rank."""
        if not torch.is_tensor(value):
            value = torch.tensor(float(value))
        value = value.detach().float().mean().reshape(1).to(self.accelerator.device)
        mean = self.accelerator.gather_for_metrics(value).mean().item()
        self._metrics[self.mode][name].append(mean)
        return mean

    def log_reduced_metric(self, name: str, value: float, mode: str | None = None) -> None:
        """Log a value that is already the same on every process."""
        self._metrics[mode or self.mode][name].append(float(value))

    def set_metric(self, name: str, value: float, mode: str) -> None:
        """Replace what ``name`` will report at the next log (e.g. a whole-eval-set accuracy)."""
        self._metrics[mode][name] = [float(value)]

    def drop_last_metric(self, name: str) -> None:
        self._metrics[self.mode][name].pop()

    def pop_metrics(self) -> dict[str, float]:
        """The mean of each metric logged in this mode since the last call, clearing them (for own train loops)."""
        metrics = self._metrics[self.mode]
        means = {name: sum(values) / len(values) for name, values in metrics.items()}
        metrics.clear()
        return means

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self.regularizer_state.save(os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint folder that ``train(resume_from_checkpoint=...)`` means, or None."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return resume_from_checkpoint or None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self.regularizer_state.load(checkpoint)
        return super().train(checkpoint, *args, **kwargs)


@dataclass(frozen=True)
class LogpCall:
    """One recorded ``_get_per_token_logps_and_entropies`` call."""

    logps: torch.Tensor
    """[B, T] what the call returned (the completion tokens' log-probs at TRL's temperature)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_to_keep: int
    extra_args: tuple
    kwargs: dict
    states: HiddenStates | None
    """The whole distribution as final hidden states + LM head (only when the regularizer needs logits)."""

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] float: the completion part of the attention mask."""
        return self.attention_mask[:, -self.logits_to_keep :].to(self.logps.dtype)


@dataclass(frozen=True)
class KLPlan:
    """What the KL regularizer asks of an online trainer's own KL (stock TRL: ``native`` in TRL's placement)."""

    native: bool
    """TRL computes the configured KL itself; the adapter only bounds the reference log-probs it reads."""
    placement: str
    """``"loss"`` or ``"reward"``."""
    needs_states: bool = False
    """Record final hidden states (estimators that need the whole distribution)."""


class OnlineAdapter(TrainerAdapter):
    dataset_formats = [("prompt",)]
    """GRPO/RLOO: records log-prob calls. Insertion points (stock defaults here; ``KLRegularizer`` overrides them):
    ``kl_plan()``, ``bound_reference(logps, ref_logps)``, ``kl_penalty(record, logged_by_trl) -> [B, T]``."""

    trl_kl_estimator = "k3"
    trl_kl_placement = "loss"
    """The KL TRL computes itself (estimator, placement)."""
    _logp_calls: list[LogpCall] | None = None
    _on_logp_call: Callable | None = None

    def kl_plan(self) -> KLPlan:
        return KLPlan(native=True, placement=self.trl_kl_placement)

    def bound_reference(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        return ref_logps

    def kl_penalty(self, record: KLRecord, logged_by_trl: bool) -> torch.Tensor:
        """Per-token KL estimate [B, T] (masked); also logs it. Only called when the plan is not native."""
        raise NotImplementedError

    @contextmanager
    def recording_logp_calls(self, on_call: Callable[[LogpCall], torch.Tensor | None] | None = None):
        """Record every log-prob call made inside the block. ``on_call(call)`` runs right after each call, before
        TRL reads anything else; a tensor it returns replaces the log-probs TRL receives."""
        self._logp_calls, self._on_logp_call = [], on_call
        try:
            yield self._logp_calls
        finally:
            self._logp_calls, self._on_logp_call = None, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._logp_calls is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        needs_states = self.kl_plan().needs_states
        with self._recording_hidden(model, logits_to_keep) if needs_states else nullcontext() as hidden:
            logps, *rest = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        states = HiddenStates(torch.cat(hidden), self.lm_head_weight(model), self.temperature) if needs_states else None
        call = LogpCall(logps, input_ids, attention_mask, logits_to_keep, args, kwargs, states)
        self._logp_calls.append(call)
        replaced = self._on_logp_call(call) if self._on_logp_call is not None else None
        return (logps if replaced is None else replaced, *rest)

    def score_like(self, call: LogpCall) -> LogpCall:
        """Score the sequences of ``call`` with the policy, without grad, recorded the same way."""
        with torch.no_grad(), self.recording_logp_calls() as calls:
            self._get_per_token_logps_and_entropies(
                self.model, call.input_ids, call.attention_mask, call.logits_to_keep, *call.extra_args, **call.kwargs
            )
        return calls[0]

    @contextmanager
    def _recording_hidden(self, model: torch.nn.Module, logits_to_keep: int):
        """Collect, per backbone forward of ``model``, the final hidden states that predict the last
        ``logits_to_keep`` tokens (the positions TRL scores), with their autograd graph."""
        recorded: list[torch.Tensor] = []

        def record(module, inputs, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            recorded.append(hidden[:, -logits_to_keep - 1 : -1])

        handle = causal_lm(self.accelerator.unwrap_model(model)).base_model.register_forward_hook(record)
        try:
            yield recorded
        finally:
            handle.remove()
