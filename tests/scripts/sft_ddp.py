"""The first step's KL of a RegularizedSFTTrainer, used by tests/trainers/test_sft.py.

Run as ``torchrun --nproc_per_node 2 tests/scripts/sft_ddp.py MODEL_PATH OUT_DIR``: one step of 2-process gloo DDP over
4 examples (2 per process); each rank writes the logged ``kl/forward`` to ``OUT_DIR/rank{i}.json``. The policy is
perturbed (the same way on every rank) after the trainer copied its base, so the first step's KL is not 0.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset

from trl_regularizers import RegularizedSFTConfig, RegularizedSFTTrainer


def first_step_kl(model_path: str, out_dir: str, per_device_batch: int, cpu: bool = False) -> float:
    data = Dataset.from_dict({"prompt": ["the cat ", "a dog ", "one bird ", "my fish "], "completion": ["sat here.", "ran off.", "sang a.", "swam by."]})
    args = RegularizedSFTConfig(output_dir=out_dir, per_device_train_batch_size=per_device_batch, max_steps=1, logging_steps=1,
                                bf16=False, report_to="none", save_strategy="no", use_cpu=cpu, sft_kl_coef=0.5)
    trainer = RegularizedSFTTrainer(model_path, args=args, train_dataset=data)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trainer.model.model.layers[-1].parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    trainer.train()
    kl = next(log["kl/forward"] for log in trainer.state.log_history if "kl/forward" in log)
    if trainer.accelerator.num_processes > 1:
        os.makedirs(out_dir, exist_ok=True)
        with open(f"{out_dir}/rank{trainer.accelerator.process_index}.json", "w") as handle:
            json.dump({"num_processes": trainer.accelerator.num_processes, "kl": kl}, handle)
        trainer.accelerator.wait_for_everyone()  # no rank tears gloo down while another still works
        trainer.accelerator.end_training()
    return kl


if __name__ == "__main__":
    first_step_kl(sys.argv[1], sys.argv[2], per_device_batch=2, cpu=True)
