"""The comparison's report, computed from the run folder's own files only: `references.json` (the
reference rows) and `seed-<s>/<arm>/metrics.jsonl` (every training step and evaluation of an arm).

`summarize` reduces them to summary.json, `format_table` writes the Markdown table shaped like the
paper's Table 1, and `plot_run` draws accuracy and entropy curves per arm and DOPD's regimes.

`python -m dopd_trainer.report RUN_DIR [RUN_DIR ...]` redoes all three for run folders written
separately (e.g. one process per training seed, run side by side): the seeds of every folder are
pooled, and the folders must share their reference rows (same task, models and held-out set).
`--by OPTION` (e.g. `hint_form`) compares instead of pooling: the folders are grouped by that option of
their config.json, each group is summarized on its own (its own reference rows) and becomes one row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import read_jsonl  # noqa: E402

REGIMES = ("LH", "LL", "HT", "HS")
# What each arm distils from, for the table (DESIGN.md section 7).
TARGETS = {"vanilla-opd": "teacher reading x", "tpriv-opd": "teacher reading x,p",
           "self-distill": "sg[student] reading x,p", "dopd": "teacher or sg[student] by regime, reading x,p"}
LABELS = {"vanilla-opd": "Vanilla OPD", "tpriv-opd": "T-Priv OPD", "self-distill": "Self-distillation",
          "dopd": "DOPD"}


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of per-seed values."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the last `fraction` of a curve (at least one point)."""
    k = max(1, round(len(values) * fraction))
    return statistics.fmean(values[-k:])


def seed_dirs(run_dirs: list[Path], seeds: list[int] | None = None) -> dict[int, Path]:
    """`seed -> seed folder` over the given run folders (every `seed-<s>` there, or only `seeds`)."""
    found: dict[int, Path] = {}
    for run_dir in map(Path, run_dirs):
        for folder in sorted(run_dir.glob("seed-*")):
            seed = int(folder.name.removeprefix("seed-"))
            if seeds is not None and seed not in seeds:
                continue
            if seed in found:
                raise ValueError(f"seed {seed} appears in both {found[seed].parent} and {run_dir}")
            found[seed] = folder
    return dict(sorted(found.items()))


def references(run_dirs: list[Path]) -> dict:
    """The reference rows, which every pooled run folder must share."""
    found = [json.loads(p.read_text()) for d in run_dirs if (p := Path(d) / "references.json").exists()]
    if any(f != found[0] for f in found[1:]):
        raise ValueError("the run folders have different reference rows (task, models or held-out set differ)")
    return found[0] if found else {}


