"""Pretraining data for PPO-ptx (eq. 6; Ouyang et al. 2022): a packed, sharded, resumable stream of batches.

The trainers add ``ptx_coef * NLL`` on these batches to their loss (``trainers.ptx.PtxRegularizer``).
"""

from __future__ import annotations

import warnings
from itertools import islice
from typing import Any, Iterator

import numpy as np
import torch


INPUT_IDS = "input_ids"


def tokenize_documents(values: list, column: str, tokenizer, eos_token_id: int | None) -> dict[str, list]:
    """Token ids of a batch of documents (raw text, or ids when ``column`` is ``input_ids``), each followed
    by EOS unless it already ends with it; their lengths, their tokens before that EOS (``content``) and their
    smallest and largest ids."""
    ids = [list(v) for v in values] if column == INPUT_IDS else tokenizer(list(values))[INPUT_IDS]
    content = [len(v) for v in ids]
    if eos_token_id is not None:
        ids = [v + [eos_token_id] if not v or v[-1] != eos_token_id else v for v in ids]
    return {
        INPUT_IDS: ids,
        "length": [len(v) for v in ids],
        "content": content,
        "min_id": [min(v, default=0) for v in ids],
        "max_id": [max(v, default=0) for v in ids],
    }


def check_token_ids(min_ids, max_ids, vocab_size: int | None, where: str) -> None:
    """Token ids must index the model's embeddings: an id outside [0, vocab_size) is an IndexError inside torch
    (a device assert on CUDA) at train time. ``min_ids``/``max_ids``: per document."""
    if vocab_size is None:
        return
    bad = np.flatnonzero((np.asarray(min_ids) < 0) | (np.asarray(max_ids) >= vocab_size))
    if bad.size:
        row = int(bad[0])
        value = min_ids[row] if min_ids[row] < 0 else max_ids[row]
        raise ValueError(f"{where.format(row=row)} holds the token id {value}, outside the model's vocabulary [0, {vocab_size}).")


STREAM_SCAN_ROWS = 10_000
"""Rows of an ``IterableDataset`` read before training, at most, to find one non-empty document."""


