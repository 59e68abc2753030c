"""The contract between the adapters and TRL, on every TRL release CI installs.

The table the adapters check when a trainer is built ships in the package (``trainers/adapters/contract.py``). Here:
it holds on this release; it lists every TRL name the adapters read; a moved name fails construction by name and a
newer TRL warns once and trains; every trainer accepts its parent's parameters; records have their documented
shapes; only the adapters name TRL privates, and lower layers never import the trainers.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
import trl
from datasets import Dataset

import trl_regularizers
from tests.trl_versions import HAS_PPO, requires_trl_ppo
from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer, RegularizedGRPOConfig, RegularizedGRPOTrainer
from trl_regularizers import RegularizedRLOOConfig, RegularizedRLOOTrainer
from trl_regularizers.trainers.adapters import contract
from trl_regularizers.trainers.adapters.grpo import grpo_aggregations

PACKAGE = Path(trl_regularizers.__file__).resolve().parent
ADAPTERS = PACKAGE / "trainers" / "adapters"
SEAM = [*sorted(ADAPTERS.glob("*.py")), *sorted((PACKAGE / "trainers" / "ppo").glob("*.py"))]
"""The modules that read TRL's (or the Trainer's) attributes: the adapters and the PPO loop over either setup."""
ENTRIES = [key for key, entry in contract.CONTRACT.items() if HAS_PPO or not entry.owner.startswith("trl.experimental")]


@pytest.mark.parametrize("key", ENTRIES)
def test_the_shipped_contract_holds_on_this_trl(key):
    contract.check_classes((key,))


def test_every_trl_attribute_the_seam_reads_is_in_the_contract():
    """Every ``self.<name>`` read in the adapters and the PPO modules is defined by the package itself, or listed in
    the contract (so a TRL release that drops it fails at construction, not mid-run)."""
    listed = {name for entry in contract.CONTRACT.values() for name in (*entry.methods, *entry.attributes, *entry.loop_attributes)}
    defined = set(dir(object)) | {f.name for f in dataclasses.fields(transformers.TrainingArguments)}  # config fields
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                defined |= {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
                defined |= {target.id for item in node.body if isinstance(item, (ast.Assign, ast.AnnAssign))
                            for target in (item.targets if isinstance(item, ast.Assign) else [item.target]) if isinstance(target, ast.Name)}
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self":
                defined.add(node.attr)
    read = {}
    for path in SEAM:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name) and node.value.id == "self":
                read.setdefault(node.attr, path.name)
    unlisted = {name: where for name, where in read.items() if name not in defined | listed | set(dir(builtins))}
    assert not unlisted, f"TRL attributes read but not in trainers/adapters/contract.py: {unlisted}"


def test_grpo_loss_types_are_the_ones_the_adapter_reduces():
    """The adapter reduces an added KL term like ``_compute_loss`` reduces its per-token loss, per ``loss_type``."""
    source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    branches = re.findall(r"loss_type\s*(?:==|in)\s*(\[[^\]]*\]|\"\w+\")", source)
    trl_types = {name for branch in branches for name in re.findall(r"\"(\w+)\"", branch)}
    assert trl_types == set(grpo_aggregations(None)), f"TRL {trl.__version__} GRPO loss types: {sorted(trl_types)}"


def reward_len(completions, **kwargs):
    return [len(c) / 8 for c in completions]


def online_args(config_cls, tmp_path, **overrides):
    return config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=1,
        bf16=False, report_to="none", gradient_checkpointing=False, save_strategy="no", beta=0.04, **overrides
    )


PROMPTS = Dataset.from_dict({"prompt": ["hi", "abc"] * 4})


def test_a_moved_trl_method_fails_construction_naming_it(tiny_lm_path, tmp_path, monkeypatch):
    def moved(self, model, batch):  # the signature a future TRL might give it
        raise AssertionError("never called")

    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", moved)
    with pytest.raises(contract.TRLContractError, match=r"trl.GRPOTrainer._compute_loss takes \(self, model, batch\), not \(self, model, inputs, \.\.\.\).*newest TRL release tested.*1\.16"):
        RegularizedGRPOTrainer(tiny_lm_path, reward_len, online_args(RegularizedGRPOConfig, tmp_path), train_dataset=PROMPTS)
    monkeypatch.undo()
    monkeypatch.delattr(trl.GRPOTrainer, "_calculate_rewards")
    with pytest.raises(contract.TRLContractError, match=r"trl.GRPOTrainer._calculate_rewards is gone"):
        RegularizedGRPOTrainer(tiny_lm_path, reward_len, online_args(RegularizedGRPOConfig, tmp_path), train_dataset=PROMPTS)


def test_a_newer_trl_whose_contract_holds_warns_once_and_trains(tiny_lm_path, tmp_path, monkeypatch):
    monkeypatch.setattr(trl, "__version__", "99.0.0")
    monkeypatch.setattr(contract, "_warned_versions", set())
    with pytest.warns(UserWarning, match=r"TRL 99.0.0 is newer than the newest release tested with trl-regularizers \(1\.16\.0\)"):
        first = RegularizedGRPOTrainer(tiny_lm_path, reward_len, online_args(RegularizedGRPOConfig, tmp_path), train_dataset=PROMPTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = RegularizedRLOOTrainer(tiny_lm_path, reward_len, online_args(RegularizedRLOOConfig, tmp_path), train_dataset=PROMPTS)
    assert not [w for w in caught if "newer than the newest" in str(w.message)]
    for trainer in (first, second):
        trainer.train()
        assert trainer.state.global_step == 1 and "kl/coef" in trainer.state.log_history[0]


def regularized_trainers():
    pairs = [(getattr(trl_regularizers, f"Regularized{name}Trainer"), getattr(trl, f"{name}Trainer")) for name in ("DPO", "Reward", "GRPO", "RLOO", "SFT")]
    if HAS_PPO:
        from trl.experimental.ppo import PPOTrainer

        pairs.append((trl_regularizers.RegularizedPPOTrainer, PPOTrainer))
    return pairs


@pytest.mark.parametrize("ours, stock", regularized_trainers(), ids=lambda cls: cls.__name__)
def test_each_trainer_accepts_every_parameter_of_its_parent(ours, stock):
    """The same names, kinds, order and defaults as the parent's ``__init__``, then keyword-only extras."""
    parent = list(inspect.signature(stock.__init__).parameters.values())
    mine = list(inspect.signature(ours.__init__).parameters.values())
    assert mine[: len(parent)] == parent
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in mine[len(parent) :])


