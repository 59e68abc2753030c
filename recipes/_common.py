"""Shared pieces of the recipes: script arguments, the offline tiny-world defaults, dataset loading.

The name ``tiny-world`` (model or dataset) means the repository's tiny model and its generated data (``examples/demo``, not in the wheel),
so every recipe runs offline by default; any other name goes to ``from_pretrained`` / ``load_dataset``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

TINY = "tiny-world"
REPOSITORY = Path(__file__).resolve().parents[1]


def demo_module(name: str):
    """``examples.demo.<name>`` of this repository: the tiny world ships with the repository, not with the wheel."""
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    return importlib.import_module(f"examples.demo.{name}")


@dataclass
class RecipeArguments:
    """Data arguments of the recipes (model arguments are TRL's ``ModelConfig``)."""

    dataset_name: str = field(default=TINY, metadata={"help": "Dataset name or path; 'tiny-world' = generated demo data."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str = field(default="test", metadata={"help": "Evaluation split (used if eval_strategy != 'no')."})
    pretrain_dataset_name: str | None = field(
        default=None, metadata={"help": "Pretraining text for ptx_coef > 0 (dataset name or 'tiny-world'); None: no ptx data."}
    )
    pretrain_dataset_config: str | None = field(default=None, metadata={"help": "Configuration of the pretraining dataset."})
    pretrain_dataset_split: str = field(default="train", metadata={"help": "Split of the pretraining dataset."})
    reward_model_name_or_path: str = field(
        default=TINY, metadata={"help": "GRPO/RLOO/PPO reward: a sequence-classification model, or 'tiny-world' (the demo's over-optimizable reward for GRPO/RLOO, a tiny reward model for PPO)."}
    )


def model_path(name: str | None) -> str:
    """Resolve ``tiny-world`` to the embedded model's folder; pass any other name through."""
    if name in (None, TINY):
        return demo_module("pretrain").base_model_path()
    return name


def model_init_kwargs(training_args, model_args) -> None:
    """Forward ModelConfig's dtype / attention / quantization choices to the trainer's model loading."""
    from trl import get_quantization_config

    kwargs = dict(dtype=model_args.dtype, attn_implementation=model_args.attn_implementation, revision=model_args.model_revision)
    quantization = get_quantization_config(model_args)
    if quantization is not None:  # 4/8-bit (bitsandbytes, GPU): one copy per process
        from accelerate import PartialState

        kwargs.update(quantization_config=quantization, device_map={"": PartialState().local_process_index})
    training_args.model_init_kwargs = {**{k: v for k, v in kwargs.items() if v is not None}, **(training_args.model_init_kwargs or {})}


def tiny_world(kind: str):
    """The generated demo data as a DatasetDict with train/test splits."""
    from datasets import Dataset, DatasetDict

    corpus_lines = demo_module("corpus").corpus_lines
    runs = demo_module("runs")
    fact_pairs, rated_pairs, task_prompts = runs.fact_pairs, runs.rated_pairs, runs.task_prompts

    if kind == "completion":  # SFT: the true fact of each pair as the completion of its prompt
        pairs = fact_pairs().train_test_split(test_size=0.25, seed=0)
        return DatasetDict({split: pairs[split].select_columns(["prompt", "chosen"]).rename_column("chosen", "completion") for split in ("train", "test")})
    if kind == "preference":
        pairs = fact_pairs().train_test_split(test_size=0.25, seed=0)
        return DatasetDict(train=pairs["train"], test=pairs["test"])
    if kind == "rated":
        return DatasetDict(train=rated_pairs(192, seed=11), test=rated_pairs(96, seed=12))
    if kind == "prompt":
        prompts = task_prompts()
        return DatasetDict(train=Dataset.from_dict({"prompt": prompts * 8}), test=Dataset.from_dict({"prompt": prompts}))
    if kind == "text":
        return DatasetDict(train=Dataset.from_dict({"text": corpus_lines(2000, "train")}), test=Dataset.from_dict({"text": corpus_lines(200, "heldout")}))
    raise ValueError(f"kind={kind!r} is not valid. Allowed values: completion, preference, rated, prompt, text.")


def load_splits(script_args: RecipeArguments, training_args, kind: str):
    """(train, eval-or-None) from ``dataset_name``; ``kind`` picks the tiny-world dataset for the default."""
    if script_args.dataset_name == TINY:
        data = tiny_world(kind)
    else:
        from datasets import load_dataset

        data = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    evaluate = training_args.eval_strategy != "no"
    return data[script_args.dataset_train_split], data[script_args.dataset_test_split] if evaluate else None


def load_pretrain(script_args: RecipeArguments):
    """The ptx dataset named by ``pretrain_dataset_name`` (None if unset)."""
    if script_args.pretrain_dataset_name is None:
        return None
    if script_args.pretrain_dataset_name == TINY:
        return tiny_world("text")["train"]
    from datasets import load_dataset

    return load_dataset(script_args.pretrain_dataset_name, name=script_args.pretrain_dataset_config, split=script_args.pretrain_dataset_split)


def reward_funcs(script_args: RecipeArguments):
    """GRPO/RLOO reward: the demo's over-optimizable character reward for 'tiny-world', else a reward model path."""
    if script_args.reward_model_name_or_path == TINY:
        return demo_module("runs").target_char_reward
    return script_args.reward_model_name_or_path
