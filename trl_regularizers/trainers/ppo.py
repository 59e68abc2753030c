"""PPO with KL options, adaptive KL control and PPO-ptx, on TRL 1.12's ``trl.experimental.ppo`` (the ``[ppo]`` extra).

``RegularizedPPOTrainer`` reuses the parent's constructor (policy + value wrapper, reference, reward model,
dataloader, accelerator, optimizer) and replaces ``train()`` with a loop written from the PPO algorithm
(Ziegler et al. 2019; Ouyang et al. 2022 for ptx), one overridable method per stage:

    rollout -> score -> compute_kl -> compute_rewards -> compute_advantages -> ppo_update (ppo_loss + extra_loss)
    -> log_update -> end_update (scheduler, callbacks, checkpoint)

With ``kl_estimator="k1"``, a fixed ``kl_coef`` and ``ptx_coef=0`` it reproduces stock ``PPOTrainer`` numerically.
Two stock quirks are fixed (see docs/ppo.md): one optimizer step per mini-batch (stock steps once per
``gradient_accumulation_steps`` micro-batches, whatever ``num_mini_batches`` is, and on every micro-batch of
the update that ends a pass over the dataloader), and ``train(resume_from_checkpoint=...)`` resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo.ppo_trainer import (  # noqa: E402
    INVALID_LOGPROB,
    OnlineTrainerState,
    batch_generation,
    forward,
    masked_mean,
    masked_whiten,
    truncate_response,
)
from trl.experimental.utils import first_true_indices, get_reward  # noqa: E402
from trl.models.utils import unwrap_model_for_generation  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from trl_regularizers.configs import KLArguments, PtxArguments, _at_least, _choice  # noqa: E402
from trl_regularizers.core.full_kl import full_vocab_kl  # noqa: E402
from trl_regularizers.core.kl import FULL_VOCAB_ESTIMATOR, kl_estimator_names, per_token_kl  # noqa: E402
from trl_regularizers.core.control import make_kl_controller  # noqa: E402
from trl_regularizers.core.losses import ptx_nll  # noqa: E402
from trl_regularizers.ptx import PtxStream  # noqa: E402
from trl_regularizers.trainers.common import CheckpointedStateMixin, check_finite, log_metric  # noqa: E402

VALUE_MODEL_DIR = "value_model"


@dataclass
class RegularizedPPOConfig(PtxArguments, KLArguments, PPOConfig):
    r"""
    [`~trl.experimental.ppo.PPOConfig`] plus a choice of KL estimator, direction, clamp and adaptive control
    ([`KLArguments`], coefficient = `kl_coef`), and PPO-ptx ([`PtxArguments`]).

    The KL penalty is per token in the reward, as PPO does: `r_t = -kl_coef * KL_t`, plus the score on the
    last token. Defaults (`k1`, reverse, fixed `kl_coef`, no ptx) reproduce stock PPO.

    kl_estimator (`str`, *optional*, defaults to `"k1"`):
        `"k1"`, `"k2"`, `"k3"`, `"abs"` (per sampled token) or `"full"` (exact KL over the vocabulary at
        each position, from the rollout's policy and reference logits, computed in chunks).
    kl_placement (`str`, *optional*, defaults to `"reward"`):
        Only `"reward"`: PPO's KL penalty is part of the per-token reward.
    kl_target (`float` or `None`, *optional*, defaults to `None`):
        If set, `kl_coef` adapts after every PPO update toward this KL per sequence (summed over tokens)
        ([Ziegler et al. 2019](https://huggingface.co/papers/1909.08593)). Its state is saved in checkpoints.
    kl_horizon (`float`, *optional*, defaults to `10000`):
        Horizon of the adaptive controller in episodes (sequences), as in Ziegler et al.: each update moves
        the coefficient by `clip(KL / kl_target - 1, ±0.2) * batch_size / kl_horizon`.
    """

    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator.", "choices": list(kl_estimator_names())})
    kl_placement: str = field(default="reward", metadata={"help": "Where the KL penalty goes (PPO: reward only).", "choices": ["reward"]})

    def __post_init__(self):
        super().__post_init__()
        _choice("kl_placement", self.kl_placement, ("reward",))
        _at_least("kl_coef", self.kl_coef, 0.0)
        if self.kl_target is not None and not self.kl_coef > 0:
            raise ValueError(f"kl_target={self.kl_target} needs kl_coef > 0 to adapt from, got kl_coef={self.kl_coef}.")
        self._validate_kl(self.kl_coef)
        self._validate_ptx()


class RegularizedPPOTrainer(CheckpointedStateMixin, PPOTrainer):
    """Drop-in [`~trl.experimental.ppo.PPOTrainer`] with KL options, adaptive KL control and PPO-ptx.

    Takes the parent's arguments plus `pretrain_dataset=` (text or `input_ids` rows) for `ptx_coef > 0`.
    `train(resume_from_checkpoint=...)` restores policy, value model, optimizer, scheduler, step, RNG, KL
    controller and ptx stream (it replaces `CheckpointedStateMixin.train`, whose `_save_checkpoint` and
    `_load_regularizer_state` it uses). Each stage below is a method to override.
    """

    def __init__(self, args: RegularizedPPOConfig, processing_class, model, ref_model, reward_model, train_dataset,
                 value_model, data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
                 peft_config=None, *, pretrain_dataset=None):
        if not isinstance(args, RegularizedPPOConfig):
            raise TypeError(f"args must be a RegularizedPPOConfig, got {type(args).__name__}.")
        if args.ptx_coef > 0 and pretrain_dataset is None:
            raise ValueError(f"ptx_coef={args.ptx_coef} needs pretrain_dataset= (a dataset with a {args.ptx_text_field!r} column).")
        estimator, args.kl_estimator = args.kl_estimator, "k1"  # the parent accepts only k1/k3; our loop reads ours
        try:
            super().__init__(args, processing_class, model, ref_model, reward_model, train_dataset, value_model,
                             data_collator, eval_dataset, optimizers, callbacks, peft_config)
        finally:
            args.kl_estimator = estimator
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.kl_controller = make_kl_controller(args.kl_coef, args.kl_target, args.kl_horizon)
        self.ptx_stream = self._make_ptx_stream(pretrain_dataset) if args.ptx_coef > 0 else None
        self._regularizer_state = {"kl_controller": self.kl_controller}
        if self.ptx_stream is not None:
            self._regularizer_state["ptx"] = self.ptx_stream

    def _make_ptx_stream(self, dataset) -> PtxStream:
        with self.accelerator.main_process_first():  # a cached Dataset.map is written once
            return PtxStream(dataset, self.processing_class, self.args.ptx_block_size,
                             self.args.ptx_batch_size or self.args.per_device_train_batch_size,
                             text_field=self.args.ptx_text_field, process_index=self.accelerator.process_index,
                             num_processes=self.accelerator.num_processes, seed=self.args.seed)

    # ------------------------------------------------------------------ loop
    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Run `num_total_batches` PPO updates, optionally continuing from a checkpoint of this trainer."""
        args = self.args
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        self._init_train_state()
        batches = self._repeat(self.dataloader)
        if checkpoint is not None:
            self._resume(checkpoint, batches)
        self.model.train()
        start_time = time.time()
        for update in range(self.state.global_step + 1, args.num_total_batches + 1):
            self.state.episode += args.batch_size
            queries = next(batches)["input_ids"].to(self.accelerator.device)
            with torch.no_grad():
                rollout = self.rollout(queries)
                self.score(rollout)
                rollout["kl"] = self.compute_kl(rollout)
                self.compute_rewards(rollout)
                self.compute_advantages(rollout)
            stats = self.ppo_update(rollout)
            self.log_update(rollout, stats, start_time)
            self.end_update(update)
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)

    @staticmethod
    def _repeat(dataloader):
        while True:
            yield from dataloader

    def _resolve_checkpoint(self, resume_from_checkpoint):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return resume_from_checkpoint or None

    def _init_train_state(self):
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

    def _resume(self, checkpoint: str, batches) -> None:
        """Restore weights, optimizer, scheduler, step/episode, data position, RNG and regularizer state."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._load_weights(checkpoint, unwrapped.policy)
        self._load_weights(os.path.join(checkpoint, VALUE_MODEL_DIR), unwrapped.value_model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("Resuming RegularizedPPOTrainer is supported with DDP or one process, not DeepSpeed/FSDP.")
        load = lambda name: torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)  # noqa: E731
        self.optimizer.load_state_dict(load(OPTIMIZER_NAME))
        self.lr_scheduler.load_state_dict(load(SCHEDULER_NAME))
        saved = OnlineTrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self.state.global_step, self.state.episode, self.state.log_history = saved.global_step, saved.episode, saved.log_history
        for _ in range(saved.global_step):  # the sampler has its own generator: skipping replays the same order
            next(batches)
        self._load_rng_state(checkpoint)
        self._load_regularizer_state(checkpoint)

    def _load_weights(self, folder: str, module: torch.nn.Module) -> None:
        """Load `save_pretrained` weights into `module` in place, so the optimizer keeps its parameters."""
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

    def _save_checkpoint(self, model, trial):
        """Parent checkpoint (policy, optimizer, scheduler, RNG, state) + regularizer state + value model."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.accelerator.unwrap_model(self.model).value_model.save_pretrained(os.path.join(folder, VALUE_MODEL_DIR))

    # ------------------------------------------------------------------ stages
    def rollout(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample responses; compute sampled-token log-probs, reference log-probs, values and masks."""
        args, pad = self.args, self.processing_class.pad_token_id
        context_length = queries.shape[1]
        temperature = args.temperature + 1e-7
        generation_kwargs = dict(max_new_tokens=args.response_length, temperature=temperature, top_k=0.0, top_p=1.0, do_sample=True)
        with unwrap_model_for_generation(self.model, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation,
                                         generation_kwargs=generation_kwargs) as unwrapped:
            query_responses, logits = batch_generation(unwrapped.policy, queries, args.local_rollout_forward_batch_size, pad,
                                                       GenerationConfig(**generation_kwargs))
        responses = query_responses[:, context_length:]
        unwrapped = self.accelerator.unwrap_model(self.model)
        chunks = defaultdict(list)
        for start in range(0, queries.shape[0], args.local_rollout_forward_batch_size):
            rows = slice(start, start + args.local_rollout_forward_batch_size)
            ref_logits = self.reference_logits(query_responses[rows], context_length) / temperature
            chunks["logprobs"].append(selective_log_softmax(logits[rows], responses[rows]))
            chunks["ref_logprobs"].append(selective_log_softmax(ref_logits, responses[rows]))
            if args.kl_estimator == FULL_VOCAB_ESTIMATOR:
                chunks["full_kl"].append(full_vocab_kl(logits[rows], ref_logits, direction=args.kl_direction))
            value = get_reward(unwrapped.value_model, query_responses[rows], pad, context_length)[0]
            chunks["values"].append(value[:, context_length - 1 : -1].squeeze(-1))
        rollout = {name: torch.cat(parts) for name, parts in chunks.items()}
        postprocessed = responses if self.stop_token_id is None else truncate_response(self.stop_token_id, pad, responses)
        sequence_lengths = first_true_indices(postprocessed == pad) - 1  # index of the last response token
        positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
        padding_mask = positions > sequence_lengths[:, None]  # after the last token
        padding_mask_p1 = positions > sequence_lengths[:, None] + 1  # values also cover one step past it
        rollout.update(queries=queries, query_responses=query_responses, responses=responses, postprocessed=postprocessed,
                       sequence_lengths=sequence_lengths, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)
        rollout["logprobs"] = rollout["logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
        rollout["ref_logprobs"] = rollout["ref_logprobs"].masked_fill(padding_mask, INVALID_LOGPROB)
        rollout["values"] = rollout["values"].masked_fill(padding_mask_p1, 0)
        return rollout

    def reference_logits(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """Reference-policy logits at the response positions (reference model, or PEFT adapter disabled)."""
        pad = self.processing_class.pad_token_id
        if self.ref_model is None:
            with self.null_ref_context():
                output = forward(self.model.policy, query_responses, pad)
        else:
            output = forward(self.ref_model, query_responses, pad)
        return output.logits[:, context_length - 1 : -1]

    def score(self, rollout: dict[str, torch.Tensor]) -> None:
        """Reward-model score of each truncated response, minus `missing_eos_penalty` if it has no EOS."""
        args, pad = self.args, self.processing_class.pad_token_id
        queries, postprocessed = rollout["queries"], rollout["postprocessed"]
        scores = []
        for start in range(0, queries.shape[0], args.local_rollout_forward_batch_size):
            rows = slice(start, start + args.local_rollout_forward_batch_size)
            query_response = torch.cat((queries[rows], postprocessed[rows]), 1)
            scores.append(get_reward(self.reward_model, query_response, pad, queries.shape[1])[1])
        scores = torch.cat(scores)
        rollout["contain_eos"] = (postprocessed == self.processing_class.eos_token_id).any(-1)
        if args.missing_eos_penalty is not None:
            scores[~rollout["contain_eos"]] -= args.missing_eos_penalty
        rollout["scores"] = scores

    def compute_kl(self, rollout: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token KL estimate [B, T] (zero after the response) with the configured estimator/direction/clamp."""
        args = self.args
        if args.kl_estimator == FULL_VOCAB_ESTIMATOR:
            kl = rollout["full_kl"]
        else:
            kl = per_token_kl(rollout["logprobs"], rollout["ref_logprobs"], args.kl_estimator, args.kl_direction, args.kl_clamp)
        return check_finite("KL", kl.masked_fill(rollout["padding_mask"], 0))

    def compute_rewards(self, rollout: dict[str, torch.Tensor]) -> None:
        """Per-token reward: `-kl_coef * KL_t`, plus the score on the token after the last response token."""
        rollout["kl_coef"] = coef = self.kl_controller.value
        rollout["non_score_reward"] = -coef * rollout["kl"]
        rewards = rollout["non_score_reward"].clone()
        lengths = rollout["sequence_lengths"]
        score_index = torch.where(lengths + 1 < rewards.shape[1], lengths + 1, lengths)
        rewards[torch.arange(rewards.shape[0], device=rewards.device), score_index] += rollout["scores"]
        if self.args.whiten_rewards:
            rewards = masked_whiten(rewards, ~rollout["padding_mask_p1"], shift_mean=False).masked_fill(rollout["padding_mask_p1"], 0)
        rollout["rewards"] = rewards

    def compute_advantages(self, rollout: dict[str, torch.Tensor]) -> None:
        """GAE (Schulman et al. 2016): A_t = sum_l (gamma*lam)^l delta_{t+l}; returns = A + V; A whitened."""
        gamma, lam = self.args.gamma, self.args.lam
        rewards, values = rollout["rewards"], rollout["values"]
        advantages = torch.zeros_like(rewards)
        running = 0
        for t in reversed(range(rewards.shape[1])):
            next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            running = delta + gamma * lam * running
            advantages[:, t] = running
        rollout["returns"] = advantages + values
        rollout["advantages"] = masked_whiten(advantages, ~rollout["padding_mask"]).masked_fill(rollout["padding_mask"], 0)

    def ppo_update(self, rollout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`num_ppo_epochs` passes over shuffled mini-batches; one optimizer step per mini-batch."""
        args, accelerator = self.args, self.accelerator
        stats = defaultdict(list)
        for _ in range(args.num_ppo_epochs):
            order = np.random.permutation(args.local_batch_size)
            for mini_start in range(0, args.local_batch_size, args.local_mini_batch_size):
                mini_batch = order[mini_start : mini_start + args.local_mini_batch_size]
                micro_batches = [mini_batch[i : i + args.per_device_train_batch_size]
                                 for i in range(0, len(mini_batch), args.per_device_train_batch_size)]
                scale = accelerator.gradient_accumulation_steps / len(micro_batches)  # backward divides by GA steps
                for i, rows in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    accelerator.sync_gradients = last
                    with nullcontext() if last else accelerator.no_sync(self.model):
                        loss, micro_stats = self.ppo_loss(rollout, rows)
                        loss = loss + self.extra_loss(rollout, rows)
                        accelerator.backward(loss * scale)
                    for name, value in micro_stats.items():
                        stats[name].append(value)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {name: torch.stack(values) for name, values in stats.items()}

    def ppo_loss(self, rollout: dict[str, torch.Tensor], rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + `vf_coef` * clipped value loss on a micro-batch, and its statistics."""
        args = self.args
        context_length = rollout["queries"].shape[1]
        padding_mask, padding_mask_p1 = rollout["padding_mask"][rows], rollout["padding_mask_p1"][rows]
        old_logprobs, old_values = rollout["logprobs"][rows], rollout["values"][rows]
        advantages, returns = rollout["advantages"][rows], rollout["returns"][rows]
        output, values = forward(self.model, rollout["query_responses"][rows], self.processing_class.pad_token_id)
        logits = output.logits[:, context_length - 1 : -1] / (args.temperature + 1e-7)
        logprobs = selective_log_softmax(logits, rollout["responses"][rows]).masked_fill(padding_mask, INVALID_LOGPROB)
        values = values[:, context_length - 1 : -1].squeeze(-1).masked_fill(padding_mask_p1, 0)
        values_clipped = torch.clamp(values, old_values - args.cliprange_value, old_values + args.cliprange_value)
        vf_unclipped, vf_clipped = (values - returns).square(), (values_clipped - returns).square()
        vf_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), ~padding_mask_p1)
        log_ratio = logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        pg_unclipped = -advantages * ratio
        pg_clipped = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
        pg_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), ~padding_mask)
        with torch.no_grad():
            entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
            stats = {
                "approxkl": 0.5 * log_ratio.square().mean(),
                "pg_clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), ~padding_mask),
                "pg_loss": pg_loss.detach(),
                "vf_loss": vf_loss.detach(),
                "vf_clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), ~padding_mask_p1),
                "entropy": entropy.mean(),
                "ratio": ratio.mean(),
            }
        return pg_loss + args.vf_coef * vf_loss, stats

    def extra_loss(self, rollout: dict[str, torch.Tensor], rows) -> torch.Tensor | float:
        """Regularizer terms added to the micro-batch loss before backward: `ptx_coef` * NLL on pretraining data (eq. 6)."""
        if self.ptx_stream is None:
            return 0.0
        batch = {k: v.to(self.accelerator.device) for k, v in self.ptx_stream.next_batch().items()}
        policy = self.accelerator.unwrap_model(self.model).policy  # plain LM forward, no value head
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll = ptx_nll(logits, batch["labels"])
        log_metric(self, "ptx/nll", nll)  # gathered: every process sees a non-finite NLL and raises together
        check_finite("ptx", torch.tensor(self._metrics["train"]["ptx/nll"][-1]))
        return self.args.ptx_coef * nll

    def log_update(self, rollout: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], start_time: float) -> None:
        """Log TRL's PPO metrics plus ours (`kl`, `kl/coef`, `ptx/nll`), then adapt the KL coefficient."""
        gather = lambda t: self.accelerator.gather_for_metrics(t).mean().item()  # noqa: E731
        kl_per_sequence = rollout["kl"].sum(1).mean()
        non_score = rollout["non_score_reward"].sum(1).mean()
        entropy = (-rollout["logprobs"] * (~rollout["padding_mask"]).float()).sum(1).mean()
        metrics = {
            "eps": int(self.state.episode / (time.time() - start_time)),
            "objective/kl": gather(kl_per_sequence),
            "objective/entropy": gather(entropy),
            "objective/non_score_reward": gather(non_score),
            "objective/rlhf_reward": gather(non_score + rollout["scores"].mean()),
            "objective/scores": gather(rollout["scores"].mean()),
            "policy/approxkl_avg": gather(stats["approxkl"]),
            "policy/clipfrac_avg": gather(stats["pg_clipfrac"]),
            "loss/policy_avg": gather(stats["pg_loss"]),
            "loss/value_avg": gather(stats["vf_loss"]),
            "val/clipfrac_avg": gather(stats["vf_clipfrac"]),
            "policy/entropy_avg": gather(stats["entropy"]),
            "val/ratio": gather(stats["ratio"]),
            "val/ratio_var": self.accelerator.gather_for_metrics(stats["ratio"]).var().item(),
            "val/num_eos_tokens": (rollout["responses"] == self.processing_class.eos_token_id).sum().item(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.episode,
        }
        log_metric(self, "kl", kl_per_sequence)
        log_metric(self, "kl/coef", rollout["kl_coef"])
        metrics.update({name: sum(values) / len(values) for name, values in self._metrics["train"].items()})
        self._metrics["train"].clear()
        self.kl_controller.update(metrics["kl"], n_steps=self.args.batch_size)
        self.state.epoch = self.state.episode / self.train_dataset_len
        self.state.global_step += 1
        self.log(metrics)

    def end_update(self, update: int) -> None:
        """Scheduler step, sample generations, `on_step_end`, and a checkpoint when the callbacks ask for one."""
        args = self.args
        self.lr_scheduler.step()
        if args.num_sample_generations > 0 and (update - 1) % self.sample_generations_freq == 0:
            self.generate_completions(sampling=True)  # before saving, so the saved RNG state is the next rollout's
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
