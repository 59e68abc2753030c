"""Shared base of the adapters: what every TRL trainer does alike (docs/trl_internals.md §1).

``TrainerAdapter`` is mixed in before a TRL trainer class. On its own it is the stock trainer; ``attach`` gives it
the components a ``Regularized*Trainer`` builds (a ``PtxTerm``, a ``KLPenalty``, ...). It checks the TRL contract
(``contract.py``) when constructed, applies the gradient-accumulation rule to added loss terms, implements the
``MetricSink`` components log through (TRL's own metric lists), and saves and restores the checkpointed
``RegularizerState``.
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from trl_regularizers.components.kl import KLPenalty
from trl_regularizers.components.ptx import PtxTerm
from trl_regularizers.components.state import RegularizerState
from trl_regularizers.data import DATASET_FORMATS, check_dataset
from trl_regularizers.trainers.adapters import contract

TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA = hasattr(Trainer, "loss_is_scaled_for_ga")
"""transformers >= 5.19 reads ``Trainer.loss_is_scaled_for_ga``; older versions ignore the attribute."""


def trl_arguments(parent_init, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of ``parent_init`` (a TRL ``__init__``), by name, bound as the parent binds them: a
    missing, repeated or unknown argument raises the parent's ``TypeError``."""
    signature = inspect.signature(parent_init)
    arguments = dict(signature.bind(None, *args, **kwargs).arguments)
    del arguments[next(iter(signature.parameters))]  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def mirror_signature(trainer_cls: type, parent_init, **extras) -> None:
    """Give ``trainer_cls.__init__`` the signature of ``parent_init`` plus keyword-only ``extras`` (name=default), which
    ``inspect.signature``, IDEs and TRL's own introspection then see."""
    signature = inspect.signature(parent_init)
    parameters = list(signature.parameters.values())
    tail = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in extras.items()]
    trainer_cls.__init__.__signature__ = signature.replace(parameters=[*head, *added, *tail])


class OutputRecorder:
    """The outputs of the forwards of the modules it is hooked on (``hook``), inside a ``recording()`` block."""

    def __init__(self) -> None:
        self.outputs: list | None = None

    def hook(self, module: torch.nn.Module, module_args, output) -> None:
        if self.outputs is not None:
            self.outputs.append(output)

    @contextmanager
    def recording(self) -> Iterator[list]:
        self.outputs = []
        try:
            yield self.outputs
        finally:
            self.outputs = None


