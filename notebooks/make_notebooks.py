"""Generate the Colab notebooks from one template, so they stay consistent: `python notebooks/make_notebooks.py`.

Each notebook is a plain TRL notebook (model, data, config, trainer, train) in which only the regularizer
lines differ, preceded by an "Open in Colab" badge and an install cell that installs the package and clones this
repository for the tiny world of its examples (``examples/demo``, which the wheel does not ship); it does
nothing where both are importable. It trains twice, with the regularizer off and on (same seed, same data), and ends with a
matplotlib plot of the metric the regularizer is meant to change, read from the runs' logs, and a one-line
summary of its final values (``<what>: {<run without>: <value>, <run with>: <value>}``, which
tests/test_notebooks.py checks). They run on the embedded tiny model in well under a minute on a CPU; the
markdown says which two lines to change for a real model.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = "trl-regularizers/trl-regularizers"  # GitHub owner/name used in the Colab links
PACKAGE = "trl-regularizers[peft,demo]"  # what the install cell installs on Colab; `demo` brings matplotlib

SETUP = '''import os
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from examples.demo.pretrain import base_model_path
from examples.demo.corpus import corpus_lines

model_name = base_model_path()  # the embedded tiny model; on Colab with a GPU try e.g. "Qwen/Qwen2.5-0.5B-Instruct"
cpu = dict(bf16=False, report_to="none", gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True)
seed = 0  # both runs, without and with the regularizer, use it and the same data'''

SERIES = '''import matplotlib.pyplot as plt

def series(log_history, key):
    """Steps and values of `key` in a Trainer log history (the rows that have it)."""
    rows = [(log["step"], log[key]) for log in log_history if key in log]
    return [step for step, _ in rows], [value for _, value in rows]

'''
"""Head of every notebook's last cell, which plots both runs and prints the summary line."""

