"""Hugging Face causal LMs -> what the fused-linear losses take: final hidden states and an `LMHead`.

    from dopd_kernels import fused_linear_dopd_loss
    from dopd_kernels.hf import final_hidden_states, lm_head

    h_s = final_hidden_states(student, ids_s, mask_s)                 # [B, T, H_s], no [B, T, V] tensor
    with torch.no_grad():
        h_t = final_hidden_states(teacher, ids_t, mask_t)
    out = fused_linear_dopd_loss(h_s, lm_head(student, tokenizer), h_t, lm_head(teacher, tokenizer), h_p, tokens)

A causal LM's logits are `softcap(scale · (h·Wᵀ + b))` over the tokenizer's rows of `W`, where the
scale and soft-cap depend on the model class (Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`, Gemma 2 soft-caps at `final_logit_softcapping`, ...). `lm_head` reads them with
`HEAD_RULES`, a table keyed by model class written from each class's `forward` in `transformers` 5.24.
A class outside the table is trusted to apply its projection alone only if its layout is the plain
one (backbone + projection) and its config sets none of the known transform attributes; otherwise it
is refused with its name, or checked against its own logits with `lm_head(model, verify=True)`, so a
transform the library would not reproduce is never silently dropped.

`transformers` (and `peft`) are imported lazily: `import dopd_kernels` never needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .heads import LMHead

__all__ = ["lm_head", "final_hidden_states", "unwrap_model", "HeadRule", "HEAD_RULES", "UNSUPPORTED_HEADS"]


@dataclass(frozen=True)
class HeadRule:
    """How a model class's `forward` turns `h·Wᵀ + b` into its logits, as text-config attribute names.

    multiply / divide: attributes the logits are multiplied / divided by (a None value means 1).
    softcap:           attribute `c` of `c · tanh(z / c)`, applied after the scale (None value: off).
    real_rows:         attribute holding the number of real vocabulary rows when the forward slices
                       the logits to it (Inkling's `unpadded_vocab_size`).
    """

    multiply: tuple = ()
    divide: tuple = ()
    softcap: Optional[str] = None
    real_rows: Optional[str] = None


_SOFTCAP = HeadRule(softcap="final_logit_softcapping")
_DIVIDE_SCALING = HeadRule(divide=("logits_scaling",))

# Model class -> its head transform, from the `forward` of each class in transformers 5.x (the order
# there is always: lm_head, then the multiplier, then the soft-cap). Classes not listed apply none,
# which `_check_unlisted` double-checks against the config.
HEAD_RULES = {
    **dict.fromkeys((
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
        "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
        "Gemma4UnifiedForConditionalGeneration", "VaultGemmaForCausalLM", "NanoChatForCausalLM",
        "PaliGemmaForConditionalGeneration", "MistralLarge4ForConditionalGeneration", "BeamForCausalLM",
    ), _SOFTCAP),
    # Gemma 3's vision-language class applies no soft-cap in its forward (its text config may set one).
    "Gemma3ForConditionalGeneration": HeadRule(),
    **dict.fromkeys(("Inkling2ForCausalLM", "Inkling2ForConditionalGeneration", "Inkling2LoopForCausalLM",
                     "Inkling2LoopForConditionalGeneration"),
                    HeadRule(softcap="final_logit_softcapping", real_rows="unpadded_vocab_size")),
    **dict.fromkeys(("InklingForCausalLM", "InklingForConditionalGeneration"), HeadRule(real_rows="unpadded_vocab_size")),
    "RecurrentGemmaForCausalLM": HeadRule(softcap="logits_soft_cap"),
    "xLSTMForCausalLM": HeadRule(softcap="output_logit_soft_cap"),
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM",
                     "CohereCompassForConditionalGeneration"), HeadRule(multiply=("logit_scale",))),
    **dict.fromkeys((
        "GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
        "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM", "Granite4VisionForConditionalGeneration",
        "GraniteDoclingForConditionalGeneration",
        # MiniCPM3 divides the hidden states before its bias-free lm_head: the same logits.
        "MiniCPM3ForCausalLM",
    ), _DIVIDE_SCALING),
    # HyperCLOVA X multiplies by `logits_scaling` where Granite divides.
    **dict.fromkeys(("HyperCLOVAXForCausalLM", "HyperCLOVAXVisionV2ForConditionalGeneration"),
                    HeadRule(multiply=("logits_scaling",))),
    "FalconH1ForCausalLM": HeadRule(multiply=("lm_head_multiplier",)),
    **dict.fromkeys(("MuseGlimmerForConditionalGeneration", "MuseSparkForConditionalGeneration"),
                    HeadRule(multiply=("output_multiplier",), softcap="final_logit_softcapping")),
}

# Classes whose logits are not `softcap(scale · (h·Wᵀ + b))`: refused with the reason.
UNSUPPORTED_HEADS = {
    "DoryForCausalLM": "its lm_head multiplies each vocabulary row by its own learned scale",
    "ChameleonForConditionalGeneration": "its forward sets the image-token columns of the logits to the dtype's minimum",
    "DiffusionGemmaForBlockDiffusion": "it is a block-diffusion model, not a causal LM",
    "BltForCausalLM": "its forward normalises the backbone output again before the lm_head",
}

# Config attributes through which some class transforms its logits, with their neutral values. A
# class outside HEAD_RULES whose text config sets one to anything else is not trusted blindly.
_TRANSFORM_ATTRS = {"final_logit_softcapping": None, "logits_soft_cap": None, "output_logit_soft_cap": None,
                    "logit_scale": 1.0, "logits_scaling": 1.0, "lm_head_multiplier": 1.0, "output_multiplier": 1.0,
                    "unpadded_vocab_size": None}


def unwrap_model(model):
    """The Hugging Face model inside a PEFT `PeftModel` (LoRA layers stay injected, so calls through it
    still train the adapters), a `DistributedDataParallel` or a `torch.compile` wrapper (nested
    wrappers too); any other model is returned as is. Prompt-learning PEFT models (virtual tokens) are
    refused: their forward prepends tokens the backbone alone does not see."""
    for _ in range(8):
        if type(model).__module__.startswith("peft."):
            config = getattr(model, "active_peft_config", None)
            if getattr(config, "is_prompt_learning", False):
                raise ValueError(f"model: PEFT prompt learning ({config.peft_type}) is not supported; its forward "
                                 f"prepends virtual tokens that final_hidden_states would not see")
            model = model.get_base_model()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            model = model.module if hasattr(model, "module") else model._orig_mod
        else:
            return model
    return model


def _class_rule(model):
    """(class name, HeadRule or None) of the first class of `model`'s MRO that either table names."""
    for cls in type(model).__mro__:
        if cls.__name__ in UNSUPPORTED_HEADS:
            raise ValueError(f"model: {type(model).__name__} (model_type {model.config.model_type!r}) is not "
                             f"supported: {UNSUPPORTED_HEADS[cls.__name__]}")
        if cls.__name__ in HEAD_RULES:
            return cls.__name__, HEAD_RULES[cls.__name__]
    return type(model).__name__, None


def _non_neutral(config) -> dict:
    """The transform attributes `config` sets to a non-neutral value."""
    out = {}
    for attr, neutral in _TRANSFORM_ATTRS.items():
        value = getattr(config, attr, neutral)
        if value is not None and value != neutral and not isinstance(value, (list, dict)):
            out[attr] = value
    return out


def _not_plain(model, module) -> Optional[str]:
    """Why a class outside the table may not apply its output embedding straight to the backbone's
    output (None when its layout is the plain one: a backbone and the projection as direct children).
    BERT-style heads nest the projection under a dense + norm block; ModernBERT's decoder and ELECTRA's
    generator put such a block beside it."""
    if getattr(model, "lm_head", module) is not module:
        return "its `lm_head` module is not its output embedding"
    if not any(child is module for child in model.children()):
        return "its output embedding is nested inside another module"
    backbone = _backbone(model)
    extra = [name for name, child in model.named_children()
             if child is not module and child is not backbone and any(True for _ in child.parameters())]
    if extra:
        return f"it has modules with parameters besides its backbone and output embedding ({', '.join(extra)})"
    return None


def _attr(config, name: str, what: str, model_name: str):
    if not hasattr(config, name):
        raise ValueError(f"model: {model_name} applies {what} {name!r} in its forward but its config has no such attribute")
    return getattr(config, name)


def _head_weight(module, model_name: str):
    """(weight, bias) of the output projection; a PEFT LoRA layer on it is merged differentiably:
    W + Σ_adapters scaling·(B·A), so the loss's weight gradient reaches the adapters (one extra `[V, H]`
    tensor, never `[N, V]`)."""
    if not hasattr(module, "base_layer"):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"model: {model_name}'s output embedding {type(module).__name__} has no 2-D weight; "
                             f"only linear output heads are supported")
        return weight, getattr(module, "bias", None)
    base_weight, bias = _head_weight(module.base_layer, model_name)
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return base_weight, bias
    if not hasattr(module, "lora_A"):
        kind = f"{type(module).__module__}.{type(module).__name__}"  # e.g. peft.tuners.ia3.layer.Linear
        raise ValueError(f"model: {model_name}'s lm_head carries a {kind} adapter; only LoRA is merged "
                         f"on the fly: merge it (model.merge_and_unload()) or leave lm_head out of target_modules")
    weight = base_weight
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        problem = None
        if name in getattr(module, "lora_variant", {}):
            problem = f"the {type(module.lora_variant[name]).__name__} variant (e.g. DoRA)"
        elif getattr(module, "fan_in_fan_out", False):
            problem = "fan_in_fan_out"
        elif module.lora_B[name].bias is not None:
            problem = "a LoRA bias"
        elif module.training and not isinstance(module.lora_dropout[name], torch.nn.Identity):
            problem = "LoRA dropout in training mode (it acts on the hidden states, so it cannot be merged)"
        if problem is not None:
            raise ValueError(f"model: the LoRA adapter {name!r} on {model_name}'s lm_head uses {problem}; merge it "
                             f"(model.merge_and_unload()) or leave lm_head out of target_modules")
        delta = module.lora_B[name].weight @ module.lora_A[name].weight
        weight = weight + (delta * module.scaling[name]).to(weight.dtype)
    return weight, bias


