"""The package's own PPO setup (TRL >= 1.13, which has no PPO): a ``transformers.Trainer`` whose ``__init__`` is not
called, since PPO replaces its training loop; what the inherited methods (``log``, ``create_optimizer_and_scheduler``,
``save_model``, checkpointing) read is set here. Written from the PPO algorithm (Ziegler et al. 2019) on
transformers, accelerate and torch APIs; no TRL code.

To log the same metrics as TRL 1.12's ``PPOTrainer`` for the same seed, the setup consumes random numbers in the
same order as it (docs/ppo.md, "Same numbers on every TRL"): dropout off in all four models, the prompt
``DataLoader(shuffle=True, drop_last=True)`` prepared by accelerate right after ``torch.manual_seed(seed)``, then
``torch.manual_seed(seed + 100003 * process_index)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, Trainer, TrainerControl, TrainerState
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import CallbackHandler, ExportableState, PrinterCallback
from transformers.utils import is_peft_available

from trl_regularizers.trainers.ppo.config import PPOConfig
from trl_regularizers.models import frozen_copy
from trl_regularizers.trainers.ppo.policy import PolicyAndValue, disable_dropout, exact_quotient

SEED_STRIDE = 100003
"""Each process samples from ``seed + SEED_STRIDE * process_index`` (a prime, as TRL 1.12)."""


@dataclass
class PPOTrainerState(TrainerState):
    """``TrainerState`` plus ``episode``: sequences sampled so far (saved in ``trainer_state.json``)."""

    episode: int = 0


class StandalonePPOTrainer(Trainer):
    """The PPO setup. Constructor arguments are those of TRL 1.12's ``PPOTrainer``."""

    def __init__(self, args: PPOConfig, processing_class, model, ref_model, reward_model, train_dataset, value_model,
                 data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None, peft_config=None) -> None:
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object: pass a copy, or None with PEFT (the adapter-disabled policy).")
        if args.stop_token and args.stop_token_id is not None:
            raise ValueError("You cannot set both `stop_token` and `stop_token_id`.")
        if args.stop_token not in (None, "eos"):
            raise ValueError(f"Unknown `stop_token` {args.stop_token}. Allowed values are: `'eos'` and `None` (no stop token).")
        self.args, self.processing_class = args, processing_class
        self.data_collator = DataCollatorWithPadding(processing_class) if data_collator is None else data_collator
        self.stop_token_id = processing_class.eos_token_id if args.stop_token == "eos" else args.stop_token_id
        model.generation_config.eos_token_id = self.stop_token_id  # generation stops there (None: at max length)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.train_dataset_len = len(train_dataset)
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = None
        self._set_models(model, ref_model, reward_model, value_model, peft_config)
        self._set_accelerator()
        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)  # the scheduler steps once per update
        self._set_callbacks_and_state(callbacks)
        self._prepare_dataloaders(train_dataset, eval_dataset)

    def _set_models(self, model, ref_model, reward_model, value_model, peft_config) -> None:
        """Policy (PEFT-wrapped if asked), reference (given, the adapter-disabled policy, or a frozen copy), reward
        and value models, dropout off in all four, policy and value in one module."""
        args = self.args
        self.policy_model = model if peft_config is None else self._peft_policy(model, peft_config)
        self.is_peft_model = hasattr(self.policy_model, "peft_config") and hasattr(self.policy_model, "disable_adapter")
        self.model_adapter_name, self.ref_adapter_name = args.model_adapter_name, args.ref_adapter_name
        if ref_model is not None:
            self.ref_model = ref_model
        elif self.is_peft_model:
            self.ref_model = None  # the reference is the policy with its adapter disabled
        else:
            self.ref_model = frozen_copy(self.policy_model)
        self.reward_model, self.value_model = reward_model, value_model
        for module in (self.policy_model, self.ref_model, self.value_model, self.reward_model):
            if module is not None:
                disable_dropout(module)
        self.model = PolicyAndValue(self.policy_model, self.value_model)

    def _set_accelerator(self) -> None:
        args = self.args
        accelerator = self.accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            raise NotImplementedError("RegularizedPPOTrainer on TRL >= 1.13 runs with one process or DDP, not DeepSpeed. "
                                      "For DeepSpeed use TRL 1.12: pip install 'trl-regularizers[ppo]'.")
        self._derive_batch_sizes(args, accelerator.num_processes, self.train_dataset_len)
        self.local_seed = args.seed + accelerator.process_index * SEED_STRIDE
        self.local_dataloader_batch_size = args.local_batch_size
        self.is_deepspeed_enabled = False
        self.is_fsdp_enabled = getattr(accelerator.state, "fsdp_plugin", None) is not None

    def _set_callbacks_and_state(self, callbacks) -> None:
        args = self.args
        self.callbacks = DEFAULT_CALLBACKS + get_reporting_integration_callbacks(args.report_to) + list(callbacks or [])
        self.callback_handler = CallbackHandler(self.callbacks, self.model, self.processing_class, self.optimizer, self.lr_scheduler)
        self.add_callback(PrinterCallback if args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK)
        self.control = TrainerControl()
        self.state = PPOTrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)],
        )
        self.current_flos, self.hp_search_backend = 0, None
        self.hub_model_id = None
        if args.push_to_hub:
            self.init_hf_repo()
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

    def _prepare_dataloaders(self, train_dataset, eval_dataset) -> None:
        args, accelerator = self.args, self.accelerator
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

