"""Drift and forgetting instruments (eq. 15, "RL's Razor"): how far the policy has moved from its base.

``KLDriftCallback`` works with any ``transformers.Trainer`` (so every TRL trainer), with or without a KL
penalty (``beta=0`` included), and with PEFT, where the base is the same model with its adapters disabled:

    drift = KLDriftCallback(task_prompts, every_n_steps=10, heldout_texts=pretraining_texts)
    trainer = GRPOTrainer(..., callbacks=[drift])

Every ``every_n_steps`` optimizer steps (and once before the first) it samples one completion per prompt
from the current policy pi, with a fixed seed and without disturbing the training RNG, and computes the
exact per-token KL over the vocabulary at every completion position (`core.full_kl.full_vocab_kl`):

* ``drift/kl_reverse`` = E_x[KL(pi || pi_0)], ``drift/kl_forward`` = E_x[KL(pi_0 || pi)]: per-token KL
  averaged over each completion's tokens, then over prompts. Positions are visited by pi's samples.
* ``drift/kl_reverse_sequence``: the per-token KL(pi || pi_0) summed over each completion, averaged over
  prompts: an unbiased estimate of the sequence-level KL(pi(.|x) || pi_0(.|x)) (the KL of Gao et al. 2022's
  ``d = sqrt(KL)``), since the positions are visited by pi's own samples.
* ``forgetting/nll``: token-mean NLL of ``heldout_texts`` under pi (nats/token), and
  ``forgetting/nll_increase``: the same minus its value before training.

Values go into the ``logs`` of the next logging step (``trainer.state.log_history``, the console and every
callback after this one) and into ``self.history`` (one dict per probe, with ``step``); the sampled
completions of the latest probe are kept in ``self.completions`` (e.g. for distinct-n or eyeballing). Reporting
integrations (W&B, TensorBoard) run before user callbacks; to feed them too, put this callback first:
``trainer.callback_handler.callbacks.insert(0, drift)``.

Every process probes all prompts (the values are identical on every rank); under ZeRO-3/FSDP generation
needs all ranks, which this satisfies, but costs one generate per rank.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import TrainerCallback

from trl_regularizers.core.full_kl import full_vocab_kl
from trl_regularizers.models import frozen_copy


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def policy_of(model: torch.nn.Module) -> torch.nn.Module:
    """The policy inside a PPO trainer's policy-and-value wrapper (TRL's and ours expose it as ``.policy``);
    any other model as is."""
    return getattr(model, "policy", model)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class KLDriftCallback(TrainerCallback):
    """Logs E_x[KL] between the policy and its base on fixed task prompts, and held-out NLL (forgetting).

    Args:
        prompts: task prompts (plain strings; chat users pass ``tokenizer.apply_chat_template(...)`` text).
        every_n_steps: probe every this many optimizer steps (and at step 0).
        max_new_tokens: length of the sampled completions.
        heldout_texts: optional "prior" texts for ``forgetting/nll`` (e.g. a slice of pretraining data).
        base_model: the reference pi_0. ``None``: the model with adapters disabled for PEFT models,
            otherwise a frozen copy taken when training begins.
        tokenizer: defaults to the trainer's ``processing_class``.
        temperature: sampling temperature of the probe completions (the KL is of the untempered policies).
        batch_size: prompts (or held-out texts) per forward.
        max_length: held-out texts are truncated to this many tokens.
        seed: seed of the probe sampling, so every probe draws with the same randomness.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 10,
        max_new_tokens: int = 32,
        heldout_texts: list[str] | None = None,
        base_model: torch.nn.Module | None = None,
        tokenizer=None,
        temperature: float = 1.0,
        batch_size: int = 16,
        max_length: int = 256,
        seed: int = 0,
    ):
        if not prompts:
            raise ValueError("KLDriftCallback needs at least one task prompt (prompts=[] given).")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.heldout_texts = list(heldout_texts) if heldout_texts else None
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self.completions: list[str] = []
        self._pending: dict[str, float] = {}
        self._nll_before: float | None = None

    # ----------------------------------------------------------------------------------- callback hooks
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        model = policy_of(model)
        self.tokenizer = self.tokenizer or processing_class
        if self.tokenizer is None:
            raise ValueError("KLDriftCallback needs a tokenizer: pass tokenizer= or give the trainer a processing_class.")
        if self.base_model is None and not _is_peft(model):
            self.base_model = frozen_copy(model)
        if not any(entry.get("step") == state.global_step for entry in self.history):
            values = self.measure(model)
            self.history.append({**values, "step": state.global_step})
            state.log_history.append({**values, "step": state.global_step})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._pending = self.measure(policy_of(model))
            self.history.append({**self._pending, "step": state.global_step})
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}

    # ----------------------------------------------------------------------------------- measurement
    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """Probe ``model`` now: ``drift/kl_reverse``, ``drift/kl_forward`` and the forgetting NLL if configured."""
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                values = self._kl(model)
            if self.heldout_texts:
                nll = self.heldout_nll(model)
                if self._nll_before is None:
                    self._nll_before = nll
                values.update({"forgetting/nll": nll, "forgetting/nll_increase": nll - self._nll_before})
        finally:
            model.train(was_training)
        return values

    def sample(self, model) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample one completion per prompt: (sequences, attention mask, prompt length), left-padded prompts."""
        tok = self.tokenizer
        enc = tok(self.prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
        sequences = []
        for start in range(0, len(self.prompts), self.batch_size):
            out = model.generate(
                input_ids=enc["input_ids"][start : start + self.batch_size],
                attention_mask=enc["attention_mask"][start : start + self.batch_size],
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=1,
                do_sample=True,
                temperature=self.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            sequences.append(torch.nn.functional.pad(out, (0, enc["input_ids"].shape[1] + self.max_new_tokens - out.shape[1]), value=tok.pad_token_id))
        sequences = torch.cat(sequences)
        prompt_len = enc["input_ids"].shape[1]
        completion = sequences[:, prompt_len:]
        # Completion tokens up to and including the first EOS count; everything after is padding.
        after_eos = (completion == tok.eos_token_id).long().cumsum(-1) - (completion == tok.eos_token_id).long()
        completion_mask = (after_eos == 0) & (completion != tok.pad_token_id)
        return sequences, torch.cat([enc["attention_mask"], completion_mask.long()], dim=1), prompt_len

    def _logits(self, model, sequences: torch.Tensor, mask: torch.Tensor, base: bool) -> torch.Tensor:
        if base and self.base_model is not None:
            model = self.base_model
        context = model.disable_adapter() if base and self.base_model is None else nullcontext()
        with context:
            return model(input_ids=sequences, attention_mask=mask, position_ids=_position_ids(mask)).logits

    def _kl(self, model) -> dict[str, float]:
        sequences, mask, prompt_len = self.sample(model)
        self.completions = [
            self.tokenizer.decode(seq[prompt_len:][m[prompt_len:].bool()], skip_special_tokens=True) for seq, m in zip(sequences, mask)
        ]
        totals = {"reverse": 0.0, "forward": 0.0}
        sequence_total = 0.0
        for start in range(0, len(sequences), self.batch_size):
            seq, m = sequences[start : start + self.batch_size], mask[start : start + self.batch_size]
            # Logits at position t predict token t+1: completion tokens are predicted from prompt_len-1 on.
            logits = self._logits(model, seq, m, base=False)[:, prompt_len - 1 : -1]
            base_logits = self._logits(model, seq, m, base=True)[:, prompt_len - 1 : -1]
            completion_mask = m[:, prompt_len:].float()
            tokens = completion_mask.sum(-1).clamp(min=1)
            for direction in totals:
                per_token = full_vocab_kl(logits, base_logits, completion_mask, direction=direction)
                totals[direction] += (per_token.sum(-1) / tokens).sum().item()
                if direction == "reverse":
                    sequence_total += per_token.sum().item()
        values = {f"drift/kl_{direction}": total / len(sequences) for direction, total in totals.items()}
        return {**values, "drift/kl_reverse_sequence": sequence_total / len(sequences)}

    def heldout_nll(self, model) -> float:
        """Token-mean NLL (nats) of the held-out texts under ``model``."""
        total, count = 0.0, 0
        for start in range(0, len(self.heldout_texts), self.batch_size):
            enc = self.tokenizer(
                self.heldout_texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(model.device)
            mask = enc["attention_mask"]
            logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=_position_ids(mask)).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
        return total / max(count, 1)
