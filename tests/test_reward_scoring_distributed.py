"""Reward-model scoring under 2-process gloo DDP on the CPU (torchrun): each rank scores only its shard, and the
cached scores are identical to one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.scripts.reward_ddp import BATCH_SIZE, pairs
from trl_regularizers.scoring import RewardScorer

SCRIPT = Path(__file__).parent / "scripts" / "reward_ddp.py"


def test_two_processes_score_their_shards_and_cache_the_single_process_scores(tiny_lm_path, tiny_rm_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), tiny_lm_path, tiny_rm_path, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1] and {r["num_processes"] for r in ranks} == {2}

    # 10 pairs in batches of 4 pairs: batches 0 and 2 (4 + 2 pairs) on rank 0, batch 1 on rank 1, 2 texts a pair.
    assert ranks[0]["scored_rows"] == [8, 4] and ranks[1]["scored_rows"] == [8]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        scorer = RewardScorer(AutoModelForSequenceClassification.from_pretrained(tiny_rm_path), AutoTokenizer.from_pretrained(tiny_rm_path))
        single = scorer.score(pairs(), "chosen_score", "rejected_score", batch_size=BATCH_SIZE)
    finally:
        torch.set_num_threads(threads)
    for rank in ranks:
        assert rank["chosen_score"] == list(single["chosen_score"])
        assert rank["rejected_score"] == list(single["rejected_score"])
    assert len(set(single["chosen_score"])) > 1  # distinct texts, distinct scores: the order is tested
    # The logged reward gap is the gathered mean over both ranks' pairs; DDP kept the weights equal.
    assert ranks[0]["reward_gap"] == ranks[1]["reward_gap"] and len(ranks[0]["reward_gap"]) == 2
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