NOTEBOOKS = {
    "dpo_nll": dict(
        title="DPO + NLL (eq. 7-8)",
        intro="DPO tends to lower the log-probability of the *chosen* answers too. Adding alpha times their length-normalized NLL keeps them up. Compared with a plain TRL DPO notebook, only the config/trainer class and `nll_alpha` change.",
        plot="the chosen (and rejected) log-probs over the training steps",
        cells=[
            '''from examples.demo.runs import fact_pairs
pairs = fact_pairs()  # columns: prompt, chosen, rejected
pairs[0]''',
            '''from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer  # was: from trl import DPOConfig, DPOTrainer

logs = {}
for name, nll_alpha in {"DPO": 0.0, "DPO + NLL": 1.0}.items():  # nll_alpha=0.0 is plain DPO
    args = RegularizedDPOConfig(output_dir="dpo_nll", nll_alpha=nll_alpha, beta=0.1, learning_rate=2e-3,
                                per_device_train_batch_size=8, max_steps=16, seed=seed, **cpu)
    trainer = RegularizedDPOTrainer(model=model_name, args=args, train_dataset=pairs)
    trainer.train()
    logs[name] = trainer.state.log_history''',
            SERIES
            + '''for (name, log_history), color in zip(logs.items(), ["tab:red", "tab:blue"]):
    plt.plot(*series(log_history, "logps/chosen"), color=color, marker="o", label=f"{name}: chosen")
    plt.plot(*series(log_history, "logps/rejected"), color=color, ls="--", label=f"{name}: rejected")
plt.xlabel("step"); plt.ylabel("completion log-prob (training batch)"); plt.legend()
plt.title("DPO pushes the chosen answers down too; the NLL term holds them up")
plt.show()
print("chosen log-prob at the last step:", {name: round(series(log, "logps/chosen")[1][-1], 3) for name, log in logs.items()})''',
        ],
    ),
    "reward_margin": dict(
        title="Reward model with margins from preference strength (eq. 9, Llama 2)",
        intro="Pairs labeled 'significantly better' should be separated by a larger reward gap than 'slightly better' ones. `margin_source=\"label\"` turns the labels into the margin of the loss.",
        plot="the held-out reward gap r(chosen) - r(rejected) by preference strength",
        cells=[
            '''from examples.demo.runs import rated_pairs
train, test = rated_pairs(96, seed=11), rated_pairs(96, seed=12)  # chosen, rejected, preference_strength
strengths = ["slightly better", "better", "significantly better"]
test_by_strength = {s.split()[0]: test.filter(lambda row: row["preference_strength"] == s) for s in strengths}  # evaluated one by one
train[0]''',
            '''from trl_regularizers import RegularizedRewardConfig, RegularizedRewardTrainer  # was: from trl import RewardConfig, RewardTrainer

logs = {}
for name, margin_source in {"RM": None, "RM + margin": "label"}.items():  # margin_source=None is plain TRL
    args = RegularizedRewardConfig(output_dir="reward_margin", margin_source=margin_source, margin_label_field="preference_strength",
                                   margin_label_map="llama2_large", learning_rate=1e-3, per_device_train_batch_size=16,
                                   max_steps=12, eval_strategy="steps", eval_steps=12, seed=seed, **cpu)
    trainer = RegularizedRewardTrainer(model=model_name, args=args, train_dataset=train, eval_dataset=test_by_strength)
    trainer.train()
    logs[name] = trainer.state.log_history''',
            SERIES
            + '''def reward_gap(log_history, subset):
    """TRL's eval_margin (mean r(chosen) - r(rejected)) in the last evaluation of one eval subset."""
    return series([log for log in log_history if f"eval_{subset}_loss" in log], "eval_margin")[1][-1]

for offset, (name, log_history) in zip([-0.2, 0.2], logs.items()):
    plt.bar([i + offset for i in range(len(strengths))], [reward_gap(log_history, s) for s in test_by_strength], width=0.4, label=name)
plt.xticks(range(len(strengths)), strengths); plt.ylabel("mean r(chosen) - r(rejected), held-out pairs"); plt.legend()
plt.title(f"Reward gap by preference strength after {args.max_steps} steps")
plt.show()
print("reward gap on 'significantly better' pairs:", {name: round(reward_gap(log, "significantly"), 3) for name, log in logs.items()})''',
        ],
    ),
    "grpo_kl": dict(
        title="GRPO: where the KL penalty goes (loss or reward), which estimator, adaptive beta",
        intro="A reward that is easy to game (the fraction of `o` characters) sends an unregularized policy off the rails. Choose the KL estimator and placement with two config fields; `KLDriftCallback` measures the exact KL to the base either way.",
        plot="the reward and the KL to the base over the training steps",
        cells=[
            '''from datasets import Dataset
from trl_regularizers import KLDriftCallback
from examples.demo.runs import target_char_reward, task_prompts
prompts = Dataset.from_dict({"prompt": task_prompts() * 16})''',
            '''from trl_regularizers import RegularizedGRPOConfig, RegularizedGRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

# KL in the reward, as RLOO does: k1 summed over the completion, subtracted before the group normalization.
# beta multiplies a sum over ~16 tokens here, so it is much smaller than a per-token beta in the loss
# (kl_placement="loss", kl_estimator="k3", beta=0.2); the demo report shows both (reports/demo/report.md).
logs = {}
for name, beta in {"beta=0": 0.0, "KL in the reward": 0.01}.items():  # beta=0.0: no KL term, as in plain TRL GRPO
    drift = KLDriftCallback(task_prompts()[:8], every_n_steps=5, max_new_tokens=16)  # the exact KL to the base, in both runs
    args = RegularizedGRPOConfig(output_dir="grpo_kl", beta=beta, kl_estimator="k1", kl_placement="reward",
                                 learning_rate=5e-4, per_device_train_batch_size=16, num_generations=8,
                                 max_completion_length=16, max_steps=40, seed=seed, **cpu)
    trainer = RegularizedGRPOTrainer(model=model_name, reward_funcs=target_char_reward, args=args, train_dataset=prompts,
                                     callbacks=[drift])
    trainer.train()
    logs[name] = trainer.state.log_history''',
            SERIES
            + '''fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for name, log_history in logs.items():
    left.plot(*series(log_history, "rewards/target_char_reward/mean"), label=name)
    right.plot(*series(log_history, "drift/kl_reverse"), marker="o", label=name)
left.set(xlabel="step", ylabel="reward (fraction of 'o')", title="Reward"); left.legend()
right.set(xlabel="step", ylabel="KL(pi || pi_0) per token", title="KL to the base (KLDriftCallback)"); right.legend()
plt.show()
print("KL(pi || pi_0) at the last step:", {name: round(series(log, "drift/kl_reverse")[1][-1], 3) for name, log in logs.items()})''',
        ],
    ),
    "ppo_ptx": dict(
        title="PPO-ptx (eq. 6, InstructGPT): mix the pretraining NLL into PPO",
        intro="TRL removed `PPOTrainer` in 1.13; `RegularizedPPOTrainer` keeps its constructor and config fields on every TRL release (the current one included), so a TRL 1.12 PPO script changes its import line only. `ptx_coef` and `pretrain_dataset=` are the only additions.",
        plot="the NLL of held-out text (forgetting) and the KL to the base after each PPO update",
        cells=[
            '''from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
from datasets import Dataset
from trl_regularizers import KLDriftCallback
from examples.demo.runs import task_prompts

tokenizer = AutoTokenizer.from_pretrained(model_name, padding_side="left")
prompts = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in task_prompts()]})
pretrain = Dataset.from_dict({"text": corpus_lines(500)})''',
            '''from trl_regularizers import RegularizedPPOConfig, RegularizedPPOTrainer  # was: from trl.experimental.ppo import PPOConfig, PPOTrainer

histories = {}
for name, ptx_coef in {"PPO": 0.0, "PPO-ptx": 0.5}.items():  # ptx_coef=0.0 is plain PPO
    set_seed(seed)  # the same random reward and value heads in both runs
    drift = KLDriftCallback(task_prompts()[:8], every_n_steps=1, max_new_tokens=16, heldout_texts=corpus_lines(16, "heldout"))  # both runs
    args = RegularizedPPOConfig(output_dir="ppo_ptx", ptx_coef=ptx_coef, ptx_block_size=64, ptx_batch_size=4,
                                learning_rate=1e-3, per_device_train_batch_size=4, total_episodes=16, response_length=12,
                                num_sample_generations=0, stop_token="eos", seed=seed, **cpu)
    trainer = RegularizedPPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(model_name), ref_model=AutoModelForCausalLM.from_pretrained(model_name),
        reward_model=AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=1),  # use your reward model
        value_model=AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=1),
        train_dataset=prompts, pretrain_dataset=pretrain if ptx_coef > 0 else None, callbacks=[drift],
    )
    trainer.train()
    histories[name] = drift.history  # one row per probe, update 0 included''',
            SERIES
            + '''fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for name, history in histories.items():
    left.plot(*series(history, "forgetting/nll"), marker="o", label=name)
    right.plot(*series(history, "drift/kl_reverse"), marker="o", label=name)
updates = series(histories["PPO"], "forgetting/nll")[0]
left.set(xlabel="PPO update", xticks=updates, ylabel="NLL of held-out text (nats/token)", title="Forgetting"); left.legend()
right.set(xlabel="PPO update", xticks=updates, ylabel="KL(pi || pi_0) per token", title="KL to the base"); right.legend()
plt.show()
print("held-out NLL after the last update:", {name: round(series(history, "forgetting/nll")[1][-1], 3) for name, history in histories.items()})''',
        ],
    ),
    "sft_kl": dict(
        title="SFT anchored to its base: the exact KL on the trained tokens, against forgetting",
        intro="Fine-tuning on new facts (here: the facts of another tiny world, which contradict what the model learned) makes it forget what it knew. `RegularizedSFTTrainer` adds `sft_kl_coef` times the exact KL(pi_0 || pi) to the base on the tokens SFT trains (RL's Razor's measure of drift). Compared with a plain TRL SFT notebook, only the config/trainer class and `sft_kl_coef` change; `KLDriftCallback` measures the held-out NLL of the old world's text.",
        runs="without the KL anchor (`sft_kl_coef=0`, stock SFT) and with it (`sft_kl_coef=3`)",
        plot="the held-out NLL of the prior text (forgetting) and the KL to the base over the training steps",
        cells=[
            '''from datasets import Dataset
new_facts = Dataset.from_dict({"text": corpus_lines(256, "train", world_seed=1)})  # another world: new, contradicting facts
new_facts[0]''',
            '''from trl_regularizers import KLDriftCallback, RegularizedSFTConfig, RegularizedSFTTrainer  # was: from trl import SFTConfig, SFTTrainer
from examples.demo.runs import task_prompts

logs = {}
for name, sft_kl_coef in {"SFT": 0.0, "SFT + KL": 3.0}.items():  # sft_kl_coef=0.0 is plain SFT
    drift = KLDriftCallback(task_prompts()[:4], every_n_steps=6, max_new_tokens=12, heldout_texts=corpus_lines(16, "heldout"))
    args = RegularizedSFTConfig(output_dir="sft_kl", sft_kl_coef=sft_kl_coef, learning_rate=3e-3, per_device_train_batch_size=8,
                                max_length=64, max_steps=12, seed=seed, **cpu)
    trainer = RegularizedSFTTrainer(model=model_name, args=args, train_dataset=new_facts, callbacks=[drift])
    trainer.train()
    logs[name] = trainer.state.log_history''',
            SERIES
            + '''fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for name, log_history in logs.items():
    left.plot(*series(log_history, "forgetting/nll"), marker="o", label=name)
    right.plot(*series(log_history, "drift/kl_forward"), marker="o", label=name)
left.set(xlabel="step", ylabel="NLL of the old world's held-out text (nats/token)", title="forgetting/nll"); left.legend()
right.set(xlabel="step", ylabel="KL(pi_0 || pi) per token on task prompts", title="drift/kl_forward"); right.legend()
plt.show()
print("forgetting/nll at the last step:", {name: round(series(log, "forgetting/nll")[1][-1], 3) for name, log in logs.items()})''',
        ],
    ),
    "drift_monitor": dict(
        title="Drift monitor: KL to the base and forgetting, with any trainer (eq. 15)",
        intro="`KLDriftCallback` logs `drift/kl_reverse`, `drift/kl_forward` (exact per-token KL on completions sampled from fixed task prompts) and `forgetting/nll` on held-out text, even with `beta=0`. It is the only addition to a stock TRL GRPO notebook here.",
        runs="without a KL penalty (`beta=0`) and with TRL's own (`beta=0.2`)",
        plot="the KL to the base and the held-out NLL over the training steps",
        cells=[
            '''from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl_regularizers import KLDriftCallback
from examples.demo.runs import target_char_reward, task_prompts

logs = {}
for beta in (0.0, 0.2):
    drift = KLDriftCallback(task_prompts()[:8], every_n_steps=2, max_new_tokens=16, heldout_texts=corpus_lines(16, "heldout"))
    args = GRPOConfig(output_dir="drift", beta=beta, learning_rate=2e-3, per_device_train_batch_size=8, num_generations=8,
                      max_completion_length=16, max_steps=12, seed=seed, **cpu)
    trainer = GRPOTrainer(model=model_name, reward_funcs=target_char_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": task_prompts() * 4}), callbacks=[drift])
    trainer.train()
    logs[f"beta={beta:g}"] = trainer.state.log_history  # the probes are also in drift.history, one row each''',
            SERIES
            + '''fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for name, log_history in logs.items():
    left.plot(*series(log_history, "drift/kl_reverse"), marker="o", label=name)
    right.plot(*series(log_history, "forgetting/nll"), marker="o", label=name)
left.set(xlabel="step", ylabel="KL(pi || pi_0) per token", title="drift/kl_reverse"); left.legend()
right.set(xlabel="step", ylabel="NLL of held-out text (nats/token)", title="forgetting/nll"); right.legend()
plt.show()
print("drift/kl_reverse at the last step:", {name: round(series(log, "drift/kl_reverse")[1][-1], 3) for name, log in logs.items()})''',
        ],
    ),
}


def install_cell() -> str:
    return f'''# Install (Colab): the package, and this repository for the tiny world of its examples (not in the wheel).
# Does nothing where both are importable already.
import os, sys
try:
    import trl_regularizers
except ImportError:
    %pip install -q "{PACKAGE}"
try:
    import examples.demo
except ImportError:
    if not os.path.isdir("trl-regularizers"):
        !git clone -q --depth 1 https://github.com/{REPO}
    sys.path.insert(0, os.path.abspath("trl-regularizers"))'''


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb)"
    runs = spec.get("runs", "with the regularizer off and on")
    comparison = f"It trains twice on the same data with the same seed, {runs}, and ends with a plot of {spec['plot']}."
    cells = [
        new_markdown_cell(f"{badge}\n\n# {spec['title']}\n\n{spec['intro']}\n\n{comparison}"),
        new_code_cell(install_cell()),
        new_code_cell(SETUP),
        *[new_code_cell(source) for source in spec["cells"]],
    ]
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{name}-{index}"  # stable ids: regenerating gives identical files
    return notebook


def main() -> None:
    for name, spec in NOTEBOOKS.items():
        nbformat.write(build(name, spec), HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
