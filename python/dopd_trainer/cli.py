"""`dopd-train`: on-policy DOPD (or vanilla OPD) on transformers causal LMs.

With no arguments it runs the built-in task (2-digit addition with step-wise hints, tiny Llama models,
a teacher and a student warmed up by cached supervised runs) and compares DOPD with vanilla OPD.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import transformers

from . import task
from .distributed import Workers
from .errors import UsageError
from .models import check_same_vocabulary, load_checkpoint, tiny_llama
from .report import plot_run
from .rollout import accuracy
from .tokenizer import build_char_tokenizer
from .train import ANCHORS, DIVERGENCES, GRANULARITIES, METHODS, TrainConfig, train_arm
from .warmup import cached_warmup, sft

# Loop settings whose default depends on the models: for real checkpoints the paper's (DESIGN.md
# section 7); the tiny built-in models take small batches at a higher rate, but not so high that the
# privileged student (the student's own weights) drifts away under DOPD's self-referenced regimes,
# and sample at a lower temperature so fewer rollouts go off the rails.
BUILTIN_DEFAULTS = dict(prompts_per_step=16, lr=2e-4, temperature=0.7,
                        max_new_tokens=None, threads=1)
CHECKPOINT_DEFAULTS = dict(prompts_per_step=128, lr=5e-6, temperature=1.0,
                           max_new_tokens=512, threads=None)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset (model-dependent) ones and flags."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dopd-train", description=__doc__, formatter_class=_HelpFormatter)
    src = p.add_argument_group("models and data (default: the built-in task)")
    src.add_argument("--student", metavar="PATH", help="local transformers checkpoint of the student")
    src.add_argument("--teacher", metavar="PATH", help="local transformers checkpoint of the teacher (same tokenizer)")
    src.add_argument("--data", metavar="JSONL", help='training prompts: {"prompt", "hint", "answer"?} per line')
    src.add_argument("--eval-data", metavar="JSONL", help="held-out prompts for accuracy (need answers or --reward)")
    src.add_argument("--reward", metavar="MODULE:FUNCTION",
                     help="accuracy function f(completion: str, example) -> float (default: exact match with answer)")
    builtin = p.add_argument_group("built-in task")
    builtin.add_argument("--digits", type=int, default=2, help="operand digits of the addition task")
    builtin.add_argument("--train-size", type=int, default=9000, help="training problems")
    builtin.add_argument("--eval-size", type=int, default=500, help="held-out problems")
    builtin.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny models")
    builtin.add_argument("--layers", type=int, default=2, help="layers of the tiny models")
    builtin.add_argument("--teacher-warmup-steps", type=int, default=400, help="SFT steps of the teacher, with hints")
    builtin.add_argument("--student-warmup-steps", type=int, default=300,
                         help="SFT steps of the student (half of its examples with hints)")
    builtin.add_argument("--cache-dir", default="~/.cache/dopd_trainer", help="where warmed-up models are cached")
    method = p.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="dopd")
    method.add_argument("--divergence", choices=DIVERGENCES, default="reverse_kl", help="vanilla OPD divergence")
    method.add_argument("--granularity", choices=GRANULARITIES, default="topk", help="vanilla OPD support")
    method.add_argument("--anchor", choices=ANCHORS, default="priv-student", help="DOPD's third stream")
    method.add_argument("--no-compare", dest="compare", action="store_false",
                        help="train only --method (by default the other method is trained too, from the same start)")
    loop = p.add_argument_group("loop (defaults marked * depend on built-in vs checkpoints)")
    loop.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    loop.add_argument("--prompts-per-step", type=int, help="* prompts per step (16 / 128)")
    loop.add_argument("--samples-per-prompt", type=int, default=4, help="rollouts G per prompt")
    loop.add_argument("--lr", type=float, help="* peak AdamW learning rate (2e-4 / 5e-6)")
    loop.add_argument("--max-new-tokens", type=int, help="* response length cap (answer + EOS + 1 / 512)")
    loop.add_argument("--temperature", type=float, help="* sampling temperature (0.7 / 1.0)")
    loop.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    loop.add_argument("--warmup-steps", type=int, default=10, help="linear LR warm-up before the cosine decay")
    loop.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    loop.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    loop.add_argument("--top-k", type=int, default=128, help="K of the top-K terms")
    loop.add_argument("--backend", default="auto", help="dopd_kernels backend (auto, torch, cpp, triton, ...)")
    loop.add_argument("--seed", type=int, default=0, help="seeds data split, data order, sampling")
    loop.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    loop.add_argument("--save-every", type=int, default=25, help="steps between checkpoints")
    loop.add_argument("--device", default="cpu", help="torch device of both models, e.g. cuda")
    loop.add_argument("--threads", type=int,
                      help="* torch CPU threads (1: tiny models gain nothing from more / torch's choice)")
    out = p.add_argument_group("output")
    out.add_argument("--run-dir", help="run folder (default runs/<time>)")
    out.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved configuration")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def load_reward(spec: str | None):
    """The accuracy function named by `--reward MODULE:FUNCTION`, or exact match."""
    if spec is None:
        return task.exact_match
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"--reward {spec!r}: cannot import it as MODULE:FUNCTION ({exc})") from exc


def setup_builtin(args, workers: Workers):
    """Tokenizer, data and the two warmed-up models of the built-in task."""
    tokenizer = build_char_tokenizer(task.ALPHABET)
    train_set, eval_set = task.addition_splits(args.digits, args.train_size, args.eval_size, args.seed)
    common = dict(digits=args.digits, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
                  hidden=args.hidden, layers=args.layers, alphabet=task.ALPHABET, version=1)

    def warmed(name: str, hint_fraction: float, steps: int, seed: int):
        def build():
            model = tiny_llama(tokenizer, args.hidden, args.layers, heads=4, seed=seed)
            sft(model, tokenizer, train_set, hint_fraction=hint_fraction, steps=steps, batch_size=64, lr=1e-3,
                seed=seed, desc=f"{name} warm-up (cached after this run)", show_progress=args.progress)
            return model, tokenizer
        key = {**common, "hint_fraction": hint_fraction, "steps": steps, "model_seed": seed}
        return cached_warmup(args.cache_dir, name, key, build)

    # Rank 0 trains and caches the warm-ups while the other ranks wait; they then load its cache.
    if not workers.is_main:
        workers.barrier()
    teacher, _ = warmed("teacher", 1.0, args.teacher_warmup_steps, args.seed + 1)
    # Half of the student's warm-up reads hints: like a pretrained LM, its privileged self can use a
    # hint, which is what DOPD's third stream assumes; its unhinted skill stays weak.
    student, tokenizer = warmed("student", 0.5, args.student_warmup_steps, args.seed + 2)
    if workers.is_main:
        workers.barrier()
    return student, teacher, tokenizer, train_set, eval_set


def setup_checkpoints(args):
    """Models, tokenizer and data from `--student`, `--teacher`, `--data` and `--eval-data`."""
    if not (args.student and args.teacher):
        raise UsageError("--student and --teacher go together (give both, or neither for the built-in task)")
    if not args.data:
        raise UsageError("--data is required with --student/--teacher")
    student, tokenizer = load_checkpoint(args.student, "--student")
    teacher, teacher_tokenizer = load_checkpoint(args.teacher, "--teacher")
    check_same_vocabulary(tokenizer, teacher_tokenizer, student, teacher)
    eval_set = task.load_jsonl(args.eval_data, "--eval-data") if args.eval_data else []
    return student, teacher, tokenizer, task.load_jsonl(args.data), eval_set


def resolve(args) -> argparse.Namespace:
    """Fill the model-dependent defaults in place and return the namespace."""
    builtin = args.student is None and args.teacher is None
    for name, value in (BUILTIN_DEFAULTS if builtin else CHECKPOINT_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_new_tokens is None:  # built-in: the answer's digits + 1 plus EOS, and one spare token
        args.max_new_tokens = args.digits + 3
    return args


def train_configs(args) -> list[TrainConfig]:
    """The `--method` arm, and unless `--no-compare` the other method's arm from the same start."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    main = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if not args.compare:
        return [main]
    return [main, dataclasses.replace(main, method="opd" if main.method == "dopd" else "dopd")]