def _num_rows(tokenizer, vocab_size, rule, config, rows: int, model_name: str) -> int:
    """Real vocabulary rows: the tokenizer's length, else `vocab_size`, else what the config declares."""
    if tokenizer is not None:
        n = len(tokenizer)
        if vocab_size is not None and vocab_size != n:
            raise ValueError(f"vocab_size={vocab_size} disagrees with len(tokenizer)={n}; give one of them")
        source = "len(tokenizer)"
    elif vocab_size is not None:
        n, source = int(vocab_size), "vocab_size"
    else:
        n = getattr(config, rule.real_rows, None) if rule is not None and rule.real_rows else None
        if n is None:
            n = getattr(config, "vocab_size", None) or rows
        return min(int(n), rows)
    if not 0 < n <= rows:
        raise ValueError(f"{source}={n} but {model_name}'s lm_head has {rows} rows: the tokenizer does not belong to "
                         f"this model (a head must have a row for every token)")
    return n


def lm_head(model, tokenizer=None, *, vocab_size: Optional[int] = None, verify: bool = False) -> LMHead:
    """The output head of a Hugging Face causal LM (or of a VLM's text part) as an `LMHead`.

    Args:
        model: a `transformers` `...ForCausalLM` / `...ForConditionalGeneration` model, optionally inside
            a PEFT `PeftModel` (LoRA on `lm_head` is merged differentiably, see `_head_weight`), DDP or
            `torch.compile`. Tied heads return the input embedding (it receives the gradient).
        tokenizer: its length is the number of real vocabulary rows (`LMHead.vocab_size`); rows past it
            are checkpoint padding and take no probability. Without it (and without `vocab_size`),
            the config's `vocab_size` is used, which usually counts the padding rows too.
        vocab_size: the number of real rows, instead of a tokenizer.
        verify: also run the model on a 4-token probe and check that `final_hidden_states` + this head
            reproduce the model's own `model(...).logits` (one forward; raises ValueError if not). Use it
            for a class outside `HEAD_RULES` whose config sets a transform attribute.

    Returns:
        `LMHead(weight [V_rows, H], bias [V_rows] or None, scale, softcap, vocab_size)`.

    Models split over devices (accelerate `device_map`): the weight stays where it is and
    `final_hidden_states` returns the hidden states on the weight's device, as the model's own forward
    does. Offloaded heads (weight on the meta device) are refused.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {type(model).__name__} is an encoder-decoder model; only decoder-only causal LMs "
                         f"and the text part of vision-language models are supported")
    name, rule = _class_rule(model)
    label = f"{name} (model_type {config.model_type!r})"
    text = config.get_text_config(decoder=True)
    module = model.get_output_embeddings()
    if module is None:
        raise ValueError(f"model: {label} has no output embeddings (not a language-modelling head model)")
    weight, bias = _head_weight(module, label)
    if weight.device.type == "meta":
        raise ValueError(f"model: {label}'s lm_head weight is offloaded (meta device); load the head on a device")

    scale, softcap = 1.0, None
    if rule is None:
        why = _not_plain(model, module)
        if why and not verify:
            raise ValueError(f"model: {label} is not in dopd_kernels.hf.HEAD_RULES and {why}, so its forward may do more "
                             f"than one projection after the backbone; lm_head(model, verify=True) checks it against "
                             f"the model's own logits")
        suspicious = _non_neutral(text)
        if suspicious and not verify:
            raise ValueError(
                f"model: {label} is not in dopd_kernels.hf.HEAD_RULES and its config sets {suspicious}, which some "
                f"models apply to their logits; lm_head(model, verify=True) checks the plain head against the model's "
                f"own logits, or build an LMHead with the transform its forward applies")
    else:
        for attr in rule.multiply:
            value = _attr(text, attr, "the multiplier", label)
            scale *= 1.0 if value is None else float(value)
        for attr in rule.divide:
            value = _attr(text, attr, "the divisor", label)
            scale /= 1.0 if value is None else float(value)
        if rule.softcap is not None:
            value = _attr(text, rule.softcap, "the soft-cap", label)
            softcap = None if value is None else float(value)
    head = LMHead(weight, bias, scale, softcap, _num_rows(tokenizer, vocab_size, rule, text, weight.shape[0], label))
    if verify:
        _verify(model, head, label)
    return head


def _backbone(model):
    """The module the LM's forward calls before its head: `model.model` for most classes (the
    multimodal model for VLMs, which takes `pixel_values` too), else the `base_model_prefix`
    attribute (GPT-2's `transformer`)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, torch.nn.Module):
        inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(inner, torch.nn.Module) or inner is model:
        raise ValueError(f"model: cannot find the backbone of {type(model).__name__} (no `model` attribute nor "
                         f"{getattr(model, 'base_model_prefix', None)!r}); call it yourself and pass its last "
                         f"hidden states")
    return inner


def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions `transformers`' `slice_logits_to_keep` keeps: an int keeps the last k (0: all); a 1-D
    tensor, those positions; a 2-D integer tensor, those positions per sequence; a 2-D bool mask, its
    True positions flattened to `[n, H]`."""
    if isinstance(logits_to_keep, torch.Tensor):
        idx = logits_to_keep.to(hidden.device)
        if idx.dim() == 2 and idx.dtype == torch.bool:
            return hidden[idx]
        if idx.dim() == 2:
            return torch.take_along_dim(hidden, idx[..., None], dim=1)
        return hidden[:, idx]
    k = int(logits_to_keep)
    return hidden if k == 0 else hidden[:, -k:]


def final_hidden_states(model, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                        logits_to_keep: Optional[Union[int, torch.Tensor]] = None, **kwargs) -> torch.Tensor:
    """The last hidden states (after the final norm) that the model's head maps to logits.

    Runs the backbone only (`model.model`, GPT-2's `transformer`, a VLM's multimodal model), so no
    `[B, T, V]` logits tensor is allocated; gradients flow to the backbone (and LoRA adapters).

    Args:
        model: as in `lm_head`.
        input_ids: `[B, T]` token ids (or pass `inputs_embeds=` in kwargs).
        attention_mask: `[B, T]`, optional.
        logits_to_keep: as the model's own argument: an int keeps the last k positions (0 or None: all),
            a 1-D tensor those positions, a 2-D tensor per-sequence positions or a bool mask.
        **kwargs: passed to the backbone (`position_ids`, `pixel_values`, `token_type_ids`, ...);
            `use_cache` defaults to False.

    Returns:
        `[B, T', H]` (`[n, H]` for a bool mask), on the device of the model's `lm_head` weight.
    """
    model = unwrap_model(model)
    backbone = _backbone(model)
    kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if logits_to_keep is not None:
        hidden = _keep(hidden, logits_to_keep)
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None) if head is not None else None
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta" and weight.device != hidden.device:
        hidden = hidden.to(weight.device)  # what accelerate's hook on a split model's lm_head does
    return hidden


def _verify(model, head: LMHead, label: str) -> None:
    """Compare `softcap(scale·(h·Wᵀ + b))` with `model(probe).logits` on a 4-token probe (float64 math),
    in eval mode (dropout off; the mode is restored)."""
    rows = head.vocab_size or head.weight.shape[0]
    ids = torch.arange(4, device=model.get_input_embeddings().weight.device)[None] % rows
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, :, :rows].double()
            h = final_hidden_states(model, ids)[0].double()
            if h.shape[-1] != head.weight.shape[1]:
                raise ValueError(f"model: {label}'s backbone returns hidden states of size {h.shape[-1]} but its output "
                                 f"embedding takes {head.weight.shape[1]}: its forward does more than one projection")
            z = h @ head.weight[:rows].double().T
    finally:
        model.train(training)
    if head.bias is not None:
        z = z + head.bias[:rows].detach().double()
    z = z * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    err = (z - logits.to(z.device)).abs().max().item()
    # The model computes in its own dtype: fp32 agrees to ~1e-6 relative, bf16/fp16 to ~1e-2.
    tol = (1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2) * max(1.0, logits.abs().max().item())
    if not err <= tol:
        raise ValueError(f"model: {label}'s logits are not softcap(scale·(h·Wᵀ + b)) with scale={head.scale}, "
                         f"softcap={head.softcap} (max difference {err:.3g} on a probe): its forward transforms the "
                         f"logits in a way dopd_kernels.hf does not reproduce")
