"""Stock TRL trainer vs. our regularized subclass, side by side in one process: step-time and peak-memory ratios.

    python benchmarks/trainer_bench.py --profile cpu                  # tiny model, any machine
    python benchmarks/trainer_bench.py --profile h100 --specs dpo,dpo_nll   # Qwen2-0.5B-shaped random init
    python benchmarks/trainer_bench.py --profile cpu --specs grpo,grpo_k2,grpo_full
    python benchmarks/trainer_bench.py --profile cpu --specs dpo_ptx,dpo_ptx_logits   # + the ptx batch's fwd+bwd alone
    python benchmarks/trainer_bench.py --profile cpu --specs sft,sft_kl   # + the reference forward and the KL alone
    python benchmarks/trainer_bench.py --profile h100 --specs grpo_full,grpo_full_reward --share-stock --budget-s 100
    .venv-trl112/bin/python benchmarks/trainer_bench.py --ppo stock --json stock.json   # PPO: one side per TRL
    .venv/bin/python benchmarks/trainer_bench.py --ppo ours --json ours.json             # (stock needs TRL 1.12)

Each spec is a pair (stock, ours) of (trainer class, config class, extra config fields). Both start from the
same saved model and data; they run in alternating order for ``--rounds`` rounds (stock first, then ours
first, ...; default: the profile's, 5 on ``h100``), and the first ``--warmup`` steps of each run are dropped. Step
time is measured around each optimizer step (CUDA-synchronized); peak memory is ``torch.cuda.max_memory_allocated``
over the run (GPU only). Each round gives one ratio (median step time of ours over stock's); the report gives their
median and a 95% bootstrap interval, so a ratio inside the machine's noise shows as an interval around 1.
``--share-stock`` runs several specs with the same stock side in one alternation (stock, a, b, then b, a, stock, ...),
so the stock runs are shared. ``--budget-s`` starts a round only while the longest round so far (after the first,
which also compiles) still fits in the budget counted from the start, so a figure is cut to fewer rounds instead of
running past a time limit; the JSON is rewritten after every round, so a killed run leaves the rounds done.
For ptx specs the harness also times one forward+backward of a ptx batch alone on the same model, through the
[B, T, V] logits (``core.losses.ptx_nll``) and from the hidden states in chunks (``core.losses.chunked_nll_from_hidden``),
with the peak memory of each on CUDA, and reports ``ptx_cost_ratio = (ours - stock) / (the logits path's time)``:
the issue's target is <= 1.05. For ``sft_kl`` it times one no-grad forward of the reference's backbone and the exact KL
from hidden states (forward + backward) alone on a batch, and reports ``anchor_cost_ratio = (ours - stock) / (their
sum)``: the target is <= 1, at most one extra reference forward plus the KL.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback

from bench_common import Deadline, spread, utc_now, write_json
from trl_regularizers.core.full_kl import full_vocab_kl_from_hidden
from trl_regularizers.core.losses import chunked_nll_from_hidden, ptx_nll
from trl_regularizers.testing import byte_tokenizer, make_tiny_causal_lm

PROFILES = {
    # batch = per_device_train_batch_size pairs; prompt + completion bytes = tokens of the byte tokenizer
    "cpu": dict(batch=2, prompt_len=24, completion_len=40, steps=8, warmup=3, rounds=2, model="tiny"),
    "h100": dict(batch=8, prompt_len=256, completion_len=512, steps=12, warmup=3, rounds=5, model="qwen2-0.5b"),
    # CI's dry run of gpu_check.py: the h100 code path (a Qwen2Config model whose vocabulary exceeds the tokenizer's)
    "dry": dict(batch=2, prompt_len=16, completion_len=8, steps=3, warmup=1, rounds=2, model="qwen2-dry"),
}
MODEL_SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32768),
    "qwen2-dry": dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512),
}
MODEL_MARKER = "bench_model.json"
"""Written beside a model that ``make_model`` built, naming its shape, so that ``--model-dir`` reuses only the same one."""


@dataclass
class Side:
    trainer: str  # "trl.DPOTrainer" or "trl_regularizers.RegularizedDPOTrainer"
    config: str
    fields: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)  # set on the trainer after construction (a dotted path: on a component)


@dataclass
class Spec:
    stock: Side
    ours: Side
    note: str
    task: str = "dpo"  # "dpo": preference pairs; "grpo": prompts + a Python reward, batch = generations per prompt; "sft": prompt + completion


STOCK_DPO = Side("trl.DPOTrainer", "trl.DPOConfig")
OURS_DPO = "trl_regularizers.RegularizedDPOTrainer", "trl_regularizers.RegularizedDPOConfig"
SPECS = {
    "dpo": Spec(STOCK_DPO, Side(*OURS_DPO), "defaults: must match stock"),
    "dpo_nll": Spec(STOCK_DPO, Side(*OURS_DPO, {"nll_alpha": 0.2}), "DPO+NLL (eq. 7-8), target <= 1.02x"),
    "dpo_margin": Spec(STOCK_DPO, Side(*OURS_DPO, {"margin_source": "rating"}), "margins from ratings, target <= 1.02x"),
    "dpo_ptx": Spec(STOCK_DPO, Side(*OURS_DPO, {"ptx_coef": 0.5}), "ptx mixing, target <= 1.05x the ptx forward+backward"),
    "dpo_ptx_logits": Spec(STOCK_DPO, Side(*OURS_DPO, {"ptx_coef": 0.5}, {"ptx_term.from_hidden_states": False}),
                           "ptx mixing through [B, T, V] logits (the fallback path), for the memory of dpo_ptx"),
    "dpo_sft_stock": Spec(STOCK_DPO, Side("trl.DPOTrainer", "trl.DPOConfig", {"loss_type": ["sigmoid", "sft"]}), "TRL's own sft term, for scale"),
}
STOCK_GRPO = Side("trl.GRPOTrainer", "trl.GRPOConfig", {"beta": 0.04})
OURS_GRPO = "trl_regularizers.RegularizedGRPOTrainer", "trl_regularizers.RegularizedGRPOConfig"
SPECS |= {
    "grpo": Spec(STOCK_GRPO, Side(*OURS_GRPO, {"beta": 0.04}), "defaults (k3 in the loss): must match stock", "grpo"),
    "grpo_k2": Spec(STOCK_GRPO, Side(*OURS_GRPO, {"beta": 0.04, "kl_estimator": "k2"}), "k2 in the loss", "grpo"),
    "grpo_full": Spec(STOCK_GRPO, Side(*OURS_GRPO, {"beta": 0.04, "kl_estimator": "full"}), "exact full-vocab KL in the loss", "grpo"),
    "grpo_full_reward": Spec(STOCK_GRPO, Side(*OURS_GRPO, {"beta": 0.04, "kl_estimator": "full", "kl_placement": "reward"}),
                             "exact full-vocab KL in the reward", "grpo"),
}


STOCK_SFT = Side("trl.SFTTrainer", "trl.SFTConfig")
OURS_SFT = "trl_regularizers.RegularizedSFTTrainer", "trl_regularizers.RegularizedSFTConfig"
SPECS |= {
    "sft": Spec(STOCK_SFT, Side(*OURS_SFT), "defaults: must match stock", "sft"),
    "sft_kl": Spec(STOCK_SFT, Side(*OURS_SFT, {"sft_kl_coef": 0.1}), "exact KL to the base on the trained tokens: one reference forward + the KL", "sft"),
}


def distinct_chars(completions, **kwargs) -> list[float]:
    """GRPO benchmark reward with spread within a group: the fraction of distinct characters."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