def run(args, workers: Workers = Workers(), device: str | None = None) -> dict:
    """Set up, measure the teacher, train every arm, write summary.json and report.png (rank 0; the
    other ranks return an empty summary). `device`: this rank's device (default `args.device`)."""
    started = time.time()
    run_dir = Path(args.run_dir)
    configs = train_configs(args)  # validates names before any model is built
    reward_fn = load_reward(args.reward)
    if args.student is None and args.teacher is None:
        student, teacher, tokenizer, train_set, eval_set = setup_builtin(args, workers)
    else:
        student, teacher, tokenizer, train_set, eval_set = setup_checkpoints(args)
    device = device or args.device
    student, teacher = student.to(device), teacher.to(device)

    summary: dict = {"run_dir": str(run_dir), "eval_examples": len(eval_set)}
    if eval_set:
        summary["teacher_accuracy_with_hint"] = accuracy(teacher, tokenizer, eval_set, reward_fn, with_hint=True,
                                                         max_new_tokens=args.max_new_tokens, workers=workers)
        summary["teacher_accuracy_without_hint"] = accuracy(teacher, tokenizer, eval_set, reward_fn, with_hint=False,
                                                            max_new_tokens=args.max_new_tokens, workers=workers)
    arms = {}
    for cfg in configs:
        arms[cfg.arm_name] = train_arm(run_dir / cfg.arm_name, cfg, copy.deepcopy(student), teacher, tokenizer,
                                       train_set, eval_set, reward_fn if eval_set else None, args.progress, workers)
    if not workers.is_main:
        return {}
    for name, records in arms.items():
        evals = [r for r in records if r["event"] == "eval"]
        if evals:
            summary["student_accuracy_before"] = evals[0]["eval_accuracy"]
            summary[f"student_accuracy_after_{name}"] = evals[-1]["eval_accuracy"]
    summary["wall_time_s"] = round(time.time() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run(run_dir / "report.png", arms, summary.get("teacher_accuracy_with_hint"))
    return summary


def format_summary(summary: dict) -> str:
    """The end-of-run report for the terminal."""
    lines = []
    if "student_accuracy_before" in summary:
        lines.append(f"held-out accuracy without hints ({summary['eval_examples']} prompts, greedy):")
        rows = [("student " + k.removeprefix("student_accuracy_").replace("_", " ", 1), v)
                for k, v in summary.items() if k.startswith("student_accuracy_")]
        rows += [("teacher, " + k.removeprefix("teacher_accuracy_").replace("_", " "), v)
                 for k, v in summary.items() if k.startswith("teacher_accuracy_")]
        lines += [f"  {name:<40} {v:7.1%}" for name, v in rows]
    lines.append(f"run folder {summary['run_dir']} (report.png, summary.json, metrics per arm); "
                 f"wall time {summary['wall_time_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fresh = not args.resume
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.exists():
            parser.error(f"--resume {args.resume}: no config.json there")
        # The saved configuration wins, except for progress bars and where the folder is now. The saved
        # thread count is kept unless overridden: a different one may change float rounding.
        config = json.loads(saved.read_text())
        args = argparse.Namespace(**{**config, "progress": args.progress, "run_dir": args.resume, "resume": None,
                                     "threads": config["threads"] if args.threads is None else args.threads})
    else:
        resolve(args)
    # Under torchrun (WORLD_SIZE > 1) every rank runs what follows on its share of the data; rank 0
    # alone writes the run folder and prints.
    workers, device = Workers.start(args.device)
    try:
        if fresh:
            if args.run_dir is None:  # rank 0's clock names the folder for all
                args.run_dir = workers.broadcast(str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
            if workers.is_main:
                Path(args.run_dir).mkdir(parents=True, exist_ok=True)
                (Path(args.run_dir) / "config.json").write_text(json.dumps(vars(args), indent=2))
        transformers.utils.logging.disable_progress_bar()  # keep the terminal to our own progress bars
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            summary = run(args, workers, device)
        except UsageError as exc:
            parser.error(str(exc))
    finally:
        workers.stop()
    if workers.is_main:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
