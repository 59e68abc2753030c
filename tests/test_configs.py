"""Config dataclasses: drop-in for the TRL configs, flat documented fields, errors that name the field."""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings

import pytest
from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, TrlParser

from trl_regularizers.configs import (
    KLArguments,
    MarginArguments,
    PtxArguments,
    RegularizedDPOConfig,
    RegularizedGRPOConfig,
    RegularizedRewardConfig,
    RegularizedRLOOConfig,
    RewardAwareArguments,
)

PAIRS = [
    (RegularizedDPOConfig, DPOConfig),
    (RegularizedRewardConfig, RewardConfig),
    (RegularizedGRPOConfig, GRPOConfig),
    (RegularizedRLOOConfig, RLOOConfig),
]
CPU = dict(bf16=False, report_to="none")


def new_fields(ours, parent):
    parent_names = {f.name for f in dataclasses.fields(parent)}
    return [f for f in dataclasses.fields(ours) if f.name not in parent_names]


@pytest.mark.parametrize("ours, parent", PAIRS)
def test_parent_fields_keep_their_order_and_defaults(ours, parent, tmp_path):
    ours_fields = [f.name for f in dataclasses.fields(ours)]
    parent_fields = [f.name for f in dataclasses.fields(parent)]
    assert ours_fields[: len(parent_fields)] == parent_fields  # positional use of the parent still works
    mine, stock = ours(str(tmp_path), **CPU), parent(str(tmp_path), **CPU)
    for name in parent_fields:
        assert getattr(mine, name) == getattr(stock, name), name