def summarize(run_dirs: Path | list[Path], arms: list[str], seeds: list[int] | None = None) -> dict:
    """Per arm, over the training seeds whose metrics exist (all `seed-*` folders of `run_dirs`, or
    only `seeds`): final held-out accuracy without the hint (mean ± sd), final accuracy of the student
    and of the privileged student reading the hint, entropy at the start and end of training, and for
    DOPD the regime mix and per-regime loss averaged over all steps. Every number comes from the
    metrics files."""
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    folders = seed_dirs(run_dirs, seeds)
    summary: dict = {"run_dir": ", ".join(map(str, run_dirs)), "seeds": list(folders), "arms": {},
                     "references": references(run_dirs)}
    for arm in arms:
        per_seed: dict[int, dict] = {}
        for seed, folder in folders.items():
            records = read_jsonl(folder / arm / "metrics.jsonl")
            train = [r for r in records if r["event"] == "train"]
            evals = [r for r in records if r["event"] == "eval"]
            if not train or not evals:
                continue
            row = {"steps": train[-1]["step"], "accuracy": evals[-1]["eval_accuracy"],
                   "accuracy_with_hint": evals[-1]["eval_accuracy_with_hint"],
                   "priv_accuracy_with_hint": evals[-1]["priv_accuracy_with_hint"],
                   "entropy_start": statistics.fmean(r["entropy"] for r in train[: max(1, len(train) // 10)]),
                   "entropy_end": tail_mean([r["entropy"] for r in train])}
            if "regime" in train[0]:
                row["regime"] = {k: statistics.fmean(r["regime"][k] for r in train) for k in REGIMES}
                row["regime_loss"] = {k: statistics.fmean(v) for k in REGIMES
                                      if (v := [r["regime_loss"][k] for r in train if k in r["regime_loss"]])}
            per_seed[seed] = row
        if not per_seed:
            continue
        rows = list(per_seed.values())
        arm_summary = {key: mean_sd([r[key] for r in rows]) for key in
                       ("accuracy", "accuracy_with_hint", "priv_accuracy_with_hint", "entropy_start", "entropy_end")}
        arm_summary["per_seed"] = per_seed
        if "regime" in rows[0]:
            arm_summary["regime"] = {k: statistics.fmean(r["regime"][k] for r in rows) for k in REGIMES}
            arm_summary["regime_loss"] = {k: statistics.fmean(v) for k in REGIMES
                                          if (v := [r["regime_loss"][k] for r in rows if k in r["regime_loss"]])}
        summary["arms"][arm] = arm_summary
    return summary


def _pct(stat: dict) -> str:
    spread = f" ± {100 * stat['sd']:.1f}" if stat["n"] > 1 else ""
    return f"{100 * stat['mean']:.1f}{spread} (n={stat['n']})"


def _per_seed(arms: dict) -> str:
    """Each arm's final accuracy per training seed, `Vanilla OPD 15.8 / 14.6 / 14.2; ...` (the values
    behind a mean ± sd, so equal summaries can be told apart from copied ones)."""
    return "; ".join(f"{LABELS.get(arm, arm)} " + " / ".join(f"{100 * r['accuracy']:.1f}" for r in s["per_seed"].values())
                     for arm, s in arms.items())


def format_table(summary: dict) -> str:
    """Markdown: the paper's Table 1 shape (methods as rows, held-out accuracy without the hint), with
    the privileged student's accuracy and the entropy beside it, then DOPD's regimes."""
    refs, arms = summary["references"], summary["arms"]
    seeds = ", ".join(map(str, summary["seeds"]))
    n_eval = refs.get("eval_examples", "?")
    lines = [f"Held-out accuracy without the hint (%, greedy, {n_eval} prompts; mean ± sd over training seeds {seeds}):",
             "", "| method | target (context) | accuracy | Δ vs vanilla OPD | privileged student, with hint | "
             "student entropy start → end (nats) |", "|---|---|---|---|---|---|"]
    if refs:
        lines += [f"| student before training | – | {100 * refs['student_without_hint']:.1f} | | "
                  f"{100 * refs['student_with_hint']:.1f} | |",
                  f"| teacher without hint | – | {100 * refs['teacher_without_hint']:.1f} | | | |",
                  f"| teacher with hint | – | {100 * refs['teacher_with_hint']:.1f} (reads x,p) | | | |"]
    base = arms.get("vanilla-opd", {}).get("accuracy")
    for arm, s in arms.items():
        delta = "" if base is None or arm == "vanilla-opd" else f"{100 * (s['accuracy']['mean'] - base['mean']):+.1f}"
        lines.append(f"| {LABELS.get(arm, arm)} | {TARGETS.get(arm, '')} | {_pct(s['accuracy'])} | {delta} | "
                     f"{_pct(s['priv_accuracy_with_hint'])} | {s['entropy_start']['mean']:.3f} → "
                     f"{s['entropy_end']['mean']:.3f} |")
    steps = sorted({r["steps"] for s in arms.values() for r in s["per_seed"].values()})
    lines.append(f"\nSteps per arm: {', '.join(map(str, steps))}.")
    lines.append(f"Per seed ({seeds}), accuracy without the hint (%): {_per_seed(arms)}.")
    if "dopd" in arms and "regime" in arms["dopd"]:
        d = arms["dopd"]
        lines += ["", "DOPD regimes (mean over all steps and seeds): fraction of response tokens, mean weighted loss",
                  "", "| regime | target | tokens | loss |", "|---|---|---|---|"]
        targets = {"LH": "teacher, top-K RKL ×0.6", "LL": "sg[student], top-K RKL ×0.3", "HT": "teacher, JS ×1",
                   "HS": "sg[student], top-K RKL ×0.6"}
        for k in REGIMES:
            loss = d["regime_loss"].get(k)
            lines.append(f"| {k} | {targets[k]} | {100 * d['regime'][k]:.1f}% | "
                         f"{'–' if loss is None else f'{loss:.4f}'} |")
    return "\n".join(lines) + "\n"


def group_by_config(run_dirs: list[Path], key: str) -> dict[str, list[Path]]:
    """Run folders grouped by the value of option `key` in their config.json (first-seen order)."""
    groups: dict[str, list[Path]] = {}
    for run_dir in map(Path, run_dirs):
        path = run_dir / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the run's configuration ({exc})") from exc
        if key not in config:
            raise ValueError(f"{path}: no option {key!r} (options: {', '.join(sorted(config))})")
        groups.setdefault(str(config[key]), []).append(run_dir)
    return groups


def format_comparison(summaries: dict[str, dict], key: str) -> str:
    """Markdown: one row per value of the option `key` (e.g. `hint_form`), each from its own summary:
    the steps the arms reached (more than one value: some run was cut short), the reference rows (the
    built-in warm-ups depend on the option, so each value has its own), each arm's held-out accuracy
    without the hint (mean ± sd over training seeds) and its difference from vanilla OPD's under the
    same value, DOPD's privileged student with the hint; then the per-seed values."""
    arms = list(dict.fromkeys(a for s in summaries.values() for a in s["arms"]))
    option = "--" + key.replace("_", "-")
    head = [option, "seeds", "steps per arm", "student without / with hint", "teacher without / with hint",
            *(LABELS.get(a, a) for a in arms), "Δ vs vanilla OPD", "DOPD's privileged student, with hint"]
    lines = [f"Held-out accuracy without the hint (%, greedy; mean ± sd over training seeds), by `{option}`:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for value, s in summaries.items():
        refs, got = s["references"], s["arms"]
        base = got.get("vanilla-opd", {}).get("accuracy")
        deltas = ", ".join(f"{LABELS.get(a, a)} {100 * (got[a]['accuracy']['mean'] - base['mean']):+.1f}"
                           for a in got if base is not None and a != "vanilla-opd")
        steps = sorted({r["steps"] for a in got.values() for r in a["per_seed"].values()})
        cells = [value, ", ".join(map(str, s["seeds"])), ", ".join(map(str, steps)),
                 *((f"{100 * refs[f'{m}_without_hint']:.1f} / {100 * refs[f'{m}_with_hint']:.1f}" if refs else "–")
                   for m in ("student", "teacher")),
                 *(_pct(got[a]["accuracy"]) if a in got else "–" for a in arms), deltas or "–",
                 _pct(got["dopd"]["priv_accuracy_with_hint"]) if "dopd" in got else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"Per seed, {option} {value} (seeds {', '.join(map(str, s['seeds']))}), accuracy without the hint (%): "
              f"{_per_seed(s['arms'])}." for value, s in summaries.items()]
    return "\n".join(lines) + "\n"


def _curves(folders: list[Path], arm: str, event: str, key: str) -> tuple[list[int], list[list[float]]]:
    """Steps and per-seed values of `key` in `event` records, cut to the steps every seed reached."""
    series = []
    for folder in folders:
        recs = [r for r in read_jsonl(folder / arm / "metrics.jsonl") if r["event"] == event]
        if recs:
            series.append(recs)
    if not series:
        return [], []
    n = min(len(s) for s in series)
    return [r["step"] for r in series[0][:n]], [[r[key] for r in s[:n]] for s in series]


def _smooth(values: list[float], width: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - width + 1): i + 1]) for i in range(len(values))]


def plot_run(path: Path, run_dirs: Path | list[Path], summary: dict) -> None:
    """Four panels: held-out accuracy per arm (mean over seeds, ± sd band; dotted: the privileged
    student reading the hint), student entropy per arm, DOPD's regime mix and per-regime loss."""
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    folders = list(seed_dirs(run_dirs, summary["seeds"]).values())
    fig, ((ax_acc, ax_ent), (ax_mix, ax_rl)) = plt.subplots(2, 2, figsize=(14, 9))
    for arm in summary["arms"]:
        steps, acc = _curves(folders, arm, "eval", "eval_accuracy")
        if not steps:
            continue
        mean = [statistics.fmean(col) for col in zip(*acc)]
        sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*acc)]
        line, = ax_acc.plot(steps, mean, marker="o", label=LABELS.get(arm, arm))
        ax_acc.fill_between(steps, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)],
                            color=line.get_color(), alpha=0.15)
        _, priv = _curves(folders, arm, "eval", "priv_accuracy_with_hint")
        ax_acc.plot(steps, [statistics.fmean(col) for col in zip(*priv)], linestyle=":", color=line.get_color())
        steps, ent = _curves(folders, arm, "train", "entropy")
        ax_ent.plot(steps, _smooth([statistics.fmean(col) for col in zip(*ent)]), color=line.get_color(),
                    label=LABELS.get(arm, arm))
    refs = summary["references"]
    for key, style in (("teacher_without_hint", "--"), ("teacher_with_hint", "-.")):
        if key in refs:
            ax_acc.axhline(refs[key], color="k", linestyle=style, linewidth=1, label=key.replace("_", " "))
    if "dopd" in summary["arms"]:
        steps, mixes = _curves(folders, "dopd", "train", "regime")
        if steps:
            ax_mix.stackplot(steps, *[[statistics.fmean(m[i][k] for m in mixes) for i in range(len(steps))]
                                      for k in REGIMES], labels=REGIMES)
            losses = _curves(folders, "dopd", "train", "regime_loss")[1]
            for k in REGIMES:
                points = [(s, statistics.fmean(v)) for i, s in enumerate(steps)
                          if (v := [m[i][k] for m in losses if k in m[i]])]
                if points:
                    ax_rl.plot([p[0] for p in points], _smooth([p[1] for p in points]), label=k)
    ax_acc.set(title="held-out accuracy without the hint (dotted: privileged student with it)", xlabel="step",
               ylabel="accuracy", ylim=(-0.02, 1.02))
    ax_ent.set(title="student entropy on its samples (nats/token, smoothed)", xlabel="step")
    ax_mix.set(title="DOPD regime mix", xlabel="step", ylabel="fraction of response tokens", ylim=(0, 1))
    ax_rl.set(title="DOPD mean weighted loss per regime (smoothed)", xlabel="step", yscale="log")
    for ax in (ax_acc, ax_ent, ax_mix, ax_rl):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def arms_in(run_dirs: list[Path]) -> list[str]:
    """The arms with a metrics file in any seed folder of `run_dirs`, in the table's order."""
    found = {a.name for d in run_dirs for s in Path(d).glob("seed-*") for a in s.iterdir()
             if (a / "metrics.jsonl").exists()}
    order = list(TARGETS)
    return sorted(found, key=lambda a: (order.index(a) if a in order else len(order), a))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dopd_trainer.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, help="run folders of dopd-train")
    p.add_argument("--out", type=Path, help="where to write summary.json, table.md, report.png (default: print only)")
    p.add_argument("--by", metavar="OPTION",
                   help="compare instead of pooling: group the folders by this option of their config.json (e.g. "
                        "hint_form), one summary per value, one row per value (writes comparison.md/.json)")
    args = p.parse_args(argv)
    if args.by:
        try:
            groups = group_by_config(args.run_dirs, args.by)
        except ValueError as exc:
            p.error(str(exc))
        summaries = {value: summarize(dirs, arms_in(dirs)) for value, dirs in groups.items()}
        table = format_comparison(summaries, args.by)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "comparison.json").write_text(json.dumps(summaries, indent=2, default=str))
            (args.out / "comparison.md").write_text(table)
        print(table)
        return 0
    summary = summarize(args.run_dirs, arms_in(args.run_dirs))
    table = format_table(summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (args.out / "table.md").write_text(table)
        plot_run(args.out / "report.png", args.run_dirs, summary)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
