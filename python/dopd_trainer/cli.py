"""`dopd-train`: the DOPD paper's comparison (vanilla OPD, T-Priv OPD, self-distillation, DOPD) by
on-policy distillation of transformers causal LMs.

With no arguments it runs the built-in task (addition whose answer order is revealed only by the
hint, tiny Llama models: a larger teacher and a weak student, warmed up by cached supervised runs),
trains every arm from the same student and prints a table shaped like the paper's Table 1.
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

from dopd_kernels.backends import resolve_backend

from . import task
from .distributed import Workers
from .errors import UsageError
from .checkpoint import atomic_write_bytes
from .models import HEADS, check_same_vocabulary, load_checkpoint, tiny_llama
from .report import format_table, plot_run, summarize
from .rollout import accuracy
from .tokenizer import build_char_tokenizer
from .train import ANCHORS, ARMS, DIVERGENCES, GRANULARITIES, PRIV_STUDENTS, TrainConfig, train_arm
from .warmup import cached_warmup, sft

PRESETS = {"quick": dict(seeds="1"), "full": dict(seeds="1,2,3")}  # training seeds (seed 0 was for tuning)
WARMUP_LR = 3e-3  # peak rate of the built-in models' supervised warm-ups
# Loop settings whose default depends on the models: for real checkpoints the paper's (DESIGN.md
# section 7); the tiny built-in models take small batches at a higher rate (1e-3: chosen on tuning
# seed 0 from the vanilla-OPD arm, where 2e-4 left the student where it started after 120 steps and
# 3e-3 first knocked it down), and sample at a lower temperature so fewer rollouts go off the rails.
BUILTIN_DEFAULTS = dict(prompts_per_step=16, lr=1e-3, temperature=0.7,
                        max_new_tokens=None, threads=1)
CHECKPOINT_DEFAULTS = dict(prompts_per_step=128, lr=5e-6, temperature=1.0,
                           max_new_tokens=512, threads=None)


def bounded(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False):
    """An argparse `type` accepting a `kind` (int or float) in [low, high] (ends excluded when open);
    the parser reports anything else as a one-line usage error naming the option."""
    interval = (("(" if low_open else "[") + ("-inf" if low is None else str(low)) + ", "
                + ("inf" if high is None else str(high)) + (")" if high_open else "]"))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}")
        return value

    parse.__name__ = f"{kind.__name__} in {interval}"  # argparse names the type in its messages
    return parse


def hidden_size(text: str) -> int:
    """Hidden size of a built-in model: HEADS heads of an even width (rotary embeddings pair features)."""
    value = bounded(int, 2 * HEADS)(text)
    if value % (2 * HEADS):
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of {2 * HEADS} ({HEADS} attention heads of "
                                         "even width)")
    return value


def name_list(allowed: tuple[str, ...]):
    """An argparse `type` for a comma-separated list of names from `allowed` (kept as the string)."""
    def parse(text: str) -> str:
        names = [n.strip() for n in text.split(",")]
        bad = [n for n in names if n not in allowed]
        if bad or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{text!r}: give distinct names from {', '.join(allowed)}")
        return ",".join(names)
    parse.__name__ = "list"
    return parse


def seed_list(text: str) -> str:
    """An argparse `type` for a comma-separated list of distinct non-negative seeds (kept as the string)."""
    try:
        seeds = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct non-negative seeds")
    return ",".join(map(str, seeds))


POSITIVE_INT, NONNEG_INT = bounded(int, 1), bounded(int, 0)
POSITIVE_FLOAT = bounded(float, 0, low_open=True)
BACKENDS = ("auto", "reference", "torch", "cpp", "triton", "cuda")


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
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                   help="quick: one training seed; full: the multi-seed comparison (seeds 1,2,3). Options given "
                        "explicitly win. CPU time of the built-in task, i.e. wall time on an idle machine (1 thread): "
                        "quick 6 min on the first run (extension build and warm-ups), 2 min once cached; full "
                        "about 2 min more per extra seed")
    builtin = p.add_argument_group("built-in task")
    builtin.add_argument("--digits", type=POSITIVE_INT, default=2, help="operand digits of the addition task")
    builtin.add_argument("--hint-form", choices=task.HINT_FORMS, default="cues",
                         help="what the hint reveals besides the answer order: carry cues (the paper's moderate "
                              "hint), the column-by-column working, or the answer")
    builtin.add_argument("--train-size", type=POSITIVE_INT, default=8000, help="training problems")
    builtin.add_argument("--eval-size", type=NONNEG_INT, default=500, help="held-out problems")
    builtin.add_argument("--hidden", type=hidden_size, default=64, help="hidden size of the student")
    builtin.add_argument("--layers", type=POSITIVE_INT, default=2, help="layers of the student")
    builtin.add_argument("--teacher-hidden", type=hidden_size, default=64, help="hidden size of the teacher")
    builtin.add_argument("--teacher-layers", type=POSITIVE_INT, default=3, help="layers of the teacher")
    builtin.add_argument("--teacher-warmup-steps", type=NONNEG_INT, default=1000,
                         help="SFT steps of the teacher (half of its examples with hints)")
    builtin.add_argument("--student-warmup-steps", type=NONNEG_INT, default=600,
                         help="SFT steps of the student (half of its examples with hints)")
    builtin.add_argument("--task-seed", type=NONNEG_INT, default=0,
                         help="seeds the problem split, the answer orders and the warm-ups")
    builtin.add_argument("--cache-dir", default="~/.cache/dopd_trainer", help="where warmed-up models are cached")
    method = p.add_argument_group("arms")
    method.add_argument("--arms", type=name_list(ARMS), default=",".join(ARMS),
                        help="arms to train, each from the same student: vanilla-opd (teacher reads x), tpriv-opd "
                             "(teacher reads x,p), self-distill (the privileged student reads x,p), dopd")
    method.add_argument("--divergence", choices=DIVERGENCES, default="reverse_kl",
                        help="divergence of the single-target arms")
    method.add_argument("--granularity", choices=GRANULARITIES, default="topk", help="support of the single-target arms")
    method.add_argument("--anchor", choices=ANCHORS, default="priv-student", help="DOPD's third stream")
    method.add_argument("--priv-student", choices=PRIV_STUDENTS, default="live",
                        help="the privileged student: the live student (paper), frozen at the start, or an EMA")
    method.add_argument("--ema-decay", type=bounded(float, 0, 1, high_open=True), default=0.99,
                        help="per-step decay of the EMA privileged student")
    loop = p.add_argument_group("loop (defaults marked * depend on built-in vs checkpoints)")
    loop.add_argument("--steps", type=POSITIVE_INT, default=120, help="optimizer steps per arm")
    loop.add_argument("--prompts-per-step", type=POSITIVE_INT, help="* prompts per step (16 / 128)")
    loop.add_argument("--samples-per-prompt", type=POSITIVE_INT, default=4, help="rollouts G per prompt")
    loop.add_argument("--lr", type=bounded(float, 0, 1, low_open=True), help="* peak AdamW learning rate (1e-3 / 5e-6)")
    loop.add_argument("--max-new-tokens", type=POSITIVE_INT, help="* response length cap (answer + EOS + 1 / 512)")
    loop.add_argument("--temperature", type=bounded(float, 0, 100, low_open=True), help="* sampling temperature (0.7 / 1.0)")
    loop.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=1.0, help="nucleus sampling mass")
    loop.add_argument("--warmup-steps", type=NONNEG_INT, default=10, help="linear LR warm-up before the cosine decay")
    loop.add_argument("--weight-decay", type=bounded(float, 0, 1), default=0.0, help="AdamW weight decay")
    loop.add_argument("--max-grad-norm", type=POSITIVE_FLOAT, default=1.0, help="gradient clipping norm")
    loop.add_argument("--top-k", type=POSITIVE_INT, default=128, help="K of the top-K terms")
    loop.add_argument("--backend", choices=BACKENDS, default="auto", help="dopd_kernels backend (auto, torch, cpp, triton, ...)")
    loop.add_argument("--seeds", type=seed_list,
                      help="training seeds (data order, sampling), comma-separated (preset: 1 / 1,2,3; seed 0 "
                           "was used to tune the defaults)")
    loop.add_argument("--eval-every", type=POSITIVE_INT, default=20, help="steps between held-out evaluations")
    loop.add_argument("--save-every", type=POSITIVE_INT, default=20, help="steps between checkpoints")
    loop.add_argument("--device", default="cpu", help="torch device of both models, e.g. cuda")
    loop.add_argument("--threads", type=bounded(int, 1, 1024),
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


def builtin_data(args):
    """The built-in task's tokenizer and (train, held-out) problems."""
    tokenizer = build_char_tokenizer(task.ALPHABET)
    return (tokenizer, *task.addition_splits(args.digits, args.train_size, args.eval_size, args.task_seed,
                                             args.hint_form))


