"""Pretraining mixing under 2-process gloo DDP on the CPU (torchrun): sharding, lockstep, synced updates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.scripts.ptx_ddp import pretraining_texts
from trl_regularizers.ptx import PtxStream
from trl_regularizers.testing import byte_tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "ptx_ddp.py"


def test_two_processes_draw_disjoint_shards_in_lockstep(tiny_lm_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), tiny_lm_path, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    assert [r["process_index"] for r in ranks] == [0, 1] and {r["num_processes"] for r in ranks} == {2}
    assert ranks[0]["ptx_coef"] == ranks[1]["ptx_coef"] == 0.5
    # One ptx batch per step on each rank, different blocks on the two ranks.
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2
    for batch0, batch1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert not {tuple(row) for row in batch0} & {tuple(row) for row in batch1}
    # Together the ranks drew exactly what one process with twice the batch would have (the documented layout).
    single = PtxStream(pretraining_texts(), byte_tokenizer(), block_size=16, batch_size=4, seed=42)
    for batch0, batch1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert torch.equal(torch.tensor(batch0 + batch1), single.next_batch()["input_ids"])
    # Lockstep: one saved state restores both ranks; the logged NLL is the gathered mean; DDP kept weights equal.
    assert ranks[0]["state"] == ranks[1]["state"] == {"epoch": 0, "block": 8, "block_size": 16, "seed": 42}
    assert ranks[0]["ptx_nll"] == ranks[1]["ptx_nll"] and len(ranks[0]["ptx_nll"]) == 2
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]