class PtxStream:
    """Packed, sharded, cycling, resumable stream of pretraining batches.

    **Packing.** Each document is tokenized (or taken as is from an ``input_ids`` column) and followed by
    the tokenizer's EOS token (unless it already ends with one); the documents are concatenated into one
    token stream that is cut into blocks of ``block_size`` tokens. Blocks span document boundaries (no padding, no
    cross-document masking, as in pretraining); the tokens left over at the end of an epoch are dropped.
    Every token of a block is a label.

    **Epochs and shuffling.** Epoch ``e`` visits the documents in a fresh deterministic order:
    ``numpy.random.default_rng(seed + e).permutation`` for a ``datasets.Dataset`` or a list, and
    ``IterableDataset.shuffle(seed=seed + e, buffer_size=shuffle_buffer_size)`` for an ``IterableDataset``.
    When an epoch has fewer blocks left than one global batch, the stream moves on to the next epoch.

    **Sharding.** The ``num_processes`` streams advance in lockstep through the same block sequence: global
    batch ``g`` is the ``batch_size * num_processes`` consecutive blocks that start at block
    ``g * batch_size * num_processes``, and process ``p`` takes rows ``p * batch_size`` to
    ``(p + 1) * batch_size`` of it. So the processes see different blocks, and together they see exactly
    what one process with ``batch_size * num_processes`` rows would see. Pass the whole dataset to every
    process, not a per-process split.

    **Resume.** The state is ``{"epoch", "block"}`` (blocks of the epoch consumed by all processes together),
    identical on every process, JSON-serializable. After ``load_state_dict`` the next batch is the one that
    would have come. A map-style dataset jumps there directly; an ``IterableDataset`` re-reads the consumed
    part of the current epoch. Resuming with another number of processes continues from the same block.

    Args:
        dataset: a ``datasets.Dataset``, a ``datasets.IterableDataset``, a list of strings, or a list of
            dicts; with a ``text_field`` column of raw text or an ``input_ids`` column of token ids (used
            when present).
        tokenizer: tokenizer for the raw text; its ``eos_token_id`` separates documents.
        block_size: tokens per sequence.
        batch_size: sequences per batch on this process.
        text_field: name of the raw-text column.
        process_index, num_processes: this process and the number of processes sharing the stream.
        seed: base seed of the per-epoch shuffles.
        shuffle_buffer_size: shuffle buffer of an ``IterableDataset``.
        vocab_size: if given, every token id must be in ``[0, vocab_size)`` (checked before training for a
            ``datasets.Dataset`` or a list, as blocks are read for an ``IterableDataset``).

    Example:
        >>> stream = PtxStream(["some text", "more text"], tokenizer, block_size=4, batch_size=2)
        >>> stream.next_batch()["input_ids"].shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        block_size: int,
        batch_size: int,
        text_field: str = "text",
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        vocab_size: int | None = None,
    ):
        import datasets

        if block_size < 2:
            raise ValueError(f"ptx block_size must be >= 2, got {block_size}.")
        if batch_size < 1:
            raise ValueError(f"ptx batch_size must be >= 1, got {batch_size}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.text_field = text_field
        self.process_index = process_index
        self.num_processes = num_processes
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.vocab_size = vocab_size
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self._epoch = 0
        self._block = 0
        self._blocks_iter: Iterator[list[int]] | None = None  # IterableDataset only
        self._order_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # map-style: (epoch, order, ends)

        if isinstance(dataset, (list, tuple)):
            if not dataset:
                raise ValueError("The pretraining dataset is empty.")
            rows = [{text_field: row} if isinstance(row, str) else row for row in dataset]
            if not all(isinstance(row, dict) for row in rows):
                raise TypeError("A list pretraining dataset must hold strings or dicts.")
            dataset = datasets.Dataset.from_list(rows)
        if isinstance(dataset, datasets.IterableDataset):
            first = None if dataset.column_names else next(iter(dataset), None)
            if not dataset.column_names and first is None:
                raise ValueError("The pretraining dataset is empty.")
            self._column = self._pick_column(dataset.column_names or list(first))
            self._iterable = dataset
            self._documents = None
            self.blocks_per_epoch = None
            self._check_stream_has_content()
        elif isinstance(dataset, datasets.Dataset):
            if len(dataset) == 0:
                raise ValueError("The pretraining dataset is empty.")
            self._column = self._pick_column(dataset.column_names)
            self._iterable = None
            self._documents = dataset.map(  # fingerprinted by its inputs alone, so processes share the cache
                lambda rows, column, tokenizer, eos: tokenize_documents(rows[column], column, tokenizer, eos),
                fn_kwargs={"column": self._column, "tokenizer": tokenizer, "eos": self.eos_token_id},
                batched=True,
                remove_columns=dataset.column_names,
                desc="Tokenizing and packing the ptx dataset",
            )
            self._lengths = np.asarray(self._documents["length"], dtype=np.int64)
            if not any(self._documents["content"]):
                raise ValueError(
                    f"Every document of the pretraining dataset is empty (column {self._column!r}): the ptx NLL would "
                    "train on end-of-sequence tokens only."
                )
            where = f"The pretraining dataset, row {{row}}, column {self._column!r},"
            check_token_ids(self._documents["min_id"], self._documents["max_id"], vocab_size, where)
            self.blocks_per_epoch = int(self._lengths.sum()) // block_size
            if self.blocks_per_epoch < self.global_batch_blocks:
                raise ValueError(
                    f"The pretraining dataset has {int(self._lengths.sum())} tokens, i.e. {self.blocks_per_epoch} "
                    f"blocks of ptx block_size={block_size}, but one batch needs batch_size * num_processes = "
                    f"{self.global_batch_blocks} blocks. Use more data, or a smaller ptx_block_size/ptx_batch_size."
                )
        else:
            raise TypeError(
                "pretrain_dataset must be a datasets.Dataset, a datasets.IterableDataset or a list of strings, "
                f"got {type(dataset).__name__}."
            )

    def _check_stream_has_content(self) -> None:
        """A stream cannot be counted: read it until a document with content, at most ``STREAM_SCAN_ROWS`` rows."""
        scanned = 0
        for rows in self._iterable.iter(batch_size=64):
            documents = tokenize_documents(rows[self._column], self._column, self.tokenizer, self.eos_token_id)
            if any(documents["content"]):
                return
            scanned += len(documents["content"])
            if scanned >= STREAM_SCAN_ROWS:
                break
        where = f"the first {scanned} documents" if scanned >= STREAM_SCAN_ROWS else f"all {scanned} documents"
        raise ValueError(
            f"Every document of the pretraining dataset is empty (column {self._column!r}; {where} of the stream): the "
            "ptx NLL would train on end-of-sequence tokens only."
        )

    @property
    def global_batch_blocks(self) -> int:
        """Blocks consumed by all processes together per batch."""
        return self.batch_size * self.num_processes

    def _pick_column(self, columns: list[str]) -> str:
        if INPUT_IDS in columns:
            return INPUT_IDS
        if self.text_field in columns:
            return self.text_field
        raise ValueError(
            f"The pretraining dataset has neither the text column {self.text_field!r} (ptx_text_field) nor an "
            f"{INPUT_IDS!r} column. Its columns are: {', '.join(map(repr, columns)) or 'none'}."
        )

    # Map-style datasets: random access to any block of any epoch.

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of ``epoch`` and the end offset of each document in the packed stream."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self._lengths))
            self._order_cache = (epoch, order, np.cumsum(self._lengths[order]))
        return self._order_cache[1], self._order_cache[2]

    def _read_blocks(self, epoch: int, first_block: int, count: int) -> list[list[int]]:
        order, ends = self._epoch_layout(epoch)
        start, stop = first_block * self.block_size, (first_block + count) * self.block_size
        first_doc = int(np.searchsorted(ends, start, side="right"))
        last_doc = int(np.searchsorted(ends, stop - 1, side="right"))
        docs = self._documents[order[first_doc : last_doc + 1].tolist()][INPUT_IDS]
        offset = start - (int(ends[first_doc]) - int(self._lengths[order[first_doc]]))
        tokens = [token for doc in docs for token in doc][offset : offset + count * self.block_size]
        return [tokens[i * self.block_size : (i + 1) * self.block_size] for i in range(count)]

    # Iterable datasets: one pass per epoch, skipping what was consumed before a resume.

    def _iterate_blocks(self, epoch: int, first_block: int) -> Iterator[list[int]]:
        dataset = self._iterable.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer_size)
        skip, buffer = first_block * self.block_size, []
        for rows in dataset.iter(batch_size=64):
            documents = tokenize_documents(rows[self._column], self._column, self.tokenizer, self.eos_token_id)
            check_token_ids(documents["min_id"], documents["max_id"], self.vocab_size, f"The pretraining dataset, column {self._column!r},")
            for ids in documents[INPUT_IDS]:
                if skip:
                    dropped = min(skip, len(ids))
                    ids, skip = ids[dropped:], skip - dropped
                buffer.extend(ids)
                while len(buffer) >= self.block_size:
                    yield buffer[: self.block_size]
                    del buffer[: self.block_size]

    def _next_global_batch(self) -> list[list[int]]:
        """The next ``global_batch_blocks`` blocks (all processes), moving to a new epoch when needed."""
        need = self.global_batch_blocks
        if self._iterable is None:
            if self._block + need > self.blocks_per_epoch:
                self._epoch, self._block = self._epoch + 1, 0
            blocks = self._read_blocks(self._epoch, self._block + self.process_index * self.batch_size, self.batch_size)
        else:
            if self._blocks_iter is None:
                self._blocks_iter = self._iterate_blocks(self._epoch, self._block)
            blocks = list(islice(self._blocks_iter, need))
            if len(blocks) < need:
                self._epoch, self._block = self._epoch + 1, 0
                self._blocks_iter = self._iterate_blocks(self._epoch, 0)
                blocks = list(islice(self._blocks_iter, need))
                if len(blocks) < need:
                    raise ValueError(
                        f"An epoch of the pretraining dataset yields {len(blocks)} blocks of ptx block_size="
                        f"{self.block_size}, but one batch needs batch_size * num_processes = {need} blocks."
                    )
            start = self.process_index * self.batch_size
            blocks = blocks[start : start + self.batch_size]
        self._block += need
        return blocks

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This process's next batch: ``input_ids``, ``attention_mask`` and ``labels``, each
        ``[batch_size, block_size]`` on the CPU."""
        input_ids = torch.tensor(self._next_global_batch(), dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "block": self._block, "block_size": self.block_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("block_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                warnings.warn(
                    f"The saved ptx stream had {key}={state[key]}, this one has {getattr(self, key)}: resuming at "
                    "the same epoch and block, but the batches will differ from the interrupted run's.",
                    stacklevel=2,
                )
        self._epoch, self._block = int(state["epoch"]), int(state["block"])
        self._blocks_iter = None
