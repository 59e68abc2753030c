"""Adapter of TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` (docs/trl_internals.md §6; removed in TRL 1.13).

The parent's ``__init__`` is reused as is (policy + value wrapper, reference, reward model, dataloader,
accelerator, optimizer); ``train()`` is the regularized trainer's own. This module holds everything that names
TRL 1.12's PPO internals: generation, the policy/reference/value/reward forwards, response truncation, and the
checkpoint layout. Line numbers are ``trl/experimental/ppo/ppo_trainer.py`` of TRL 1.12.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import safetensors.torch
import torch
import trl
from packaging.version import Version

if Version(trl.__version__).release >= (1, 13):
    raise ImportError(
        f"RegularizedPPOTrainer needs TRL < 1.13, but TRL {trl.__version__} is installed: TRL removed "
        "trl.experimental.ppo in 1.13 (it held PPOTrainer and PPOConfig). Install the PPO extra, "
        "`pip install 'trl-regularizers[ppo]'`, which pins trl>=1.12,<1.13. "
        "The other trl_regularizers trainers work with the latest TRL."
    )

from transformers import GenerationConfig  # noqa: E402
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo.ppo_trainer import INVALID_LOGPROB, OnlineTrainerState, batch_generation, forward, truncate_response  # noqa: E402
from trl.experimental.utils import first_true_indices, get_reward  # noqa: E402
from trl.models.utils import unwrap_model_for_generation  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from trl_regularizers.trainers.adapters.base import TrainerAdapter  # noqa: E402

VALUE_MODEL_DIR = "value_model"
__all__ = ["INVALID_LOGPROB", "PPOAdapter", "PPOConfig"]


class PPOAdapter(TrainerAdapter, PPOTrainer):
    """TRL 1.12's PPO pieces as methods; ``_metrics`` so the shared metric helpers work (PPO 1.12 has none)."""

    def __init__(self, args, *rest, **kwargs):
        # The parent accepts only kl_estimator in {k1, k3} (L404-409); the regularized loop reads the real one.
        estimator, args.kl_estimator = args.kl_estimator, "k1"
        try:
            super().__init__(args, *rest, **kwargs)
        finally:
            args.kl_estimator = estimator
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def scale_like_parent_loss(self, term: torch.Tensor) -> torch.Tensor:
        return term  # the PPO update scales the summed loss itself before accelerator.backward

    def language_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model).policy  # the LM without the value head

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

    def begin_training(self) -> None:
        """Trainer state and callbacks as the parent's ``train()`` sets them up (L642-667)."""
        args, state = self.args, self.state
        state.global_step, state.episode = 0, 0
        state.max_steps = args.num_total_batches
        state.num_train_epochs = args.total_episodes / self.train_dataset_len
        for name in ("logging_steps", "eval_steps", "save_steps"):  # fractions are relative to max_steps
            value = getattr(args, name)
            if value is not None:
                setattr(state, name, math.ceil(state.max_steps * value) if value < 1 else value)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped = self.model

    def save_checkpoint(self) -> None:
        self._save_checkpoint(self.model, trial=None)

    def _save_checkpoint(self, model, trial):
        """Parent checkpoint (policy, optimizer, scheduler, RNG, state) + regularizer state + value model."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.accelerator.unwrap_model(self.model).value_model.save_pretrained(os.path.join(folder, VALUE_MODEL_DIR))

    def restore_checkpoint(self, checkpoint: str, batches) -> None:
        """Restore weights, optimizer, scheduler, step/episode, the position of ``batches`` (an endless iterator
        over the dataloader), RNG and regularizer state."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("Resuming RegularizedPPOTrainer is supported with DDP or one process, not DeepSpeed/FSDP.")
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._load_weights(checkpoint, unwrapped.policy)
        self._load_weights(os.path.join(checkpoint, VALUE_MODEL_DIR), unwrapped.value_model)
        load = lambda name: torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)  # noqa: E731
        self.optimizer.load_state_dict(load(OPTIMIZER_NAME))
        self.lr_scheduler.load_state_dict(load(SCHEDULER_NAME))
        saved = OnlineTrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self.state.global_step, self.state.episode, self.state.log_history = saved.global_step, saved.episode, saved.log_history
        for _ in range(saved.global_step):  # the sampler has its own generator: replaying gives the same order
            next(batches)
        self._load_rng_state(checkpoint)  # after the replay, which draws from the global RNG
        self.regularizer_state.load(checkpoint)

    def _load_weights(self, folder: str, module: torch.nn.Module) -> None:
        """Load ``save_pretrained`` weights into ``module`` in place, so the optimizer keeps its parameters."""
        if hasattr(module, "peft_config"):  # PEFT: the Trainer loads the saved adapter
            return self._load_from_checkpoint(folder, model=module)
        index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
        files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else [SAFE_WEIGHTS_NAME]
        state = {k: v for name in files for k, v in safetensors.torch.load_file(os.path.join(folder, name)).items()}
        result = module.load_state_dict(state, strict=False)
        aliases = defaultdict(set)  # tied parameters are saved once, under one of their names
        for name, parameter in module.named_parameters(remove_duplicate=False):
            aliases[id(parameter)].add(name)
        tied = {name for names in aliases.values() if names & state.keys() for name in names}
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise RuntimeError(f"Checkpoint {folder} does not match {type(module).__name__}: missing "
                               f"{sorted(set(result.missing_keys) - tied)}, unexpected {result.unexpected_keys}.")
