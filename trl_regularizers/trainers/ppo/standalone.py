"""``StandalonePPOAdapter``: the methods the regularized PPO loop calls (sampling, the policy, reference, value and
reward forwards, truncation), on the package's own setup (``setup.py``); any TRL release."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers import GenerationConfig

from trl_regularizers.trainers.adapters.base import TrainerAdapter
from trl_regularizers.trainers.ppo.checkpoint import PPOCheckpoints
from trl_regularizers.trainers.ppo.policy import (
    first_true_index,
    forward_padded,
    last_token_index,
    padded_inputs,
    sample_responses,
    score_head,
    token_logps,
    truncate_after,
)
from trl_regularizers.trainers.ppo.setup import StandalonePPOTrainer


class StandalonePPOAdapter(PPOCheckpoints, TrainerAdapter, StandalonePPOTrainer):
    """The PPO stages' model calls on the package's own setup."""

    TRL_CLASSES = ("Trainer", "PPOSetup")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_metric_lists()

    token_logps = staticmethod(token_logps)

    def generation_config(self, temperature: float) -> GenerationConfig:
        """Pure sampling at ``temperature`` (+1e-7, so 0 stays valid): no top-k, no top-p; returns the processed scores."""
        return GenerationConfig(max_new_tokens=self.args.response_length, temperature=temperature + 1e-7, top_k=0.0, top_p=1.0, do_sample=True,
                                return_dict_in_generate=True, output_scores=True)

    def generate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ``query_responses`` [B, Tq + T] and the sampling logits [B, T, V] (already divided by the temperature)."""
        policy = self.accelerator.unwrap_model(self.model).policy
        return sample_responses(policy, queries, self.args.local_rollout_forward_batch_size, self.processing_class.pad_token_id,
                                self.generation_config(self.args.temperature))

    @contextmanager
    def reference_context(self):
        """Inside: the policy computes the reference (PEFT: adapter disabled, or the named reference adapter)."""
        policy = self.accelerator.unwrap_model(self.model).policy
        with policy.disable_adapter() if self.is_peft_model and not self.ref_adapter_name else nullcontext():
            if self.ref_adapter_name:
                policy.set_adapter(self.ref_adapter_name)
            try:
                yield
            finally:
                if self.ref_adapter_name:
                    policy.set_adapter(self.model_adapter_name or "default")

    def reference_logits(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Reference-policy logits [B, T, V] at the response positions (reference model, or PEFT adapter disabled)."""
        pad = self.processing_class.pad_token_id
        if self.ref_model is None:
            with self.reference_context():
                output = forward_padded(self.accelerator.unwrap_model(self.model).policy, query_responses, pad)
        else:
            output = forward_padded(self.ref_model, query_responses, pad)
        return output.logits[:, context_length - 1 : -1]

    def value_estimates(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Values [B, T] at the response positions (the value of the state before each response token)."""
        value_model = self.accelerator.unwrap_model(self.model).value_model
        return score_head(value_model, query_responses, self.processing_class.pad_token_id)[:, context_length - 1 : -1].squeeze(-1)

    def reward_scores(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Reward-model score [B] on each sequence's last response token."""
        pad = self.processing_class.pad_token_id
        scores = score_head(self.reward_model, query_responses, pad)
        return scores[torch.arange(scores.shape[0], device=scores.device), last_token_index(query_responses, pad, context_length)].squeeze(-1)

    def truncated(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses cut after ``stop_token`` (pad after it) and the index of each one's last token."""
        pad = self.processing_class.pad_token_id
        responses = responses if self.stop_token_id is None else truncate_after(responses, self.stop_token_id, pad)
        return responses, first_true_index(responses == pad) - 1

    def policy_forward(self, query_responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits and values [B, T'] through the accelerate wrapper (DDP syncs both)."""
        output, values = self.model(**padded_inputs(query_responses, self.processing_class.pad_token_id), return_dict=True, output_hidden_states=True)
        return output.logits, values

    def generate_completions(self, sampling: bool = False):
        """Print sample completions of the eval prompts (near-greedy, temperature 0.01) with their scores; one batch
        when ``sampling``."""
        if self.eval_dataloader is None:
            return
        pad = self.processing_class.pad_token_id
        policy = self.accelerator.unwrap_model(self.model).policy
        rows = []
        with torch.no_grad():
            for batch in self.eval_dataloader:
                query = batch["input_ids"]
                query_response, _ = sample_responses(policy, query, query.shape[0], pad, self.generation_config(0.01))
                response = query_response[:, query.shape[1]:]
                if self.stop_token_id is not None:
                    response = truncate_after(response, self.stop_token_id, pad)
                sequences = torch.cat((query, response), 1)
                scores = score_head(self.reward_model, sequences, pad)[torch.arange(len(query)), last_token_index(sequences, pad, query.shape[1])].squeeze(-1)
                queries = self.processing_class.batch_decode(query, skip_special_tokens=True)
                responses = self.processing_class.batch_decode(response)
                rows += list(zip(queries, responses, scores.float().tolist()))
                if sampling:
                    break
        if self.accelerator.is_main_process:
            for query, response, score in rows[:5]:
                print(f"[sample] score={score:.4f}\n  query: {query!r}\n  response: {response!r}")
