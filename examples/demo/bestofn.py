"""Best-of-n from the start policy (Gao et al. 2022's first experiment) and the proxy's quality there.

``run_best_of_n`` samples ``DemoSize.bon_samples`` completions of every task prompt from the start policy once and
scores each with the seed's proxy and with the gold reward. The report derives from these saved scores both the
start-policy rank correlation of proxy and gold (``stats.bootstrap_spearman``) and, for n = 1, 2, 4, ... up to
the number of samples, the expected scores of the proxy's best of n (``stats.best_of_n_means``, no resampling
noise) against ``KL_bon = log n - (n - 1) / n``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from examples.demo.gold import GoldReward
from examples.demo.overopt import ProxyReward, load_base, sample_completions
from examples.demo.runs import DemoSize, task_prompts

BATCH = 256
"""Completions sampled (and scored) per forward."""


def bon_sizes(samples: int) -> list[int]:
    """n = 1, 2, 4, ... up to ``samples``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    return [2**k for k in range(samples.bit_length()) if 2**k <= samples]


@torch.no_grad()
def run_best_of_n(start: str, judge: str, proxy_dir: Path, size: DemoSize, seed: int) -> dict:
    """``size.bon_samples`` start-policy samples per task prompt with their proxy and gold scores (and the gold's
    parts), listed prompt by prompt."""
    model, tokenizer = load_base(start)
    prompts = task_prompts()
    rows = [prompt for prompt in prompts for _ in range(size.bon_samples)]
    completions = []
    for offset in range(0, len(rows), BATCH):
        completions += sample_completions(model, tokenizer, rows[offset : offset + BATCH], seed=10_000 * (seed + 1) + offset // BATCH)
    proxy = ProxyReward(proxy_dir)
    proxy_scores = [s for offset in range(0, len(rows), BATCH) for s in proxy(rows[offset : offset + BATCH], completions[offset : offset + BATCH])]
    gold = GoldReward(*load_base(judge)).components(rows, completions)
    return {"name": "best-of-n", "prompts": prompts, "samples_per_prompt": size.bon_samples, "completions": completions,
            "proxy": proxy_scores, **gold}
