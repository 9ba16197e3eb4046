"""The run's PNG: loss per step, the DOPD regime mix over steps, and held-out accuracy curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

REGIMES = ("LH", "LL", "HT", "HS")


def plot_run(path: Path, arms: dict[str, list[dict]], teacher_accuracy: float | None = None) -> None:
    """`arms` maps an arm name to its metric records (as written to metrics.jsonl)."""
    fig, (ax_loss, ax_mix, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, records in arms.items():
        train = [r for r in records if r["event"] == "train"]
        evals = [r for r in records if r["event"] == "eval"]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        line, = ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o", label=name)
        ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy_with_hint"] for r in evals], linestyle=":",
                    color=line.get_color(), label=f"{name}, reading the hint")
        if train and "regime" in train[0]:
            steps = [r["step"] for r in train]
            ax_mix.stackplot(steps, *[[r["regime"][k] for r in train] for k in REGIMES], labels=REGIMES)
            ax_mix.set_title(f"regime mix ({name})")
    if teacher_accuracy is not None:
        ax_acc.axhline(teacher_accuracy, color="k", linestyle="--", label="teacher (with hint)")
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_mix.set(xlabel="step", ylabel="fraction of response tokens", ylim=(0, 1))
    ax_acc.set(title="held-out student accuracy (greedy)", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_mix, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