@pytest.mark.parametrize("ours, parent", PAIRS)
def test_every_new_field_is_documented(ours, parent):
    docs = "".join(cls.__doc__ or "" for cls in ours.__mro__ if cls in (ours, KLArguments, PtxArguments, MarginArguments, RewardAwareArguments))
    for f in new_fields(ours, parent):
        assert f.metadata.get("help"), f"{ours.__name__}.{f.name} has no help text"
        assert f"{f.name} (`" in docs, f"{ours.__name__}.{f.name} is missing from the docstrings"


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        (RegularizedGRPOConfig, dict(kl_estimator="k9"), "kl_estimator='k9' is not valid. Allowed values: k1, k2, k3, abs, full"),
        (RegularizedGRPOConfig, dict(kl_placement="advantage"), "kl_placement='advantage'.*loss, reward"),
        (RegularizedRLOOConfig, dict(kl_direction="both"), "kl_direction='both'.*reverse, forward"),
        (RegularizedGRPOConfig, dict(kl_clamp=0.0), r"kl_clamp must be in \(0, 50\] or None, got 0.0"),
        (RegularizedGRPOConfig, dict(kl_clamp=100.0), r"kl_clamp must be in \(0, 50\] or None, got 100.0"),
        (RegularizedGRPOConfig, dict(kl_target=1.0, beta=0.0), "kl_target=1.0 needs beta > 0"),
        (RegularizedRLOOConfig, dict(beta=-0.1), "beta must be >= 0"),
        (RegularizedDPOConfig, dict(nll_alpha=-1.0), "nll_alpha must be >= 0"),
        (RegularizedDPOConfig, dict(nll_normalization="tokens"), "nll_normalization='tokens'.*completion, sequence"),
        (RegularizedDPOConfig, dict(ptx_coef=-0.5), "ptx_coef must be >= 0"),
        (RegularizedRewardConfig, dict(margin_source="vibes"), "margin_source='vibes'.*column, rating, likert, label"),
        (RegularizedRewardConfig, dict(margin_label_map="llama3"), "margin_label_map='llama3'.*llama2_small, llama2_large"),
        (RegularizedRewardConfig, dict(margin_likert_points=1), "margin_likert_points must be >= 2"),
        (RegularizedDPOConfig, dict(reward_aware_loss="rpo"), "reward_aware_loss='rpo'.*rpo_sq, rpo_bwd_kl, rpo_fwd_kl, rebel, weighted_dpo"),
        (RegularizedDPOConfig, dict(reward_weighting="rank"), "reward_weighting='rank'.*abs_normalized, abs, sigmoid"),
        (RegularizedDPOConfig, dict(reward_eta=-0.5), r"reward_eta must be in \[0, 1e\+15\], got -0.5"),
        (RegularizedDPOConfig, dict(reward_aware_loss="rebel", reward_eta=0.0), "reward_eta must be > 0, got 0.0"),
        (RegularizedDPOConfig, dict(reward_eta=1e20), r"reward_eta must be in \[0, 1e\+15\], got 1e\+20"),
        (RegularizedDPOConfig, dict(reward_model_batch_size=0), "reward_model_batch_size must be > 0"),
        (RegularizedDPOConfig, dict(reward_model_max_length=0), "reward_model_max_length must be >= 1"),
        (RegularizedDPOConfig, dict(reward_rejected_score_field="chosen_score"), "two different column names"),
    ],
)
def test_bad_values_raise_errors_naming_the_field(config, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(str(tmp_path), **CPU, **kwargs)


def test_rloo_and_grpo_defaults_are_the_stock_kl():
    assert (RegularizedGRPOConfig("o", **CPU).kl_estimator, RegularizedGRPOConfig("o", **CPU).kl_placement) == ("k3", "loss")
    assert (RegularizedRLOOConfig("o", **CPU).kl_estimator, RegularizedRLOOConfig("o", **CPU).kl_placement) == ("k1", "reward")


def test_label_map_accepts_json():
    config = RegularizedRewardConfig("o", **CPU, margin_label_map='{"A is better": 2, "tie": 0}')
    assert config.margin_labels() == {"A is better": 2.0, "tie": 0.0}


def test_yaml_and_command_line_reach_the_new_fields(tmp_path):
    yaml_file = tmp_path / "grpo.yaml"
    yaml_file.write_text("output_dir: out\nbf16: false\nbeta: 0.05\nkl_estimator: k2\nkl_placement: reward\nkl_target: 3.0\n")
    (config,) = TrlParser((RegularizedGRPOConfig,)).parse_args_and_config(["--config", str(yaml_file), "--kl_clamp", "5"])
    assert (config.kl_estimator, config.kl_placement, config.kl_target, config.kl_clamp, config.beta) == ("k2", "reward", 3.0, 5.0, 0.05)


def float_fields(config_cls) -> list[str]:
    """Every field typed with float (alone, optional, or in a list), inherited TRL fields included."""
    hints = typing.get_type_hints(config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if "float" in str(hints.get(f.name, ""))]


def all_configs() -> list[type]:
    from trl_regularizers.trainers.ppo import RegularizedPPOConfig  # on every TRL

    return [*(ours for ours, _ in PAIRS), RegularizedPPOConfig]


NON_FINITE_CASES = [
    (config_cls, name, value)
    for config_cls in all_configs()
    for name in float_fields(config_cls)
    for value in (math.nan, math.inf, -math.inf)
]


@pytest.mark.parametrize("config_cls, name, value", NON_FINITE_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_no_float_field_accepts_nan_or_inf(config_cls, name, value, tmp_path):
    """Generated from the dataclass fields: a new float field is covered without a new test."""
    hints = typing.get_type_hints(config_cls)
    bad = [value] if "list" in str(hints[name]).lower() else value
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        config_cls(str(tmp_path), **CPU, **{name: bad})


@pytest.mark.parametrize("config_cls", [RegularizedGRPOConfig, RegularizedDPOConfig])
def test_non_finite_numbers_are_refused_from_the_command_line_and_yaml(config_cls, tmp_path):
    field_name = "kl_target" if config_cls is RegularizedGRPOConfig else "nll_alpha"
    parser = TrlParser((config_cls,))
    with pytest.raises(ValueError, match=f"{field_name} must be a finite number"):
        parser.parse_args_and_config(["--output_dir", "o", "--bf16", "False", f"--{field_name}", "inf"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"output_dir: out\nbf16: false\n{field_name}: .nan\n")
    with pytest.raises(ValueError, match=f"{field_name} must be a finite number"):
        parser.parse_args_and_config(["--config", str(yaml_file)])


def test_what_the_docs_show_parses_from_the_command_line_and_yaml(tmp_path):
    """``--margin_source None`` (the documented default) and ``margin_label_map`` as a YAML mapping."""
    parser = TrlParser((RegularizedRewardConfig,))
    (config,) = parser.parse_args_and_config(["--output_dir", "o", "--bf16", "False", "--margin_source", "None"])
    assert config.margin_source is None
    yaml_file = tmp_path / "rm.yaml"
    yaml_file.write_text("output_dir: out\nbf16: false\nmargin_source: label\nmargin_label_map:\n  much better: 2\n  better: 1\n")
    (config,) = parser.parse_args_and_config(["--config", str(yaml_file)])
    assert config.margin_labels() == {"much better": 2.0, "better": 1.0}


@pytest.mark.parametrize("label_map", ['{"better": NaN}', '{"better": Infinity}', '{"better": true}'])
def test_label_map_refuses_non_finite_and_non_numeric_margins(label_map):
    with pytest.raises(ValueError, match="margin_label_map=.*labels to finite numbers"):
        RegularizedRewardConfig("o", **CPU, margin_label_map=label_map)


def test_margin_scale_must_be_positive():
    with pytest.raises(ValueError, match="margin_scale must be > 0, got -1.0"):
        RegularizedRewardConfig("o", **CPU, margin_scale=-1.0)


@pytest.mark.parametrize("config_cls", [RegularizedGRPOConfig, RegularizedRLOOConfig])
def test_kl_options_with_a_zero_coefficient_warn_that_no_kl_is_applied(config_cls, tmp_path):
    """TRL's GRPO defaults to beta=0.0: a KL estimator chosen there would silently do nothing."""
    with pytest.warns(UserWarning, match=r"kl_estimator='k2', kl_direction='forward' set, but beta=0: no KL penalty is applied"):
        config_cls(str(tmp_path), beta=0.0, kl_estimator="k2", kl_direction="forward", **CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        config_cls(str(tmp_path), beta=0.0, **CPU)  # defaults: nothing asked for, nothing to warn about
        config_cls(str(tmp_path), beta=0.1, kl_estimator="k1", **CPU)


def test_sft_kl_options_with_a_zero_coefficient_warn(tmp_path):
    from trl_regularizers import RegularizedSFTConfig

    with pytest.warns(UserWarning, match=r"sft_kl_direction='reverse' set, but sft_kl_coef=0"):
        RegularizedSFTConfig(str(tmp_path), sft_kl_direction="reverse", **CPU)