def load(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def make_model(profile: dict, folder: str) -> str:
    """Build the profile's random-init model into ``folder``, or reuse the one a previous call built there."""
    marker = os.path.join(folder, MODEL_MARKER)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(marker):
        with open(marker) as f:
            built = json.load(f)["model"]
        if built != profile["model"]:
            raise ValueError(f"--model-dir {folder} holds the {built!r} model, not the profile's {profile['model']!r}")
        return folder
    if profile["model"] == "tiny":
        make_tiny_causal_lm(folder)
    else:
        tokenizer = byte_tokenizer()
        config = Qwen2Config(  # random init; bf16 on disk, as every GPU run loads it
            **MODEL_SHAPES[profile["model"]], tie_word_embeddings=True, rope_theta=1e6,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    with open(marker, "w") as f:
        json.dump({"model": profile["model"]}, f)
    return folder


def make_dataset(profile: dict, rows: int) -> Dataset:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text(n):
        return "".join(rng.choice(letters) for _ in range(n))

    return Dataset.from_dict({
        "prompt": [text(profile["prompt_len"]) for _ in range(rows)],
        "chosen": [text(profile["completion_len"]) for _ in range(rows)],
        "rejected": [text(profile["completion_len"]) for _ in range(rows)],
        "chosen_rating": [rng.randint(4, 7) for _ in range(rows)],
        "rejected_rating": [rng.randint(1, 3) for _ in range(rows)],
    })


def sequence_length(profile: dict) -> int:
    """Prompt + completion tokens: the DPO ``max_length`` and the ptx block size."""
    return profile["prompt_len"] + profile["completion_len"]


def make_pretrain_dataset(profile: dict) -> Dataset:
    rng = random.Random(1)
    return Dataset.from_dict({"text": ["".join(rng.choice("abcdefghij klmnop") for _ in range(4 * sequence_length(profile))) for _ in range(64)]})


def time_ptx_alone(model_path: str, profile: dict, repeats: int) -> dict:
    """One forward+backward of a ptx batch (batch x block tokens) through the model, as in training, by two paths:
    ``logits`` (the model's [B, T, V] logits, ``ptx_nll``) and ``chunked`` (the backbone's hidden states and the
    LM-head weight, ``chunked_nll_from_hidden``). Per path: median seconds (first call dropped), the NLL, and on
    CUDA the peak memory of one call above the model's weights (activations, logits or chunks, and gradients)."""
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if on_gpu else torch.float32)
    model.to("cuda" if on_gpu else "cpu").train()
    input_ids = torch.randint(0, model.config.vocab_size, (profile["batch"], sequence_length(profile)), device=model.device)

    def through_logits():
        return ptx_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)

    def chunked():
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = model.get_output_embeddings().weight
        return chunked_nll_from_hidden(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, input_ids[:, 1:].reshape(-1))

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    out = {}
    for name, loss_fn in (("logits", through_logits), ("chunked", chunked)):
        times, nll, peak = [], None, None
        for index in range(repeats + 1):
            sync()
            if on_gpu and index == 1:  # after the first call: allocator and kernels warm
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=on_gpu):
                loss = loss_fn()
            loss.backward()
            sync()
            times.append(time.perf_counter() - start)
            if on_gpu and index == 1:
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            nll = loss.item()
            model.zero_grad(set_to_none=True)
            del loss
        out[name] = {"median_s": statistics.median(times[1:]), "nll": nll, "peak_GiB": peak}
    del model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        out["chunked_over_logits_memory"] = out["chunked"]["peak_GiB"] / out["logits"]["peak_GiB"]
    return out


