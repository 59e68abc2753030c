"""The package's own PPO pieces: what ``RegularizedPPOTrainer`` needs on TRL >= 1.13, where TRL has no PPO.

Nothing here imports TRL: the config (``PPOConfig``, on ``transformers.TrainingArguments``), the policy + value
module, generation, reward/value scoring, truncation after the stop token, the trainer setup (accelerator,
optimizer, scheduler, dataloader, callbacks) and the checkpoint layout are written from the PPO algorithm
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences") on transformers/accelerate/torch
APIs. ``PPOPieces`` (checkpointing, the trainer-state setup) is shared with the TRL 1.12 adapter (``ppo.py``).

To log the same metrics as TRL 1.12's ``PPOTrainer`` for the same seed, the setup consumes random numbers in
the same order as it (docs/ppo.md, "Same numbers on every TRL"): dropout off in all four models, the prompt
``DataLoader(shuffle=True, drop_last=True)`` prepared by accelerate right after ``torch.manual_seed(seed)``,
then ``torch.manual_seed(seed + 100003 * process_index)``; sampling through ``model.generate`` per chunk of
``local_rollout_forward_batch_size``; ``np.random.permutation`` for the mini-batches (in the trainer's loop).
This module also names transformers ``Trainer`` private methods (``_save_checkpoint``, ``_load_rng_state``,
``_load_from_checkpoint``), which is why it lives in ``adapters/``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, GenerationConfig, Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import CallbackHandler, ExportableState, PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, is_peft_available

from trl_regularizers.trainers.adapters.base import TrainerAdapter

INVALID_LOGPROB = 1.0
"""Log-prob written at positions after a response's last token (masked out of every loss and metric)."""
VALUE_MODEL_DIR = "value_model"
SEED_STRIDE = 100003
"""Each process samples from ``seed + SEED_STRIDE * process_index`` (a prime, as TRL 1.12)."""
__all__ = ["INVALID_LOGPROB", "PPOConfig", "PPOPieces", "PolicyAndValue", "StandalonePPOAdapter", "StandalonePPOTrainer"]


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    PPO settings: the fields (names, defaults, meanings) of TRL 1.12's `trl.experimental.ppo.PPOConfig`, on top
    of [`~transformers.TrainingArguments`], so a TRL 1.12 PPO script keeps its config on any TRL.

    Defaults that differ from `TrainingArguments` (as in TRL): `learning_rate=3e-6`, `logging_steps=10`,
    `gradient_checkpointing=True` (PPO's loop does not apply it, as TRL 1.12's did not), `bf16=not fp16`.
    Derived fields (`world_size`, `num_total_batches`, `micro_batch_size`, `local_batch_size`, `batch_size`,
    `local_mini_batch_size`, `mini_batch_size`) are set by the trainer.
    """

    learning_rate: float = field(default=3e-6, metadata={"help": "Initial learning rate (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a float in [0, 1) is a ratio of the total)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Kept for compatibility; the PPO loop does not enable it."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None means `not fp16`."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra scheduler arguments."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset processing."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches per rollout batch."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total episodes (sequences); default num_train_epochs * dataset size."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={"help": "Per-process batch of the no-grad rollout forwards."})
    num_sample_generations: int = field(default=10, metadata={"help": "Number of sample-generation printouts during training."})
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    stop_token: Literal["eos"] | None = field(default=None, metadata={"help": "'eos' stops and truncates at the tokenizer's EOS (exclusive with stop_token_id)."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id to stop and truncate at (exclusive with stop_token)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a response without EOS."})
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path of the SFT model (informational)."})
    world_size: int | None = field(default=None, metadata={"help": "Number of processes (set by the trainer)."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Number of PPO updates (set by the trainer)."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "per_device_train_batch_size * world_size (set by the trainer)."})
    local_batch_size: int | None = field(default=None, metadata={"help": "per_device_train_batch_size * gradient_accumulation_steps (set by the trainer)."})
    batch_size: int | None = field(default=None, metadata={"help": "local_batch_size * world_size (set by the trainer)."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Per-process mini-batch size (set by the trainer)."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Mini-batch size across processes (set by the trainer)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the model to the Hub after training."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path of the reward model (informational)."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "PEFT adapter to train (several adapters)."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "PEFT adapter used as the reference (several adapters)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "Coefficient of the per-token KL penalty in the reward."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "DeepSpeed ZeRO-3 only (not supported by this implementation)."})

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        super().__post_init__()


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


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode deep copy of ``model`` (the default reference policy)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def exact_quotient(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what}: {a} is not a multiple of {b}.")
    return a // b


@dataclass
class PPOTrainerState(TrainerState):
    """``TrainerState`` plus ``episode``: sequences sampled so far (saved in ``trainer_state.json``)."""

    episode: int = 0


class StandalonePPOTrainer(Trainer):
    """The PPO trainer setup, as a ``transformers.Trainer`` whose ``__init__`` is not called: ``Trainer`` owns its
    own training loop, which PPO replaces; what the inherited methods (``log``, ``create_optimizer_and_scheduler``,
    ``save_model``, checkpointing) read is set here. Constructor arguments are those of TRL 1.12's ``PPOTrainer``."""

    def __init__(self, args: PPOConfig, processing_class, model, ref_model, reward_model, train_dataset, value_model,
                 data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None, peft_config=None) -> None:
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object: pass a copy, or None with PEFT (the adapter-disabled policy).")
        self.args, self.processing_class = args, processing_class
        self.policy_model = model
        self.data_collator = DataCollatorWithPadding(processing_class) if data_collator is None else data_collator
        if args.stop_token and args.stop_token_id is not None:
            raise ValueError("You cannot set both `stop_token` and `stop_token_id`.")
        if args.stop_token not in (None, "eos"):
            raise ValueError(f"Unknown `stop_token` {args.stop_token}. Allowed values are: `'eos'` and `None` (no stop token).")
        self.stop_token_id = processing_class.eos_token_id if args.stop_token == "eos" else args.stop_token_id
        model.generation_config.eos_token_id = self.stop_token_id  # generation stops there (None: at max length)

        if peft_config is not None:
            self.policy_model = self._peft_policy(model, peft_config)
        self.is_peft_model = hasattr(self.policy_model, "peft_config") and hasattr(self.policy_model, "disable_adapter")
        self.model_adapter_name, self.ref_adapter_name = args.model_adapter_name, args.ref_adapter_name
        if ref_model is not None:
            self.ref_model = ref_model
        elif self.is_peft_model:
            self.ref_model = None  # the reference is the policy with its adapter disabled
        else:
            self.ref_model = frozen_copy(self.policy_model)
        self.reward_model, self.value_model = reward_model, value_model
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.train_dataset_len = len(train_dataset)
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = None

        accelerator = self.accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            raise NotImplementedError("RegularizedPPOTrainer on TRL >= 1.13 runs with one process or DDP, not DeepSpeed. "
                                      "For DeepSpeed use TRL 1.12: pip install 'trl-regularizers[ppo]'.")
        self._derive_batch_sizes(args, accelerator.num_processes, self.train_dataset_len)
        self.local_seed = args.seed + accelerator.process_index * SEED_STRIDE
        if args.num_sample_generations > 0:
            self.sample_generations_freq = max(1, args.num_total_batches // args.num_sample_generations)
        self.local_dataloader_batch_size = args.local_batch_size

        for module in (self.policy_model, self.ref_model, self.value_model, self.reward_model):
            if module is not None:
                disable_dropout(module)
        self.model = PolicyAndValue(self.policy_model, self.value_model)
        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)  # the scheduler steps once per update

        self.callbacks = DEFAULT_CALLBACKS + get_reporting_integration_callbacks(args.report_to) + list(callbacks or [])
        self.callback_handler = CallbackHandler(self.callbacks, self.model, processing_class, self.optimizer, self.lr_scheduler)
        self.add_callback(PrinterCallback if args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK)
        self.control = TrainerControl()
        self.state = PPOTrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)],
        )
        self.current_flos, self.hp_search_backend = 0, None
        self.is_deepspeed_enabled = False
        self.is_fsdp_enabled = getattr(accelerator.state, "fsdp_plugin", None) is not None
        self.hub_model_id = None
        if args.push_to_hub:
            self.init_hf_repo()
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

        dataloader = DataLoader(train_dataset, batch_size=args.local_batch_size, shuffle=True, collate_fn=self.data_collator, drop_last=True)
        # Every process draws the same sampler seed (accelerate takes it from the torch RNG), then its own stream.
        torch.manual_seed(args.seed)
        self.model, self.optimizer, self.dataloader = accelerator.prepare(self.model, self.optimizer, dataloader)
        self.model_wrapped = self.model
        torch.manual_seed(self.local_seed)
        self.eval_dataloader = None
        if eval_dataset is not None:
            eval_loader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=self.data_collator, drop_last=True)
            self.eval_dataloader = accelerator.prepare(eval_loader)
        if self.ref_model is not None:
            self.ref_model = self.ref_model.to(accelerator.device)
        self.reward_model = self.reward_model.to(accelerator.device)

    @staticmethod
    def _derive_batch_sizes(args, world_size: int, dataset_len: int) -> None:
        """The batch arithmetic of PPO's config: one update = ``batch_size`` episodes across processes."""
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches"):
            if getattr(args, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}.")
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * dataset_len)  # episodes as passes over the prompts
        args.world_size = world_size
        args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.micro_batch_size = args.per_device_train_batch_size * world_size
        args.batch_size = args.local_batch_size * world_size
        args.mini_batch_size = exact_quotient(args.batch_size, args.num_mini_batches, "`batch_size` must be a multiple of `num_mini_batches`")
        args.local_mini_batch_size = exact_quotient(args.local_batch_size, args.num_mini_batches, "`local_batch_size` must be a multiple of `num_mini_batches`")
        if args.whiten_rewards and args.local_mini_batch_size < 8:
            raise ValueError(f"whiten_rewards needs a per-process mini-batch of at least 8 sequences, got {args.local_mini_batch_size}.")
        args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)  # may train past total_episodes

    def _peft_policy(self, model, peft_config):
        if not is_peft_available():
            raise ImportError("You passed `peft_config` but the `peft` library is not installed: pip install peft.")
        from peft import PeftConfig, PeftModel, get_peft_model

        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"`peft_config` must be a `peft.PeftConfig` instance (e.g. `peft.LoraConfig`), got {type(peft_config).__name__}.")
        if isinstance(model, PeftModel):
            raise ValueError("You passed a `PeftModel` together with a `peft_config`: merge and unload the adapter first, then pass the base model.")
        model = get_peft_model(model, peft_config)
        if self.args.bf16 and getattr(model, "is_loaded_in_4bit", False):  # k-bit LoRA: norms in fp32, embeddings and head in bf16
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.LayerNorm) or "norm" in name:
                    module.to(torch.float32)
                elif any(key in name for key in ("lm_head", "embed_tokens", "wte", "wpe")) and getattr(getattr(module, "weight", None), "dtype", None) == torch.float32:
                    module.to(torch.bfloat16)
        return model

    def get_train_dataloader(self) -> DataLoader:
        return self.dataloader

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader | None:
        return self.eval_dataloader

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

    def generation_config(self, temperature: float) -> GenerationConfig:
        """Pure sampling at ``temperature`` (+1e-7, so 0 stays valid): no top-k, no top-p; returns the processed scores."""
        return GenerationConfig(max_new_tokens=self.args.response_length, temperature=temperature + 1e-7, top_k=0.0, top_p=1.0, do_sample=True,
                                return_dict_in_generate=True, output_scores=True)

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


