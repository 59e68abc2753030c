"""The TRL contract: every TRL (and ``transformers.Trainer``) name the adapters rely on, checked at construction.

Instead of an upper bound on TRL's version, each adapter checks this table when a trainer is built: its methods
and their leading parameters before TRL's ``__init__`` runs (``check_classes``), the instance attributes it reads
right after (``check_attributes``). A TRL release that moved one fails there with a ``TRLContractError`` naming
the name, what was expected and the newest TRL release tested; a release newer than ``NEWEST_TESTED_TRL`` whose
contract holds gets one warning and trains. ``tests/test_trl_contract.py`` checks the table on every release CI
installs, and that every attribute the adapters read is listed here. The facts behind each entry:
docs/trl_internals.md.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field

import trl
from packaging.version import Version

NEWEST_TESTED_TRL = "1.16.0"
"""The newest TRL release the whole suite ran on (scripts/test.sh); newer releases warn once and run."""
OLDEST_SUPPORTED_TRL = "1.12.0"


class TRLContractError(RuntimeError):
    """A TRL name an adapter relies on is missing or has moved."""


@dataclass(frozen=True)
class Contract:
    """What the adapters use of one class: methods with the leading parameters they call or override them with,
    instance attributes read after ``__init__``, and module-level functions."""

    owner: str
    """``module.Class``."""
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attributes: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    """``module.name`` of functions or constants the adapters import."""
    loop_attributes: tuple[str, ...] = ()
    """Instance attributes the training loop sets before ``compute_loss`` (not there at construction; the trainer
    tests read them)."""


ONLINE_METHODS = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep"),
    "_compute_loss": ("self", "model", "inputs"),
}
LOOP_ATTRIBUTES = ("_metrics", "compute_loss_func")
"""Set by ``Trainer.__init__`` and TRL's trainers that run the Trainer's loop (not PPO's own setups)."""
ONLINE_ATTRIBUTES = (*LOOP_ATTRIBUTES, "beta", "ref_model", "temperature")

CONTRACT: dict[str, Contract] = {
    "Trainer": Contract(
        "transformers.Trainer",
        methods={
            "_save_checkpoint": ("self", "model", "trial"),
            "_get_output_dir": ("self", "trial"),
            "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
            "train": ("self", "resume_from_checkpoint"),
            "add_callback": ("self", "callback"),
            "evaluate": ("self", "eval_dataset"),
            "log": ("self", "logs"),
        },
        attributes=("accelerator", "args", "model", "processing_class", "state"),
        loop_attributes=("current_gradient_accumulation_steps",),
    ),
    "DPOTrainer": Contract(
        "trl.DPOTrainer",
        methods={
            "_set_signature_columns_if_needed": ("self",),
            "compute_ref_log_probs": ("self", "model", "inputs"),
            "_compute_loss": ("self", "model", "inputs", "return_outputs"),
        },
        attributes=(*LOOP_ATTRIBUTES, "_signature_columns", "beta", "data_collator", "loss_types", "loss_weights", "precompute_ref_logps", "ref_model"),
        functions=("trl.trainer.utils.selective_log_softmax",),
    ),
    "RewardTrainer": Contract("trl.RewardTrainer", attributes=LOOP_ATTRIBUTES),
    "GRPOTrainer": Contract(
        "trl.GRPOTrainer",
        methods={**ONLINE_METHODS, "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list")},
        attributes=(*ONLINE_ATTRIBUTES, "importance_sampling_level", "loss_type", "max_completion_length", "multi_objective_aggregation",
                    "reward_func_names", "reward_funcs", "reward_processing_classes", "reward_weights"),
        functions=("trl.trainer.utils.use_adapter",),
    ),
    "RLOOTrainer": Contract("trl.RLOOTrainer", methods=ONLINE_METHODS, attributes=ONLINE_ATTRIBUTES, functions=("trl.trainer.utils.use_adapter",)),
    "SFTTrainer": Contract("trl.SFTTrainer", attributes=LOOP_ATTRIBUTES),
    # PPO: the Trainer methods both PPO setups call from their own loop, TRL 1.12's PPOTrainer, the package's setup
    "PPOCheckpoints": Contract(
        "transformers.Trainer",
        methods={"_load_rng_state": ("self", "checkpoint"), "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
                 "save_model": ("self", "output_dir", "_internal_call")},
    ),
    "PPOSetup": Contract(
        "transformers.Trainer",
        methods={"create_optimizer_and_scheduler": ("self", "num_training_steps"), "init_hf_repo": ("self",),
                 "is_local_process_zero": ("self",), "is_world_process_zero": ("self",)},
    ),
    "PPOTrainer": Contract(
        "trl.experimental.ppo.PPOTrainer",
        methods={"__init__": ("self", "args", "processing_class", "model", "ref_model", "reward_model", "train_dataset", "value_model"),
                 "null_ref_context": ("self",), "generate_completions": ("self", "sampling")},
        attributes=("callback_handler", "control", "dataloader", "is_deepspeed_enabled", "is_fsdp_enabled", "lr_scheduler", "optimizer",
                    "ref_model", "reward_model", "stop_token_id", "train_dataset_len"),
        functions=("trl.experimental.ppo.ppo_trainer.batch_generation", "trl.experimental.ppo.ppo_trainer.forward",
                   "trl.experimental.ppo.ppo_trainer.truncate_response", "trl.experimental.utils.first_true_indices",
                   "trl.experimental.utils.get_reward", "trl.models.utils.unwrap_model_for_generation"),
    ),
}


