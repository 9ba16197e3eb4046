"""The on-policy distillation loop: sample, build contexts, score, fused loss, AdamW step, log."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from dopd_kernels import DOPDConfig, fused_linear_dopd_loss, fused_linear_opd_loss
from dopd_kernels.heads import LMHead
from dopd_kernels.hf import lm_head
from dopd_kernels.config import DIVERGENCES, GRANULARITIES, Regime

from .checkpoint import (append_line, atomic_write_bytes, load_latest, read_jsonl, rng_state, save_checkpoint,
                         save_pretrained_atomic, truncate_metrics)
from .contexts import IGNORE_INDEX, Contexts, build_contexts, gather_response
from .distributed import Workers
from .errors import UsageError
from .models import HiddenAndHead, head_logits, hidden_states
from .rollout import accuracy, encode_prompts, generate
from .task import Example

# The arms, as the paper names them (DESIGN.md section 7): which model is the target of the loss and
# which context it reads. The student always reads x,y.
ARMS = ("vanilla-opd", "tpriv-opd", "self-distill", "dopd")
ANCHORS = ("priv-student", "teacher-no-hint")  # DOPD's third stream
# The privileged student (the student's weights reading x,p,y; DOPD's third stream and the
# self-distillation target): the live student (paper), a copy frozen at the arm's start, or an
# exponential moving average of the student.
PRIV_STUDENTS = ("live", "frozen", "ema")
REGIMES = tuple(r.name for r in Regime if r >= 0)  # LH, LL, HT, HS in code order
# Metrics that depend on the machine's speed rather than on the computation; excluded when
# comparing a resumed run with an uninterrupted one.
TIMING_FIELDS = ("tokens_per_s", "peak_mem_mb", "step_time_s")


@dataclass
class TrainConfig:
    """Settings of one training arm (one method from one starting student)."""

    arm: str = "dopd"
    divergence: str = "reverse_kl"  # the single-target arms (vanilla-opd, tpriv-opd, self-distill)
    granularity: str = "topk"  # the single-target arms
    anchor: str = "priv-student"  # DOPD's third stream
    priv_student: str = "live"
    ema_decay: float = 0.99  # priv_student="ema": weight of the average's old value per step
    steps: int = 200
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    top_k: int = 128
    backend: str = "auto"  # dopd_kernels backend
    seed: int = 0
    eval_every: int = 25
    save_every: int = 25

    def __post_init__(self) -> None:
        for name, value, allowed in (("arms", self.arm, ARMS), ("divergence", self.divergence, DIVERGENCES),
                                     ("granularity", self.granularity, GRANULARITIES),
                                     ("anchor", self.anchor, ANCHORS), ("priv-student", self.priv_student,
                                                                        PRIV_STUDENTS)):
            if value not in allowed:
                raise UsageError(f"--{name}: {value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"--ema-decay: {self.ema_decay} is outside [0, 1)")

    @property
    def arm_name(self) -> str:
        return self.arm


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Example indices of a step: consecutive slices of per-epoch permutations seeded by (seed, epoch).
    A pure function of the step, so a resumed run sees exactly the data an uninterrupted one would."""
    out, perms = [], {}
    for i in range(step * batch, (step + 1) * batch):
        epoch = i // n
        if epoch not in perms:
            perms[epoch] = random.Random(f"{seed}-{epoch}").sample(range(n), n)
        out.append(perms[epoch][i % n])
    return out


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base rate, then cosine decay to zero at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def mean_entropy(hidden: torch.Tensor, head: LMHead, valid: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """Mean entropy of the student's next-token distributions (its head's transforms applied, real
    vocabulary only) at the valid positions, in row chunks so no full `[N, V]` logit tensor is held."""
    rows = hidden[valid]
    total = 0.0
    for chunk in rows.split(rows_per_chunk):
        logp = torch.log_softmax(head_logits(chunk, head).float(), dim=-1)
        total += float(-(logp.exp() * logp).sum())
    return total / max(1, rows.shape[0])


@torch.no_grad()
def frozen_hidden(model, ctx) -> torch.Tensor:
    """`[B, T, H]` final hidden states of a model that takes no gradient, at `ctx`'s scored positions."""
    return gather_response(hidden_states(model, ctx.input_ids, ctx.attention_mask), ctx)


def detached_head(model, vocab_size: Optional[int]) -> LMHead:
    """`dopd_kernels.hf.lm_head(model)` as a constant (a live privileged student's head is the
    student's own weight, read without gradient)."""
    head = lm_head(model, vocab_size=vocab_size)
    return dataclasses.replace(head, weight=head.weight.detach(),
                               bias=None if head.bias is None else head.bias.detach())


def target_streams(cfg: TrainConfig, teacher, priv, contexts: Contexts) -> list[tuple]:
    """The frozen streams of the loss as `(model, context)`: the target, then (DOPD) the third stream.
    This table IS the arm (DESIGN.md section 7); `priv` is the privileged student's model."""
    s_ctx, p_ctx = contexts.student, contexts.privileged
    if cfg.arm == "vanilla-opd":
        return [(teacher, s_ctx)]  # the teacher never reads the hint
    if cfg.arm == "tpriv-opd":
        return [(teacher, p_ctx)]
    if cfg.arm == "self-distill":
        return [(priv, p_ctx)]
    third = (priv, p_ctx) if cfg.anchor == "priv-student" else (teacher, s_ctx)
    return [(teacher, p_ctx), third]


def regime_losses(out) -> dict:
    """Mean weighted loss of the valid tokens of each DOPD regime (absent regimes omitted)."""
    logs = {}
    for code, name in enumerate(REGIMES):
        mask = out.regime == code  # REGIMES is in code order
        if bool(mask.any()):
            logs[name] = float(out.per_token_loss[mask].double().mean())
    return logs


def distillation_loss(cfg: TrainConfig, student, forward, teacher, contexts: Contexts, routing_group=None,
                      priv=None) -> tuple[torch.Tensor, dict]:
    """The training loss on the response tokens of `contexts`, and what to log about it. `forward` is
    `HiddenAndHead(student)`, in DDP when data-parallel; `priv` the privileged student's model (the
    student itself when None or live); `routing_group` spans the ranks whose tokens together set
    DOPD's routing thresholds."""
    priv = student if priv is None else priv
    wrapper = getattr(forward, "module", forward)  # HiddenAndHead, inside DDP or not
    s_ctx = contexts.student
    s_hidden, w_s, b_s = forward(s_ctx.input_ids, s_ctx.attention_mask)
    s_hidden, s_head = gather_response(s_hidden, s_ctx), wrapper.head(w_s, b_s)
    # Frozen streams: hidden states without gradient, heads (with their models' transforms) detached.
    streams = [(frozen_hidden(model, ctx), detached_head(model, wrapper.vocab_size))
               for model, ctx in target_streams(cfg, teacher, priv, contexts)]
    tokens = s_ctx.tokens.to(s_hidden.device)
    valid = tokens != IGNORE_INDEX
    logs = {"entropy": mean_entropy(s_hidden.detach(), detached_head(student, wrapper.vocab_size), valid)}
    if cfg.arm != "dopd":
        (t_hidden, t_head), = streams
        out = fused_linear_opd_loss(s_hidden, s_head, t_hidden, t_head, tokens, divergence=cfg.divergence,
                                    granularity=cfg.granularity, top_k=cfg.top_k, reduction="seq_mean",
                                    backend=cfg.backend)
        return out.loss, logs
    (t_hidden, t_head), (a_hidden, a_head) = streams
    out = fused_linear_dopd_loss(s_hidden, s_head, t_hidden, t_head, a_hidden, tokens, priv_student_weight=a_head,
                                 config=DOPDConfig(top_k=cfg.top_k, reduction="seq_mean"), backend=cfg.backend,
                                 routing_group=routing_group)
    logs["regime"] = out.regime_fractions()
    logs["regime_loss"] = regime_losses(out)
    logs["adv_gap"] = float(out.adv_gap[valid].mean())
    logs["thresholds"] = [float(t) for t in out.thresholds]  # (Ā, q̄_T, q̄_P) of the global batch
    return out.loss, logs


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """Append-only JSONL, fsynced per record so a killed run keeps what it logged; a last line cut
    short by a kill is dropped (with a warning) when read."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record))

    def read(self) -> list[dict]:
        return read_jsonl(self.path)


def optimizer_step(cfg: TrainConfig, student, forward, teacher, contexts: Contexts, optimizer, scheduler,
                   workers: Workers, batch_size: int, priv=None) -> dict:
    """Loss on `contexts` (this rank's share of a global batch of `batch_size` sequences), backward,
    clipping, AdamW and schedule step, then the EMA privileged student's update (only after the
    step: within it every privileged stream is fixed). Returns this rank's logs."""
    loss, logs = distillation_loss(cfg, student, forward, teacher, contexts, workers.group, priv)
    optimizer.zero_grad(set_to_none=True)
    # DDP averages the ranks' gradients; weighting each rank's sequence-mean loss by its share of the
    # batch makes that average the gradient of the global batch's sequence mean, also when the prompts
    # do not split evenly. The factor is 1 for a single process.
    (loss * (workers.world * contexts.student.tokens.shape[0] / batch_size)).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)  # of the averaged gradient
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    if cfg.priv_student == "ema" and priv is not None:
        update_ema(priv, student, cfg.ema_decay)
    return {"loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm), **logs}


@torch.no_grad()
def update_ema(average, model, decay: float) -> None:
    """`average ← decay · average + (1 − decay) · model`, parameter by parameter."""
    for p_avg, p in zip(average.parameters(), model.parameters()):
        p_avg.lerp_(p.detach(), 1.0 - decay)


def privileged_student(cfg: TrainConfig, student):
    """The model of the privileged stream: the student itself (live) or a gradient-free copy."""
    if cfg.priv_student == "live":
        return student
    return copy.deepcopy(student).requires_grad_(False).eval()


# How a rank's logged mean becomes the global one: weighted by the rank's sequences or tokens.
PER_SEQUENCE = ("loss", "response_len", "sample_reward")
PER_TOKEN = ("entropy", "adv_gap")


def merge_records(parts: list[tuple[dict, int, int]]) -> dict:
    """The step's global record from every rank's `(record, sequences, tokens)`: means weighted by
    sequences or tokens, throughput over all ranks, time and memory of the slowest and largest rank;
    the rest (lr, grad_norm, thresholds) is the same on every rank."""
    if len(parts) == 1:
        return parts[0][0]
    record = dict(parts[0][0])

    def mean(key: str, weight: int, sub: Optional[str] = None) -> float:
        """Mean of `r[key]` (or `r[key][sub]`) over the ranks that logged it, weighted by `part[weight]`."""
        pairs = [(r[key] if sub is None else r[key][sub], part[weight]) for part in parts if key in (r := part[0])]
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)

    for key in PER_SEQUENCE + PER_TOKEN:
        if any(key in part[0] for part in parts):
            record[key] = mean(key, 1 if key in PER_SEQUENCE else 2)
    if "regime" in record:
        record["regime"] = {name: mean("regime", 2, name) for name in record["regime"]}
        # A regime's mean loss, weighted by the rank's number of tokens in that regime.
        losses = {}
        for name in REGIMES:
            pairs = [(p[0]["regime_loss"][name], p[2] * p[0]["regime"][name]) for p in parts
                     if name in p[0].get("regime_loss", {})]
            if pairs and sum(w for _, w in pairs) > 0:
                losses[name] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        record["regime_loss"] = losses
    record["step_time_s"] = max(p[0]["step_time_s"] for p in parts)
    record["peak_mem_mb"] = max(p[0]["peak_mem_mb"] for p in parts)
    record["tokens_per_s"] = sum(p[2] for p in parts) / record["step_time_s"]
    return record


