"""Tiny random Hugging Face causal LMs and a local character tokenizer, for tests and examples.

Nothing is downloaded: every model is built from a `transformers` config with a small vocabulary,
hidden size and layer count, in fp32, randomly initialised from a seed, with dropout off (so two
forwards of one batch agree). Families whose output head transforms the logits get a non-neutral
transform by default (a soft-cap or multiplier chosen to change the logits noticeably), and the
initializer range is raised so that the logits spread over several nats instead of being nearly
uniform; both can be overridden through `**overrides`.

    tok = char_tokenizer()                                   # PreTrainedTokenizerFast, with a chat template
    model = tiny_causal_lm("gemma2", tokenizer=tok, seed=0)  # Gemma2ForCausalLM, vocab = len(tok)
    model = tiny_causal_lm("qwen3", vocab_size=160, hidden=48)

`FAMILIES` lists the family names; `TRANSFORMING` those whose head applies a scale or soft-cap.
"""

from __future__ import annotations

from typing import Optional

import torch

# family -> (config model_type, config overrides beyond the common sizes). The overrides set the
# head transform (when the family has one) to a value that visibly changes the logits.
_FAMILY_CONFIGS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "gemma2": ("gemma2", {"final_logit_softcapping": 2.0}),
    "gemma3": ("gemma3_text", {"final_logit_softcapping": 2.0}),
    # Gemma 3n / 4 add per-layer token embeddings (sized to the vocabulary in tiny_config).
    "gemma3n": ("gemma3n_text", {"final_logit_softcapping": 2.0, "hidden_size_per_layer_input": 8,
                                 "num_kv_shared_layers": 0, "laurel_rank": 4, "altup_num_inputs": 2}),
    "gemma4": ("gemma4_text", {"final_logit_softcapping": 2.0, "hidden_size_per_layer_input": 8}),
    "vaultgemma": ("vaultgemma", {"final_logit_softcapping": 2.0}),
    "nanochat": ("nanochat", {"final_logit_softcapping": 2.5}),
    "cohere": ("cohere", {"logit_scale": 2.5}),
    "cohere2": ("cohere2", {"logit_scale": 0.5}),
    "granite": ("granite", {"logits_scaling": 0.4}),
    "hyperclovax": ("hyperclovax", {"logits_scaling": 1.8}),
    # logits_scaling = hidden / dim_model_base (0.4 at hidden 32); its attention needs as many KV heads as heads.
    "minicpm3": ("minicpm3", {"dim_model_base": 80, "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16,
                              "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}),
    "falcon_h1": ("falcon_h1", {"lm_head_multiplier": 1.7, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                                "mamba_d_state": 8, "mamba_chunk_size": 8}),
}

FAMILIES = tuple(_FAMILY_CONFIGS)
TRANSFORMING = ("gemma2", "gemma3", "gemma3n", "gemma4", "vaultgemma", "nanochat", "cohere", "cohere2", "granite", "hyperclovax",
                "minicpm3", "falcon_h1")

DEFAULT_ALPHABET = "0123456789+-*=?:., abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# One line per message, then the assistant's turn: what TRL's chat-formatted prompts need.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, extra_tokens: int = 0):
    """A character-level `PreTrainedTokenizerFast` built locally (no download).

    Ids: the four special tokens `<pad> <s> </s> <unk>` (0-3), then one per distinct character of
    `alphabet` (sorted), then `extra_tokens` placeholder tokens `<extra_i>` (to make two tokenizers
    of different sizes). Encoding prepends `<s>`; `apply_chat_template` renders `role: content`
    lines and, with `add_generation_prompt=True`, a trailing `assistant: `.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet + "\n"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({f"<extra_{i}>": len(vocab) + i for i in range(extra_tokens)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int = 96, hidden: int = 32, layers: int = 2, tokenizer=None, **overrides):
    """The `transformers` config of a tiny `family` model (see `FAMILIES`).

    `hidden` is the model width (4 attention heads of `hidden // 4`, 2 key/value heads, MLP width
    `2·hidden`); `tokenizer`, when given, supplies the special-token ids. `overrides` are passed to
    the config last (e.g. `final_logit_softcapping=None`, `tie_word_embeddings=True`).
    """
    from transformers import CONFIG_MAPPING

    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model_type, family_overrides = _FAMILY_CONFIGS[family]
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if tokenizer is not None:
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=128,
                  initializer_range=0.2, attention_dropout=0.0, **special)
    kwargs.update(family_overrides)
    if "hidden_size_per_layer_input" in family_overrides:
        kwargs["vocab_size_per_layer_input"] = vocab_size
    kwargs.update(overrides)
    return CONFIG_MAPPING[model_type](**kwargs)


def tiny_causal_lm(family: str, vocab_size: Optional[int] = None, hidden: int = 32, layers: int = 2, seed: int = 0,
                   tokenizer=None, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny randomly initialised `AutoModelForCausalLM` of `family`, seeded, in `dtype`.

    `vocab_size` defaults to `len(tokenizer)` when a tokenizer is given, else 96; pass a larger
    `vocab_size` with a tokenizer to build a checkpoint with padded `lm_head` rows. Other arguments
    as in `tiny_config`. The model is returned in train mode (dropout is off in every family).
    """
    from transformers import AutoModelForCausalLM

    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 96
    config = tiny_config(family, vocab_size, hidden, layers, tokenizer, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


# family -> (config class name, model class name, text family): vision-language models whose language
# part is a tiny text family above; the image token is the last vocabulary id.
_VLM_FAMILIES = {
    "paligemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration", "gemma2"),  # soft-caps its logits
    "gemma3_vlm": ("Gemma3Config", "Gemma3ForConditionalGeneration", "gemma3"),  # does not (its forward has none)
}
VLM_FAMILIES = tuple(_VLM_FAMILIES)
IMAGE_SIZE = 16  # pixels; 8-pixel patches, so an image is 4 patch tokens


def tiny_vision_lm(family: str = "paligemma", vocab_size: int = 96, hidden: int = 32, seed: int = 0, **text_overrides):
    """A tiny vision-language model (`VLM_FAMILIES`) with a 1-layer SigLIP encoder on 16×16 images.

    The text config holds the head's transform attributes. Its image token id is `vocab_size - 1`
    (`model.config.image_token_id`); a prompt carries `tokens_per_image(model)` of them per image.
    """
    import transformers

    config_name, model_name, text_family = _VLM_FAMILIES[family]
    text = tiny_config(text_family, vocab_size, hidden, **text_overrides).to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)
    extra = ({"projection_dim": hidden} if family == "paligemma"
             else {"mm_tokens_per_image": 4, "boi_token_index": vocab_size - 3, "eoi_token_index": vocab_size - 2})
    config = getattr(transformers, config_name)(text_config=text, vision_config=vision, image_token_index=vocab_size - 1,
                                                **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).train()


def tokens_per_image(model) -> int:
    """How many image-token ids a prompt must carry per image for `model` (from `tiny_vision_lm`)."""
    return getattr(model.config, "mm_tokens_per_image", None) or (IMAGE_SIZE // 8) ** 2
