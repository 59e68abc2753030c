"""Recipes: every YAML parses into the recipe's dataclasses with its values, its header is the exact launch
line (naming files that exist), the accelerate configs load, and one recipe trains with 2 CPU processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
SCRIPT_OF = {"dpo_nll": "dpo", "reward_margin": "reward", "grpo_kl": "grpo", "rloo_kl": "rloo", "ppo_ptx": "ppo", "sft_kl": "sft"}


def free_port() -> int:
    """A port no process listens on now: a rank left over from another run on the default 29500 would join this one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_recipe(name: str):
    sys.path.insert(0, str(RECIPES))
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPES))


def test_every_trainer_has_a_recipe_and_a_config():
    assert {c.stem for c in CONFIGS} == set(SCRIPT_OF)
    assert all((RECIPES / f"{script}.py").is_file() for script in SCRIPT_OF.values())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_yaml_parses_into_the_recipe_dataclasses(config, tmp_path):
    script = SCRIPT_OF[config.stem]
    values = yaml.safe_load(config.read_text())
    parsed = load_recipe(script).make_parser().parse_args_and_config(args=["--config", str(config), "--output_dir", str(tmp_path)])
    fields = {}
    for dataclass_obj in parsed:
        fields.update(vars(dataclass_obj))
    for key, value in values.items():
        if key == "output_dir":
            assert fields[key] == str(tmp_path)  # command-line flags override the YAML
        elif key == "report_to":
            assert fields[key] in (value, [value], [])
        else:
            assert fields[key] == value, key
    assert type(parsed[1]).__name__.startswith("Regularized")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_yaml_header_is_the_launch_line(config):
    header = config.read_text().splitlines()[0]
    launch = f"# accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/{SCRIPT_OF[config.stem]}.py --config recipes/configs/{config.name}"
    assert header == launch


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {path.stem: ClusterConfig.from_yaml_file(str(path)).distributed_type for path in (RECIPES / "accelerate").glob("*.yaml")}
    assert {k: str(v).split(".")[-1] for k, v in kinds.items()} == {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "multi_cpu": "MULTI_GPU",  # torchrun launcher; the recipe runs with --use_cpu true
        "fsdp": "FSDP",
        "deepspeed_zero3": "DEEPSPEED",
    }


@pytest.mark.slow
def test_dpo_recipe_trains_with_two_cpu_processes(tmp_path):
    """accelerate launch with the multi_cpu config: 2 ranks, 2 optimizer steps, finite losses incl. nll/chosen."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "accelerate" / "multi_cpu.yaml"), "--main_process_port", str(free_port()),
        str(RECIPES / "dpo.py"), "--config", str(RECIPES / "configs" / "dpo_nll.yaml"),
        "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
        "--use_cpu", "true", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads(line.replace("'", '"')) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 2, result.stdout[-2000:]
    assert all(float(log["nll/chosen"]) > 0 for log in logs)
    assert (out / "model.safetensors").is_file()
    # 2 ranks x 4 pairs per step over the 48 training pairs: epoch 16/48 after 2 steps (one process: 8/48).
    assert float(logs[-1]["epoch"]) == pytest.approx(2 * 2 * 4 / 48, abs=1e-3)


@pytest.mark.slow
def test_ppo_recipe_trains_with_two_cpu_processes(tmp_path):
    """PPO-ptx under DDP (2 CPU ranks) on this TRL: 2 updates of 2 x 4 episodes, finite metrics incl. ptx/nll, the
    policy saved."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "accelerate" / "multi_cpu.yaml"), "--main_process_port", str(free_port()),
        str(RECIPES / "ppo.py"), "--config", str(RECIPES / "configs" / "ppo_ptx.yaml"),
        "--output_dir", str(out), "--total_episodes", "16", "--logging_steps", "1", "--num_ppo_epochs", "1",
        "--response_length", "8", "--use_cpu", "true", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [line for line in result.stdout.splitlines() if line.startswith("{'eps'")]
    assert len(logs) == 2, result.stdout[-2000:]
    last = eval(logs[-1], {"nan": float("nan")})  # noqa: S307 (the trainer's own printed dict)
    assert int(last["episode"]) == 2 * 2 * 4  # 2 updates x 2 ranks x per_device_train_batch_size 4
    assert all(float(last[name]) == float(last[name]) for name in ("objective/kl", "loss/policy_avg", "ptx/nll"))
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_sft_recipe_trains_and_logs_its_regularizers(tmp_path):
    """The SFT recipe on the tiny world: the KL to the base grows from 0 as the policy moves, ptx is mixed in."""
    recipe = load_recipe("sft")
    config = RECIPES / "configs" / "sft_kl.yaml"
    parsed = recipe.make_parser().parse_args_and_config(args=["--config", str(config), "--output_dir", str(tmp_path), "--max_steps", "3", "--logging_steps", "1"])
    trainer = recipe.main(*parsed)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and logs[0]["kl/forward"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl/forward"] > 0
    assert all(log["ptx/nll"] > 0 and log["kl/coef"] == 0.5 for log in logs)
    assert (tmp_path / "model.safetensors").is_file()
