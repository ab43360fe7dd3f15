"""The shipped causal language model configs: the tiny random-weight families load and run offline through
transformers' Auto classes, their files are what ``tests/language_model_fixtures.py`` derives, and the
full-size architecture configs build (on the meta device) at their published sizes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.language_model_fixtures import CONFIGS, FAMILIES, VOCAB_SIZE, tiny_language_model_files

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "falcon": "FalconForCausalLM"}
# Each family's special tokens and the tokens its config and generation config name as bos/eos.
SPECIALS = {
    "llama": ({"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
              "<|begin_of_text|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "qwen2": ({"<|endoftext|>", "<|im_start|>", "<|im_end|>"}, "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"]),
    "mistral": ({"<unk>", "<s>", "</s>", "[INST]", "[/INST]"}, "<s>", ["</s>"]),
    "falcon": ({"<|endoftext|>"}, "<|endoftext|>", ["<|endoftext|>"]),
}
TEXTS = ["Hello, how are you today? The capital of France is Paris.",
         "Привет! 你好，世界。こんにちは 123456 café 🙂\n  indented\tline"]
FULL_SIZE = {  # folder: (architecture, parameters in billions to 2 decimals, key/value heads)
    "llama-3.2-1b": ("LlamaForCausalLM", 1.24, 8),
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", 1.54, 2),
    "mistral-7b-v0.3": ("MistralForCausalLM", 7.25, 8),
    "falcon-7b": ("FalconForCausalLM", 6.92, 1),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_loads_and_runs(family):
    folder = CONFIGS / f"tiny-{family}"
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    assert config.architectures == [ARCHITECTURES[family]]
    assert config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.num_key_value_heads == (1 if family == "falcon" else 2)

    specials, bos, eos = SPECIALS[family]
    assert specials <= set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    eos_ids = tokenizer.convert_tokens_to_ids(eos)
    assert config.bos_token_id == generation.bos_token_id == bos_id
    assert generation.eos_token_id == (eos_ids if len(eos_ids) > 1 else eos_ids[0])
    for text in TEXTS:  # byte-level BPE: every text round-trips
        ids = tokenizer(text)["input_ids"]
        assert (ids[0] == bos_id) == (family in ("llama", "mistral"))
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    if family in ("llama", "qwen2", "mistral"):
        chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert "Hi!" in prompt and "Hello." in prompt and prompt.count("Bye") == 1

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert type(model).__name__ == ARCHITECTURES[family]
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (family != "mistral")
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True) if tokenizer.pad_token else tokenizer(
        TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**tokenizer(TEXTS[:1], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert logits.shape[-1] == VOCAB_SIZE and torch.isfinite(logits).all()
    assert out.shape[1] >= len(tokenizer(TEXTS[0])["input_ids"]) + 1
    # initializer_range 0.4: random weights give peaked next-token distributions, far from uniform.
    probabilities = logits[0].softmax(-1)
    entropy = -(probabilities * probabilities.log()).sum(-1).mean()
    assert entropy < 0.75 * torch.log(torch.tensor(float(VOCAB_SIZE)))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_files_are_rederived(family):
    folder = CONFIGS / f"tiny-{family}"
    derived = tiny_language_model_files(family)
    assert sorted(path.name for path in folder.iterdir()) == sorted(derived)
    for name, text in derived.items():
        assert (folder / name).read_bytes() == text.encode("utf-8"), f"{folder.name}/{name} differs from the generator"
    assert sum((folder / name).stat().st_size for name in derived) < 200_000


@pytest.mark.parametrize("folder", FULL_SIZE)
def test_full_size_config_builds(folder):
    architecture, billions, kv_heads = FULL_SIZE[folder]
    path = CONFIGS / folder
    assert sorted(item.name for item in path.iterdir()) == ["config.json", "generation_config.json"]
    config = AutoConfig.from_pretrained(path)
    generation = GenerationConfig.from_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == [architecture]
    assert (generation.bos_token_id, generation.eos_token_id) == (raw["bos_token_id"], raw["eos_token_id"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    assert config.num_key_value_heads == kv_heads
