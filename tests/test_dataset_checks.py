"""Bad training data fails before training with one error naming the column, the dataset and what was found,
instead of a bare KeyError/StopIteration deep in TRL or a GRPO run of zero steps."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trl_regularizers import (
    RegularizedDPOConfig,
    RegularizedDPOTrainer,
    RegularizedGRPOConfig,
    RegularizedGRPOTrainer,
    RegularizedRewardConfig,
    RegularizedRewardTrainer,
)

CPU = dict(bf16=False, report_to="none", max_steps=1, gradient_checkpointing=False, save_strategy="no")


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def dpo(path, tmp_path, data):
    return RegularizedDPOTrainer(path, args=RegularizedDPOConfig(str(tmp_path), **CPU), train_dataset=data)


def reward(path, tmp_path, data):
    return RegularizedRewardTrainer(path, args=RegularizedRewardConfig(str(tmp_path), **CPU), train_dataset=data)


def grpo(path, tmp_path, data):
    args = RegularizedGRPOConfig(str(tmp_path), per_device_train_batch_size=4, num_generations=4, **CPU)
    return RegularizedGRPOTrainer(path, reward_len, args, train_dataset=data)


@pytest.mark.parametrize(
    "build, model, data, message",
    [
        (dpo, "lm", {"prompt": ["a"], "chosen": ["b"]}, r"RegularizedDPOTrainer needs the columns \('chosen', 'rejected'\) in the train dataset, which has the columns \['prompt', 'chosen'\]"),
        (dpo, "lm", {"prompt": ["a", "b"], "chosen": [2, 3], "rejected": ["y", "z"]}, r"train dataset, row 0, column 'chosen': .*needs text.*got int 2"),
        (dpo, "lm", {"prompt": [], "chosen": [], "rejected": []}, "The train dataset given to RegularizedDPOTrainer is empty"),
        (reward, "rm", {"chosen": ["a"], "rejected_text": ["b"]}, r"RegularizedRewardTrainer needs the columns \('chosen', 'rejected'\)"),
        (grpo, "lm", {"question": ["a"] * 4}, r"RegularizedGRPOTrainer needs the columns \('prompt'\) in the train dataset, which has the columns \['question'\]"),
        (grpo, "lm", {"prompt": []}, "The train dataset given to RegularizedGRPOTrainer is empty"),
        (grpo, "lm", {"prompt": ["a", None, "c", "d"]}, r"row 1, column 'prompt'.*got NoneType None"),
    ],
)
def test_bad_training_data_fails_before_training(tiny_lm_path, tiny_rm_path, tmp_path, build, model, data, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_rm_path if model == "rm" else tiny_lm_path, tmp_path, Dataset.from_dict(data))


def test_chat_messages_and_tokenized_pairs_are_accepted(tiny_lm_path, tiny_rm_path, tmp_path):
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]] * 4
    grpo(tiny_lm_path, tmp_path, Dataset.from_dict({"prompt": messages}))
    dpo(tiny_lm_path, tmp_path, Dataset.from_dict({"chosen": messages, "rejected": messages}))
    reward(tiny_rm_path, tmp_path, Dataset.from_dict({"chosen_ids": [[3, 4]], "rejected_ids": [[5]]}))