@requires_trl_ppo
def test_standalone_ppo_config_has_stock_ppo_fields_and_defaults(tmp_path):
    """On TRL >= 1.13 RegularizedPPOConfig stands on trainers/ppo/config.PPOConfig: it must hold every field of TRL
    1.12's PPOConfig with the same default, so a TRL 1.12 script's config runs unchanged."""
    from trl.experimental.ppo import PPOConfig as StockConfig

    from tests.trainers.test_ppo import STOCK_PPO_DEFAULTS
    from trl_regularizers.trainers.ppo.config import PPOConfig

    default = lambda f: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()  # noqa: E731
    stock = {f.name: f for f in dataclasses.fields(StockConfig)}
    ours = {f.name: f for f in dataclasses.fields(PPOConfig)}
    assert set(stock) <= set(ours), sorted(set(stock) - set(ours))
    for name, stock_field in stock.items():
        assert default(ours[name]) == default(stock_field), name
    own = {name for name in stock if name not in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}}
    assert {name for name in STOCK_PPO_DEFAULTS if name in own} == own
    assert all(STOCK_PPO_DEFAULTS[name] == getattr(StockConfig(output_dir=str(tmp_path), bf16=False), name) for name in STOCK_PPO_DEFAULTS)


def trl_private_names() -> set[str]:
    classes = [transformers.Trainer, trl.DPOTrainer, trl.RewardTrainer, trl.GRPOTrainer, trl.RLOOTrainer]
    if HAS_PPO:
        from trl.experimental.ppo import PPOTrainer

        classes.append(PPOTrainer)
    names = {name for cls in classes for name in dir(cls) if name.startswith("_") and not name.startswith("__")}
    return names | {"_metrics", "_signature_columns", "_logs"}  # private instance attributes of TRL trainers


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


# ---- records have their documented shapes on a tiny model


