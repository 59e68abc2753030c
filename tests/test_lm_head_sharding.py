"""The LM-head weight under sharding, as the exact KL reads it: FSDP2 (2 gloo CPU processes), DeepSpeed ZeRO-3
(a fake that partitions parameters the same way: DeepSpeed is not installed here) and the refused setups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType

from trl_regularizers import models
from trl_regularizers.components.kl import KLPenalty, KLPlan, check_distribution_setup
from trl_regularizers.core.control import FixedKLController
from trl_regularizers.core.full_kl import full_vocab_kl
from trl_regularizers.core.kl import kl_estimator_info
from trl_regularizers.core.records import HiddenStates, KLRecord

SCRIPT = Path(__file__).parent / "scripts" / "full_kl_fsdp2.py"


@pytest.mark.parametrize("shard_head, weight_type", [("0", "Parameter"), ("1", "DTensor")], ids=["head-in-root", "head-sharded"])
def test_fsdp2_gradients_through_the_exact_kl_equal_one_process(tiny_lm_path, tmp_path, shard_head, weight_type):
    """The head in the root unit is a plain parameter after the forward; a separately sharded head is a DTensor,
    whose gathered gradient must be averaged over ranks (TRL's plain ``full_tensor()`` leaves it per rank)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), tiny_lm_path, str(tmp_path), shard_head]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert facts["weight_type"] == weight_type
        assert facts["head_grad_norm"] > 0.1
        assert facts["max_error"] < 1e-6, facts


class FakeZero3:
    """DeepSpeed ZeRO-3 as ``models.gathered`` sees it: ``param.data`` is empty outside ``GatheredParameters``."""

    AVAILABLE, NOT_AVAILABLE = "AVAILABLE", "NOT_AVAILABLE"

    def __init__(self, monkeypatch, *params):
        self.full = {id(p): p.data for p in params}
        self.gathers: list[list] = []
        for p in params:
            p.data, p.ds_status = torch.empty(0, dtype=p.dtype), self.NOT_AVAILABLE
        zero = types.SimpleNamespace(GatheredParameters=self.gathered_parameters)
        status = types.SimpleNamespace(ZeroParamStatus=types.SimpleNamespace(AVAILABLE=self.AVAILABLE))
        monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
        monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.partition_parameters", status)
        monkeypatch.setattr(models, "is_deepspeed_zero3_enabled", lambda: True)

    @contextmanager
    def gathered_parameters(self, params):
        self.gathers.append(params)
        for p in params:
            p.data, p.ds_status = self.full[id(p)], self.AVAILABLE
        try:
            yield
        finally:
            for p in params:
                p.data, p.ds_status = torch.empty(0, dtype=p.dtype), self.NOT_AVAILABLE


def test_zero3_heads_are_gathered_once_each_around_the_exact_kl(monkeypatch):
    """Reward placement under ZeRO-3: the partitioned heads are gathered (each once, a shared one once) for the
    computation and the KL equals the one from the full weights; outside it they are partitioned again."""
    torch.manual_seed(0)
    hidden, ref_hidden = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    weight, ref_weight = torch.nn.Parameter(torch.randn(11, 4)), torch.nn.Parameter(torch.randn(11, 4))
    expected = full_vocab_kl(hidden @ weight.detach().T, ref_hidden @ ref_weight.detach().T)
    mask = torch.ones(2, 3)
    zero3 = FakeZero3(monkeypatch, weight, ref_weight)
    record = KLRecord(torch.zeros(2, 3), torch.zeros(2, 3), mask, HiddenStates(hidden, weight), HiddenStates(ref_hidden, ref_weight))
    penalty = full_kl_penalty("reward")
    with torch.no_grad():
        kl = penalty.estimate(record)
    torch.testing.assert_close(kl, expected)
    assert zero3.gathers == [[weight, ref_weight]] and weight.numel() == 0
    shared = KLRecord(torch.zeros(2, 3), torch.zeros(2, 3), mask, HiddenStates(hidden, weight), HiddenStates(ref_hidden, weight))
    with torch.no_grad():
        penalty.estimate(shared)
    assert zero3.gathers[-1] == [weight]  # PEFT: the reference is the policy's own head


class PlainHeadLM(torch.nn.Module):
    """A causal LM whose logits are ``hidden @ W.T``, as far as the checks look."""

    config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace())

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 11, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def full_kl_penalty(placement: str) -> KLPenalty:
    plan = KLPlan(kl_estimator_info("full"), "reverse", placement, None, native=False)
    return KLPenalty(plan, FixedKLController(0.1), metrics=None)


def fake_accelerator(distributed_type, zero_stage=None, fsdp2=False):
    state = types.SimpleNamespace(distributed_type=distributed_type, deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage))
    return types.SimpleNamespace(state=state, is_fsdp2=fsdp2, unwrap_model=lambda m: m)


@pytest.mark.parametrize("setup, placement, message", [
    (dict(distributed_type=DistributedType.FSDP), "loss", "FSDP1 keeps it in flat sharded parameters. Use FSDP2"),
    (dict(distributed_type=DistributedType.DEEPSPEED, zero_stage=3), "loss", "kl_placement='loss' .* not supported under DeepSpeed ZeRO-3"),
])
def test_setups_without_a_readable_head_are_refused(setup, placement, message):
    """The setups the FSDP2 and ZeRO-3 tests above run (FSDP2, ZeRO-3 with the KL in the reward) pass this check."""
    with pytest.raises(ValueError, match=message):
        check_distribution_setup(full_kl_penalty(placement), "RegularizedGRPOTrainer", fake_accelerator(**setup), [PlainHeadLM()])