def run_side(side: Side, task: str, model_path: str, dataset: Dataset, profile: dict, out_dir: str, seed: int) -> dict:
    on_gpu = torch.cuda.is_available()
    if task == "grpo":
        task_fields = dict(max_completion_length=profile["completion_len"], num_generations=profile["batch"])
        task_inputs = dict(reward_funcs=distinct_chars)
    elif task == "sft":  # the pairs' chosen completions as SFT targets
        task_fields, task_inputs = dict(max_length=sequence_length(profile)), {}
        dataset = dataset.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    else:
        task_fields, task_inputs = dict(max_length=sequence_length(profile)), {}
    if side.fields.get("ptx_coef"):
        task_fields["ptx_block_size"] = sequence_length(profile)
        task_inputs["pretrain_dataset"] = make_pretrain_dataset(profile)
    config = load(side.config)(
        output_dir=out_dir, per_device_train_batch_size=profile["batch"], max_steps=profile["steps"], learning_rate=1e-6,
        logging_steps=1, save_strategy="no", report_to="none", bf16=on_gpu, gradient_checkpointing=False, seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, **task_fields, **side.fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if on_gpu else torch.float32)
    timer = StepTimer()
    trainer = load(side.trainer)(
        model=model, args=config, train_dataset=dataset, processing_class=byte_tokenizer(), callbacks=[timer], **task_inputs
    )
    for path, value in side.attributes.items():
        *owners, name = path.split(".")
        owner = trainer
        for part in owners:
            owner = getattr(owner, part)
        if not hasattr(owner, name):  # a renamed attribute would otherwise be set in vain and measure the default
            raise AttributeError(f"{type(trainer).__name__} has no attribute {path!r} to set for this spec")
        setattr(owner, name, value)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    del trainer, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return {"times": timer.times, "peak_GiB": peak, "losses": losses}


