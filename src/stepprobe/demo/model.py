"""A tiny Qwen2 and a character-level tokenizer, built locally (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Digits and arithmetic for the task; a few letters and punctuation so chat roles and
# simple words encode (unknown characters are dropped, as Qwen2Tokenizer does).
CHARACTERS = list("0123456789+-*=?:., ") + list("abcdefghijklmnopqrstuvwxyz") + ["\n"]
# Byte-level spelling of each character (GPT-2's bytes_to_unicode: " " -> "Ġ", "\n" -> "Ċ").
_BYTE_LEVEL = {" ": "\u0120", "\n": "\u010a"}
# <s>, then each turn's content verbatim: the same ids as the plain-text prompt path, and
# the prompt ends right where the answer starts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Character tokenizer: one token per character, `<s>` prepended to every encoding.

    A byte-level BPE with no merges, so every character is one token. Byte-level on
    purpose: transformers' AutoTokenizer loads any saved "qwen2" tokenizer as
    Qwen2Tokenizer, which imposes a ByteLevel pre-tokenizer/decoder and drops unknown
    characters; built the same way here, both load paths give identical ids.
    Saved with `save_pretrained` when `save_dir` is given.
    """
    chars = [_BYTE_LEVEL.get(c, c) for c in CHARACTERS]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # TRL tokenizes plain-text prompts with add_special_tokens=True: they get <s> this way.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    **overrides,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 sized to the tokenizer (eager attention: jvp-safe)."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    settings.update(overrides)
    config = Qwen2Config(**settings)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_base(
    out_dir: str | Path,
    model: Qwen2ForCausalLM | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **model_kwargs,
) -> Path:
    """Write model + tokenizer to `out_dir` so `from_pretrained(out_dir)` loads both.

    With no model, a fresh `build_model(tokenizer, **model_kwargs)` is saved.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = model if model is not None else build_model(tokenizer, **model_kwargs)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
