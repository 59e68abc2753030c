"""Every data format stock TRL trains on, the Regularized* trainers train on, with the same loss: tool calls (an
assistant turn with ``tool_calls`` and no ``content``, ``tool`` turns, a ``tools`` column as JSON text or as a list,
``reasoning_content``),
ShareGPT ``conversations``, SFT's ``formatting_func``, ``dataset_text_field`` and plain ``TrainingArguments``.
The data are TRL's own test formats (its ``scripts/generate_toolcall_dataset.py`` and SFT tests)."""

from __future__ import annotations

import json
import math

import pytest
from datasets import Dataset
from transformers import AutoTokenizer, TrainingArguments
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from trl_regularizers import RegularizedDPOTrainer, RegularizedRewardTrainer, RegularizedSFTTrainer

TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.get('reasoning_content') %}{{ '<think>' + message['reasoning_content'] + '</think>' }}{% endif %}"
    "{% if message.get('content') %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML with the tool schemas in a system turn, reasoning in <think> tags and tool calls as JSON (the tiny
tokenizer's template has none of them)."""

TIMER = {"type": "function", "function": {"name": "start_timer", "description": "Start a timer.",
         "parameters": {"type": "object", "properties": {"duration": {"type": "integer"}}, "required": ["duration"]}}}
PROMPTS = [[{"role": "user", "content": "Set a timer for 10 minutes."}], [{"role": "user", "content": "What time is it?"}]]
CHOSEN = [
    [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "start_timer", "arguments": {"duration": 600}}}]},
     {"role": "tool", "name": "start_timer", "content": "600"},
     {"role": "assistant", "content": "Timer set for 10 minutes."}],
    [{"role": "assistant", "reasoning_content": "Tokyo is UTC+9.", "content": "It is 6:22."}],
]
REJECTED = [[{"role": "assistant", "content": "Timer set for 10 seconds."}], [{"role": "assistant", "content": "Noon, maybe."}]]
CPU = dict(report_to="none", max_steps=2, per_device_train_batch_size=2, bf16=False, save_strategy="no", seed=7,
           learning_rate=1e-3, gradient_checkpointing=False, logging_steps=1)


def tool_rows(tools_as_json: bool, **columns) -> Dataset:
    """Rows of ``columns`` with a ``tools`` column; ``on_mixed_types="use_json"`` stores messages of mixed shapes as
    JSON values, as TRL's generator does (datasets >= 4.1; older ones: the Arrow struct, missing keys as None)."""
    tools = [json.dumps([TIMER])] * 2 if tools_as_json else [[TIMER]] * 2
    try:
        return Dataset.from_dict({**columns, "tools": tools}, on_mixed_types="use_json")
    except TypeError:
        return Dataset.from_dict({**columns, "tools": tools})


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_lm_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def losses(trainer) -> list[float]:
    """The loss logged at each of the two steps (the second one after an optimizer step on the first batch)."""
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def same_as_stock(stock_cls, ours_cls, model, args, **kwargs) -> None:
    stock = losses(stock_cls(model, args=args(), **kwargs))
    ours = losses(ours_cls(model, args=args(), **kwargs))
    assert len(stock) == 2 and ours == stock


@pytest.mark.parametrize("tools_as_json", [True, False], ids=["tools_json", "tools_list"])
def test_sft_trains_on_tool_calls_like_stock(tiny_lm_path, tool_tokenizer, tmp_path, tools_as_json):
    data = tool_rows(tools_as_json, messages=[p + c for p, c in zip(PROMPTS, CHOSEN)])
    same_as_stock(SFTTrainer, RegularizedSFTTrainer, tiny_lm_path, lambda: SFTConfig(str(tmp_path), **CPU),
                  train_dataset=data, processing_class=tool_tokenizer)