def train_step(cfg: TrainConfig, step: int, student, forward, teacher, tokenizer, train_set: list[Example],
               optimizer, scheduler, reward_fn: Optional[Callable[[str, Example], float]],
               workers: Workers = Workers(), priv=None) -> dict:
    """One on-policy update: sample G responses per prompt, score them in the three contexts, step
    AdamW and the schedule. Each rank takes every `world`-th prompt of the step's batch (the batch of
    the single-process run). Returns the step's global metric record."""
    t0 = time.perf_counter()
    batch = [train_set[i] for i in batch_indices(step, cfg.prompts_per_step, len(train_set), cfg.seed)]
    examples = workers.shard(batch)
    prompts, hints = encode_prompts(tokenizer, examples)
    g = cfg.samples_per_prompt
    responses = generate(student, tokenizer, prompts, num_samples=g, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p)
    contexts = build_contexts([x for x in prompts for _ in range(g)], [p for p in hints for _ in range(g)],
                              responses, tokenizer.pad_token_id)
    logs = optimizer_step(cfg, student, forward, teacher, contexts, optimizer, scheduler, workers, len(batch) * g,
                          priv)
    elapsed = time.perf_counter() - t0
    n_tokens = sum(len(r) for r in responses)
    record = {"event": "train", "step": step + 1, **logs, "response_len": n_tokens / len(responses)}
    if reward_fn is not None and all(e.answer is not None for e in examples):
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        record["sample_reward"] = sum(reward_fn(t, examples[i // g]) for i, t in enumerate(texts)) / len(texts)
    record.update(tokens_per_s=n_tokens / elapsed, peak_mem_mb=peak_memory_mb(student.device), step_time_s=elapsed)
    return merge_records(workers.gather((record, len(responses), n_tokens)))


def train_arm(arm_dir: Path, cfg: TrainConfig, student, teacher, tokenizer, train_set: list[Example],
              eval_set: list[Example], reward_fn: Optional[Callable[[str, Example], float]],
              show_progress: bool = True, workers: Workers = Workers()) -> list[dict]:
    """Train `student` in place for `cfg.steps` steps, resuming from `arm_dir`'s newest checkpoint if
    any. Returns the arm's metric records (train and eval). Each evaluation logs the held-out
    accuracy of the student without the hint (`eval_accuracy`), of the student reading the hint
    (`eval_accuracy_with_hint`) and of the privileged student reading it (`priv_accuracy_with_hint`,
    the same model as the student when live): a drifting privileged student shows there. With several workers every rank runs
    this, and rank 0 alone writes `arm_dir` (and returns the records; the others return [])."""
    if cfg.prompts_per_step < workers.world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step}: fewer prompts than the {workers.world} "
                         "processes that share them")
    main = workers.is_main
    if main:
        arm_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(arm_dir / "train_config.json", json.dumps(asdict(cfg), indent=2).encode())
    log = MetricsLog(arm_dir / "metrics.jsonl")
    teacher.requires_grad_(False).eval()
    student.train()
    priv = privileged_student(cfg, student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.steps)
    status: dict = {}  # what the progress bar shows after the step count

    def evaluate(step: int) -> None:
        if reward_fn is None or not eval_set:
            return
        # Also with the hint: that is the privileged student, DOPD's default third stream, whose
        # competence decides whether its regimes teach anything.
        with torch.random.fork_rng(devices=[]):  # evaluation must not move the sampling RNG
            acc, acc_hint = (accuracy(student, tokenizer, eval_set, reward_fn, with_hint=hint,
                                      max_new_tokens=cfg.max_new_tokens, workers=workers) for hint in (False, True))
            priv_hint = acc_hint if priv is student else accuracy(
                priv, tokenizer, eval_set, reward_fn, with_hint=True, max_new_tokens=cfg.max_new_tokens,
                workers=workers)
        if main:
            log.write({"event": "eval", "step": step, "eval_accuracy": acc, "eval_accuracy_with_hint": acc_hint,
                       "priv_accuracy_with_hint": priv_hint})
        status["acc"] = f"{acc:.3f}"

    # Every rank restores the same weights and optimizer state, and its own sampling RNG.
    start = load_latest(arm_dir, student, optimizer, scheduler, workers.rank, workers.world,
                        None if priv is student else priv)
    forward = workers.wrap(HiddenAndHead(student, len(tokenizer)))
    bar = tqdm(total=cfg.steps, desc=cfg.arm_name, disable=not (show_progress and main), dynamic_ncols=True)
    if start is None:
        start = 0
        torch.manual_seed(cfg.seed + workers.rank)  # ranks sample their prompts independently
        if main:
            log.path.unlink(missing_ok=True)
        evaluate(0)
    else:
        if main:
            truncate_metrics(log.path, start)
        bar.update(start)
    for step in range(start, cfg.steps):
        record = train_step(cfg, step, student, forward, teacher, tokenizer, train_set, optimizer, scheduler,
                            reward_fn, workers, priv)
        if main:
            log.write(record)
        status.update(loss=f"{record['loss']:.3f}", H=f"{record['entropy']:.2f}",
                      **{k: f"{v:.2f}" for k, v in record.get("regime", {}).items()})
        bar.set_postfix(status, refresh=False)
        bar.update(1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            rng_states = workers.gather(rng_state())
            if main:
                save_checkpoint(arm_dir, step + 1, student, optimizer, scheduler, rng_states,
                                priv=None if priv is student else priv)
    bar.close()
    if not main:
        return []
    if not (arm_dir / "final").exists():
        save_pretrained_atomic(student, tokenizer, arm_dir / "final")
    return log.read()
