"""Pretraining mixing: the packed/sharded/resumable PtxStream and the PtxMixin inside a real DPO trainer."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.scripts.ptx_ddp import PtxDPO, preference_pairs, pretraining_texts
from trl_regularizers.configs import RegularizedDPOConfig
from trl_regularizers.ptx import PtxStream
from trl_regularizers.testing import byte_tokenizer
from trl_regularizers.models import causal_lm, why_logits_are_not_a_product
from trl_regularizers.trainers.adapters.base import TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA

TOKENIZER = byte_tokenizer()
EOS = TOKENIZER.eos_token_id


def unique_token_docs(n: int = 20) -> list[list[int]]:
    """Pre-tokenized documents of 2..6 tokens (100 tokens with EOS); no token id repeats, so distinct blocks differ."""
    return [list(range(10 * i, 10 * i + i % 5 + 2)) for i in range(n)]


def as_kind(kind: str, docs: list[list[int]]):
    rows = {"input_ids": docs}
    if kind == "list":
        return [{"input_ids": doc} for doc in docs]
    dataset = datasets.Dataset.from_dict(rows)
    return dataset.to_iterable_dataset() if kind == "iterable" else dataset


def draw(stream: PtxStream, n: int) -> list[torch.Tensor]:
    return [stream.next_batch()["input_ids"] for _ in range(n)]


# ---------------------------------------------------------------- stream


def test_packs_text_with_eos_and_cycles():
    stream = PtxStream(["abcdefgh"], TOKENIZER, block_size=3, batch_size=1)
    batches = [stream.next_batch() for _ in range(4)]
    assert [TOKENIZER.decode(b["input_ids"][0]) for b in batches] == ["abc", "def", "gh<|im_end|>", "abc"]
    assert stream.state_dict() == {"epoch": 1, "block": 1, "block_size": 3, "seed": 0}
    for batch in batches:
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (1, 3)
        assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].eq(1).all()


def test_packs_input_ids_in_the_documented_per_epoch_order():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, EOS]]  # the last one already ends with EOS
    stream = PtxStream(datasets.Dataset.from_dict({"input_ids": docs, "text": ["ignored"] * 5}), TOKENIZER, 3, 1, seed=7)
    assert stream.blocks_per_epoch == 16 // 3
    for epoch in range(2):
        order = np.random.default_rng(7 + epoch).permutation(len(docs))
        packed = [t for i in order for t in (docs[i] if docs[i][-1] == EOS else docs[i] + [EOS])]
        expected = [packed[3 * k : 3 * k + 3] for k in range(5)]
        assert [b[0].tolist() for b in draw(stream, 5)] == expected


@pytest.mark.parametrize("kind", ["dataset", "iterable"])
def test_each_epoch_is_a_new_permutation_of_all_documents(kind):
    docs = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(10)]  # + EOS: one document per 4-token block
    blocks = [b.tolist() for batch in draw(PtxStream(as_kind(kind, docs), TOKENIZER, 4, 2, seed=1), 10) for b in batch]
    epochs = [[tuple(b[:3]) for b in blocks[:10]], [tuple(b[:3]) for b in blocks[10:]]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [tuple(d) for d in docs]
    assert epochs[0] != epochs[1]
    other_seed = [tuple(b[0, :3].tolist()) for b in draw(PtxStream(as_kind(kind, docs), TOKENIZER, 4, 1, seed=2), 10)]
    assert other_seed != epochs[0]


@pytest.mark.parametrize("kind", ["list", "dataset", "iterable"])
def test_processes_split_each_global_batch(kind):
    docs = unique_token_docs()
    shards = [PtxStream(as_kind(kind, docs), TOKENIZER, 4, 2, process_index=p, num_processes=2) for p in range(2)]
    single = PtxStream(as_kind(kind, docs), TOKENIZER, 4, 4)
    for step in range(14):  # 25 blocks per epoch, 4 per global batch: crosses two epoch boundaries
        first, second = (s.next_batch()["input_ids"] for s in shards)
        assert not {tuple(r) for r in first.tolist()} & {tuple(r) for r in second.tolist()}
        assert torch.equal(torch.cat([first, second]), single.next_batch()["input_ids"]), step
        assert shards[0].state_dict() == shards[1].state_dict() == single.state_dict()
    assert single.state_dict()["epoch"] == 2


@pytest.mark.parametrize("kind", ["list", "dataset", "iterable"])
def test_resume_gives_the_batches_that_would_have_come(kind):
    docs = unique_token_docs()
    stream = PtxStream(as_kind(kind, docs), TOKENIZER, 4, 3, seed=3)
    draw(stream, 6)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = draw(stream, 5)  # 25 blocks per epoch, 8 batches of 3: crosses an epoch boundary
    assert stream.state_dict()["epoch"] == 1

    resumed = PtxStream(as_kind(kind, docs), TOKENIZER, 4, 3, seed=3)
    assert not torch.equal(resumed.next_batch()["input_ids"], expected[0])  # without the state: different data
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(draw(resumed, 5), expected))


def test_resume_with_another_block_size_warns():
    stream = PtxStream(["abcdefgh"] * 4, TOKENIZER, block_size=3, batch_size=1)
    with pytest.warns(UserWarning, match="block_size=4"):
        stream.load_state_dict({"epoch": 0, "block": 1, "block_size": 4, "seed": 0})


def test_processes_share_the_tokenization_cache_of_a_disk_dataset(tmp_path):
    datasets.Dataset.from_dict({"text": pretraining_texts()}).save_to_disk(str(tmp_path / "ptx"))
    on_disk = datasets.load_from_disk(str(tmp_path / "ptx"))
    streams = [PtxStream(on_disk, TOKENIZER, 16, 2, process_index=p, num_processes=2) for p in range(2)]
    assert streams[0]._documents.cache_files and streams[0]._documents.cache_files == streams[1]._documents.cache_files


def test_stream_rejects_bad_datasets():
    with pytest.raises(ValueError, match=r"'text'.*'content', 'id'"):
        PtxStream(datasets.Dataset.from_dict({"content": ["x"], "id": [1]}), TOKENIZER, 4, 1)
    with pytest.raises(ValueError, match=r"'body'.*'content'"):
        PtxStream(datasets.Dataset.from_dict({"content": ["x"]}).to_iterable_dataset(), TOKENIZER, 4, 1, text_field="body")
    with pytest.raises(ValueError, match=r"'text'.*'content'"):
        PtxStream([{"content": "x"}], TOKENIZER, 4, 1)
    with pytest.raises(ValueError, match=r"9 tokens, i.e. 2 blocks .* needs batch_size \* num_processes = 4"):
        PtxStream(["abcdefgh"], TOKENIZER, block_size=4, batch_size=2, num_processes=2)
    with pytest.raises(ValueError, match="yields 2 blocks"):
        PtxStream(datasets.Dataset.from_dict({"text": ["abcdefgh"]}).to_iterable_dataset(), TOKENIZER, 4, 3).next_batch()
    with pytest.raises(ValueError, match="empty"):
        PtxStream([], TOKENIZER, 4, 1)
    with pytest.raises(ValueError, match="empty"):
        PtxStream(datasets.IterableDataset.from_generator(lambda: iter([])), TOKENIZER, 4, 1)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        PtxStream("just a string", TOKENIZER, 4, 1)


# ---------------------------------------------------------------- mixin in a trainer


def make_trainer(model_path, tmp_path, pretrain_dataset=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"), bf16=False, report_to="none", gradient_checkpointing=False, max_steps=1,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", ptx_coef=0.5, ptx_block_size=16,
    )
    kwargs.update(overrides)
    return PtxDPO(model_path, args=RegularizedDPOConfig(**kwargs), train_dataset=preference_pairs(), pretrain_dataset=pretrain_dataset)


def record_ptx_batches(trainer) -> list[list]:
    drawn, next_batch = [], trainer.ptx_term.stream.next_batch

    def recording():
        batch = next_batch()
        drawn.append(batch["input_ids"].tolist())
        return batch

    trainer.ptx_term.stream.next_batch = recording
    return drawn


def nll_by_hand(model, input_ids: torch.Tensor) -> torch.Tensor:
    logps = model(input_ids=input_ids).logits[:, :-1].float().log_softmax(-1)
    return -logps.gather(-1, input_ids[:, 1:, None]).mean()


def test_step_adds_coef_times_nll_with_one_extra_forward(tiny_lm_path, tmp_path):
    texts = pretraining_texts()
    trainer = make_trainer(tiny_lm_path, tmp_path, texts)
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    trainer.train()

    first_batch = PtxStream(texts, TOKENIZER, 16, 2, seed=trainer.args.seed).next_batch()["input_ids"]
    with torch.no_grad():
        expected_nll = nll_by_hand(AutoModelForCausalLM.from_pretrained(tiny_lm_path), first_batch).item()
    log = trainer.state.log_history[0]
    assert log["ptx/nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert log["loss"] == pytest.approx(math.log(2) + 0.5 * expected_nll, rel=1e-5)  # DPO loss is log 2 at step 1
    assert len(forwards) == 2  # the policy forward plus one ptx forward

    stock = make_trainer(tiny_lm_path, tmp_path, None, ptx_coef=0.0)
    forwards.clear()
    stock.model.register_forward_hook(lambda *_: forwards.append(1))
    stock.train()
    assert len(forwards) == 1 and "ptx/nll" not in stock.state.log_history[0]
    assert "ptx" not in stock.regularizer_state


@pytest.mark.parametrize(
    "parent_scales_for_ga",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(
            not TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA,
            reason="simulates a parent that scales its own loss through Trainer.loss_is_scaled_for_ga (transformers >= 5.19)",
        )),
    ],
    ids=["trainer-divides", "parent-divides"],
)
def test_gradient_accumulation_gives_the_full_batch_gradient(tiny_lm_path, tmp_path, parent_scales_for_ga):
    """Step-1 grad norm of the ptx term alone: (GA, per-device batch) = (1, 4) and (2, 2) both equal the
    gradient of coef * NLL over the same 4 blocks, whether the Trainer divides the loss by GA (DPO/Reward/RLOO)
    or the parent scales it itself (GRPO)."""
    texts = pretraining_texts()

    class PtxOnly(PtxDPO):
        ptx_only = True
        loss_is_scaled_for_ga = parent_scales_for_ga

    norms = []
    for ga, batch in [(1, 4), (2, 2)]:
        args = RegularizedDPOConfig(
            output_dir=str(tmp_path / f"ga{ga}"), bf16=False, report_to="none", gradient_checkpointing=False, max_steps=1,
            per_device_train_batch_size=batch, gradient_accumulation_steps=ga, logging_steps=1, save_strategy="no",
            ptx_coef=0.5, ptx_block_size=16,
        )
        trainer = PtxOnly(tiny_lm_path, args=args, train_dataset=preference_pairs(), pretrain_dataset=texts)
        trainer.train()
        norms.append(trainer.state.log_history[0]["grad_norm"])

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    (0.5 * nll_by_hand(model, PtxStream(texts, TOKENIZER, 16, 4, seed=42).next_batch()["input_ids"])).backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    assert norms == pytest.approx([expected, expected], rel=1e-4)


def test_resumed_run_draws_the_same_ptx_batches(tiny_lm_path, tmp_path):
    texts = pretraining_texts(8)  # 5 ptx batches per epoch: the run crosses an epoch boundary
    common = dict(max_steps=3, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)
    full = make_trainer(tiny_lm_path, tmp_path / "full", texts, **common)
    full_batches = record_ptx_batches(full)
    full.train()
    assert len(full_batches) == 6 and full.ptx_term.stream.state_dict()["epoch"] == 1

    resumed = make_trainer(tiny_lm_path, tmp_path / "resumed", texts, **common)
    resumed_batches = record_ptx_batches(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "run" / "checkpoint-2"))
    assert full_batches[0] != full_batches[4]  # a stream restarted from scratch would not match
    assert resumed_batches == full_batches[4:]
    step3 = [[log["ptx/nll"] for log in t.state.log_history if log.get("step") == 3 and "ptx/nll" in log] for t in (full, resumed)]
    assert step3[1] == pytest.approx(step3[0], rel=1e-5) and len(step3[0]) == 1


def test_setup_errors_and_warnings(tiny_lm_path, tmp_path):
    with pytest.raises(ValueError, match=r"ptx_coef=0.5 > 0 needs pretraining data: pass pretrain_dataset="):
        make_trainer(tiny_lm_path, tmp_path, None)
    with pytest.raises(ValueError, match=r"'text' \(ptx_text_field\).*'content', 'source'"):
        make_trainer(tiny_lm_path, tmp_path, datasets.Dataset.from_dict({"content": ["x"], "source": ["y"]}))
    with pytest.raises(ValueError, match="ptx_block_size=1024 exceeds the model's max_position_embeddings=512"):
        make_trainer(tiny_lm_path, tmp_path, pretraining_texts(), ptx_block_size=1024)
    with pytest.warns(UserWarning, match="ptx_coef=0.0"):
        unused = make_trainer(tiny_lm_path, tmp_path, pretraining_texts(), ptx_coef=0.0)
    assert unused.ptx_term is None and "ptx" not in unused.regularizer_state


def test_ptx_loss_is_off_in_eval_and_names_non_finite_values(tiny_lm_path, tmp_path):
    trainer = make_trainer(tiny_lm_path, tmp_path, pretraining_texts())
    assert trainer.regularizer_state["ptx"] is trainer.ptx_term.stream
    metrics = trainer.evaluate(preference_pairs(4))
    assert trainer.ptx_term.stream.state_dict()["block"] == 0 and "eval_ptx/nll" not in metrics  # eval draws nothing
    trainer.model.train()
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the ptx term is not finite"):
        trainer.ptx_term.loss(trainer.model)


def test_a_model_without_lm_head_is_refused(tiny_rm_path, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from trl_regularizers.components.ptx import PtxTerm

    args = RegularizedDPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", ptx_coef=0.1, ptx_block_size=16)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_path)
    with pytest.raises(ValueError, match="ptx_coef=0.1 > 0 needs a model with a language-modeling head; .*ForSequenceClassification"):
        PtxTerm.from_config(args, pretraining_texts(), model, TOKENIZER, Accelerator(cpu=True), None, "Trainer")


def test_ptx_goes_through_a_peft_model(tiny_lm_path, tmp_path):
    from peft import LoraConfig

    texts = pretraining_texts()
    args = RegularizedDPOConfig(
        output_dir=str(tmp_path), bf16=False, report_to="none", gradient_checkpointing=False, max_steps=1,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", ptx_coef=0.5, ptx_block_size=16,
    )
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PtxDPO(tiny_lm_path, args=args, train_dataset=preference_pairs(), pretrain_dataset=texts, peft_config=peft_config)
    trainer.train()
    with torch.no_grad():  # LoRA starts as the identity, so step 1 sees the base model
        batch = PtxStream(texts, TOKENIZER, 16, 2, seed=42).next_batch()["input_ids"]
        expected_nll = nll_by_hand(AutoModelForCausalLM.from_pretrained(tiny_lm_path), batch).item()
    assert trainer.state.log_history[0]["ptx/nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2) + 0.5 * expected_nll, rel=1e-5)


def test_empty_texts_and_out_of_vocabulary_ids_are_refused_before_training():
    with pytest.raises(ValueError, match="Every document of the pretraining dataset is empty \\(column 'text'\\)"):
        PtxStream(["", "", ""], TOKENIZER, block_size=2, batch_size=1)
    empty_stream = datasets.Dataset.from_dict({"text": [""] * 100}).to_iterable_dataset()
    with pytest.raises(ValueError, match="empty \\(column 'text'; all 100 documents of the stream\\)"):
        PtxStream(empty_stream, TOKENIZER, block_size=2, batch_size=1)
    endless = datasets.IterableDataset.from_generator(lambda: ({"text": ""} for _ in iter(int, 1)))
    with pytest.raises(ValueError, match=r"the first 100[0-9]{2} documents of the stream"):
        PtxStream(endless, TOKENIZER, block_size=2, batch_size=1)
    late_content = datasets.Dataset.from_dict({"text": [""] * 99 + ["abc"]}).to_iterable_dataset()
    late = PtxStream(late_content, TOKENIZER, block_size=2, batch_size=1)  # its one document with content is the last
    epoch = [token for _ in range(51) for token in late.next_batch()["input_ids"].flatten().tolist()]  # 103 tokens
    assert sorted(set(epoch)) == sorted(TOKENIZER("abc")["input_ids"] + [TOKENIZER.eos_token_id])
    ids = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 3 + [[4, 999]]})
    with pytest.raises(ValueError, match=r"row 3, column 'input_ids', holds the token id 999, outside the model's vocabulary \[0, 259\)"):
        PtxStream(ids, TOKENIZER, block_size=2, batch_size=1, vocab_size=259)
    streamed = PtxStream(ids.to_iterable_dataset(), TOKENIZER, block_size=2, batch_size=1, vocab_size=259)
    with pytest.raises(ValueError, match="holds the token id 999"):  # an IterableDataset is checked as it streams
        [streamed.next_batch() for _ in range(8)]


def test_ppo_style_block_size_longer_than_the_model_is_refused_for_every_trainer(tiny_lm_path, tmp_path):
    """The shared PtxTerm checks ptx_block_size for every trainer (PPO once accepted any length)."""
    from trl_regularizers import RegularizedGRPOConfig, RegularizedGRPOTrainer

    args = RegularizedGRPOConfig(str(tmp_path), bf16=False, report_to="none", per_device_train_batch_size=4, num_generations=4,
                                 ptx_coef=0.1, ptx_block_size=4096)
    with pytest.raises(ValueError, match="ptx_block_size=4096 exceeds the model's max_position_embeddings=512"):
        RegularizedGRPOTrainer(tiny_lm_path, lambda completions, **k: [0.0] * len(completions), args,
                               train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * 4}), pretrain_dataset=pretraining_texts())


# ---------------------------------------------------------------- NLL from hidden states vs from logits, per trainer


def dpo_ptx_trainer(tmp_path, lm_path, rm_path, texts, peft=False):
    from peft import LoraConfig

    from trl_regularizers import RegularizedDPOTrainer

    args = RegularizedDPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", gradient_checkpointing=False,
                                per_device_train_batch_size=2, ptx_coef=0.5, ptx_block_size=16)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if peft else None
    trainer = RegularizedDPOTrainer(lm_path, args=args, train_dataset=preference_pairs(), pretrain_dataset=texts, peft_config=peft_config)
    return trainer, trainer.model


def online_ptx_trainer(trainer_name):
    def build(tmp_path, lm_path, rm_path, texts):
        from tests.trainers.test_grpo import drifted_policy, online_args, prompts, reward_distinct
        from trl_regularizers import RegularizedGRPOConfig, RegularizedGRPOTrainer, RegularizedRLOOConfig, RegularizedRLOOTrainer

        trainer_cls, config_cls = {"grpo": (RegularizedGRPOTrainer, RegularizedGRPOConfig), "rloo": (RegularizedRLOOTrainer, RegularizedRLOOConfig)}[trainer_name]
        args = online_args(config_cls, tmp_path, beta=0.1, ptx_coef=0.5, ptx_block_size=16)
        trainer = trainer_cls(drifted_policy(lm_path), reward_distinct, args, train_dataset=prompts(), pretrain_dataset=texts)
        return trainer, trainer.model

    return build


def ppo_ptx_trainer(tmp_path, lm_path, rm_path, texts):
    from tests.trainers.test_ppo import PTX, _regularized

    trainer = _regularized(tmp_path, lm_path, rm_path, pretrain_dataset=texts, **PTX)
    return trainer, trainer.language_model()


PTX_TRAINERS = {
    "dpo": dpo_ptx_trainer,
    "dpo-peft": lambda *a: dpo_ptx_trainer(*a, peft=True),
    "grpo": online_ptx_trainer("grpo"),
    "rloo": online_ptx_trainer("rloo"),
    "ppo": ppo_ptx_trainer,  # TRL 1.12's stock PPO subclass there, the standalone PPO on newer TRL
}


@pytest.mark.parametrize("name", list(PTX_TRAINERS))
def test_nll_from_hidden_states_equals_the_logits_nll_and_its_gradient(tiny_lm_path, tiny_rm_path, tmp_path, name):
    """Each trainer with ptx computes the NLL from the backbone's hidden states in chunks, with no LM-head forward
    (no [B, T, V] logits); value and gradient equal those of the NLL of the model's own logits on the same batch."""
    trainer, model = PTX_TRAINERS[name](tmp_path, tiny_lm_path, tiny_rm_path, pretraining_texts())
    assert trainer.ptx_term.from_hidden_states
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; GRPO divides its terms by it
    params = [p for p in model.parameters() if p.requires_grad]
    head_calls = []
    causal_lm(trainer.accelerator.unwrap_model(model)).get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    results = {}
    for from_hidden in (True, False):
        trainer.ptx_term.from_hidden_states = from_hidden
        trainer.ptx_term.stream.load_state_dict({"epoch": 0, "block": 0, "block_size": 16, "seed": trainer.args.seed})
        loss = trainer.scale_like_parent_loss(trainer.ptx_term.loss(model))
        results[from_hidden] = (loss.detach(), torch.autograd.grad(loss, params))
        assert len(head_calls) == (0 if from_hidden else 1)
    (value, grads), (expected, expected_grads) = results[True], results[False]
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert value > 0.1
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads)


def test_models_whose_logits_are_not_a_product_use_the_logits_path(tiny_lm_path, tmp_path):
    """A logit soft-capping config (or an LM-head bias) changes the logits after the head: the chunked NLL would
    miss it, so the trainer computes the NLL from the model's logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    model.config.final_logit_softcapping = 30.0
    args = RegularizedDPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", per_device_train_batch_size=2,
                                ptx_coef=0.5, ptx_block_size=16)
    from trl_regularizers import RegularizedDPOTrainer

    capped = RegularizedDPOTrainer(model, args=args, train_dataset=preference_pairs(), pretrain_dataset=pretraining_texts())
    assert not capped.ptx_term.from_hidden_states
    assert why_logits_are_not_a_product(model) == "its config sets final_logit_softcapping=30.0, which changes the logits after the LM head"
    biased = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    biased.lm_head = torch.nn.Linear(biased.config.hidden_size, biased.config.vocab_size, bias=True)
    assert why_logits_are_not_a_product(biased).startswith("its LM head is Linear(in_features=64, out_features=259, bias=True)")
