"""Dual On-policy Distillation in TRL: `DOPDTrainer`, a `trl.DistillationTrainer` with privileged context.

    pip install "dopd-kernels[trl]"

TRL's `DistillationTrainer` (TRL >= 1.16) samples completions from the student on-policy, scores them
with a frozen teacher and trains the student on a chunked fused-linear divergence, with gradient
accumulation, DDP/FSDP/DeepSpeed through `accelerate`, checkpointing and logging. `DOPDTrainer` keeps
all of that and adds a third context and the library's fused losses:

- Dataset rows `{"prompt": ..., "privileged_context": ...}` (TRL SDPO's column name), the prompt plain
  text or conversational as TRL accepts it. The student generates from the prompt alone; the
  privileged prompt is the prompt with the context inserted by `privileged_prompt` (the config's
  `privileged_prompt_template`, overridable). Every context scores the *same completion token ids*:
  they are appended as ids to each tokenized prompt, never re-tokenized from text, so a chat
  template's turn markers cannot merge with them.
- `method` (DESIGN.md section 7, the paper's arms):

  | method         | target of the loss                           | contexts read                        |
  |----------------|----------------------------------------------|--------------------------------------|
  | `dopd`         | teacher or sg[student] per token, by regime  | student `x`; teacher and sg[student] `x, p` |
  | `vanilla-opd`  | frozen teacher (TRL's own setting)           | student and teacher `x`              |
  | `tpriv-opd`    | frozen teacher                               | student `x`; teacher `x, p`          |
  | `self-distill` | sg[student]                                  | student `x`; sg[student] `x, p`      |

- The loss is `fused_linear_dopd_loss` / `fused_linear_opd_loss` on the final hidden states and each
  model's `lm_head` with its head transforms (`dopd_kernels.hf.lm_head`), run inside TRL's forward
  redirection, so DDP/FSDP/DeepSpeed see it as the student's forward. TRL's `num_items_in_batch`
  (valid completion tokens of the global batch over the process count) is the library's `normalizer`,
  so the loss is TRL's `sum / num_items_in_batch` and gradient accumulation stays exact. DOPD routing
  thresholds are trimmed means over the valid tokens of the whole data-parallel group
  (`routing_group`), so a run does not depend on how the global batch is split.
- The OPD arms take their divergence from TRL's `beta` unless `divergence` is set: `beta=0` forward
  KL, `beta=1` reverse KL, otherwise the generalized JSD whose mixture is `(1-beta) p_student +
  beta p_teacher` (the library's `js_beta = 1 - beta`). With `method="vanilla-opd"` and
  `granularity="full"` the trainer computes exactly TRL's loss, with the library's kernels.

Padding rows of a padded vocabulary take part in every softmax, as in TRL (on-policy samples are
drawn over all rows by `generate`). Vision-language processors are not supported yet (the privileged
prompt would need its own multimodal fields).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import pad

from ..api import fused_linear_dopd_loss, fused_linear_opd_loss
from ..config import DIVERGENCES, GRANULARITIES, TOPK_SOURCES, DOPDConfig, OPDConfig, Regime
from ..heads import LMHead
from ..hf import lm_head

METHODS = ("dopd", "vanilla-opd", "tpriv-opd", "self-distill")
IGNORE_INDEX = -100
ENTROPY_ROW_CHUNK = 256  # rows per chunk of the logged entropy pass: [chunk, V] fp32 logits at a time
# Metric keys (TRL style: plain names for what TRL also logs, a `dopd/` group for the routing)
REGIME_KEYS = {Regime.LH: "dopd/regime_lh", Regime.LL: "dopd/regime_ll", Regime.HT: "dopd/regime_ht",
               Regime.HS: "dopd/regime_hs"}
THRESHOLD_KEYS = ("dopd/threshold_adv_gap", "dopd/threshold_q_teacher", "dopd/threshold_q_priv_student")


@dataclass
class DOPDTrainerConfig(DistillationConfig):
    r"""
    Configuration class for the [`DOPDTrainer`]: every option of TRL's [`~trl.DistillationConfig`] plus the
    ones below. Using [`~transformers.HfArgumentParser`] this class becomes command-line flags.

    Parameters:
        method (`str`, *optional*, defaults to `"dopd"`):
            `"dopd"`, `"vanilla-opd"` (teacher without the privileged context: TRL's own setting), `"tpriv-opd"`
            (teacher with the context) or `"self-distill"` (target: the student reading the context, stop-gradient).
        privileged_prompt_template (`str`, *optional*, defaults to `"{prompt}\n\n{privileged_context}"`):
            How the privileged context enters the teacher's and the privileged student's prompt (the text of the last
            user turn for conversational prompts). Must contain `{prompt}` and `{privileged_context}`.
        divergence (`str` or `None`, *optional*):
            OPD arms: `"reverse_kl"`, `"forward_kl"` or `"js"`. `None` follows `beta` as TRL does (0 forward KL, 1
            reverse KL, otherwise JSD). A JSD always uses `beta` as TRL's mixture weight of the teacher.
        granularity (`str`, *optional*, defaults to `"full"`):
            OPD arms: `"full"` (whole vocabulary, TRL's), `"topk"` or `"sampled"` (see `dopd_kernels.opd_loss`).
        loss_top_k (`int`, *optional*, defaults to `128`):
            K of the top-K supports (DOPD's LH/LL/HS regimes, `granularity="topk"`). Not the sampling `top_k`.
        topk_from (`str`, *optional*, defaults to `"student"`):
            Whose K most probable tokens form a top-K support: `"student"` or `"target"`.
        topk_renorm (`bool`, *optional*, defaults to `True`):
            Renormalize over the K tokens (`True`) or keep a tail bucket with the remaining mass (`False`).
        beta_light (`float`, *optional*, defaults to `0.6`), beta_weak (`0.3`), beta_strong (`1.0`):
            DOPD weights of the LH/HS, LL and HT regimes (paper defaults).
        dopd_js_beta (`float`, *optional*, defaults to `0.5`):
            Student weight of the JS mixture on DOPD's HT tokens (0.5: the symmetric JS of the paper).
        trim (`float`, *optional*, defaults to `0.05`):
            DOPD routing: fraction of largest values dropped before averaging each routing statistic.
        loss_backend (`str`, *optional*, defaults to `"auto"`):
            Backend of the library's loss (`"auto"`, `"torch"`, `"cpp"`, `"triton"`, `"cuda"`).
        log_entropy (`bool`, *optional*, defaults to `True`):
            Log the student's mean next-token entropy, as TRL does. Costs one extra no-grad pass over the vocabulary
            (one `[N, H] x [H, V]` matmul in row chunks).
    """

    method: str = field(
        default="dopd",
        metadata={"help": "Which target the student is distilled towards.", "choices": list(METHODS)},
    )
    privileged_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={"help": "Template combining the prompt and the privileged context into the privileged prompt "
                  "(the last user turn of conversational prompts); needs {prompt} and {privileged_context}."},
    )
    divergence: Optional[str] = field(
        default=None,
        metadata={"help": "OPD arms: reverse_kl, forward_kl or js; None follows `beta` (0 forward KL, 1 reverse "
                  "KL, otherwise JSD)."},
    )
    granularity: str = field(
        default="full",
        metadata={"help": "OPD arms: support of the divergence (full, topk or sampled).",
                  "choices": list(GRANULARITIES)},
    )
    loss_top_k: int = field(
        default=128, metadata={"help": "K of the loss's top-K supports (not the sampling top_k)."}
    )
    topk_from: str = field(
        default="student",
        metadata={"help": "Whose top-K tokens form a top-K support.", "choices": list(TOPK_SOURCES)},
    )
    topk_renorm: bool = field(
        default=True, metadata={"help": "Renormalize over the K tokens (else keep a tail bucket)."}
    )
    beta_light: float = field(default=0.6, metadata={"help": "DOPD weight of LH and HS tokens."})
    beta_weak: float = field(default=0.3, metadata={"help": "DOPD weight of LL tokens."})
    beta_strong: float = field(default=1.0, metadata={"help": "DOPD weight of HT tokens."})
    dopd_js_beta: float = field(
        default=0.5, metadata={"help": "Student weight of the JS mixture on DOPD's HT tokens."}
    )
    trim: float = field(
        default=0.05, metadata={"help": "DOPD routing: fraction of largest values dropped from each mean."}
    )
    loss_backend: str = field(default="auto", metadata={"help": "Backend of the dopd-kernels loss."})
    log_entropy: bool = field(
        default=True, metadata={"help": "Log the student's mean entropy (one extra no-grad vocabulary pass)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.divergence is not None and self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES} or None, got {self.divergence!r}")
        for name in ("{prompt}", "{privileged_context}"):
            if name not in self.privileged_prompt_template:
                raise ValueError(f"privileged_prompt_template must contain {name}, got "
                                 f"{self.privileged_prompt_template!r}")
        # Build the loss settings once so a bad value fails here, naming the field, before any model loads.
        self.loss_config()

    def opd_divergence(self) -> tuple[str, float]:
        """(library divergence, library `js_beta`) of the OPD arms, from `divergence` and TRL's `beta`.

        TRL's JSD mixes `(1-beta) p_student + beta p_teacher`; the library's `js_beta` is the student's weight.
        """
        divergence = self.divergence
        if divergence is None:
            divergence = "forward_kl" if self.beta == 0.0 else "reverse_kl" if self.beta == 1.0 else "js"
        if divergence == "js" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"divergence='js' needs 0 < beta < 1 (TRL's teacher weight in the mixture), got "
                             f"beta={self.beta}")
        return divergence, (1.0 - self.beta if divergence == "js" else 0.5)

    def loss_config(self) -> DOPDConfig | OPDConfig:
        """The library's loss settings for `method` (reduction "mean": TRL's `num_items_in_batch` normalizes)."""
        common = dict(top_k=self.loss_top_k, temperature=self.temperature, topk_from=self.topk_from,
                      topk_renorm=self.topk_renorm, ignore_index=IGNORE_INDEX, reduction="mean")
        if self.method == "dopd":
            return DOPDConfig(beta_light=self.beta_light, beta_weak=self.beta_weak, beta_strong=self.beta_strong,
                              js_beta=self.dopd_js_beta, trim=self.trim, **common)
        divergence, js_beta = self.opd_divergence()
        return OPDConfig(divergence=divergence, granularity=self.granularity, js_beta=js_beta, **common)


def _context_text(privileged_context: Any) -> str:
    """The context as text: a string, or the text of a list of messages (one line per message)."""
    if isinstance(privileged_context, str):
        return privileged_context
    if isinstance(privileged_context, list) and all(isinstance(m, dict) for m in privileged_context):
        return "\n".join(str(m.get("content", "")) for m in privileged_context)
    raise TypeError("privileged_context must be a string or a list of messages, got "
                    f"{type(privileged_context).__name__}")


def _lm_head(model) -> LMHead:
    """The model's output head with its transforms (`dopd_kernels.hf.lm_head`; every row of the head takes part in
    the softmax, as in TRL). Under FSDP2 the weight is a sharded `DTensor`: it is gathered once here, as TRL does,
    differentiably (the gradient is reduce-scattered back to the shards)."""
    head = lm_head(model)
    if isinstance(head.weight, DTensor):
        bias = head.bias.full_tensor() if isinstance(head.bias, DTensor) else head.bias
        head = dataclasses.replace(head, weight=head.weight.full_tensor(), bias=bias)
    return head


def _entropy_sum(hidden: torch.Tensor, head: LMHead, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over valid rows of the entropy (nats) of softmax(softcap(scale·(h·Wᵀ + b)) / τ); no gradient.

    `hidden` `[B, T, H]`, `valid` `[B, T]` bool. Row chunks of `ENTROPY_ROW_CHUNK` keep the logits to
    `[chunk, V]` at a time; the matmul runs in the weight's dtype and the softmax in fp32.
    """
    with torch.no_grad():
        rows = hidden.reshape(-1, hidden.shape[-1])[valid.reshape(-1)]
        vocab = head.vocab_size or head.weight.shape[0]  # rows past vocab_size are padding, as in the loss
        weight = head.weight.detach()[:vocab]
        bias = head.bias.detach()[:vocab] if head.bias is not None else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for chunk in rows.split(ENTROPY_ROW_CHUNK):
            z = (chunk.to(weight.dtype) @ weight.T).float()
            if bias is not None:
                z += bias.float()
            z *= head.scale
            if head.softcap is not None:
                z = head.softcap * torch.tanh(z / head.softcap)
            logp = torch.log_softmax(z / temperature, dim=-1)
            total += -(logp.exp() * logp).sum(dtype=torch.float64)
        return total


class DOPDTrainer(DistillationTrainer):
    """
    TRL's [`~trl.DistillationTrainer`] for Dual On-policy Distillation (arXiv 2606.30626) and the comparison arms
    (`args.method`), with the dopd-kernels fused losses. Same arguments as `DistillationTrainer`; `args` is a
    [`DOPDTrainerConfig`]. The dataset needs a `"privileged_context"` column unless `method="vanilla-opd"`;
    `teacher_model` may be omitted for `method="self-distill"`.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from dopd_kernels.integrations.trl import DOPDTrainer, DOPDTrainerConfig

    >>> dataset = Dataset.from_list([{"prompt": "2+3=", "privileged_context": "Hint: 2+3 is odd."}])
    >>> trainer = DOPDTrainer(model=student, teacher_model=teacher, args=DOPDTrainerConfig("out"),
    ...                       train_dataset=dataset, processing_class=tokenizer)
    >>> trainer.train()
    ```

    Logged metrics (besides TRL's `loss`, `completions/*`, `num_tokens`): `entropy` (student, nats), and for
    `method="dopd"` the regime fractions `dopd/regime_{lh,ll,ht,hs}`, the routing thresholds
    `dopd/threshold_{adv_gap,q_teacher,q_priv_student}` and `dopd/mean_adv_gap`, all over the global batch.
    """

    _tag_names = ["trl", "distillation", "dopd"]
    _name = "DOPD"

    def __init__(self, model, teacher_model=None, args: Optional[DOPDTrainerConfig] = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = DOPDTrainerConfig(f"{str(name).split('/')[-1]}-DOPD")
        if not isinstance(args, DOPDTrainerConfig):
            raise TypeError(f"args must be a DOPDTrainerConfig, got {type(args).__name__}")
        if teacher_model is None and args.method != "self-distill":
            raise ValueError(f"method={args.method!r} needs a teacher_model (only 'self-distill' has none)")
        super().__init__(model, teacher_model, args, *pargs, **kwargs)
        if self._is_vlm and args.method != "vanilla-opd":
            raise ValueError("DOPDTrainer does not support vision-language processors with a privileged context yet")
        self.loss_config = args.loss_config()

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "privileged_context", "image", "images"]

    def privileged_prompt(self, prompt: Any, privileged_context: Any) -> Any:
        """The prompt the privileged policies read: `args.privileged_prompt_template` filled with the prompt and the
        context. Plain prompts are filled as a whole; conversational prompts in their last turn, which must be the
        user's (earlier turns, e.g. a system message, are kept). Override to place the context elsewhere (say in a
        system turn); the completion is appended as token ids after the chat template's generation prompt
        whatever this returns."""
        template, text = self.args.privileged_prompt_template, _context_text(privileged_context)
        if isinstance(prompt, str):
            return template.format(prompt=prompt, privileged_context=text)
        last = prompt[-1]
        if last.get("role") != "user" or not isinstance(last.get("content"), str):
            raise ValueError("a conversational prompt must end with a user turn whose content is a string to take "
                             "the privileged context; override DOPDTrainer.privileged_prompt for other layouts")
        return [*prompt[:-1], {**last, "content": template.format(prompt=last["content"], privileged_context=text)}]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        # TRL generates from the plain prompts; the privileged prompts are tokenized here, in the same order (the
        # generation batch is shuffled and split only afterwards, every tensor in unison).
        needs_context = self.args.method != "vanilla-opd"
        if needs_context and any(x.get("privileged_context") is None for x in inputs):
            raise ValueError(f"method={self.args.method!r} needs a 'privileged_context' in every dataset row")
        output = super()._generate_and_score_completions(inputs)
        if not needs_context:
            return output
        prompts = [self.privileged_prompt(x["prompt"], x["privileged_context"]) for x in inputs]
        ids, _, _ = self._tokenize_prompts(prompts)
        device = output["prompt_ids"].device
        rows = [torch.tensor(row) for row in ids]
        output["privileged_prompt_ids"] = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                                              pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        output["privileged_prompt_mask"] = pad([torch.ones_like(r) for r in rows], padding_value=0,
                                               padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of
                                               ).to(device)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # As TRL: the count of valid completion tokens over the global generation batch, divided by the process
        # count because DDP averages gradients; it is the library's `normalizer`.
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        unwrapped_student = self.accelerator.unwrap_model(model)
        loss, sums = self._forward_redirection(
            model, unwrapped_student, self._compute_loss, unwrapped_student, inputs, num_items_in_batch
        )
        # Collectives run after the redirected forward returns (as TRL does), never inside the wrapped forward.
        self._log_metrics(sums)
        return (loss, None) if return_outputs else loss

    def _hidden(self, model, prompt_ids, prompt_mask, inputs) -> torch.Tensor:
        """Final hidden states `[B, C, H]` of `model` reading `prompt + completion`, at the positions whose logits
        predict the completion tokens (TRL's `_get_last_hidden_state`: PEFT and backbone handling included)."""
        input_ids = torch.cat([prompt_ids, inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask, inputs["completion_mask"]], dim=1)
        return self._get_last_hidden_state(model, input_ids, attention_mask, inputs["completion_ids"].size(1))

    def _teacher_hidden(self, prompt_ids, prompt_mask, inputs) -> torch.Tensor:
        # The teacher's own forward redirection lets FSDP/DeepSpeed gather its shards, as in TRL.
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            return self._forward_redirection(self.teacher_model, unwrapped_teacher, self._hidden, unwrapped_teacher,
                                             prompt_ids, prompt_mask, inputs)

    def _routing_group(self):
        """The data-parallel group over which DOPD's routing thresholds are computed (None: one process)."""
        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        method = self.args.method
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        valid = loss_mask != 0
        tokens = inputs["completion_ids"].masked_fill(~valid, IGNORE_INDEX)
        plain = inputs["prompt_ids"], inputs["prompt_mask"]
        privileged = (inputs["privileged_prompt_ids"], inputs["privileged_prompt_mask"]) if method != "vanilla-opd" \
            else None

        h_student = self._hidden(unwrapped_student, *plain, inputs)
        head_student = _lm_head(unwrapped_student)
        if method in ("dopd", "self-distill"):
            with torch.no_grad():  # the privileged student: the student's weights reading x, p (stop-gradient)
                h_priv = self._hidden(unwrapped_student, *privileged, inputs)
        if method != "self-distill":
            h_teacher = self._teacher_hidden(*(plain if method == "vanilla-opd" else privileged), inputs)
            head_teacher = _lm_head(self.accelerator.unwrap_model(self.teacher_model))
        device = head_student.weight.device
        h_student, tokens = h_student.to(device), tokens.to(device)

        sums = torch.zeros(10, dtype=torch.float64, device=device)  # see `_log_metrics`
        sums[0] = valid.sum()
        if self.args.log_entropy:
            sums[1] = _entropy_sum(h_student, head_student, valid.to(device), self.args.temperature)
        common = dict(backend=self.args.loss_backend, normalizer=num_items_in_batch)
        cfg = self.loss_config
        if method == "dopd":
            out = fused_linear_dopd_loss(h_student, head_student, h_teacher.to(device), head_teacher,
                                         h_priv.to(device), tokens, config=cfg,
                                         routing_group=self._routing_group(), **common)
            for regime, i in zip(REGIME_KEYS, range(2, 6)):
                sums[i] = (out.regime == regime).sum()
            sums[6:9] = torch.stack([t.to(device, torch.float64) for t in out.thresholds])
            sums[9] = out.adv_gap.sum(dtype=torch.float64)
            return out.loss, sums
        h_target, head_target = (h_priv, head_student) if method == "self-distill" else (h_teacher, head_teacher)
        opd = dict(divergence=cfg.divergence, granularity=cfg.granularity, top_k=cfg.top_k, js_beta=cfg.js_beta,
                   temperature=cfg.temperature, ignore_index=cfg.ignore_index, reduction=cfg.reduction,
                   topk_from=cfg.topk_from, topk_renorm=cfg.topk_renorm)
        out = fused_linear_opd_loss(h_student, head_student, h_target.to(device), head_target, tokens, **opd, **common)
        return out.loss, sums

    def _log_metrics(self, sums: torch.Tensor) -> None:
        """Global-batch metrics from this micro-batch's sums: [valid tokens, entropy sum, 4 regime counts, 3
        thresholds, (DOPD) advantage-gap sum]. Counts and sums are summed over the processes; the thresholds, the
        same on every process with a routing group, are averaged."""
        mode = "train" if self.model.training else "eval"
        world = self.accelerator.num_processes
        total = self.accelerator.gather_for_metrics(sums.reshape(1, -1)).reshape(world, -1).sum(0)
        n = max(float(total[0]), 1.0)
        metrics = self._metrics[mode]
        if self.args.log_entropy:
            metrics["entropy"].append(float(total[1]) / n)
        if self.args.method == "dopd":
            for i, key in enumerate(REGIME_KEYS.values(), start=2):
                metrics[key].append(float(total[i]) / n)
            for i, key in enumerate(THRESHOLD_KEYS, start=6):
                metrics[key].append(float(total[i]) / world)
            metrics["dopd/mean_adv_gap"].append(float(total[9]) / n)
