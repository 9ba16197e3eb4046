"""`dopd_kernels.hf`: output heads and final hidden states read from Hugging Face models.

Every check compares against the model's own `model(...).logits`: `softcap(scale·(h·Wᵀ + b))` computed
here by hand from `lm_head(...)` and `final_hidden_states(...)` must reproduce them, for every family
of `tiny_models` (18 text families, 2 vision-language models), tied heads, PEFT-wrapped models and
`logits_to_keep`. Classes the library cannot reproduce are refused with their name in the error.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import FAMILIES, TRANSFORMING, VLM_FAMILIES, char_tokenizer, tiny_causal_lm, tiny_config, \
    tiny_vision_lm, tokens_per_image  # noqa: E402

from dopd_kernels.hf import final_hidden_states, lm_head  # noqa: E402
from dopd_kernels.heads import LMHead  # noqa: E402

TOK = char_tokenizer()


def head_logits(head: LMHead, hidden: torch.Tensor) -> torch.Tensor:
    """softcap(scale·(h·Wᵀ + b)) over the head's real rows, in float64."""
    rows = head.vocab_size or head.weight.shape[0]
    z = hidden.double() @ head.weight[:rows].double().T
    if head.bias is not None:
        z = z + head.bias[:rows].double()
    z = z * head.scale
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def assert_logits_match(model, head: LMHead, ids: torch.Tensor, **kwargs) -> None:
    rows = head.vocab_size or head.weight.shape[0]
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits[..., :rows].double()
        got = head_logits(head, final_hidden_states(model, ids, **kwargs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def random_ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(4, len(TOK), (batch, length))


def expected_transform(model) -> tuple:
    """(scale, softcap) each family's forward applies, read from its config by hand."""
    c = model.config
    softcap = lambda: (1.0, c.final_logit_softcapping)  # noqa: E731
    rule = {
        "gemma2": softcap, "gemma3_text": softcap, "gemma3n_text": softcap, "gemma4_text": softcap,
        "vaultgemma": softcap, "nanochat": softcap,
        "cohere": lambda: (c.logit_scale, None), "cohere2": lambda: (c.logit_scale, None),
        "granite": lambda: (1 / c.logits_scaling, None), "minicpm3": lambda: (c.dim_model_base / c.hidden_size, None),
        "hyperclovax": lambda: (c.logits_scaling, None), "falcon_h1": lambda: (c.lm_head_multiplier, None),
    }.get(c.model_type, lambda: (1.0, None))
    return rule()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_reproduces_model_logits(family):
    model = tiny_causal_lm(family, tokenizer=TOK, seed=3)
    head = lm_head(model, TOK)
    scale, softcap = expected_transform(model)
    assert head.scale == pytest.approx(scale, rel=1e-12) and head.softcap == softcap
    assert head.vocab_size == len(TOK) and head.weight is model.get_output_embeddings().weight
    ids = random_ids()
    assert_logits_match(model, head, ids)
    if family in TRANSFORMING:  # the transform matters: the plain projection is not the model's logits
        plain = LMHead(head.weight, head.bias, vocab_size=head.vocab_size)
        with torch.no_grad():
            gap = (head_logits(plain, final_hidden_states(model, ids)) - model(ids).logits.double()).abs().max()
        assert gap > 0.05, f"{family}: the test model's transform is too weak to be tested"
    lm_head(model, TOK, verify=True)


# Families outside tiny_models with other layouts (GPT-NeoX's `embed_out`, BioGPT's `output_projection`,
# RWKV's `head`, Mamba, OPT, MoE, hybrid recurrent models), built from one generic set of tiny sizes.
OTHER_FAMILIES = ["gpt_neox", "opt", "bloom", "falcon_mamba", "rwkv", "mpt", "biogpt", "phi", "olmo2", "starcoder2",
                  "xglm", "gpt_bigcode", "gemma", "mixtral", "lfm2", "ctrl"]


def generic_tiny(model_type: str):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    sizes = dict(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2, n_embd=32,
                 n_layer=2, n_head=4, n_positions=128, ffn_dim=64, d_model=32, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    defaults = CONFIG_MAPPING[model_type]()
    return AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](
        **{k: v for k, v in sizes.items() if k == "vocab_size" or hasattr(defaults, k)}))


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_other_families_reproduce_their_logits(model_type):
    model = generic_tiny(model_type).eval()
    head = lm_head(model, TOK)
    assert head.scale == 1.0 and head.softcap is None
    assert_logits_match(model, head, random_ids())


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "cohere"])
def test_tied_head_is_the_input_embedding(family):
    model = tiny_causal_lm(family, tokenizer=TOK)
    assert lm_head(model).weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_language_text_part(family):
    """The transform lives in the text config (PaliGemma soft-caps; Gemma 3's VLM forward does not),
    and final_hidden_states passes pixel_values through to the multimodal model."""
    model = tiny_vision_lm(family, vocab_size=96, seed=1)
    head = lm_head(model, verify=True)
    assert head.softcap == (2.0 if family == "paligemma" else None)
    ids = torch.randint(4, 90, (2, 10))
    ids[:, 1:1 + tokens_per_image(model)] = model.config.image_token_id
    assert_logits_match(model, head, ids, pixel_values=torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("keep", [0, 1, 3, "positions", "per_row", "mask"])
def test_logits_to_keep_slices_like_transformers(keep):
    model = tiny_causal_lm("qwen3", tokenizer=TOK, seed=1)
    ids = random_ids(2, 8)
    arg = {"positions": torch.tensor([0, 2, 5]), "per_row": torch.tensor([[1, 4], [0, 7]]),
           "mask": torch.rand(2, 8) > 0.4}.get(keep, keep)
    head = lm_head(model)
    with torch.no_grad():
        want = model(ids, logits_to_keep=arg).logits.double()
        got = head_logits(head, final_hidden_states(model, ids, logits_to_keep=arg))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hidden_states_carry_the_backbone_gradient():
    model = tiny_causal_lm("llama", tokenizer=TOK)
    final_hidden_states(model, random_ids()).square().sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None  # the head is not run


# -- vocabulary ----------------------------------------------------------------------------------


def test_padded_rows_past_the_tokenizer():
    model = tiny_causal_lm("qwen2", tokenizer=TOK, vocab_size=len(TOK) + 14)
    assert lm_head(model, TOK).vocab_size == len(TOK)
    assert lm_head(model, vocab_size=len(TOK)).vocab_size == len(TOK)
    assert lm_head(model).vocab_size == len(TOK) + 14  # without a tokenizer: the config's vocab_size


def test_tokenizer_larger_than_the_head_is_refused():
    model = tiny_causal_lm("llama", vocab_size=len(TOK) - 3)
    with pytest.raises(ValueError, match=rf"len\(tokenizer\)={len(TOK)} .* {len(TOK) - 3} rows"):
        lm_head(model, TOK)
    with pytest.raises(ValueError, match="disagrees with len"):
        lm_head(tiny_causal_lm("llama", tokenizer=TOK), TOK, vocab_size=len(TOK) - 1)


# -- classes the table does not know -------------------------------------------------------------


def _subclass(base, name: str, multiply: bool):
    """A subclass named `name` of `base` whose forward multiplies the logits by config.logit_scale (or not)."""

    def forward(self, *args, **kwargs):
        out = base.forward(self, *args, **kwargs)
        if multiply:
            out.logits = out.logits * self.config.logit_scale
        return out

    return type(name, (base,), {"forward": forward})


def _llama_config(**extra):
    return tiny_config("llama", len(TOK), tokenizer=TOK, **extra)


def test_unknown_class_with_a_transform_attribute_is_refused():
    from transformers import LlamaForCausalLM

    model = _subclass(LlamaForCausalLM, "ScaledLM", multiply=True)(_llama_config(logit_scale=3.0))
    with pytest.raises(ValueError, match=r"ScaledLM \(model_type 'llama'\).*logit_scale"):
        lm_head(model)
    with pytest.raises(ValueError, match=r"ScaledLM.*logits are not softcap"):
        lm_head(model, verify=True)


def test_unknown_class_checked_by_verify_is_accepted():
    from transformers import LlamaForCausalLM

    model = _subclass(LlamaForCausalLM, "PlainLM", multiply=False)(_llama_config(logit_scale=3.0))
    head = lm_head(model, TOK, verify=True)  # the attribute is set but this forward does not use it
    assert head.scale == 1.0
    assert_logits_match(model, head, random_ids())


def test_subclass_of_a_known_class_inherits_its_rule():
    from transformers import CohereForCausalLM

    model = _subclass(CohereForCausalLM, "MyCohere", multiply=False)(tiny_config("cohere", len(TOK), tokenizer=TOK))
    head = lm_head(model)
    assert head.scale == 2.5
    assert_logits_match(model, head, random_ids())


def test_unsupported_models_are_refused_by_name():
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, T5ForConditionalGeneration

    dory = AutoModelForCausalLM.from_config(CONFIG_MAPPING["dory"](
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match=r"DoryForCausalLM \(model_type 'dory'\) is not supported: .*own learned scale"):
        lm_head(dory)
    t5 = T5ForConditionalGeneration(CONFIG_MAPPING["t5"](vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                         d_kv=8))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        lm_head(t5)
    # ModernBERT's decoder runs a dense + norm block (its `lm_head`) before the projection.
    mbd = AutoModelForCausalLM.from_config(CONFIG_MAPPING["modernbert-decoder"](
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=3, sep_token_id=3))
    with pytest.raises(ValueError, match="ModernBertDecoderForCausalLM .*its `lm_head` module is not its output embedding"):
        lm_head(mbd)
    with pytest.raises(ValueError, match="logits are not softcap"):
        lm_head(mbd, verify=True)
    # BERT-style heads nest the projection under a dense + norm block; ELECTRA's generator puts one beside it
    # (with embedding_size == hidden_size nothing but this check would notice).
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 is_decoder=True)
    bert = AutoModelForCausalLM.from_config(CONFIG_MAPPING["bert"](**small))
    with pytest.raises(ValueError, match="BertLMHeadModel .*output embedding is nested inside another module"):
        lm_head(bert)
    with pytest.raises(ValueError, match="BertLMHeadModel.*logits are not softcap"):
        lm_head(bert, verify=True)
    electra = AutoModelForCausalLM.from_config(CONFIG_MAPPING["electra"](embedding_size=16, **small))
    with pytest.raises(ValueError, match=r"ElectraForCausalLM .*besides its backbone and output embedding "
                                         r"\(generator_predictions\)"):
        lm_head(electra)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lm_head(torch.nn.Linear(4, 4))


def test_offloaded_head_is_refused():
    with torch.device("meta"):
        model = tiny_causal_lm("llama", tokenizer=TOK)
    with pytest.raises(ValueError, match="offloaded"):
        lm_head(model)


# -- PEFT ----------------------------------------------------------------------------------------


def _lora(model, targets, dropout=0.0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_peft_model_is_unwrapped():
    model = _lora(tiny_causal_lm("gemma2", tokenizer=TOK), ["q_proj", "v_proj"])
    head = lm_head(model, TOK, verify=True)
    assert head.softcap == 2.0
    assert_logits_match(model, head, random_ids())


def test_lora_on_lm_head_is_merged_differentiably():
    model = _lora(tiny_causal_lm("cohere", tokenizer=TOK, tie_word_embeddings=False), ["q_proj", "lm_head"])
    head = lm_head(model, TOK, verify=True)
    assert_logits_match(model, head, random_ids())
    head.weight.sum().backward()  # the merged weight carries the gradient to the adapter
    lora_b = [p for n, p in model.named_parameters() if "lm_head.lora_B" in n]
    assert lora_b and lora_b[0].grad.abs().sum() > 0


def test_lora_dropout_on_lm_head_is_refused_in_training():
    model = _lora(tiny_causal_lm("llama", tokenizer=TOK), ["lm_head"], dropout=0.1)
    with pytest.raises(ValueError, match="LoRA dropout in training mode"):
        lm_head(model)
    model.eval()
    assert_logits_match(model, lm_head(model), random_ids())


def test_importing_the_library_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, dopd_kernels, dopd_kernels.hf; print('transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_prompt_learning_peft_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_causal_lm("llama", tokenizer=TOK),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="PEFT prompt learning"):
        final_hidden_states(model, random_ids())
    with pytest.raises(ValueError, match="PEFT prompt learning"):
        lm_head(model)


def test_other_peft_adapters_on_lm_head_are_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_causal_lm("llama", tokenizer=TOK),
                                peft.IA3Config(target_modules=["lm_head", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"lm_head carries a peft\.tuners\.ia3\..*adapter; only LoRA is merged"):
        lm_head(model)
