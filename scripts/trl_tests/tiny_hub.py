"""Offline stand-ins for the hub repos TRL's trainer tests load (``trl-internal-testing/...``).

Models: random-init tiny configs of the named architecture with a byte-level tokenizer carrying that family's
special tokens and the chat template TRL ships for it (``trl/chat_templates``), written in the Hugging Face cache
layout so the real ``from_pretrained`` path loads them. Data sets: TRL's own generator scripts, run with
``push_to_hub`` captured, served by a patched ``datasets.load_dataset``. Names not listed here stay unresolved, and
their tests fail stock as well (``docs/trl_tests.md`` lists them).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

ORG = "trl-internal-testing"
SNAPSHOT = "0" * 40
SIMPLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """Special tokens and chat template of one tokenizer family."""

    eos: str
    pad: str
    bos: str | None = None
    extra: tuple[str, ...] = ()
    template: str | None = None  # file name in trl/chat_templates; None: SIMPLE_TEMPLATE


QWEN_EXTRA = ("<|im_start|>", "<tool_call>", "</tool_call>", "<think>", "</think>")
QWEN2_5 = Family(eos="<|im_end|>", pad="<|endoftext|>", extra=QWEN_EXTRA, template="qwen2_5.jinja")
QWEN3 = Family(eos="<|im_end|>", pad="<|endoftext|>", extra=QWEN_EXTRA, template="qwen3.jinja")
LLAMA3_2 = Family(
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
    bos="<|begin_of_text|>",
    extra=("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"),
    template="llama3_2.jinja",
)
MISTRAL = Family(eos="</s>", pad="<unk>", bos="<s>", extra=("[INST]", "[/INST]"))


@dataclass(frozen=True)
class TinyModel:
    """One hub name: config class, extra config fields, head and tokenizer family."""

    config_class: type
    family: Family
    head: str = "causal_lm"  # or "sequence_classification"
    config_extra: dict = field(default_factory=dict)


TINY_MODELS: dict[str, TinyModel] = {
    f"{ORG}/tiny-Qwen2ForCausalLM-2.5": TinyModel(Qwen2Config, QWEN2_5),
    f"{ORG}/tiny-Qwen2ForSequenceClassification-2.5": TinyModel(Qwen2Config, QWEN2_5, "sequence_classification"),
    f"{ORG}/tiny-Qwen3ForCausalLM": TinyModel(Qwen3Config, QWEN3),
    f"{ORG}/tiny-Qwen3ForSequenceClassification": TinyModel(Qwen3Config, QWEN3, "sequence_classification"),
    f"{ORG}/tiny-Qwen3MoeForCausalLM": TinyModel(
        Qwen3MoeConfig, QWEN3, config_extra={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
    ),
    f"{ORG}/tiny-LlamaForCausalLM-3.2": TinyModel(LlamaConfig, LLAMA3_2),
    f"{ORG}/tiny-LlamaForSequenceClassification-3.2": TinyModel(LlamaConfig, LLAMA3_2, "sequence_classification"),
    f"{ORG}/tiny-MistralForCausalLM-0.2": TinyModel(MistralConfig, MISTRAL),
}


def family_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """Byte-level BPE (256 byte tokens, no merges) plus the family's special tokens and chat template."""
    import trl

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    specials = [family.eos, family.pad, *([family.bos] if family.bos else []), *family.extra]
    for token in specials:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=family.eos,
        pad_token=family.pad,
        bos_token=family.bos,
        additional_special_tokens=list(family.extra),
    )
    if family.template is None:
        tokenizer.chat_template = SIMPLE_TEMPLATE
    else:
        tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / family.template).read_text()
    return tokenizer


def build_tiny_model(spec: TinyModel, folder: Path, hidden_size: int = 16, seed: int = 0) -> None:
    """Save a random-init model of ``spec`` and its tokenizer to ``folder``."""
    tokenizer = family_tokenizer(spec.family)
    config = spec.config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **spec.config_extra,
    )
    torch.manual_seed(seed)
    if spec.head == "sequence_classification":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def install_tiny_models(hub_cache: str | Path) -> None:
    """Write every model of :data:`TINY_MODELS` into ``hub_cache`` in the hub cache layout (skip those present)."""
    hub_cache = Path(hub_cache)
    for name, spec in TINY_MODELS.items():
        repo = hub_cache / ("models--" + name.replace("/", "--"))
        snapshot = repo / "snapshots" / SNAPSHOT
        if snapshot.is_dir():
            continue
        staging = Path(tempfile.mkdtemp(dir=hub_cache))
        build_tiny_model(spec, staging)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(SNAPSHOT)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, snapshot)


def run_generator(script: Path) -> dict[tuple[str, str | None], datasets.DatasetDict]:
    """Run one of TRL's ``scripts/generate_*_dataset.py`` with ``push_to_hub`` captured instead of uploading."""
    pushed: dict[tuple[str, str | None], datasets.DatasetDict] = {}

    def capture(self, repo_id, config_name=None, **_kwargs):
        pushed[(repo_id, config_name)] = self

    module_spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    originals = (datasets.Dataset.push_to_hub, datasets.DatasetDict.push_to_hub)
    datasets.Dataset.push_to_hub = capture
    datasets.DatasetDict.push_to_hub = capture
    try:
        module.main(test_size=0.1, push_to_hub=True, repo_id=module.ScriptArguments().repo_id)
    finally:
        datasets.Dataset.push_to_hub, datasets.DatasetDict.push_to_hub = originals
    return pushed


GENERATORS = ("generate_zen_dataset.py", "generate_toolcall_dataset.py", "generate_harmony_dataset.py")


def install_tiny_datasets(scripts_folder: str | Path) -> dict[tuple[str, str | None], datasets.DatasetDict]:
    """Patch ``datasets.load_dataset`` to serve the data sets of TRL's generator scripts; return them."""
    served: dict[tuple[str, str | None], datasets.DatasetDict] = {}
    for script in GENERATORS:
        served.update(run_generator(Path(scripts_folder) / script))
    original_load = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if not str(path).startswith(ORG + "/"):
            return original_load(path, name, *args, split=split, streaming=streaming, **kwargs)
        configs = [config for repo, config in served if repo == path]
        if name is None and len(configs) == 1:
            name = configs[0]
        if (path, name) not in served:
            raise FileNotFoundError(f"{path} (config {name!r}) has no offline stand-in (trl_tests/tiny_hub.py)")
        data = served[(path, name)]
        if split is not None:
            data = data[split]
            return data.to_iterable_dataset() if streaming else data
        if streaming:
            return datasets.IterableDatasetDict({key: value.to_iterable_dataset() for key, value in data.items()})
        return data

    datasets.load_dataset = load_dataset
    return served
