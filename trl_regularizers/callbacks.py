"""Trainer callbacks for regularizers.

``AdaptiveKLCallback`` is *the* cadence of the adaptive KL coefficient in the trainers built on the HF training loop
(GRPO, RLOO): they add it when ``kl_target`` is set, so users normally only set that field.
"""

from __future__ import annotations

from transformers import TrainerCallback


class AdaptiveKLCallback(TrainerCallback):
    """After each optimizer step, moves a ``KLPenalty``'s adaptive coefficient toward its target KL
    (``KLPenalty.end_step``).

    The penalty observes the KL of every sequence it penalizes in training; the step's mean over all processes moves
    the coefficient (a collective call: every rank runs ``on_step_end``), so it is identical everywhere. Rule of
    [Ziegler et al. 2019](https://huggingface.co/papers/1909.08593) (``core.control.AdaptiveKLController``):
    ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) / horizon)``.

    With the KL in the loss every step sees new values; with the KL in the reward only the steps that generate (and
    score) a rollout do, so with ``steps_per_generation > 1`` beta changes once per generation: the later steps
    reuse the rollout's already-penalized rewards, which a new beta could not change. The controller is in the
    trainer's checkpointed ``regularizer_state`` (``"kl_controller"``): resuming restores beta bit for bit.
    """

    def __init__(self, penalty):
        self.penalty = penalty

    def on_step_end(self, args, state, control, **kwargs):
        self.penalty.end_step()