def warmed_model(args, name: str, tokenizer, train_set):
    """The cached warm-up of the built-in `name` ("teacher" or "student"): a tiny Llama trained by
    supervised warm-up on examples of which half read the hint; built and cached on a miss."""
    hidden, layers, steps, seed = ((args.teacher_hidden, args.teacher_layers, args.teacher_warmup_steps, 1)
                                   if name == "teacher" else (args.hidden, args.layers, args.student_warmup_steps, 2))
    seed += args.task_seed
    # The training problems are the first `train_size` drawn, whatever `eval_size` is.
    key = dict(digits=args.digits, train_size=args.train_size, task_seed=args.task_seed, hint_form=args.hint_form,
               alphabet=task.ALPHABET, lr=WARMUP_LR, hidden=hidden, layers=layers, steps=steps, model_seed=seed,
               version=2)

    def build():
        model = tiny_llama(tokenizer, hidden, layers, seed=seed)
        sft(model, tokenizer, train_set, hint_fraction=0.5, steps=steps, batch_size=64, lr=WARMUP_LR, seed=seed,
            desc=f"{name} warm-up (cached after this run)", show_progress=args.progress)
        return model, tokenizer

    return cached_warmup(args.cache_dir, name, key, build)


def setup_builtin(args, workers: Workers):
    """Tokenizer, data and the two warmed-up models of the built-in task: a teacher larger than the
    student and trained longer, so it is competent without the hint and better with it, and a
    student whose privileged self can use a hint (what DOPD's third stream assumes) while its
    unhinted skill stays weak."""
    tokenizer, train_set, eval_set = builtin_data(args)
    # Rank 0 trains and caches the warm-ups while the other ranks wait; they then load its cache.
    if not workers.is_main:
        workers.barrier()
    teacher, _ = warmed_model(args, "teacher", tokenizer, train_set)
    student, tokenizer = warmed_model(args, "student", tokenizer, train_set)
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
    positions = [getattr(m.config.get_text_config(), "max_position_embeddings", None) for m in (student, teacher)]
    positions = min((p for p in positions if p is not None), default=None)
    check = task.example_checker(tokenizer, positions, args.max_new_tokens)
    eval_set = task.load_jsonl(args.eval_data, "--eval-data", check) if args.eval_data else []
    return student, teacher, tokenizer, task.load_jsonl(args.data, "--data", check), eval_set