def time_anchor_alone(model_path: str, profile: dict, repeats: int) -> dict:
    """What the SFT KL anchor adds to a step, timed alone on a batch (batch x sequence tokens): one no-grad forward of
    the reference's backbone, and the exact KL from hidden states (``full_vocab_kl_from_hidden``) forward + backward
    on every position. Median seconds of each (first call dropped) and their sum, the budget of ``sft_kl``."""
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to("cuda" if on_gpu else "cpu")
    input_ids = torch.randint(0, model.config.vocab_size, (profile["batch"], sequence_length(profile)), device=model.device)
    weight = model.get_output_embeddings().weight
    hidden = torch.randn(input_ids.numel(), weight.shape[1], device=model.device, dtype=dtype, requires_grad=True)

    def reference_forward():
        with torch.no_grad():
            return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state

    def kl():
        full_vocab_kl_from_hidden(hidden, hidden.detach() + 0.1, weight, weight.detach()).sum().backward()

    out = {}
    for name, step in (("reference_forward", reference_forward), ("kl", kl)):
        times = []
        for _ in range(repeats + 1):
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = {"median_s": statistics.median(times[1:])}
    out["budget_s"] = out["reference_forward"]["median_s"] + out["kl"]["median_s"]
    del model
    gc.collect()
    return out


def summarize(spec: Spec, stock_runs: list[dict], ours_runs: list[dict], warmup: int, ptx_alone: dict | None,
              anchor_alone: dict | None = None) -> dict:
    """Medians, per-round ratios with their interval, peak memory and (ptx specs) the added cost of one spec."""
    result = {"note": spec.note}
    for which, results in (("stock", stock_runs), ("ours", ours_runs)):
        times = [t for r in results for t in r["times"][warmup:]]
        peaks = [r["peak_GiB"] for r in results if r["peak_GiB"] is not None]
        result[which] = {"median_s": statistics.median(times), "steps": len(times), "peak_GiB": max(peaks) if peaks else None,
                         "first_losses": results[0]["losses"][:3]}
    round_medians = [(statistics.median(s["times"][warmup:]), statistics.median(o["times"][warmup:])) for s, o in zip(stock_runs, ours_runs)]
    result["time_ratio"] = result["ours"]["median_s"] / result["stock"]["median_s"]
    result["time_ratio_per_round"] = spread([o / s for s, o in round_medians])
    if spec.ours.fields.get("ptx_coef") and ptx_alone:
        alone = ptx_alone["logits"]["median_s"]
        result["ptx_alone_s"] = alone
        result["ptx_cost_ratio"] = (result["ours"]["median_s"] - result["stock"]["median_s"]) / alone
        result["ptx_cost_ratio_per_round"] = spread([(o - s) / alone for s, o in round_medians])
    if spec.ours.fields.get("sft_kl_coef") and anchor_alone:
        budget = anchor_alone["budget_s"]
        result["anchor_budget_s"] = budget
        result["anchor_cost_ratio_per_round"] = spread([(o - s) / budget for s, o in round_medians])
    if result["stock"]["peak_GiB"]:
        result["memory_ratio"] = result["ours"]["peak_GiB"] / result["stock"]["peak_GiB"]
        result["memory_ratio_per_round"] = spread([o["peak_GiB"] / s["peak_GiB"] for s, o in zip(stock_runs, ours_runs)])
    return result


def bench(names: list[str], model_path: str, dataset: Dataset, profile: dict, rounds: int, warmup: int, deadline: Deadline,
          ptx_alone: dict | None = None, on_round=None, anchor_alone: dict | None = None) -> tuple[dict, int]:
    """Run the specs ``names`` (one stock side, shared) in alternating rounds; ``on_round(results, rounds_done)`` after
    each. A round starts only while the longest one so far (the first excluded once there are others: it also
    compiles) still fits in ``deadline``. Returns (results, rounds done)."""
    specs = [SPECS[name] for name in names]
    if any(spec.stock != specs[0].stock or spec.task != specs[0].task for spec in specs):
        raise ValueError(f"specs {names} do not share one stock side and task: run them without --share-stock")
    sides = {"stock": specs[0].stock} | {name: spec.ours for name, spec in zip(names, specs)}
    runs = {key: [] for key in sides}
    round_seconds: list[float] = []
    results: dict = {}
    for round_index in range(rounds):
        predicted = max(round_seconds[1:] or round_seconds or [0.0])  # the first round also compiles and warms up
        if round_seconds and not deadline.fits(predicted):
            print(f"{','.join(names)}: cut to {round_index} of {rounds} rounds (a round takes about {predicted:.0f} s, "
                  f"{deadline.left():.0f} s of the budget left)", flush=True)
            break
        start = time.monotonic()
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for key in order:
            with tempfile.TemporaryDirectory() as out_dir:
                runs[key].append(run_side(sides[key], specs[0].task, model_path, dataset, profile, out_dir, seed=round_index))
        round_seconds.append(time.monotonic() - start)
        results = {name: summarize(spec, runs["stock"], runs[name], warmup, ptx_alone, anchor_alone) for name, spec in zip(names, specs)}
        for result in results.values():
            result["round_seconds"] = list(round_seconds)
        if on_round:
            on_round(results, len(round_seconds))
    return results, len(round_seconds)


