"""The tiny causal language models shipped in ``publisher/configs/tiny-{llama,qwen2,mistral,falcon}``.

Each folder is a Hub text-generation repository without weights: ``config.json``, ``generation_config.json``
and a tokenizer that transformers' ``AutoTokenizer`` loads offline. The tokenizers are byte-level BPE
models trained here, with the ``tokenizers`` library, on :data:`CORPUS` (English with some French, German,
Spanish, Portuguese, Italian, Russian, Greek, Arabic, Hindi, Chinese, Japanese and Korean), 512 tokens in
all, with each family's special tokens and pre-tokenization:

- Llama 3: the Llama 3 split regex (numbers in groups of up to 3) and ``ignore_merges``; its special tokens
  follow the vocabulary in Llama 3's order (``<|begin_of_text|>`` ... ``<|python_tag|>``, without the
  reserved ones); the post-processor prepends ``<|begin_of_text|>``.
- Qwen2: NFC, Qwen2's split regex (single digits); ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` follow
  the vocabulary; no BOS.
- Mistral: GPT-2 style byte-level pre-tokenization (the real tokenizer is SentencePiece; the ids of the
  specials are Mistral's: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``[INST]``, ``[/INST]``); prepends ``<s>``.
- Falcon: punctuation split + byte-level + digit runs, ``<|endoftext|>`` at id 0; no BOS.

The model configs are the families' real ones shrunk (hidden 64, 2 layers, 4 heads, 2 key/value heads or
multi-query for Falcon, MLP 128, 256 positions). Llama keeps its ``llama3`` RoPE scaling, shrunk to 64 original
positions x 4 so that all three frequency bands occur with 16-wide heads. ``initializer_range`` is 0.4: at the
families' 0.02 (or 0.2) random weights give next-token distributions close to uniform (median top-1
probability 0.06 and entropy 5.0 nats of 6.24 at 0.2), at 0.4 they are peaked (median top-1 about 0.3, entropy
about 2.8 nats) while the residual stream stays near 150 at most, so greedy decoding has clear winners to agree on
and float16 has headroom.

``python -m tests.language_model_fixtures`` rewrites the shipped folders; ``tests/test_language_model_configs.py``
checks that :func:`write_tiny_language_model` re-derives them byte for byte (BPE training is deterministic for a
given ``tokenizers`` release).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CONFIGS = Path(__file__).resolve().parent.parent / "publisher" / "configs"
FAMILIES = ("llama", "qwen2", "mistral", "falcon")
VOCAB_SIZE = 512
INITIALIZER_RANGE = 0.4

CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the tokens before it.
Once upon a time there was a little lighthouse keeper who lived on a rocky island in the middle of the sea.
Every morning she climbed the stairs, cleaned the great lamp and wrote the weather in her notebook.
The weather was cold and windy, and the waves were high, but the ships found their way home in the night.
What is the capital of France? The capital of France is Paris. What is the capital of Japan? It is Tokyo.
How many days are there in a week? There are seven days in a week, twelve months in a year and 365 days.
Please write a short poem about the moon, the stars and the river that runs through the old town.
I think that this is a good idea, but we should test it first and then we can share the results with everyone.
Hello, how are you today? I am fine, thank you. Can you help me with my homework? Of course, I can help you.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000 -7 +12 50% $19.99 #1 @home a_b x=y*2 (a+b)/c
Code: def add(a, b):\n    return a + b\nprint(add(2, 3))  # prints 5\nfor i in range(10): total += i
Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque ? Elle est près de la gare.
Je voudrais un café et un croissant, s'il vous plaît. Merci beaucoup, bonne journée à vous aussi !
Der schnelle braune Fuchs springt über den faulen Hund. Wie spät ist es? Es ist halb zwölf. Grüße aus München.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la estación? Está al lado del mercado.
A raposa marrom rápida pula sobre o cão preguiçoso. Obrigado pela ajuda, até amanhã! Não há problema.
La volpe marrone veloce salta sopra il cane pigro. Buongiorno, come stai? Sto bene, grazie. È già tardi.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела? Спасибо, всё хорошо. Москва.
Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. Καλημέρα, τι κάνεις; Ευχαριστώ πολύ.
الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا، كيف حالك؟ شكرا جزيلا. اللغة العربية جميلة.
तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। नमस्ते, आप कैसे हैं? धन्यवाद। भारत एक बड़ा देश है।
敏捷的棕色狐狸跳过了懒狗。你好，你今天怎么样？我很好，谢谢。北京是中国的首都。我们一起学习中文吧。
素早い茶色の狐が怠け者の犬を飛び越える。こんにちは、お元気ですか？ありがとうございます。東京は日本の首都です。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요, 잘 지내세요? 감사합니다. 서울은 한국의 수도입니다.
Emoji and symbols: 🙂 🚀 ✨ → ← ≤ ≥ × ÷ ° € £ ¥ © ™ … “quotes” ‘single’ — dash – en dash • bullet
The end of the story is near. The keeper smiled, turned off the lamp and went to sleep as the sun rose.
"""

