"""The LM-head weight of an FSDP2-sharded policy, as the exact KL reads it, on 2 gloo CPU processes.

Run as ``torchrun --nproc_per_node 2 tests/scripts/full_kl_fsdp2.py MODEL_PATH OUT_DIR SHARD_HEAD``: each rank
runs the policy forward on its own batch (recording the final hidden states as ``OnlineAdapter`` does), adds the
exact KL from those hidden states and ``full_weight(lm_head.weight)`` to a loss on the logits, and backpropagates.
``SHARD_HEAD=1`` wraps an untied LM head in its own FSDP2 unit, so the head is a sharded DTensor outside its
forward; ``0`` leaves it (tied to the embeddings) in the root unit, unsharded after the root's forward. Each rank
writes the largest difference between its unsharded gradients and those of one process on both batches.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from trl_regularizers.core.full_kl import full_vocab_kl_from_hidden
from trl_regularizers.models import full_weight


def batch(rank: int) -> torch.Tensor:
    return torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(100 + rank))


def loss_and_weight_type(model, reference, input_ids) -> tuple[torch.Tensor, str]:
    """A stand-in for TRL's loss on the logits plus the exact KL of the last 6 positions (GRPO's loss placement)."""
    recorded = []
    handle = model.model.register_forward_hook(lambda module, args, output: recorded.append(output.last_hidden_state[:, -7:-1]))
    logits = model(input_ids=input_ids, use_cache=False).logits
    handle.remove()
    raw_weight = model.get_output_embeddings().weight
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=input_ids).last_hidden_state[:, -7:-1]
    kl = full_vocab_kl_from_hidden(recorded[0], ref_hidden, full_weight(raw_weight, trainable=True), reference.lm_head.weight, chunk_size=3)
    return logits[:, -7:-1].float().logsumexp(-1).mean() + 2.0 * kl.mean(), type(raw_weight).__name__


def main(model_path: str, out_dir: str, shard_head: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    untied = shard_head == "1"
    model = AutoModelForCausalLM.from_pretrained(model_path, tie_word_embeddings=not untied)
    if untied:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight + 0.01 * torch.randn_like(model.lm_head.weight))
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    single = copy.deepcopy(model)

    # One process on both batches: FSDP2 averages the per-rank gradients.
    expected_loss = sum(loss_and_weight_type(single, reference, batch(r))[0] for r in range(2)) / 2
    expected_loss.backward()
    expected = {name: p.grad for name, p in single.named_parameters()}

    for layer in model.model.layers:
        fully_shard(layer)
    if untied:
        fully_shard(model.lm_head)
    fully_shard(model)
    loss, weight_type = loss_and_weight_type(model, reference, batch(rank))
    loss.backward()
    errors = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors[name] = (grad - expected[name]).abs().max().item()
    facts = {"weight_type": weight_type, "max_error": max(errors.values()), "worst": max(errors, key=errors.get),
             "head_grad_norm": expected["lm_head.weight" if untied else "model.embed_tokens.weight"].norm().item()}
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(facts, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
