"""DOPD on Hugging Face causal LMs, from hidden states: no [batch, length, vocabulary] logits anywhere.

Runs as-is on CPU in a few seconds: tiny random models built from configs (a Qwen3 student and a
soft-capped Gemma 2 teacher whose head is padded past the tokenizer) and a character tokenizer built
locally. With real checkpoints, load the tokenizer and the two models with `from_pretrained` instead.

    python examples/hf_models.py
"""

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from dopd_kernels import DOPDConfig, dopd_loss, fused_linear_dopd_loss
from dopd_kernels.hf import final_hidden_states, lm_head

# A tokenizer and two models (stand-ins for AutoTokenizer / AutoModelForCausalLM.from_pretrained).
chars = "0123456789+=:,. abcdefghijklmnopqrstuvwxyz"
core = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}, "<pad>"))
core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
student = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **size))
teacher = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer) + 21, final_logit_softcapping=30.0, **size)).eval()

# On-policy rollout: the student samples R response tokens for each prompt (equal-length prompts,
# so no padding in this sketch). The privileged streams read a hint before the prompt.
R = 8
prompts, hint = ["12+34=", "56+17="], "hint: add the ones first. "
x = tokenizer(prompts, return_tensors="pt").input_ids
x_priv = tokenizer([hint + p for p in prompts], return_tensors="pt").input_ids
with torch.no_grad():
    y = student.generate(x, do_sample=True, max_new_tokens=R, min_new_tokens=R, pad_token_id=0)[:, x.shape[1]:]
ids, ids_priv = torch.cat([x, y], 1), torch.cat([x_priv, y], 1)

# The hidden states at the R positions that predict y (keep the last R+1, drop the one after y).
h_student = final_hidden_states(student, ids, logits_to_keep=R + 1)[:, :-1]  # [B, R, H]; grad to the backbone
with torch.no_grad():
    h_teacher = final_hidden_states(teacher, ids_priv, logits_to_keep=R + 1)[:, :-1]
    h_priv_student = final_hidden_states(student, ids_priv, logits_to_keep=R + 1)[:, :-1]

# One line per stream: lm_head reads the weight, the soft-cap / scale the model's forward applies, and
# the tokenizer's number of real rows (the teacher's 21 padding rows take no probability).
config = DOPDConfig(top_k=16, reduction="seq_mean")
out = fused_linear_dopd_loss(h_student, lm_head(student, tokenizer), h_teacher, lm_head(teacher, tokenizer),
                             h_priv_student, y, config=config)
out.loss.backward()

# The same loss from the models' own logits (logits mode materializes [B, R, V]; fine at this size).
with torch.no_grad():
    V = len(tokenizer)
    logits = [m(i).logits[:, -R - 1:-1, :V] for m, i in ((student, ids), (teacher, ids_priv), (student, ids_priv))]
    check = dopd_loss(*logits, y, config=config)
print(f"fused DOPD loss {out.loss.item():.6f}, from the models' logits {check.loss.item():.6f}")
print("regimes:", {k: round(v, 2) for k, v in out.regime_fractions().items()})
torch.optim.AdamW(student.parameters(), lr=1e-3).step()