PPO_SPEC = dict(
    # The tiny CPU model; one PPO update = 8 rollouts (per device 4 x GA 2) of up to 24 new tokens, 2 PPO epochs.
    per_device_train_batch_size=4, gradient_accumulation_steps=2, num_ppo_epochs=2, response_length=24,
    local_rollout_forward_batch_size=8, num_sample_generations=0, learning_rate=1e-4, temperature=1.0,
    bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, logging_steps=1,
)
"""The ``ppo`` spec: stock TRL 1.12 ``PPOTrainer`` vs ``RegularizedPPOTrainer`` (own implementation on TRL >= 1.13)
cannot share a process (no TRL has both), so ``--ppo stock|ours`` times one side; the same sizes, models, data and
seed on both."""


class UpdateTimer(TrainerCallback):
    """Seconds per PPO update (rollout + scoring + PPO epochs): between consecutive ``on_step_end`` calls."""

    def __init__(self):
        self.times, self.last = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def bench_ppo(side: str, updates: int, rounds: int, warmup: int) -> dict:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from trl_regularizers.testing import make_tiny_reward_model

    if side == "stock":
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    else:
        from trl_regularizers import RegularizedPPOConfig as PPOConfig
        from trl_regularizers import RegularizedPPOTrainer as PPOTrainer
    times = []
    with tempfile.TemporaryDirectory() as folder:
        lm_path, rm_path = make_tiny_causal_lm(f"{folder}/lm"), make_tiny_reward_model(f"{folder}/rm")
        tokenizer = AutoTokenizer.from_pretrained(lm_path, padding_side="left")
        batch = PPO_SPEC["per_device_train_batch_size"] * PPO_SPEC["gradient_accumulation_steps"]
        prompts = Dataset.from_dict({"input_ids": [tokenizer(f"prompt {i}: " + "ab" * (i % 5))["input_ids"] for i in range(batch * (updates + 1))]})
        for round_index in range(rounds):
            set_seed(round_index)
            timer = UpdateTimer()
            args = PPOConfig(output_dir=f"{folder}/run{round_index}", total_episodes=batch * updates, seed=round_index, **PPO_SPEC)
            trainer = PPOTrainer(args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(lm_path), ref_model=AutoModelForCausalLM.from_pretrained(lm_path),
                                 reward_model=AutoModelForSequenceClassification.from_pretrained(rm_path), train_dataset=prompts,
                                 value_model=AutoModelForSequenceClassification.from_pretrained(rm_path), callbacks=[timer])
            trainer.train()
            times.append(timer.times[warmup:])
            last_log = {k: v for k, v in trainer.state.log_history[-1].items() if k != "eps"}  # same work: same metrics on both sides
            del trainer
            gc.collect()
    medians = [statistics.median(t) for t in times]
    return {"side": side, "trainer": f"{PPOTrainer.__module__}.{PPOTrainer.__name__}", "updates": updates, "rounds": rounds, "warmup": warmup,
            "spec": PPO_SPEC, "round_median_s": medians, "median_s": statistics.median([x for t in times for x in t]), "last_log": last_log}


