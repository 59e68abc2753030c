"""Pretrain the demo's embedded tiny model on the tiny-world corpus, and find or cache it.

    python -m examples.demo.pretrain --out /tmp/tiny-world     # ~1-3 min on 2 CPU cores

``base_model_path()`` is what the demo, recipes and notebooks call: it returns the shipped weights in
``examples/demo/assets/tiny-world`` when they match this script's settings, else a copy cached under
``~/.cache/trl_regularizers`` (``$TRL_REGULARIZERS_CACHE`` overrides), pretraining it on first use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from examples.demo.corpus import ANIMALS, ATTRIBUTES, corpus_lines, fact, world
from trl_regularizers.testing import byte_tokenizer, tiny_config

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny-world"
INFO_FILE = "pretrain_info.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the pretrained weights (its hash names the cache folder)."""

    hidden_size: int = 128
    num_layers: int = 4
    train_lines: int = 4000
    heldout_lines: int = 200
    block_size: int = 128
    batch_size: int = 16
    steps: int = 800
    learning_rate: float = 3e-3
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def pack_lines(lines: list[str], tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole lines (each ending in EOS) packed greedily into blocks that start at a line start.

    Returns ``input_ids`` and ``labels`` [N, block_size]; padding has label -100.
    """
    blocks, current = [], []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"][: block_size - 1] + [tokenizer.eos_token_id]
        if len(current) + len(ids) > block_size:
            blocks.append(current)
            current = []
        current = current + ids
    blocks.append(current)
    input_ids = torch.full((len(blocks), block_size), tokenizer.pad_token_id)
    labels = torch.full((len(blocks), block_size), -100)
    for row, ids in enumerate(blocks):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    return input_ids, labels


@torch.no_grad()
def heldout_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    """Mean NLL per predicted token (nats) of ``model`` on packed blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids, lab = input_ids[start : start + batch_size], labels[start : start + batch_size]
        logits = model(input_ids=ids.to(model.device), attention_mask=(lab != -100).long().to(model.device)).logits.float()
        target = lab[:, 1:].to(model.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        total, count = total + nll.item(), count + int((target != -100).sum())
    model.train(was_training)
    return total / count


@torch.no_grad()
def fact_accuracy(model, tokenizer) -> float:
    """Fraction of the world's facts ("the fox eats" -> " berries.") the model completes greedily."""
    facts = world()
    pairs = [fact(animal, attribute, facts[animal][attribute]) for animal in ANIMALS for attribute in ATTRIBUTES]
    correct = 0
    for prompt, completion in pairs:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        out = model.generate(ids, max_new_tokens=len(completion.encode()), do_sample=False, pad_token_id=tokenizer.pad_token_id)
        correct += tokenizer.decode(out[0, ids.shape[1] :]) == completion
    return correct / len(pairs)


def pretrain(out: str | Path, settings: PretrainSettings = PretrainSettings(), log_every: int = 100) -> dict:
    """Train a random-init Qwen2 on the corpus, save it with its tokenizer to ``out``; return the info dict."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    train_ids, train_labels = pack_lines(corpus_lines(settings.train_lines, "train"), tokenizer, settings.block_size)
    held_ids, held_labels = pack_lines(corpus_lines(settings.heldout_lines, "heldout"), tokenizer, settings.block_size)
    nll_init, facts_init = heldout_nll(model, held_ids, held_labels), fact_accuracy(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / settings.steps)))
    )
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    started = time.time()
    for step in range(settings.steps):
        rows = torch.randint(len(train_ids), (settings.batch_size,), generator=generator)
        ids, lab = train_ids[rows], train_labels[rows]
        loss = model(input_ids=ids, attention_mask=(lab != -100).long(), labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"pretrain step {step + 1}/{settings.steps}  loss {loss.item():.3f}  ({time.time() - started:.0f}s)", flush=True)
    info = {
        "settings": asdict(settings),
        "fingerprint": settings.fingerprint(),
        "heldout_nll_init": nll_init,
        "heldout_nll": heldout_nll(model, held_ids, held_labels),
        "fact_accuracy_init": facts_init,
        "fact_accuracy": fact_accuracy(model, tokenizer),
        "train_seconds": time.time() - started,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_regularizers"
    return Path(os.environ.get("TRL_REGULARIZERS_CACHE", default))


def _matches(folder: Path, settings: PretrainSettings) -> bool:
    info = folder / INFO_FILE
    return info.is_file() and json.loads(info.read_text()).get("fingerprint") == settings.fingerprint()


def base_model_path(settings: PretrainSettings = PretrainSettings()) -> str:
    """Path of the pretrained tiny-world model: a shipped asset (``assets/tiny-world*``), else the user cache, else
    pretrain now (once)."""
    for folder in sorted(ASSET_DIR.parent.glob("tiny-world*")):
        if _matches(folder, settings):
            return str(folder)
    folder = cache_root() / f"tiny-world-{settings.fingerprint()}"
    if not _matches(folder, settings):
        print(f"Pretraining the tiny-world model into {folder} (first run only)...", flush=True)
        pretrain(folder, settings)
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSET_DIR), help="Folder to save the model to (default: the demo's assets).")
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps)
    args = parser.parse_args(argv)
    info = pretrain(args.out, PretrainSettings(steps=args.steps))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