class PPOPieces:
    """What both PPO adapters share: the trainer-state setup of a run, checkpoint save/restore (value model and
    regularizer state included), the ptx language model."""

    # Read by transformers.Trainer's save methods and set by Trainer.__init__, which neither PPO setup runs.
    is_distributed_loading_by_transformers = False
    is_fsdp_xla_enabled = is_fsdp_xla_v1_enabled = is_fsdp_xla_v2_enabled = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the policy only (what inference needs; the value model goes into checkpoints), unwrapped first: TRL
        1.12's own ``save_model`` looks for ``.policy`` on the DDP wrapper and saves the whole module under DDP."""
        wrapper = self.model
        self.model = self.accelerator.unwrap_model(wrapper).policy
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = wrapper

    def scale_like_parent_loss(self, term: torch.Tensor) -> torch.Tensor:
        return term  # the PPO update scales the summed loss itself before accelerator.backward

    def language_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model).policy  # the LM without the value head

    def begin_training(self) -> None:
        """Trainer state for ``num_total_batches`` updates; fractional logging/eval/save steps are relative to it."""
        args, state = self.args, self.state
        state.global_step, state.episode = 0, 0
        state.max_steps = args.num_total_batches
        state.num_train_epochs = args.total_episodes / self.train_dataset_len
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(args, name)
            if value is not None:
                setattr(state, name, math.ceil(state.max_steps * value) if value < 1 else value)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped = self.model

    def save_checkpoint(self) -> None:
        self._save_checkpoint(self.model, trial=None)

    def _save_checkpoint(self, model, trial):
        """Trainer checkpoint (policy, optimizer, scheduler, RNG, state) + regularizer state + value model."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.accelerator.unwrap_model(self.model).value_model.save_pretrained(os.path.join(folder, VALUE_MODEL_DIR))

    def restore_checkpoint(self, checkpoint: str, batches) -> None:
        """Restore weights, optimizer, scheduler, step/episode, the position of ``batches`` (an endless iterator
        over the dataloader), RNG and regularizer state."""
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("Resuming RegularizedPPOTrainer is supported with DDP or one process, not DeepSpeed/FSDP.")
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._load_weights(checkpoint, unwrapped.policy)
        self._load_weights(os.path.join(checkpoint, VALUE_MODEL_DIR), unwrapped.value_model)
        load = lambda name: torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)  # noqa: E731
        self.optimizer.load_state_dict(load(OPTIMIZER_NAME))
        self.lr_scheduler.load_state_dict(load(SCHEDULER_NAME))
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
            saved = json.load(handle)
        self.state.global_step, self.state.episode, self.state.log_history = saved["global_step"], saved["episode"], saved["log_history"]
        for _ in range(saved["global_step"]):  # replaying the batches gives the same order (then the RNG is restored)
            next(batches)
        self._load_rng_state(checkpoint)  # after the replay, which draws from the global RNG
        self.regularizer_state.load(checkpoint)

    def _load_weights(self, folder: str, module: torch.nn.Module) -> None:
        """Load ``save_pretrained`` weights into ``module`` in place, so the optimizer keeps its parameters."""
        if hasattr(module, "peft_config"):  # PEFT: the Trainer loads the saved adapter
            return self._load_from_checkpoint(folder, model=module)
        index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        else:
            files = [SAFE_WEIGHTS_NAME]
        state = {k: v for name in files for k, v in safetensors.torch.load_file(os.path.join(folder, name)).items()}
        result = module.load_state_dict(state, strict=False)
        aliases = defaultdict(set)  # tied parameters are saved once, under one of their names
        for name, parameter in module.named_parameters(remove_duplicate=False):
            aliases[id(parameter)].add(name)
        tied = {name for names in aliases.values() if names & state.keys() for name in names}
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise RuntimeError(f"Checkpoint {folder} does not match {type(module).__name__}: missing "
                               f"{sorted(set(result.missing_keys) - tied)}, unexpected {result.unexpected_keys}.")


class StandalonePPOAdapter(PPOPieces, TrainerAdapter, StandalonePPOTrainer):
    """The methods the regularized PPO loop calls, on the package's own PPO setup (any TRL)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def generate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ``query_responses`` [B, Tq + T] and the sampling logits [B, T, V] (already divided by the temperature)."""
        policy = self.accelerator.unwrap_model(self.model).policy
        return sample_responses(policy, queries, self.args.local_rollout_forward_batch_size, self.processing_class.pad_token_id,
                                self.generation_config(self.args.temperature))

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

    token_logps = staticmethod(token_logps)