def check_backend(name: str, device: str) -> None:
    """Refuse a `--backend` that cannot run here before any model is built."""
    try:
        resolve_backend(name, torch.device(device))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--backend {name}: {exc}") from exc


def resolve(args) -> argparse.Namespace:
    """Fill the preset's and the model-dependent defaults in place and return the namespace."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    builtin = args.student is None and args.teacher is None
    for name, value in (BUILTIN_DEFAULTS if builtin else CHECKPOINT_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_new_tokens is None:  # built-in: the answer's digits + 1 plus EOS, and one spare token
        args.max_new_tokens = args.digits + 3
    return args


def train_configs(args) -> list[TrainConfig]:
    """One configuration per (training seed, arm), seed-major."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in vars(args).items() if k in fields}
    return [TrainConfig(**base, arm=arm, seed=int(seed)) for seed in args.seeds.split(",")
            for arm in args.arms.split(",")]


def references(args, student, teacher, tokenizer, eval_set, reward_fn, workers: Workers) -> dict:
    """The reference rows: held-out accuracy of the starting student and of the teacher, each without
    and with the hint."""
    rows = {}
    for name, model in (("student", student), ("teacher", teacher)):
        for hint in (False, True):
            rows[f"{name}_{'with' if hint else 'without'}_hint"] = accuracy(
                model, tokenizer, eval_set, reward_fn, with_hint=hint, max_new_tokens=args.max_new_tokens,
                workers=workers)
    return rows


