"""The contract between the adapters and TRL, checked on every TRL release CI installs.

A TRL release that moves one of the internals the adapters rely on fails one named test here, which says what
moved: a missing private method, a changed signature, a new GRPO ``loss_type``, a record of another shape. And
no module outside ``trainers/adapters/`` names a TRL private method or attribute.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
import trl
from datasets import Dataset

from tests.trl_versions import HAS_PPO, requires_trl_ppo
from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer, RegularizedGRPOConfig, RegularizedGRPOTrainer
from trl_regularizers import RegularizedRLOOConfig, RegularizedRLOOTrainer
from trl_regularizers.trainers.adapters.grpo import grpo_aggregations

PACKAGE = Path(__file__).resolve().parents[1] / "trl_regularizers"
ADAPTERS = PACKAGE / "trainers" / "adapters"

# (class, method) -> the leading parameter names the adapters call or override it with
METHODS = {
    (transformers.Trainer, "_save_checkpoint"): ["self", "model", "trial"],
    (transformers.Trainer, "_get_output_dir"): ["self", "trial"],
    (transformers.Trainer, "_load_rng_state"): ["self", "checkpoint"],
    (transformers.Trainer, "_load_from_checkpoint"): ["self", "resume_from_checkpoint", "model"],
    (transformers.Trainer, "compute_loss"): ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    # the PPO setup of adapters/ppo_standalone.py (a Trainer whose own __init__ and loop it replaces)
    (transformers.Trainer, "create_optimizer_and_scheduler"): ["self", "num_training_steps"],
    (transformers.Trainer, "save_model"): ["self", "output_dir", "_internal_call"],
    (transformers.Trainer, "log"): ["self", "logs"],
    (trl.DPOTrainer, "_prepare_dataset"): ["self", "dataset", "processing_class", "args", "dataset_name"],
    (trl.DPOTrainer, "_set_signature_columns_if_needed"): ["self"],
    (trl.DPOTrainer, "compute_ref_log_probs"): ["self", "model", "inputs"],
    (trl.DPOTrainer, "_compute_loss"): ["self", "model", "inputs", "return_outputs"],
    (trl.RewardTrainer, "_prepare_dataset"): ["self", "dataset", "processing_class", "args", "dataset_name"],
    (trl.GRPOTrainer, "_generate_and_score_completions"): ["self", "inputs"],
    (trl.GRPOTrainer, "_get_per_token_logps_and_entropies"): ["self", "model", "input_ids", "attention_mask", "logits_to_keep"],
    (trl.GRPOTrainer, "_calculate_rewards"): ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    (trl.GRPOTrainer, "_compute_loss"): ["self", "model", "inputs"],
    (trl.RLOOTrainer, "_generate_and_score_completions"): ["self", "inputs"],
    (trl.RLOOTrainer, "_get_per_token_logps_and_entropies"): ["self", "model", "input_ids", "attention_mask", "logits_to_keep"],
    (trl.RLOOTrainer, "_compute_loss"): ["self", "model", "inputs"],
}
INSTANCE_PRIVATES = {"_metrics", "_signature_columns", "_logs"}
"""Private instance attributes of TRL trainers (not visible on the classes)."""


@pytest.mark.parametrize("owner, method", list(METHODS), ids=lambda x: getattr(x, "__name__", x))
def test_private_methods_keep_their_signatures(owner, method):
    assert hasattr(owner, method), f"TRL {trl.__version__}: {owner.__name__}.{method} is gone"
    parameters = list(inspect.signature(getattr(owner, method)).parameters.values())
    names, expected = [p.name for p in parameters], METHODS[owner, method]
    # TRL 1.14 declares GRPO's log-prob method as (self, model, *args, ...): the positional calls still fit
    takes_rest = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters[: len(expected)])
    head = names[: next(i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_POSITIONAL)] if takes_rest else names
    assert head[: len(expected)] == expected[: len(head)] if takes_rest else names[: len(expected)] == expected, (
        f"TRL {trl.__version__}: {owner.__name__}.{method}{names} moved"
    )


def test_grpo_loss_types_are_the_ones_the_adapter_reduces():
    """The adapter reduces an added KL term like ``_compute_loss`` reduces its per-token loss, per ``loss_type``."""
    source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    branches = re.findall(r"loss_type\s*(?:==|in)\s*(\[[^\]]*\]|\"\w+\")", source)
    trl_types = {name for branch in branches for name in re.findall(r"\"(\w+)\"", branch)}
    assert trl_types == set(grpo_aggregations(None)), f"TRL {trl.__version__} GRPO loss types: {sorted(trl_types)}"


@requires_trl_ppo
def test_ppo_internals_exist():
    from trl.experimental.ppo import PPOTrainer, ppo_trainer
    from trl.experimental.utils import first_true_indices, get_reward

    for name in ("INVALID_LOGPROB", "OnlineTrainerState", "batch_generation", "forward", "truncate_response"):
        assert hasattr(ppo_trainer, name), name
    assert list(inspect.signature(PPOTrainer.__init__).parameters)[:8] == [
        "self", "args", "processing_class", "model", "ref_model", "reward_model", "train_dataset", "value_model"
    ]
    assert callable(first_true_indices) and callable(get_reward) and hasattr(PPOTrainer, "null_ref_context")


@requires_trl_ppo
def test_standalone_ppo_config_has_stock_ppo_fields_and_defaults(tmp_path):
    """On TRL >= 1.13 RegularizedPPOConfig stands on adapters/ppo_standalone.PPOConfig: it must hold every field
    of TRL 1.12's PPOConfig with the same default, so a TRL 1.12 script's config runs unchanged."""
    from dataclasses import MISSING, fields

    from trl.experimental.ppo import PPOConfig as StockConfig

    from tests.trainers.test_ppo import STOCK_PPO_DEFAULTS
    from trl_regularizers.trainers.adapters.ppo_standalone import PPOConfig

    stock = {f.name: f for f in fields(StockConfig)}
    ours = {f.name: f for f in fields(PPOConfig)}
    assert set(stock) <= set(ours), sorted(set(stock) - set(ours))
    for name, stock_field in stock.items():
        default = stock_field.default if stock_field.default_factory is MISSING else stock_field.default_factory()
        mine = ours[name].default if ours[name].default_factory is MISSING else ours[name].default_factory()
        assert mine == default, name
    own = {name for name in stock if name not in {f.name for f in fields(transformers.TrainingArguments)}}
    assert {name for name in STOCK_PPO_DEFAULTS if name in own} == own
    assert all(STOCK_PPO_DEFAULTS[name] == getattr(StockConfig(output_dir=str(tmp_path), bf16=False), name) for name in STOCK_PPO_DEFAULTS)


def trl_private_names() -> set[str]:
    classes = [transformers.Trainer, trl.DPOTrainer, trl.RewardTrainer, trl.GRPOTrainer, trl.RLOOTrainer]
    if HAS_PPO:
        from trl.experimental.ppo import PPOTrainer

        classes.append(PPOTrainer)
    names = {name for cls in classes for name in dir(cls) if name.startswith("_") and not name.startswith("__")}
    return names | INSTANCE_PRIVATES


def test_only_adapters_name_trl_private_methods_or_attributes():
    private = trl_private_names()
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        hits = sorted(used & private)
        if hits and ADAPTERS not in path.parents:
            offenders[str(path.relative_to(PACKAGE))] = hits
    assert not offenders, f"TRL private names outside trainers/adapters/: {offenders}"
    assert sorted(p.name for p in ADAPTERS.glob("*.py")) == ["__init__.py", "base.py", "dpo.py", "grpo.py", "ppo.py", "ppo_standalone.py", "reward.py", "rloo.py"]


# ---- records have their documented shapes on a tiny model

def online_args(config_cls, tmp_path, **overrides):
    return config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=1,
        bf16=False, report_to="none", gradient_checkpointing=False, save_strategy="no", beta=0.04, **overrides
    )


def reward_len(completions, **kwargs):
    return [len(c) / 8 for c in completions]


@pytest.mark.parametrize("trainer_cls, config_cls, placement", [
    (RegularizedGRPOTrainer, RegularizedGRPOConfig, "loss"),
    (RegularizedGRPOTrainer, RegularizedGRPOConfig, "reward"),
    (RegularizedRLOOTrainer, RegularizedRLOOConfig, "loss"),
    (RegularizedRLOOTrainer, RegularizedRLOOConfig, "reward"),
])
def test_kl_records_have_the_documented_shapes(tiny_lm_path, tmp_path, trainer_cls, config_cls, placement):
    records = []

    class Recording(trainer_cls):
        def kl_penalty(self, record, logged_by_trl):
            records.append(record)
            return super().kl_penalty(record, logged_by_trl)

    args = online_args(config_cls, tmp_path, kl_estimator="full", kl_placement=placement)
    trainer = Recording(tiny_lm_path, reward_len, args, train_dataset=Dataset.from_dict({"prompt": ["hi", "abc"] * 4}))
    trainer.train()
    assert records
    hidden, vocab = trainer.model.config.hidden_size, trainer.model.config.vocab_size
    for record in records:
        batch, length = record.logps.shape
        assert record.ref_logps.shape == record.mask.shape == (batch, length)
        assert not record.ref_logps.requires_grad and set(record.mask.unique().tolist()) <= {0.0, 1.0}
        for states in (record.policy_states, record.ref_states):
            assert states.hidden.shape == (batch, length, hidden) and states.weight.shape == (vocab, hidden)
    assert any(record.logps.requires_grad for record in records) == (placement == "loss")


def test_preference_record_has_the_documented_shapes(tiny_lm_path, tmp_path):
    records = []

    class Recording(RegularizedDPOTrainer):
        def preference_loss(self, record):
            records.append(record)
            return super().preference_loss(record)

    pairs = Dataset.from_dict({"prompt": ["a", "b"] * 2, "chosen": ["yes", "yes!"] * 2, "rejected": ["no", "n"] * 2, "margin": [0.5, 1.0] * 2})
    args = RegularizedDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, bf16=False, report_to="none",
        gradient_checkpointing=False, save_strategy="no", nll_alpha=0.1, margin_source="column",
    )
    Recording(tiny_lm_path, args=args, train_dataset=pairs).train()
    (record,) = records
    batch, length = record.chosen_logps.shape
    assert batch == 2 and record.chosen_logps.requires_grad
    assert record.rejected_logps.shape == record.chosen_mask.shape == record.rejected_mask.shape == (batch, length)
    assert record.ref_chosen_logps.shape == record.ref_rejected_logps.shape == record.chosen_lengths.shape == (batch,)
    torch.testing.assert_close(record.columns["margin"], torch.tensor([0.5, 1.0]))
    assert (record.chosen_lengths > record.chosen_mask.sum(-1)).all()  # prompt + completion


OVERRIDES = {
    "DPOTrainer": {"_prepare_dataset", "_save_checkpoint", "_set_signature_columns_if_needed", "compute_loss", "compute_ref_log_probs", "train"},
    "RewardTrainer": {"_prepare_dataset", "_save_checkpoint", "compute_loss", "log", "train"},
    "GRPOTrainer": {"_calculate_rewards", "_compute_loss", "_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_save_checkpoint", "compute_loss", "train"},
    "RLOOTrainer": {"_compute_loss", "_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_save_checkpoint", "compute_loss", "train"},
}


@pytest.mark.parametrize("stock_name", sorted(OVERRIDES))
def test_regularized_trainers_override_only_the_intended_trl_names(stock_name):
    """A name the package defines that TRL also defines overrides TRL's: a new TRL attribute that collides with
    one of ours (``mode``, ``log_metric``, ...) would silently change TRL's behaviour, so the set is pinned."""
    import trl_regularizers

    stock = getattr(trl, stock_name)
    ours = getattr(trl_regularizers, f"Regularized{stock_name}")
    own = {name for cls in ours.__mro__ if cls.__module__.startswith("trl_regularizers") for name in vars(cls)}
    assert {name for name in own if hasattr(stock, name) and not name.startswith("__")} == OVERRIDES[stock_name]


def test_layers_only_point_down():
    """core/ and the config and data modules never import trainers/ (docs/architecture.md, "Layers")."""
    lower = [*sorted((PACKAGE / "core").glob("*.py")), *(PACKAGE / name for name in ("configs.py", "data.py", "ptx.py", "scoring.py"))]
    offenders = {}
    for path in lower:
        tree = ast.parse(path.read_text())
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        bad = sorted(m for m in modules if m.startswith("trl_regularizers.trainers"))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"lower layers import trainers/: {offenders}"
