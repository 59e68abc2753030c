"""The language model's LM head read outside its own forward (the exact KL, the ptx NLL), under every sharding.

TRL reads its fused head the same way (docs/trl_internals.md §1.5); these helpers use public torch, accelerate,
transformers and DeepSpeed APIs and name no TRL helper: ``causal_lm``, ``why_logits_are_not_a_product``,
``full_weight`` (FSDP2), ``gathered`` (ZeRO-3), ``lm_head_weight``, ``run_inside_forward``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.distributed.tensor import DTensor, Partial
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


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


def lm_head_weight(model: torch.nn.Module, trainable: bool = True) -> torch.Tensor:
    """The LM-head weight of an (unwrapped) causal LM or PEFT model as a whole tensor (``full_weight``); under ZeRO-3,
    read it inside ``gathered``."""
    return full_weight(causal_lm(model).get_output_embeddings().weight, trainable)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode deep copy that runs the class's own ``forward`` (a reference or base policy).

    Trainers patch ``forward`` on the instance (TRL's fused LM head, accelerate's fp32 output wrapper); those closures
    still call the *original* model, so a plain deepcopy would silently read the live policy. Dropping the instance
    attribute restores the class method on the copy.
    """
    base = copy.deepcopy(model).eval().requires_grad_(False)
    for module in base.modules():
        module.__dict__.pop("forward", None)
    return base