@pytest.mark.parametrize("tools_as_json", [True, False], ids=["tools_json", "tools_list"])
def test_dpo_trains_on_tool_calls_like_stock(tiny_lm_path, tool_tokenizer, tmp_path, tools_as_json):
    data = tool_rows(tools_as_json, prompt=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    same_as_stock(DPOTrainer, RegularizedDPOTrainer, tiny_lm_path, lambda: DPOConfig(str(tmp_path), **CPU),
                  train_dataset=data, processing_class=tool_tokenizer)


def test_reward_trains_on_tool_calls_like_stock(tiny_rm_path, tool_tokenizer, tmp_path):
    data = tool_rows(True, chosen=[p + c for p, c in zip(PROMPTS, CHOSEN)], rejected=[p + r for p, r in zip(PROMPTS, REJECTED)])
    same_as_stock(RewardTrainer, RegularizedRewardTrainer, tiny_rm_path, lambda: RewardConfig(str(tmp_path), **CPU),
                  train_dataset=data, processing_class=tool_tokenizer)


SFT_FORMATS = {
    "sharegpt_conversations": (dict(conversations=[[{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yes"}]] * 2), {}),
    "formatting_func": (dict(chosen=["a good one"] * 2, rejected=["a bad one"] * 2),
                        dict(formatting_func=lambda row: row["chosen"] + " beats " + row["rejected"])),
    "dataset_text_field": (dict(content=["plain text here", "more text"]), {}),
}


@pytest.mark.parametrize("name", list(SFT_FORMATS))
def test_sft_trains_on_every_stock_format_like_stock(tiny_lm_path, tmp_path, name):
    columns, kwargs = SFT_FORMATS[name]
    field = {"dataset_text_field": "content"} if name == "dataset_text_field" else {}
    same_as_stock(SFTTrainer, RegularizedSFTTrainer, tiny_lm_path, lambda: SFTConfig(str(tmp_path), **CPU, **field),
                  train_dataset=Dataset.from_dict(columns), **kwargs)


def test_sft_takes_plain_training_arguments_like_stock(tiny_lm_path, tmp_path):
    """SFTTrainer turns ``transformers.TrainingArguments`` into an ``SFTConfig``; ours into a ``RegularizedSFTConfig``."""
    args = TrainingArguments(str(tmp_path), report_to="none", max_steps=1, per_device_train_batch_size=2, use_cpu=True)
    data = Dataset.from_dict({"text": ["some text", "other text"]})
    ours = RegularizedSFTTrainer(tiny_lm_path, args=args, train_dataset=data)
    stock = SFTTrainer(tiny_lm_path, args=args, train_dataset=data)
    assert type(ours.args).__name__ == "RegularizedSFTConfig" and ours.args.sft_kl_coef == 0.0
    assert {k: v for k, v in ours.args.to_dict().items() if k in stock.args.to_dict()} == stock.args.to_dict()


@pytest.mark.parametrize(
    "columns, config, message",
    [
        (dict(messages=[[{"role": "user", "content": "hi"}], [{"content": "no role"}]]), {},
         r"train dataset, row 1, column 'messages': RegularizedSFTTrainer needs text .*got list"),
        (dict(text=["a", "b"]), {"dataset_text_field": "body"},
         r"needs the columns \('body'\) or \('messages'\) or \('conversations'\) or \('prompt', 'completion'\) or \('input_ids'\)"),
    ],
)
def test_sft_refuses_what_stock_cannot_train_naming_row_and_column(tiny_lm_path, tmp_path, columns, config, message):
    with pytest.raises(ValueError, match=message):
        RegularizedSFTTrainer(tiny_lm_path, args=SFTConfig(str(tmp_path), **CPU, **config), train_dataset=Dataset.from_dict(columns))


def logged(trainer, metric: str) -> list[float]:
    trainer.train()
    values = [entry[metric] for entry in trainer.state.log_history if metric in entry]
    assert values and all(math.isfinite(value) for value in values), (metric, values)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_regularizers_on_tool_call_data_are_finite_and_logged(tiny_lm_path, tool_tokenizer, tmp_path):
    """DPO+NLL and the SFT KL anchor on the tool-call rows: finite, logged, and they change the loss."""
    from trl_regularizers import RegularizedDPOConfig, RegularizedSFTConfig

    pairs = tool_rows(True, prompt=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    dpo = logged(RegularizedDPOTrainer(tiny_lm_path, args=RegularizedDPOConfig(str(tmp_path), nll_alpha=0.5, **CPU),
                                       train_dataset=pairs, processing_class=tool_tokenizer), "nll/chosen")
    assert dpo[0] > losses(DPOTrainer(tiny_lm_path, args=DPOConfig(str(tmp_path), **CPU), train_dataset=pairs,
                                      processing_class=tool_tokenizer))[0]  # + 0.5 * NLL > 0
    texts = tool_rows(False, messages=[p + c for p, c in zip(PROMPTS, CHOSEN)])
    sft = RegularizedSFTTrainer(tiny_lm_path, args=RegularizedSFTConfig(str(tmp_path), sft_kl_coef=1.0, **CPU),
                                train_dataset=texts, processing_class=tool_tokenizer)
    logged(sft, "kl/forward")