@pytest.mark.parametrize("trainer_cls, config_cls, placement", [
    (RegularizedGRPOTrainer, RegularizedGRPOConfig, "loss"),
    (RegularizedGRPOTrainer, RegularizedGRPOConfig, "reward"),
    (RegularizedRLOOTrainer, RegularizedRLOOConfig, "loss"),
    (RegularizedRLOOTrainer, RegularizedRLOOConfig, "reward"),
])
def test_kl_records_have_the_documented_shapes(tiny_lm_path, tmp_path, trainer_cls, config_cls, placement):
    args = online_args(config_cls, tmp_path, kl_estimator="full", kl_placement=placement)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full in the reward is biased: warned, not the point here
        trainer = trainer_cls(tiny_lm_path, reward_len, args, train_dataset=PROMPTS)
    records, penalty = [], trainer.kl_penalty.penalty
    trainer.kl_penalty.penalty = lambda record, logged_by_trl=False: records.append(record) or penalty(record, logged_by_trl)
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
    pairs = Dataset.from_dict({"prompt": ["a", "b"] * 2, "chosen": ["yes", "yes!"] * 2, "rejected": ["no", "n"] * 2, "margin": [0.5, 1.0] * 2})
    args = RegularizedDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, bf16=False, report_to="none",
        gradient_checkpointing=False, save_strategy="no", nll_alpha=0.1, margin_source="column",
    )
    trainer = RegularizedDPOTrainer(tiny_lm_path, args=args, train_dataset=pairs)
    records, loss = [], trainer.preference_terms.loss
    trainer.preference_terms.loss = lambda record: records.append(record) or loss(record)
    trainer.train()
    (record,) = records
    batch, length = record.chosen_logps.shape
    assert batch == 2 and record.chosen_logps.requires_grad
    assert record.rejected_logps.shape == record.chosen_mask.shape == record.rejected_mask.shape == (batch, length)
    assert record.ref_chosen_logps.shape == record.ref_rejected_logps.shape == record.chosen_lengths.shape == (batch,)
    torch.testing.assert_close(record.columns["margin"], torch.tensor([0.5, 1.0]))
    assert (record.chosen_lengths > record.chosen_mask.sum(-1)).all()  # prompt + completion


OVERRIDES = {
    "DPOTrainer": {"_save_checkpoint", "_set_signature_columns_if_needed", "compute_loss", "compute_ref_log_probs", "evaluate", "train"},
    "RewardTrainer": {"_save_checkpoint", "compute_loss", "evaluate", "log", "train"},
    "GRPOTrainer": {"_calculate_rewards", "_compute_loss", "_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_save_checkpoint", "compute_loss", "train"},
    "RLOOTrainer": {"_compute_loss", "_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_save_checkpoint", "compute_loss", "train"},
    "SFTTrainer": {"_save_checkpoint", "compute_loss", "train"},
}


@pytest.mark.parametrize("stock_name", sorted(OVERRIDES))
def test_regularized_trainers_override_only_the_intended_trl_names(stock_name):
    """A name the package defines that TRL also defines overrides TRL's: a new TRL attribute that collides with
    one of ours (``mode``, ``log_mean``, ...) would silently change TRL's behaviour, so the set is pinned."""
    stock = getattr(trl, stock_name)
    ours = getattr(trl_regularizers, f"Regularized{stock_name}")
    own = {name for cls in ours.__mro__ if cls.__module__.startswith("trl_regularizers") for name in vars(cls)}
    assert {name for name in own if hasattr(stock, name) and not name.startswith("__")} == OVERRIDES[stock_name]


def test_layers_only_point_down():
    """core/, the config, data and model helpers and the components never import trainers/; core/ and the
    components name no TRL (docs/architecture.md, "Layers")."""
    lower = [*sorted((PACKAGE / "core").glob("*.py")), *sorted((PACKAGE / "components").glob("*.py")),
             *(PACKAGE / name for name in ("arguments.py", "configs.py", "data.py", "ptx.py", "scoring.py", "validation.py", "models.py"))]
    offenders = {}
    for path in lower:
        tree = ast.parse(path.read_text())
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        bad = sorted(m for m in modules if m.startswith("trl_regularizers.trainers"))
        if path.parent.name in ("core", "components"):
            bad += sorted(m for m in modules if m == "trl" or m.startswith("trl."))
        if bad:
            offenders[path.relative_to(PACKAGE).as_posix()] = bad
    assert not offenders, f"lower layers import what they must not: {offenders}"