# Pre-tokenization regexes of the real tokenizers (tokenizer.json of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-1.5B;
# transformers' models/qwen2/tokenization_qwen2.py carries Qwen2's).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Special tokens: those placed before the BPE vocabulary (ids 0...) and those after it, in the real order.
LEADING_SPECIALS = {
    "llama": [],
    "qwen2": [],
    "mistral": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
    "falcon": ["<|endoftext|>"],
}
TRAILING_SPECIALS = {
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
              "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "mistral": [],
    "falcon": [],
}

CHAT_TEMPLATES = {
    # Llama 3.x's header/eot layout without the tool and date handling of the real template.
    "llama": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    # Qwen2.5's ChatML with its default system prompt, without tools.
    "qwen2": (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    # Mistral-7B-Instruct-v0.3's [INST] layout (system messages are not supported).
    "mistral": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + '[/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
}

MODEL_MAX_LENGTH = 256


def _pipeline(family: str) -> Tokenizer:
    """An untrained byte-level BPE tokenizer with ``family``'s normalizer, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    if family == "llama":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False), byte_level])
    elif family == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False), byte_level])
    elif family == "mistral":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    elif family == "falcon":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Punctuation(behavior="contiguous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            pre_tokenizers.Digits(individual_digits=False),
        ])
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_tokenizer(family: str) -> Tokenizer:
    """``family``'s tiny tokenizer, trained on :data:`CORPUS`: :data:`VOCAB_SIZE` tokens, specials included."""
    tokenizer = _pipeline(family)
    leading, trailing = LEADING_SPECIALS[family], TRAILING_SPECIALS[family]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(trailing),
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in leading],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in trailing])
    if len(tokenizer.get_vocab(with_added_tokens=True)) != VOCAB_SIZE:
        raise RuntimeError(f"{family}: the corpus yields {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")

    bos = {"llama": "<|begin_of_text|>", "mistral": "<s>"}.get(family)
    byte_level_post = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if bos is None:
        tokenizer.post_processor = byte_level_post
    else:
        bos_id = tokenizer.token_to_id(bos)
        template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, bos_id)])
        # Llama 3's tokenizer.json chains the byte-level offsets fix and the template; Mistral's has the template.
        tokenizer.post_processor = processors.Sequence([byte_level_post, template]) if family == "llama" else template
    if family == "llama":
        # Llama 3's tokenizer.json looks whole words up in the vocabulary before merging.
        data = json.loads(tokenizer.to_str())
        data["model"]["ignore_merges"] = True
        tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _special(family: str) -> dict[str, str | None]:
    return {
        "llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None},
        "qwen2": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        "mistral": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"},
        "falcon": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": None, "unk_token": None},
    }[family]