def at_least(minimum: int):
    """argparse type: an integer >= ``minimum``, else an error naming the value and the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def print_result(name: str, result: dict) -> None:
    if "ptx_cost_ratio" in result:
        low, high = result["ptx_cost_ratio_per_round"]["ci95"]
        print(f"{name:16s} ptx forward+backward alone {result['ptx_alone_s']:.4f} s, added cost / that = "
              f"{result['ptx_cost_ratio_per_round']['median']:.3f} (95% [{low:.3f}, {high:.3f}])")
    if "anchor_cost_ratio_per_round" in result:
        low, high = result["anchor_cost_ratio_per_round"]["ci95"]
        print(f"{name:16s} reference forward + exact KL alone {result['anchor_budget_s']:.4f} s, added cost / that = "
              f"{result['anchor_cost_ratio_per_round']['median']:.3f} (95% [{low:.3f}, {high:.3f}])")
    memory = f"  peak {result['stock']['peak_GiB']:.2f} -> {result['ours']['peak_GiB']:.2f} GiB ({result['memory_ratio']:.3f}x)" if "memory_ratio" in result else ""
    low, high = result["time_ratio_per_round"]["ci95"]
    print(f"{name:16s} step {result['stock']['median_s']:.4f} -> {result['ours']['median_s']:.4f} s "
          f"({result['time_ratio_per_round']['median']:.3f}x, 95% [{low:.3f}, {high:.3f}]){memory}   [{result['note']}]", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ppo", choices=["stock", "ours"], default=None, help="time one side of the PPO spec instead of --specs")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, from: {', '.join(SPECS)}")
    parser.add_argument("--share-stock", action="store_true", help="one alternation for all specs, sharing the stock runs")
    parser.add_argument("--rounds", type=at_least(1), default=None, help="alternating rounds (default: the profile's)")
    parser.add_argument("--warmup", type=at_least(0), default=None, help="steps dropped at the start of each run (default: the profile's)")
    parser.add_argument("--steps", type=at_least(1), default=None, help="optimizer steps per run (default: the profile's)")
    parser.add_argument("--batch", type=at_least(2), default=None, help="pairs (DPO) or generations (GRPO) per step")
    parser.add_argument("--prompt-len", type=at_least(1), default=None, help="prompt tokens (default: the profile's)")
    parser.add_argument("--completion-len", type=at_least(1), default=None, help="completion tokens (default: the profile's)")
    parser.add_argument("--budget-s", type=seconds, default=None, help="start no round that would end after this many seconds")
    parser.add_argument("--model-dir", default=None, help="build the model here, or reuse the one built here before")
    parser.add_argument("--json", default=None, help="the report, rewritten after every round")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (1 keeps CPU timings stable on a shared machine)")
    args = parser.parse_args()
    deadline = Deadline(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = dict(PROFILES[args.profile])
    for name in ("steps", "warmup", "batch", "prompt_len", "completion_len"):
        if getattr(args, name) is not None:
            profile[name] = getattr(args, name)
    args.rounds = args.rounds or profile["rounds"]
    args.warmup = profile.pop("warmup")
    if not args.ppo and profile["steps"] <= args.warmup:
        parser.error(f"--steps {profile['steps']} must exceed --warmup {args.warmup}: no step would be timed")
    names = args.specs.split(",")
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        parser.error(f"unknown specs {unknown}; valid: {', '.join(SPECS)}")
    import trl

    if args.ppo:
        report = {"date": utc_now(), "device": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "trl": trl.__version__, "threads": torch.get_num_threads(), **bench_ppo(args.ppo, args.steps or 10, args.rounds, args.warmup)}
        print(json.dumps(report, indent=1))
        write_json(args.json, report)
        return
    import transformers

    report = {
        "date": utc_now(), "profile": args.profile, **profile, "rounds": args.rounds, "rounds_done": {}, "warmup": args.warmup,
        "budget_s": args.budget_s, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "results": {},
    }
    write_json(args.json, report)  # the settings, before any result: a run killed in its first round still says what it ran
    with tempfile.TemporaryDirectory() as folder:
        model_path = make_model(profile, args.model_dir or folder)
        dataset = make_dataset(profile, rows=profile["batch"] * profile["steps"])
        if any(SPECS[name].ours.fields.get("ptx_coef") for name in names):
            report["ptx_alone"] = ptx_alone = time_ptx_alone(model_path, profile, repeats=2 * profile["steps"])
            print(f"ptx batch alone: {json.dumps(ptx_alone)}", flush=True)
            write_json(args.json, report)
        else:
            ptx_alone = None
        anchor_alone = None
        if any(SPECS[name].ours.fields.get("sft_kl_coef") for name in names):
            report["anchor_alone"] = anchor_alone = time_anchor_alone(model_path, profile, repeats=2 * profile["steps"])
            print(f"SFT KL anchor alone: {json.dumps(anchor_alone)}", flush=True)
            write_json(args.json, report)
        groups = [names] if args.share_stock else [[name] for name in names]
        for group in groups:

            def record(results, rounds_done, group=group):
                report["results"].update(results)
                report["rounds_done"][",".join(group)] = rounds_done
                write_json(args.json, report)

            results, _ = bench(group, model_path, dataset, profile, args.rounds, args.warmup, deadline, ptx_alone, on_round=record,
                               anchor_alone=anchor_alone)
            for name, result in results.items():
                print_result(name, result)
    write_json(args.json, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
