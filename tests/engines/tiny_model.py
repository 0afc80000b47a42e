"""A tiny model directory for vLLM's real server: a config and a tokenizer, no weights.

``config.json`` is a one-layer Llama (a model type vLLM's ``ModelConfig`` accepts, read through
transformers as a real checkpoint's config would be). The tokenizer is a word-level
``tokenizers`` tokenizer (``tokenizer.json``, loaded by transformers' ``PreTrainedTokenizerFast``)
with a chat template: token id ``i >= FIRST`` decodes to ``f"t{i} "`` (the ``Fuse`` decoder joins
tokens as they are), so the ids the fake engine core emits come out of vLLM's own detokenizer as
text ``t100 t101 ...``. Written by the tests (stdlib only); the model is never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 1024
FIRST = 3  # 0-2 are <unk>, <s>, </s>
SPECIALS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def token_text(token_id: int) -> str:
    return f"t{token_id} "


def write(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
    }
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    vocab.update({token_text(i): i for i in range(FIRST, VOCAB)})
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, name in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return directory
