"""Score preference pairs with a reward model once, before training, and cache the scores as dataset columns.

    scorer = RewardScorer.load(reward_model, tokenizer)          # a sequence-classification model or a path
    dataset = scorer.score(dataset, "chosen_score", "rejected_score", batch_size=16)

Each pair is scored as (prompt + chosen, prompt + rejected): plain text gets the reward tokenizer's EOS appended
(as TRL's ``RewardTrainer`` trains on it), chat messages go through its chat template. Scoring is batched (one
forward per ``batch_size`` pairs, the two texts of each pair in the same forward), in eval mode without gradients,
with a progress bar on the main process. Under several processes (``accelerate``'s ``PartialState``) the batches
are dealt out round-robin, each process scores only its own, and the scores are gathered so that every process
adds the same columns in dataset order; every batch holds the same pairs (hence the same padding) whatever the
number of processes, so the cached scores do not depend on it.

Imports transformers and accelerate; nothing of ``trainers/``.
"""

from __future__ import annotations

import warnings

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm


def pair_texts(example: dict, tokenizer) -> tuple[str, str]:
    """The (chosen, rejected) texts a reward model scores for one preference row (standard or conversational;
    explicit ``prompt`` column or not)."""
    prompt, chosen, rejected = example.get("prompt"), example["chosen"], example["rejected"]
    if isinstance(chosen, list):  # conversational: lists of {"role", "content"} messages
        prefix = list(prompt or [])
        return tuple(tokenizer.apply_chat_template(prefix + list(completion), tokenize=False) for completion in (chosen, rejected))
    eos = tokenizer.eos_token or ""
    texts = ((prompt or "") + completion for completion in (chosen, rejected))
    return tuple(text if not eos or text.endswith(eos) else text + eos for text in texts)


class RewardScorer:
    """A reward model (``num_labels == 1`` sequence classification) and the tokenizer of its inputs."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"reward_model must output one score per sequence (num_labels=1), got num_labels={num_labels}.")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor: its text tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the model finds each sequence's last token by it
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, reward_model, tokenizer=None, fallback_tokenizer=None) -> RewardScorer:
        """From a model or a path. The tokenizer: ``tokenizer``, else the one saved with a ``reward_model`` path,
        else ``fallback_tokenizer`` (the policy's), else the one saved at the model's ``name_or_path``."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = reward_model if isinstance(reward_model, str) else None
        if path is not None:
            reward_model = AutoModelForSequenceClassification.from_pretrained(path)
        if not isinstance(reward_model, torch.nn.Module):
            raise TypeError(f"reward_model must be a sequence-classification model or a path, got {type(reward_model).__name__}.")
        if tokenizer is None:
            source = path or (None if fallback_tokenizer is not None else getattr(reward_model, "name_or_path", None))
            tokenizer = AutoTokenizer.from_pretrained(source) if source else fallback_tokenizer
        if tokenizer is None:
            raise ValueError("reward_model= needs a tokenizer: pass reward_processing_class=.")
        return cls(reward_model, tokenizer)

    @torch.no_grad()
    def score_texts(self, texts: list[str], max_length: int | None = None) -> list[float]:
        """One forward over ``texts`` (right-padded to the longest); their scores as floats."""
        encoded = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="right",
            truncation=max_length is not None, max_length=max_length,
        )
        device = next(self.model.parameters()).device
        logits = self.model(**{k: v.to(device) for k, v in encoded.items()}).logits
        return logits[:, 0].float().cpu().tolist()

    def score(self, dataset, chosen_field: str, rejected_field: str, batch_size: int = 16, max_length: int | None = None,
              dataset_name: str = "train"):
        """``dataset`` with the float columns ``chosen_field`` and ``rejected_field`` (replaced if present)."""
        if getattr(dataset, "column_names", None) is None or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"reward_model= scores the {dataset_name} dataset before training, which needs a map-style datasets.Dataset; "
                "an IterableDataset cannot be scored up front. Add the score columns yourself instead."
            )
        state = PartialState()
        model = self.model
        if not hasattr(model, "hf_device_map"):
            model.to(state.device)
        was_training = model.training
        model.eval()
        n = len(dataset)
        batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        mine = batches[state.process_index :: state.num_processes]
        scored: list[tuple[int, float, float]] = []
        try:
            for rows in tqdm(mine, desc=f"Scoring {dataset_name} pairs with the reward model", disable=not state.is_local_main_process):
                texts = [pair_texts(dataset[i], self.tokenizer) for i in rows]
                scores = self.score_texts([c for c, _ in texts] + [r for _, r in texts], max_length)
                scored.extend(zip(rows, scores[: len(rows)], scores[len(rows) :]))
        finally:
            model.train(was_training)
        everything = sorted(gather_object(scored)) if state.num_processes > 1 else scored
        if [index for index, *_ in everything] != list(range(n)):
            raise RuntimeError(f"reward scoring gathered {len(everything)} rows for a dataset of {n}")  # a sharding bug
        present = [name for name in (chosen_field, rejected_field) if name in dataset.column_names]
        if present:
            warnings.warn(f"reward_model= replaces the existing column(s) {present} of the {dataset_name} dataset with its scores.", stacklevel=3)
            dataset = dataset.remove_columns(present)
        dataset = dataset.add_column(chosen_field, [c for _, c, _ in everything])
        return dataset.add_column(rejected_field, [r for _, _, r in everything])
