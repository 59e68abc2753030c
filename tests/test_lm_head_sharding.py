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

from trl_regularizers.core.full_kl import full_vocab_kl
from trl_regularizers.trainers import adapters
from trl_regularizers.trainers.kl import KLRegularizer, estimate_kl
from trl_regularizers.trainers.records import HiddenStates, KLRecord

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
    """DeepSpeed ZeRO-3 as the adapters see it: ``param.data`` is empty outside ``GatheredParameters``."""

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
        monkeypatch.setattr(adapters.base, "is_deepspeed_zero3_enabled", lambda: True)

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
    with torch.no_grad():
        kl = estimate_kl(record, "full", "reverse", None)
    torch.testing.assert_close(kl, expected)
    assert zero3.gathers == [[weight, ref_weight]] and weight.numel() == 0
    shared = KLRecord(torch.zeros(2, 3), torch.zeros(2, 3), mask, HiddenStates(hidden, weight), HiddenStates(ref_hidden, weight))
    with torch.no_grad():
        estimate_kl(shared, "full", "reverse", None)
    assert zero3.gathers[-1] == [weight]  # PEFT: the reference is the policy's own head


class PlainHeadLM(torch.nn.Module):
    """A causal LM whose logits are ``hidden @ W.T``, as far as the checks look."""

    config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace())

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 11, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def fake_trainer(distributed_type, zero_stage=None, fsdp2=False, placement="loss"):
    state = types.SimpleNamespace(distributed_type=distributed_type, deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage))
    return types.SimpleNamespace(
        accelerator=types.SimpleNamespace(state=state, is_fsdp2=fsdp2, unwrap_model=lambda m: m),
        args=types.SimpleNamespace(kl_estimator="full", kl_placement=placement), model=PlainHeadLM(), ref_model=None,
    )


@pytest.mark.parametrize("setup, message", [
    (dict(distributed_type=DistributedType.FSDP), "FSDP1 keeps it in flat sharded parameters. Use FSDP2"),
    (dict(distributed_type=DistributedType.DEEPSPEED, zero_stage=3), "kl_placement='loss' .* not supported under DeepSpeed ZeRO-3"),
])
def test_setups_without_a_readable_head_are_refused(setup, message):
    with pytest.raises(ValueError, match=message):
        KLRegularizer._check_logits_recomputable(fake_trainer(**setup))


@pytest.mark.parametrize("setup", [
    dict(distributed_type=DistributedType.FSDP, fsdp2=True),
    dict(distributed_type=DistributedType.DEEPSPEED, zero_stage=3, placement="reward"),
], ids=["fsdp2", "zero3-reward"])
def test_supported_sharded_setups_are_accepted(setup):
    KLRegularizer._check_logits_recomputable(fake_trainer(**setup))
