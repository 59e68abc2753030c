"""Adapter of TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` (docs/trl_internals.md §6; removed in TRL 1.13).

``RegularizedPPOTrainer`` uses it on TRL 1.12 only, so that it stays a subclass of the stock trainer there; on
TRL >= 1.13 it stands on the package's own setup (``trainers/ppo/standalone.py``) instead. The parent's ``__init__``
is reused as is (policy + value wrapper, reference, reward model, dataloader, accelerator, optimizer); ``train()``
is the regularized loop's (``trainers/ppo/loop.py``). This module holds everything that names TRL 1.12's PPO
internals: generation, the policy/reference/value/reward forwards, response truncation. Line numbers are
``trl/experimental/ppo/ppo_trainer.py`` of TRL 1.12.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import trl
from packaging.version import Version

if Version(trl.__version__).release >= (1, 13):
    raise ImportError(
        f"trl_regularizers.trainers.adapters.ppo adapts TRL 1.12's trl.experimental.ppo, which TRL removed in 1.13 "
        f"(TRL {trl.__version__} is installed). RegularizedPPOTrainer does not need it there: it uses "
        "trl_regularizers.trainers.ppo.standalone. For stock TRL 1.12 PPO: pip install 'trl-regularizers[ppo]'."
    )

from transformers import GenerationConfig  # noqa: E402
from trl.experimental.ppo import PPOTrainer  # noqa: E402
from trl.experimental.ppo.ppo_trainer import batch_generation, forward, truncate_response  # noqa: E402
from trl.experimental.utils import first_true_indices, get_reward  # noqa: E402
from trl.models.utils import unwrap_model_for_generation  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from trl_regularizers.trainers.adapters.base import TrainerAdapter  # noqa: E402
from trl_regularizers.trainers.ppo.checkpoint import PPOCheckpoints  # noqa: E402


class PPOAdapter(PPOCheckpoints, TrainerAdapter, PPOTrainer):
    """TRL 1.12's PPO pieces as the methods the regularized loop calls."""

    TRL_CLASSES = ("Trainer", "PPOCheckpoints", "PPOTrainer")

    def __init__(self, args, *rest, **kwargs):
        with self._estimator_accepted_by_trl(args):
            super().__init__(args, *rest, **kwargs)
        self.init_metric_lists()  # PPO 1.12 never calls Trainer.__init__, so it has no _metrics (L349-568)

    @staticmethod
    @contextmanager
    def _estimator_accepted_by_trl(args):
        """The parent's ``__init__`` accepts only ``kl_estimator`` in {k1, k3} (L404-409) and reads it nowhere else the
        regularized loop uses: hold it at ``"k1"`` while that ``__init__`` runs."""
        estimator, args.kl_estimator = args.kl_estimator, "k1"
        try:
            yield
        finally:
            args.kl_estimator = estimator

    def generate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ``query_responses`` [B, Tq + T] and the sampling logits [B, T, V] at the response positions (L682-696)."""
        args = self.args
        generation_kwargs = dict(max_new_tokens=args.response_length, temperature=args.temperature + 1e-7, top_k=0.0, top_p=1.0, do_sample=True)
        with unwrap_model_for_generation(self.model, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation,
                                         generation_kwargs=generation_kwargs) as unwrapped:
            return batch_generation(unwrapped.policy, queries, args.local_rollout_forward_batch_size,
                                    self.processing_class.pad_token_id, GenerationConfig(**generation_kwargs))

    def reference_logits(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Reference-policy logits [B, T, V] at the response positions (reference model, or PEFT adapter disabled; L707-716)."""
        pad = self.processing_class.pad_token_id
        if self.ref_model is None:
            with self.null_ref_context():
                output = forward(self.model.policy, query_responses, pad)
        else:
            output = forward(self.ref_model, query_responses, pad)
        return output.logits[:, context_length - 1 : -1]

    def value_estimates(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Values [B, T] at the response positions (L728-732)."""
        value_model = self.accelerator.unwrap_model(self.model).value_model
        value = get_reward(value_model, query_responses, self.processing_class.pad_token_id, context_length)[0]
        return value[:, context_length - 1 : -1].squeeze(-1)

    def reward_scores(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Reward-model score [B] of each sequence (L733-735)."""
        return get_reward(self.reward_model, query_responses, self.processing_class.pad_token_id, context_length)[1]

    def truncated(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses cut after ``stop_token`` (pad after it) and the index of each one's last token (L718-727)."""
        pad = self.processing_class.pad_token_id
        responses = responses if self.stop_token_id is None else truncate_response(self.stop_token_id, pad, responses)
        return responses, first_true_indices(responses == pad) - 1

    def policy_forward(self, query_responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits and values [B, T'] of the wrapped model, through the accelerate wrapper (L820)."""
        output, values = forward(self.model, query_responses, self.processing_class.pad_token_id)
        return output.logits, values

    @staticmethod
    def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return selective_log_softmax(logits, tokens)
