"""A tiny DPO trainer with pretraining mixing, used by tests/test_ptx*.py.

Run as ``torchrun --nproc_per_node 2 tests/scripts/ptx_ddp.py MODEL_PATH OUT_DIR``: trains 2 steps with
2-process gloo DDP and writes what each rank saw to ``OUT_DIR/rank{i}.json``.
"""

from __future__ import annotations

import json
import sys

import datasets
import torch

from trl_regularizers.configs import RegularizedDPOConfig
from trl_regularizers.trainers.adapters.dpo import DPOAdapter
from trl_regularizers.trainers.build import ptx_term


class PtxDPO(DPOAdapter):
    """Stock DPO (the adapter with no preference terms) plus a ``PtxTerm`` on ``pretrain_dataset``; ``ptx_only``
    drops the DPO loss (for GA checks)."""

    ptx_only = False

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attach(ptx=ptx_term(self, self.args, pretrain_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.ptx_only:
            return self.scale_like_parent_loss(self.ptx_term.loss(model))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def preference_pairs(n: int = 16) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"prompt": [f"q{i} " for i in range(n)], "chosen": ["yes"] * n, "rejected": ["no"] * n}
    )


def pretraining_texts(n: int = 64) -> list[str]:
    return [f"document {i}: " + "abcdefghij"[i % 10] * (i % 7 + 3) for i in range(n)]


def main(model_path: str, out_dir: str) -> None:
    args = RegularizedDPOConfig(
        output_dir=f"{out_dir}/run", bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False,
        max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_strategy="no", learning_rate=1e-3,
        ptx_coef=0.5, ptx_block_size=16,
    )
    trainer = PtxDPO(model_path, args=args, train_dataset=preference_pairs(), pretrain_dataset=pretraining_texts())
    drawn = []
    next_batch = trainer.ptx_term.stream.next_batch

    def recording_next_batch():
        batch = next_batch()
        drawn.append(batch["input_ids"].tolist())
        return batch

    trainer.ptx_term.stream.next_batch = recording_next_batch
    trainer.train()
    rank = trainer.accelerator.process_index
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    facts = {
        "process_index": rank,
        "num_processes": trainer.accelerator.num_processes,
        "ptx_coef": trainer.args.ptx_coef,
        "batches": drawn,
        "state": trainer.ptx_term.stream.state_dict(),
        "ptx_nll": [log["ptx/nll"] for log in trainer.state.log_history if "ptx/nll" in log],
        "param_sum": params.double().sum().item(),
        "param_abs_sum": params.double().abs().sum().item(),
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(facts, handle)
    trainer.accelerator.wait_for_everyone()  # as the recipes: no rank tears gloo down while another still works
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:3])