def _tokenizer_config(tokenizer: Tokenizer, family: str) -> dict:
    special = _special(family)
    added = {}
    for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        added[str(token_id)] = {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                                "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
    config: dict = {"added_tokens_decoder": added}
    if family == "qwen2":
        config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    if family == "mistral":
        config["add_bos_token"] = True
        config["add_eos_token"] = False
    config["bos_token"] = special["bos_token"]
    if family in CHAT_TEMPLATES:
        config["chat_template"] = CHAT_TEMPLATES[family]
    config["clean_up_tokenization_spaces"] = False
    config["eos_token"] = special["eos_token"]
    config["model_input_names"] = ["input_ids", "attention_mask"]
    config["model_max_length"] = MODEL_MAX_LENGTH
    config["pad_token"] = special["pad_token"]
    config["tokenizer_class"] = "Qwen2Tokenizer" if family == "qwen2" else "PreTrainedTokenizerFast"
    config["unk_token"] = special["unk_token"]
    return config


def _special_tokens_map(family: str) -> dict:
    special = {key: value for key, value in _special(family).items() if value is not None}
    if family == "qwen2":
        special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], **special}
    return special


def _ids(tokenizer: Tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.token_to_id(token) for token in tokens]


def _model_configs(tokenizer: Tokenizer, family: str) -> tuple[dict, dict]:
    """``config.json`` and ``generation_config.json`` of ``family``'s tiny model (keys sorted, as the Hub's)."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    common = {"hidden_size": 64, "initializer_range": INITIALIZER_RANGE, "max_position_embeddings": 256,
              "num_attention_heads": 4, "num_hidden_layers": 2, "torch_dtype": "float32", "use_cache": True,
              "vocab_size": vocab_size}
    if family == "llama":
        bos = _ids(tokenizer, "<|begin_of_text|>")[0]
        eos = _ids(tokenizer, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        config = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                  "bos_token_id": bos, "eos_token_id": eos, "head_dim": 16, "hidden_act": "silu",
                  "intermediate_size": 128, "mlp_bias": False, "model_type": "llama", "num_key_value_heads": 2,
                  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 4.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 64, "rope_type": "llama3"},
                  "rope_theta": 500000.0, "tie_word_embeddings": True}
        generation = {"bos_token_id": bos, "eos_token_id": eos}
    elif family == "qwen2":
        endoftext, im_end = _ids(tokenizer, "<|endoftext|>", "<|im_end|>")
        config = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": endoftext,
                  "eos_token_id": im_end, "hidden_act": "silu", "intermediate_size": 128, "max_window_layers": 2,
                  "model_type": "qwen2", "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                  "sliding_window": None, "tie_word_embeddings": True, "use_sliding_window": False}
        generation = {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}
    elif family == "mistral":
        bos, eos = _ids(tokenizer, "<s>", "</s>")
        config = {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": bos,
                  "eos_token_id": eos, "hidden_act": "silu", "intermediate_size": 128, "model_type": "mistral",
                  "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                  "tie_word_embeddings": False}
        generation = {"bos_token_id": bos, "eos_token_id": eos}
    elif family == "falcon":
        eos = _ids(tokenizer, "<|endoftext|>")[0]
        config = {"alibi": False, "apply_residual_connection_post_layernorm": False,
                  "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False,
                  "bos_token_id": eos, "eos_token_id": eos, "ffn_hidden_size": 128, "hidden_dropout": 0.0,
                  "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True,
                  "new_decoder_architecture": False, "parallel_attn": True, "rope_theta": 10000.0,
                  "tie_word_embeddings": True}
        generation = {"bos_token_id": eos, "eos_token_id": eos}
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return dict(sorted({**common, **config}.items())), generation


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def tiny_language_model_files(family: str) -> dict[str, str]:
    """The text of every file of ``family``'s tiny model folder, by file name."""
    tokenizer = build_tokenizer(family)
    config, generation = _model_configs(tokenizer, family)
    return {
        "config.json": _json(config),
        "generation_config.json": _json(generation),
        "special_tokens_map.json": _json(_special_tokens_map(family)),
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": _json(_tokenizer_config(tokenizer, family)),
    }


def write_tiny_language_model(family: str, folder: Path) -> Path:
    """Write ``family``'s tiny model folder (config, generation config, tokenizer) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tiny_language_model_files(family).items():
        (folder / name).write_bytes(text.encode("utf-8"))
    return folder


def main() -> None:
    for family in FAMILIES:
        print(write_tiny_language_model(family, CONFIGS / f"tiny-{family}"))


if __name__ == "__main__":
    main()
