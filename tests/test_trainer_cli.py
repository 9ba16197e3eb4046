"""`dopd-train` end to end on a tiny configuration, on the built-in task and on local checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dopd_trainer.cli import load_reward, main
from dopd_trainer.errors import UsageError
from dopd_trainer.models import check_same_vocabulary, load_checkpoint, tiny_llama
from dopd_trainer.task import ALPHABET, load_jsonl
from dopd_trainer.tokenizer import build_char_tokenizer
from dopd_trainer.train import TIMING_FIELDS

TINY = ["--digits", "1", "--train-size", "60", "--eval-size", "12", "--hidden", "16", "--layers", "1",
        "--teacher-hidden", "24", "--teacher-layers", "1", "--teacher-warmup-steps", "4", "--student-warmup-steps", "3",
        "--steps", "3", "--prompts-per-step", "3", "--samples-per-prompt", "2", "--eval-every", "2", "--save-every", "2",
        "--no-progress", "--backend", "torch"]
ARMS = ("vanilla-opd", "tpriv-opd", "self-distill", "dopd")


@pytest.fixture(autouse=True, scope="module")
def keep_thread_count():
    """`main` sets torch's thread count (1 for the built-in task); later test files keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_dir, cache = root / "run", root / "cache"
    assert main(TINY + ["--run-dir", str(run_dir), "--cache-dir", str(cache)]) == 0
    return run_dir, cache


def test_builtin_run_writes_the_run_folder(builtin_run):
    run_dir, cache = builtin_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["arms"]) == list(ARMS)
    for key in ("student_without_hint", "student_with_hint", "teacher_without_hint", "teacher_with_hint"):
        assert 0.0 <= summary["references"][key] <= 1.0
    assert json.loads((run_dir / "config.json").read_text())["arms"] == ",".join(ARMS)
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "| DOPD |" in (run_dir / "table.md").read_text()
    for arm in ARMS:
        records = [json.loads(line) for line in (run_dir / "seed-1" / arm / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3]
        assert (run_dir / "seed-1" / arm / "final" / "config.json").exists()
        assert sorted(p.name for p in (run_dir / "seed-1" / arm).glob("ckpt-*.pt")) == ["ckpt-000002.pt",
                                                                                       "ckpt-000003.pt"]
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["student", "teacher"]


def test_teacher_and_student_differ_in_size(builtin_run):
    _, cache = builtin_run
    sizes = {p.name.split("-")[0]: json.loads((p / "config.json").read_text())["hidden_size"] for p in cache.iterdir()}
    assert sizes == {"student": 16, "teacher": 24}


def test_resume_of_a_finished_run_changes_nothing(builtin_run):
    run_dir, _ = builtin_run
    before = (run_dir / "seed-1" / "dopd" / "metrics.jsonl").read_text()
    assert main(["--resume", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "seed-1" / "dopd" / "metrics.jsonl").read_text() == before


def test_local_checkpoints_and_jsonl(builtin_run, tmp_path):
    _, cache = builtin_run
    student = next(cache.glob("student-*"))
    teacher = next(cache.glob("teacher-*"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "hint": f"{a}+{b}+0={a + b:02d};",
                                        "answer": str(a + b).zfill(2)[::-1]}) + "\n"
                            for a in range(4) for b in range(3)))
    args = ["--student", str(student), "--teacher", str(teacher), "--data", str(data), "--eval-data", str(data),
            "--steps", "2", "--prompts-per-step", "2", "--max-new-tokens", "4", "--no-progress", "--backend", "torch",
            "--arms", "tpriv-opd", "--divergence", "js", "--granularity", "full", "--run-dir", str(tmp_path / "run")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["arms"]) == ["tpriv-opd"]


def test_mismatched_vocabularies_are_rejected(builtin_run, tmp_path):
    _, cache = builtin_run
    student, student_tok = load_checkpoint(str(next(cache.glob("student-*"))), "--student")
    other_tok = build_char_tokenizer(ALPHABET + "abc")
    other = tiny_llama(other_tok, hidden=16, layers=1, heads=2, seed=0)
    with pytest.raises(ValueError, match="--teacher"):
        check_same_vocabulary(student_tok, other_tok, student, other)
    other.save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit):  # the CLI turns the ValueError into a usage error
        main(["--student", str(next(cache.glob("student-*"))), "--teacher", str(tmp_path / "other"),
              "--data", str(tmp_path / "none.jsonl"), "--run-dir", str(tmp_path / "run")])


def test_jsonl_missing_field_names_the_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "hint": "x"}\n{"prompt": "2+2="}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'hint'"):
        load_jsonl(str(path))


def test_reward_function_is_pluggable():
    assert load_reward("os.path:exists") is os.path.exists
    with pytest.raises(UsageError, match="--reward"):
        load_reward("os.path:no_such_function")


def test_bad_arm_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["--arms", "dopd,grpo"])
    assert "--arms" in capsys.readouterr().err


def test_resume_after_sigkill_equals_an_uninterrupted_run(builtin_run, tmp_path):
    """Kill `dopd-train` mid-run with SIGKILL, resume it, and get the uninterrupted run's metrics and weights."""
    _, cache = builtin_run
    cmd = [sys.executable, "-m", "dopd_trainer.cli", *TINY, "--steps", "30", "--eval-every", "1", "--threads", "1",
           "--cache-dir", str(cache), "--arms", "vanilla-opd,dopd"]
    subprocess.run(cmd + ["--run-dir", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--run-dir", str(tmp_path / "cut")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "seed-1" / "vanilla-opd" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count('"train"') >= 5):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(cmd[:3] + ["--resume", str(tmp_path / "cut"), "--no-progress", "--threads", "1"], check=True,
                   capture_output=True)
    for arm in ("vanilla-opd", "dopd"):
        full, cut = (tmp_path / run / "seed-1" / arm for run in ("full", "cut"))
        assert strip_timing(cut / "metrics.jsonl") == strip_timing(full / "metrics.jsonl")
        assert (cut / "final" / "model.safetensors").read_bytes() == (full / "final" / "model.safetensors").read_bytes()


def strip_timing(path):
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]
