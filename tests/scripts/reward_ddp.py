"""RPO with a reward model under 2-process gloo DDP on the CPU, used by tests/test_reward_scoring_distributed.py.

Run as ``torchrun --nproc_per_node 2 tests/scripts/reward_ddp.py POLICY_PATH REWARD_PATH OUT_DIR``: scores the
pairs (each rank its shard), trains 2 steps and writes what each rank saw to ``OUT_DIR/rank{i}.json``.
"""

from __future__ import annotations

import json
import sys

import datasets
import torch
from transformers import AutoModelForSequenceClassification

from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer

BATCH_SIZE = 4


def pairs(n: int = 10) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"prompt": [f"q{i}: " for i in range(n)], "chosen": ["yes" * (i % 3 + 1) for i in range(n)], "rejected": ["no" * (i % 4 + 1) for i in range(n)]}
    )


def main(policy_path: str, reward_path: str, out_dir: str) -> None:
    args = RegularizedDPOConfig(
        output_dir=f"{out_dir}/run", bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False,
        max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_strategy="no", learning_rate=1e-3,
        reward_aware_loss="rpo_bwd_kl", reward_model_batch_size=BATCH_SIZE,
    )
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path)
    scored_rows = []
    reward_model.register_forward_hook(lambda module, a, kw, out: scored_rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    trainer = RegularizedDPOTrainer(policy_path, args=args, train_dataset=pairs(), reward_model=reward_model)
    trainer.train()
    rank = trainer.accelerator.process_index
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    facts = {
        "process_index": rank,
        "num_processes": trainer.accelerator.num_processes,
        "scored_rows": scored_rows,
        "chosen_score": list(trainer.train_dataset["chosen_score"]),
        "rejected_score": list(trainer.train_dataset["rejected_score"]),
        "reward_gap": [log["reward_aware/reward_gap"] for log in trainer.state.log_history if "reward_aware/reward_gap" in log],
        "param_sum": params.double().sum().item(),
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(facts, handle)
    trainer.accelerator.wait_for_everyone()  # as the recipes: no rank tears gloo down while another still works
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])
