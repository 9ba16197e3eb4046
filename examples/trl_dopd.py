"""DOPD with TRL: tiny random models and a local tokenizer, so it runs on a CPU in seconds.

    python examples/trl_dopd.py                                  # CPU (or one GPU)
    accelerate launch examples/trl_dopd.py --output_dir out      # every GPU of the machine (torchrun works too)

Every `DOPDTrainerConfig` / TRL `DistillationConfig` / `TrainingArguments` option is a flag (`--method tpriv-opd`,
`--beta 0.5`, ...). For real models pass names instead: `DOPDTrainer(model="Qwen/Qwen3-1.7B",
teacher_model="Qwen/Qwen3-8B", ...)` and drop the tokenizer and model building below.
"""

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dopd_kernels.integrations.trl import DOPDTrainer, DOPDTrainerConfig

parser = HfArgumentParser(DOPDTrainerConfig)
gpu = torch.cuda.is_available()
parser.set_defaults(output_dir="dopd-trl-demo", max_steps=3, per_device_train_batch_size=4, max_completion_length=8,
                    learning_rate=1e-3, use_cpu=not gpu, bf16=gpu, gradient_checkpointing=False, logging_steps=1,
                    report_to="none", save_strategy="no", loss_top_k=16)
(args,) = parser.parse_args_into_dataclasses()

# A character-level tokenizer whose chat template wraps each turn in special tokens.
specials = ["<pad>", "<unk>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
vocab = {t: i for i, t in enumerate(specials + list("0123456789+=:? abcdefghijklmnopqrstuvwxyz"))}
core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                              padding_side="left", additional_special_tokens=specials[3:])
tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_llama(hidden: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, eos_token_id=2))


# Rows: a conversational prompt and the privileged context only the teacher and the privileged student read.
data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                           "privileged_context": f"hint: the sum is {'even' if (a + b) % 2 == 0 else 'odd'}"}
                          for a in range(10) for b in range(10)])
trainer = DOPDTrainer(model=tiny_llama(32), teacher_model=tiny_llama(64), args=args, train_dataset=data,
                      processing_class=tok)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if k in ("loss", "entropy") or k.startswith("dopd/")})
# Under accelerate / torchrun: leave together and close the process group (a rank exiting with it alive can abort).
trainer.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