def resolve(path: str):
    """The object at ``module.name`` (``module.Class`` too), or None when the module or the name is gone."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def fits(parameters: list[inspect.Parameter], expected: tuple[str, ...]) -> bool:
    """The leading parameter names are ``expected``, or the list turns into ``*args`` before they end (TRL 1.14
    declares GRPO's log-prob method as ``(self, model, *args, ...)``: positional calls still fit)."""
    for index, name in enumerate(expected):
        if index >= len(parameters):
            return False
        if parameters[index].kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameters[index].name != name:
            return False
    return True


def _fail(what: str) -> TRLContractError:
    return TRLContractError(
        f"TRL {trl.__version__}: {what}. trl_regularizers relies on it (docs/trl_internals.md); the newest TRL release "
        f"tested with this version is {NEWEST_TESTED_TRL}. Install trl=={NEWEST_TESTED_TRL}, or a trl-regularizers release "
        "that supports your TRL."
    )


_warned_versions: set[str] = set()


def check_classes(keys: tuple[str, ...]) -> None:
    """Raise ``TRLContractError`` unless every method and function of the ``CONTRACT[key]`` entries is where the
    adapters expect it; warn once if this TRL is newer than the newest tested."""
    version = trl.__version__
    if Version(version) > Version(NEWEST_TESTED_TRL) and version not in _warned_versions:
        _warned_versions.add(version)
        warnings.warn(
            f"TRL {version} is newer than the newest release tested with trl-regularizers ({NEWEST_TESTED_TRL}). "
            "Every TRL name its adapters rely on is in place, so training proceeds; please report what breaks.",
            UserWarning,
            stacklevel=4,
        )
    for key in keys:
        entry = CONTRACT[key]
        owner = resolve(entry.owner)
        if owner is None:
            raise _fail(f"{entry.owner} is gone")
        for name, expected in entry.methods.items():
            method = getattr(owner, name, None)
            if not callable(method):
                raise _fail(f"{entry.owner}.{name} is gone (expected a method taking ({', '.join(expected)}, ...))")
            parameters = list(inspect.signature(method).parameters.values())
            if not fits(parameters, expected):
                found = ", ".join(p.name for p in parameters)
                raise _fail(f"{entry.owner}.{name} takes ({found}), not ({', '.join(expected)}, ...)")
        for path in entry.functions:
            if resolve(path) is None:
                raise _fail(f"{path} is gone")


def check_attributes(trainer, keys: tuple[str, ...]) -> None:
    """Raise ``TRLContractError`` unless ``trainer`` (after TRL's ``__init__``) has every attribute the entries list."""
    for key in keys:
        entry = CONTRACT[key]
        missing = [name for name in entry.attributes if not hasattr(trainer, name)]
        if missing:
            raise _fail(f"{entry.owner} instances no longer set {', '.join(missing)}")
