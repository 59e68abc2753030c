"""What both PPO setups share: the trainer state of a run, and checkpoints with the value model and the regularizer
state (``train(resume_from_checkpoint=...)`` resumes, which stock TRL 1.12 PPO could not)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import safetensors.torch
import torch
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

VALUE_MODEL_DIR = "value_model"


class PPOCheckpoints:
    """Mixed in before a PPO setup (``setup.StandalonePPOAdapter`` or the TRL 1.12 ``adapters.ppo.PPOAdapter``)."""

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
        """The policy LM without the value head (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).policy

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

    def save_checkpoint_extras(self, folder: str) -> None:
        super().save_checkpoint_extras(folder)
        self.accelerator.unwrap_model(self.model).value_model.save_pretrained(os.path.join(folder, VALUE_MODEL_DIR))

    def restore_checkpoint(self, checkpoint: str, batches) -> None:
        """Restore weights, optimizer, scheduler, step/episode, the position of ``batches`` (an endless iterator
        over the dataloader), RNG and regularizer state."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("Resuming RegularizedPPOTrainer is supported with DDP or one process, not DeepSpeed/FSDP.")
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.load_weights(checkpoint, unwrapped.policy)
        self.load_weights(os.path.join(checkpoint, VALUE_MODEL_DIR), unwrapped.value_model)
        load = lambda name: torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)  # noqa: E731
        self.optimizer.load_state_dict(load(OPTIMIZER_NAME))
        self.lr_scheduler.load_state_dict(load(SCHEDULER_NAME))
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
            saved = json.load(handle)
        self.state.global_step, self.state.episode, self.state.log_history = saved["global_step"], saved["episode"], saved["log_history"]
        for _ in range(saved["global_step"]):  # replaying the batches gives the same order (then the RNG is restored)
            next(batches)
        self.load_rng_state(checkpoint)  # after the replay, which draws from the global RNG
        self.regularizer_state.load(checkpoint)

    def load_weights(self, folder: str, module: torch.nn.Module) -> None:
        """Load ``save_pretrained`` weights into ``module`` in place, so the optimizer keeps its parameters."""
        if hasattr(module, "peft_config"):  # PEFT: the Trainer loads the saved adapter
            return self.load_adapter_checkpoint(folder, module)
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