class TrainerAdapter:
    """Mixed in before a TRL trainer class; components: ``ptx_term``, ``kl_penalty`` (None until ``attach``)."""

    TRL_CLASSES: tuple[str, ...] = ("Trainer",)
    """The contract entries (``contract.CONTRACT`` keys) this adapter relies on."""
    dataset_kind: str | None = None
    """What the TRL trainer reads (``data.check_dataset``); None: no check."""

    def __init__(self, *args, **kwargs):
        contract.check_classes(self.TRL_CLASSES)  # before TRL runs: a moved method fails here, by name
        self.regularizer_state = RegularizerState()
        self.ptx_term: PtxTerm | None = None
        self.kl_penalty: KLPenalty | None = None
        self.check_datasets(inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments)
        super().__init__(*args, **kwargs)
        contract.check_attributes(self, self.TRL_CLASSES)

    def dataset_formats(self, arguments: dict) -> list[tuple[str, ...]] | None:
        """The column sets TRL's trainer reads with these constructor ``arguments``; None: it reads any columns."""
        return None if self.dataset_kind is None else DATASET_FORMATS[self.dataset_kind]

    def check_datasets(self, arguments: dict) -> None:
        """TRL reads the data in its ``__init__`` (a missing column is a KeyError there): check it first."""
        formats = self.dataset_formats(arguments)
        if formats is not None:
            for split in ("train", "eval"):
                check_dataset(arguments.get(f"{split}_dataset"), formats, split, type(self).__name__)

    def attach(self, kl: KLPenalty | None = None, ptx: PtxTerm | None = None) -> None:
        """Take the components built for this trainer (after TRL's ``__init__``); their state goes into checkpoints."""
        self.kl_penalty, self.ptx_term = kl, ptx
        if ptx is not None:
            self.regularizer_state.register("ptx", ptx.stream)
        if kl is not None and kl.enabled and kl.adaptive:
            self.regularizer_state.register("kl_controller", kl.controller)

    # ---- MetricSink: components log through TRL's own metric lists (docs/trl_internals.md §1.2)

    @property
    def training(self) -> bool:
        return self.model.training

    @property
    def mode(self) -> str:
        """``"train"`` or ``"eval"``, as TRL decides it."""
        return "train" if self.model.training else "eval"

    def log_mean(self, name: str, value: torch.Tensor | float) -> float:
        """Log the mean of ``value`` over all processes under ``name`` and return it. Collective: call on every rank."""
        if not torch.is_tensor(value):
            value = torch.tensor(float(value))
        value = value.detach().float().mean().reshape(1).to(self.accelerator.device)
        mean = self.accelerator.gather_for_metrics(value).mean().item()
        self._metrics[self.mode][name].append(mean)
        return mean

    def log_value(self, name: str, value: float) -> None:
        """Log a value that is already the same on every process."""
        self._metrics[self.mode][name].append(float(value))

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum")

    def set_metric(self, name: str, value: float, mode: str) -> None:
        """Replace what ``name`` will report at the next log (e.g. a whole-eval-set accuracy)."""
        self._metrics[mode][name] = [float(value)]

    # ---- added loss terms and checkpoints

    def trainer_divides_by_ga(self) -> bool:
        """True when the HF Trainer divides ``compute_loss``'s result by the GA steps (docs/trl_internals.md §1.1):
        DPO/Reward/RLOO/SFT yes, GRPO no (it scales its own loss)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None) if TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA else None
        if scaled is None:
            scaled = bool(getattr(self, "model_accepts_loss_kwargs", False)) or self.compute_loss_func is not None
        return not scaled

    def scale_like_parent_loss(self, term: torch.Tensor) -> torch.Tensor:
        """Scale an added loss term the way the parent's loss is scaled, so gradient accumulation sums it right."""
        if self.model.training and not self.trainer_divides_by_ga():
            return term / self.current_gradient_accumulation_steps
        return term

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self.stock_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.ptx_term is None or not self.model.training:
            return result
        ptx = self.scale_like_parent_loss(self.ptx_term.loss(model))  # outside stock_loss: adapters record its forwards only
        return (result[0] + ptx, result[1]) if return_outputs else result + ptx

    def stock_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The TRL trainer's ``compute_loss``; an adapter overrides this to record what TRL computes or add a term."""
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self.save_checkpoint_extras(os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))

    def save_checkpoint_extras(self, folder: str) -> None:
        """Write what the Trainer's checkpoint lacks into its ``folder``: the regularizer state (PPO: the value model)."""
        self.regularizer_state.save(folder)

    # ---- the Trainer's checkpoint and metric machinery, for trainers that run their own loop (PPO)

    def save_trainer_checkpoint(self) -> None:
        """A Trainer checkpoint of the current step (weights, optimizer, scheduler, RNG, state, extras)."""
        self._save_checkpoint(self.model, trial=None)

    def load_rng_state(self, checkpoint: str) -> None:
        self._load_rng_state(checkpoint)

    def load_adapter_checkpoint(self, folder: str, model: torch.nn.Module) -> None:
        """Load the PEFT adapter saved in ``folder`` into ``model``, as the Trainer resumes one."""
        self._load_from_checkpoint(folder, model=model)

    @contextmanager
    def micro_batch(self, last: bool):
        """One micro-batch of an optimizer step of an own loop (PPO): DDP syncs gradients only on the ``last`` one, and
        accelerate steps only then (its optimizer wrapper skips steps, and ``accelerator.backward`` steps a DeepSpeed
        engine, while ``sync_gradients`` is False), whatever its own gradient-accumulation count says."""
        self.accelerator.sync_gradients = last
        with nullcontext() if last else self.accelerator.no_sync(self.model):
            yield

    def init_metric_lists(self) -> None:
        """TRL's per-mode metric lists, for a trainer whose TRL base has none (PPO)."""
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def pop_metrics(self) -> dict[str, float]:
        """The mean of each metric logged in this mode since the last call, clearing them (for own train loops)."""
        metrics = self._metrics[self.mode]
        means = {name: sum(values) / len(values) for name, values in metrics.items()}
        metrics.clear()
        return means

    def resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint folder that ``train(resume_from_checkpoint=...)`` means, or None."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        return resume_from_checkpoint or None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self.regularizer_state.load(checkpoint)
        return super().train(checkpoint, *args, **kwargs)
