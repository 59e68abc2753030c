"""PPO's models and tensors: the policy + value module and the helpers for left-padded prompts, sampling, scoring and
truncation (written from the PPO algorithm on transformers and torch APIs; no TRL code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

INVALID_LOGPROB = 1.0
"""Log-prob written at positions after a response's last token (masked out of every loss and metric)."""


class PolicyAndValue(torch.nn.Module):
    """Policy LM and value model as one module, so one ``accelerator.prepare`` wraps both (one optimizer, one DDP).

    ``forward(**inputs)`` returns ``(policy output, values [B, T, 1])``: the values are the value model's score
    head applied to its backbone's last hidden state at every position.
    """

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = policy.config

    def forward(self, **inputs):
        backbone = getattr(self.value_model, self.value_model.base_model_prefix)
        values = self.value_model.score(backbone(**inputs).hidden_states[-1])
        return self.policy(**inputs), values


# ---- tensor helpers (no grad bookkeeping of their own)

def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row of ``bools`` [..., T], or T when there is none."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device)
    return torch.where(bools, positions, length).min(-1).values


def truncate_after(responses: torch.Tensor, stop_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Responses with every token after the first ``stop_token_id`` replaced by ``pad_token_id`` (the stop token stays)."""
    stop = first_true_index(responses == stop_token_id)
    positions = torch.arange(responses.shape[1], device=responses.device)
    return responses.masked_fill(positions > stop[:, None], pad_token_id)


def padded_inputs(query_responses: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for left-padded (and right-padded) sequences: pad ids -> 0, attention mask, positions counted
    from each sequence's first real token."""
    mask = query_responses != pad_token_id
    return dict(input_ids=query_responses.masked_fill(~mask, 0), attention_mask=mask, position_ids=mask.cumsum(1) - mask.long())


def forward_padded(model: torch.nn.Module, query_responses: torch.Tensor, pad_token_id: int):
    return model(**padded_inputs(query_responses, pad_token_id), return_dict=True, output_hidden_states=True)


def score_head(model: torch.nn.Module, query_responses: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per-position scores [B, T, 1] of a sequence-classification model: its ``score`` head on the backbone's last
    hidden state."""
    backbone = getattr(model, model.base_model_prefix)
    output = backbone(**padded_inputs(query_responses, pad_token_id), return_dict=True, output_hidden_states=True, use_cache=False)
    return model.score(output.hidden_states[-1])


def last_token_index(query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> torch.Tensor:
    """Index of each sequence's last response token: the one before the first pad of the response part (the last
    query token when the response starts with pad; the last position when it has none)."""
    return first_true_index(query_responses[:, context_length:] == pad_token_id) - 1 + context_length


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] = z_token - logsumexp(z), one row at a time to bound peak memory; half
    precision goes through log_softmax (logsumexp is unstable there)."""
    if logits.dtype in (torch.float32, torch.float64):
        normalizer = torch.stack([torch.logsumexp(row, -1) for row in logits])
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - normalizer
    return torch.stack([row.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) for row, ids in zip(logits, tokens)])


@torch.no_grad()
def sample_responses(policy, queries: torch.Tensor, chunk: int, pad_token_id: int, generation_config: GenerationConfig):
    """``model.generate`` on chunks of ``chunk`` left-padded queries. Returns ``query_responses`` [B, Tq + T]
    (responses right-padded with pad to the longest chunk) and the processed sampling scores [B, T, V] (zeros where
    a chunk stopped early)."""
    context_length = queries.shape[1]
    sequences, scores = [], []
    for start in range(0, queries.shape[0], chunk):
        query = queries[start : start + chunk]
        inputs = padded_inputs(query, pad_token_id)
        output = policy.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=generation_config)
        sequences.append(torch.cat((query, output.sequences[:, context_length:]), 1))
        scores.append(torch.stack(output.scores, 1))
    length = max(s.shape[1] for s in sequences)
    sequences = [F.pad(s, (0, length - s.shape[1]), value=pad_token_id) for s in sequences]
    steps = length - context_length
    scores = [F.pad(s, (0, 0, 0, steps - s.shape[1]), value=0.0) for s in scores]
    return torch.cat(sequences), torch.cat(scores)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def exact_quotient(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what}: {a} is not a multiple of {b}.")
    return a // b


