"""Generate the Colab notebooks from one template, so they stay consistent: `python notebooks/make_notebooks.py`.

Each notebook is a plain TRL notebook (model, data, config, trainer, train) in which only the regularizer
lines differ, preceded by an "Open in Colab" badge and an install cell that does nothing when the package
is already importable. They run on the embedded tiny model in well under a minute on a CPU; the markdown
says which two lines to change for a real model.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = "trl-regularizers/trl-regularizers"  # GitHub owner/name used in the Colab links

SETUP = '''import os
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from trl_regularizers.demo.pretrain import base_model_path
from trl_regularizers.demo.corpus import corpus_lines

model_name = base_model_path()  # the embedded tiny model; on Colab with a GPU try e.g. "Qwen/Qwen2.5-0.5B-Instruct"
cpu = dict(bf16=False, report_to="none", gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True)'''

NOTEBOOKS = {
    "dpo_nll": dict(
        title="DPO + NLL (eq. 7-8)",
        intro="DPO tends to lower the log-probability of the *chosen* answers too. Adding alpha times their length-normalized NLL keeps them up. Compared with a plain TRL DPO notebook, only the config/trainer class and `nll_alpha` change.",
        extra="pip_extra",
        cells=[
            '''from trl_regularizers.demo.runs import fact_pairs
pairs = fact_pairs()  # columns: prompt, chosen, rejected
pairs[0]''',
            '''from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer  # was: from trl import DPOConfig, DPOTrainer

args = RegularizedDPOConfig(output_dir="dpo_nll", nll_alpha=1.0, beta=0.1, learning_rate=2e-3,
                            per_device_train_batch_size=8, max_steps=8, **cpu)
trainer = RegularizedDPOTrainer(model=model_name, args=args, train_dataset=pairs)
trainer.train()''',
            '''[(log["step"], log["logps/chosen"], log["nll/chosen"]) for log in trainer.state.log_history if "nll/chosen" in log]''',
        ],
    ),
    "reward_margin": dict(
        title="Reward model with margins from preference strength (eq. 9, Llama 2)",
        intro="Pairs labeled 'significantly better' should be separated by a larger reward gap than 'slightly better' ones. `margin_source=\"label\"` turns the labels into the margin of the loss.",
        extra="pip_extra",
        cells=[
            '''from trl_regularizers.demo.runs import rated_pairs
train, test = rated_pairs(96, seed=11), rated_pairs(48, seed=12)  # chosen, rejected, preference_strength
train[0]''',
            '''from trl_regularizers import RegularizedRewardConfig, RegularizedRewardTrainer  # was: from trl import RewardConfig, RewardTrainer

args = RegularizedRewardConfig(output_dir="reward_margin", margin_source="label", margin_label_field="preference_strength",
                               margin_label_map="llama2_large", learning_rate=1e-3, per_device_train_batch_size=16,
                               max_steps=6, eval_strategy="steps", eval_steps=6, **cpu)
trainer = RegularizedRewardTrainer(model=model_name, args=args, train_dataset=train, eval_dataset=test)
trainer.train()''',
            '''{k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("eval_accuracy")}''',
        ],
    ),
    "grpo_kl": dict(
        title="GRPO: where the KL penalty goes (loss or reward), which estimator, adaptive beta",
        intro="A reward that is easy to game (the fraction of `o` characters) sends an unregularized policy off the rails. Choose the KL estimator and placement with two config fields; `KLDriftCallback` measures the exact KL to the base either way.",
        extra="pip_extra",
        cells=[
            '''from datasets import Dataset
from trl_regularizers.demo.runs import target_char_reward, task_prompts
prompts = Dataset.from_dict({"prompt": task_prompts() * 4})''',
            '''from trl_regularizers import RegularizedGRPOConfig, RegularizedGRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

# KL in the reward, as RLOO does: k1 summed over the completion, subtracted before the group normalization.
# beta multiplies a sum over ~16 tokens here, so it is much smaller than a per-token beta in the loss
# (kl_placement="loss", kl_estimator="k3", beta=0.2); the demo report shows both (reports/demo/report.md).
args = RegularizedGRPOConfig(output_dir="grpo_kl", beta=0.005, kl_estimator="k1", kl_placement="reward",
                             learning_rate=5e-4, per_device_train_batch_size=8, num_generations=8,
                             max_completion_length=16, max_steps=4, **cpu)
trainer = RegularizedGRPOTrainer(model=model_name, reward_funcs=target_char_reward, args=args, train_dataset=prompts)
trainer.train()''',
            '''[(log["step"], log["rewards/target_char_reward/mean"], log.get("kl")) for log in trainer.state.log_history if "reward" in log]''',
        ],
    ),
    "ppo_ptx": dict(
        title="PPO-ptx (eq. 6, InstructGPT): mix the pretraining NLL into PPO",
        intro="TRL removed `PPOTrainer` in 1.13; `RegularizedPPOTrainer` keeps its constructor and config fields on every TRL release (the current one included), so a TRL 1.12 PPO script changes its import line only. `ptx_coef` and `pretrain_dataset=` are the only additions.",
        extra="pip_extra",
        cells=[
            '''from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from datasets import Dataset
from trl_regularizers.demo.runs import task_prompts

tokenizer = AutoTokenizer.from_pretrained(model_name, padding_side="left")
prompts = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in task_prompts()]})
pretrain = Dataset.from_dict({"text": corpus_lines(500)})''',
            '''from trl_regularizers import RegularizedPPOConfig, RegularizedPPOTrainer  # was: from trl.experimental.ppo import PPOConfig, PPOTrainer

args = RegularizedPPOConfig(output_dir="ppo_ptx", ptx_coef=0.5, ptx_block_size=64, ptx_batch_size=4,
                            learning_rate=1e-3, per_device_train_batch_size=4, total_episodes=16, response_length=12,
                            num_sample_generations=0, stop_token="eos", **cpu)
trainer = RegularizedPPOTrainer(
    args=args, processing_class=tokenizer,
    model=AutoModelForCausalLM.from_pretrained(model_name), ref_model=AutoModelForCausalLM.from_pretrained(model_name),
    reward_model=AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=1),  # use your reward model
    value_model=AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=1),
    train_dataset=prompts, pretrain_dataset=pretrain,
)
trainer.train()''',
            '''[(log["step"], log.get("ptx/nll")) for log in trainer.state.log_history if "ptx/nll" in log]''',
        ],
    ),
    "drift_monitor": dict(
        title="Drift monitor: KL to the base and forgetting, with any trainer (eq. 15)",
        intro="`KLDriftCallback` logs `drift/kl_reverse`, `drift/kl_forward` (exact per-token KL on completions sampled from fixed task prompts) and `forgetting/nll` on held-out text, even with `beta=0`. It is the only addition to a stock TRL GRPO notebook here.",
        extra="pip_extra",
        cells=[
            '''from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl_regularizers import KLDriftCallback
from trl_regularizers.demo.runs import target_char_reward, task_prompts

drift = KLDriftCallback(task_prompts()[:8], every_n_steps=2, max_new_tokens=16, heldout_texts=corpus_lines(16, "heldout"))
args = GRPOConfig(output_dir="drift", beta=0.0, learning_rate=2e-3, per_device_train_batch_size=8, num_generations=8,
                  max_completion_length=16, max_steps=4, **cpu)
trainer = GRPOTrainer(model=model_name, reward_funcs=target_char_reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": task_prompts() * 4}), callbacks=[drift])
trainer.train()''',
            '''drift.history  # one row per probe: drift/kl_reverse, drift/kl_forward, forgetting/nll, forgetting/nll_increase''',
        ],
    ),
}


def install_cell(extra: str) -> str:
    package = "trl-regularizers[ppo]" if extra == "ppo" else "trl-regularizers[peft]"
    return f'''# Install (Colab); does nothing when trl_regularizers is already importable.
try:
    import trl_regularizers
except ImportError:
    %pip install -q "{package}"'''


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb)"
    cells = [
        new_markdown_cell(f"{badge}\n\n# {spec['title']}\n\n{spec['intro']}"),
        new_code_cell(install_cell(spec["extra"])),
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