def run(args, workers: Workers = Workers(), device: str | None = None) -> dict:
    """Set up, measure the reference rows, train every (seed, arm) into `run_dir/seed-<s>/<arm>`, and
    write summary.json, table.md and report.png from the runs' metrics files (rank 0; the other ranks
    return an empty summary). `device`: this rank's device (default `args.device`)."""
    started = time.time()
    run_dir = Path(args.run_dir)
    configs = train_configs(args)  # validates names before any model is built
    device = device or args.device
    check_backend(args.backend, device)
    reward_fn = load_reward(args.reward)
    if args.student is None and args.teacher is None:
        student, teacher, tokenizer, train_set, eval_set = setup_builtin(args, workers)
    else:
        student, teacher, tokenizer, train_set, eval_set = setup_checkpoints(args)
    student, teacher = student.to(device), teacher.to(device)
    refs_path = run_dir / "references.json"
    if eval_set and not refs_path.exists():  # measured once per run folder (a resume reuses them)
        refs = references(args, student, teacher, tokenizer, eval_set, reward_fn, workers)
        if workers.is_main:
            atomic_write_bytes(refs_path, json.dumps({"eval_examples": len(eval_set), **refs}, indent=2).encode())
    for cfg in configs:
        train_arm(run_dir / f"seed-{cfg.seed}" / cfg.arm_name, cfg, copy.deepcopy(student), teacher, tokenizer,
                  train_set, eval_set, reward_fn if eval_set else None, args.progress, workers)
    if not workers.is_main:
        return {}
    summary = summarize(run_dir, args.arms.split(","), [int(x) for x in args.seeds.split(",")])
    summary["wall_time_s"] = round(time.time() - started, 1)
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(run_dir / "table.md", format_table(summary).encode())
    plot_run(run_dir / "report.png", run_dir, summary)
    return summary


def load_saved_config(parser: argparse.ArgumentParser, path: Path) -> dict:
    """A run folder's config.json, checked against the parser: every option present (a missing one is
    an error, never a silent default: it could change the run being resumed), no unknown ones, and
    each value valid for its option exactly as the command line would have had to be."""
    where = f"--resume: {path}"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{where}: not found (is this a dopd-train run folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: unreadable or not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UsageError(f"{where}: expected a JSON object, got a {type(config).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    missing, unknown = sorted(set(actions) - set(config)), sorted(set(config) - set(actions))
    if missing or unknown:
        raise UsageError(f"{where}: " + "; ".join(part for part in (
            missing and f"missing {', '.join(missing)}", unknown and f"unknown {', '.join(unknown)}") if part))
    for dest, action in actions.items():
        value, option = config[dest], action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            ok = isinstance(value, bool)
        elif value is None:
            ok = action.default is None  # only options that may be unset
        elif action.type is None:
            ok = isinstance(value, str) and (action.choices is None or value in action.choices)
        else:  # the option's own parser must give back the saved value (an int stays an int, in range)
            try:
                ok = action.type(str(value)) == value
            except (argparse.ArgumentTypeError, ValueError):
                ok = False
        if not ok:
            raise UsageError(f"{where}: {dest} = {value!r} is not a valid {option}")
    return config


def format_summary(summary: dict) -> str:
    """The end-of-run report for the terminal: the table, and where the files are."""
    return (format_table(summary) + f"\nrun folder {summary['run_dir']} (table.md, report.png, summary.json, "
            f"seed-*/<arm>/metrics.jsonl); wall time of this invocation {summary['wall_time_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fresh = not args.resume
    if args.resume:
        try:
            config = load_saved_config(parser, Path(args.resume) / "config.json")
        except UsageError as exc:
            parser.error(str(exc))
        # The saved configuration wins, except for progress bars and where the folder is now. The saved
        # thread count is kept unless overridden: a different one may change float rounding.
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
                atomic_write_bytes(Path(args.run_dir) / "config.json", json.dumps(vars(args), indent=2).encode())
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
