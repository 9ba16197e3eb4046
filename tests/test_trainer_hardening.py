"""The trainer survives damaged run files and refuses bad options and data with one-line messages
(issue 15 points 8 and 9)."""

import json
import os

import pytest
import torch

from dopd_trainer import checkpoint, cli
from dopd_trainer.checkpoint import load_latest, read_jsonl, save_checkpoint, truncate_metrics
from dopd_trainer.errors import UsageError
from dopd_trainer.models import tiny_llama
from dopd_trainer.task import ALPHABET, addition_splits, example_checker, load_jsonl
from dopd_trainer.tokenizer import build_char_tokenizer
from dopd_trainer.train import MetricsLog, cosine_schedule
from dopd_trainer.warmup import sft


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


@pytest.mark.parametrize("option, value", [
    ("--teacher-warmup-steps", "-1"), ("--student-warmup-steps", "x"), ("--eval-every", "0"), ("--save-every", "0"),
    ("--top-k", "0"), ("--samples-per-prompt", "0"), ("--temperature", "0"), ("--backend", "bogus"), ("--lr", "-1"),
    ("--lr", "nan"), ("--hidden", "6"), ("--hidden", "20"), ("--steps", "-1"), ("--steps", "0"), ("--top-p", "2"),
    ("--top-p", "0"), ("--threads", "0"), ("--max-grad-norm", "0"), ("--prompts-per-step", "0"),
    ("--max-new-tokens", "0"), ("--digits", "0"), ("--layers", "0"), ("--weight-decay", "-0.1"),
    ("--warmup-steps", "-2"), ("--train-size", "0"), ("--seed", "-1"), ("--steps", "2.5")])
def test_bad_options_are_one_line_parser_errors(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args([option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dopd-train: error: argument {option}")


def test_boundary_values_are_accepted():
    args = cli.build_parser().parse_args(["--teacher-warmup-steps", "0", "--top-p", "1", "--hidden", "8",
                                          "--eval-every", "1", "--lr", "1e-9", "--temperature", "0.01"])
    assert (args.teacher_warmup_steps, args.top_p, args.hidden, args.lr) == (0, 1.0, 8, 1e-9)


def test_short_warmups_run(tokenizer):
    """10 warm-up steps used to divide by zero in the schedule; 1 and 0 steps are fine too."""
    train_set, _ = addition_splits(1, 20, 0, seed=0)
    for steps in (0, 1, 10):
        model = tiny_llama(tokenizer, hidden=8, layers=1, seed=0)
        sft(model, tokenizer, train_set, hint_fraction=0.5, steps=steps, batch_size=4, lr=1e-3, seed=0)


def test_unavailable_backend_is_a_usage_error_before_any_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--backend", "cuda", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    assert "--backend cuda" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def small_state(tmp_path, tokenizer):
    model = tiny_llama(tokenizer, hidden=8, layers=1, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, cosine_schedule(optimizer, 1, 10)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, tokenizer, capsys):
    model, optimizer, scheduler = small_state(tmp_path, tokenizer)
    rng = [checkpoint.rng_state()]
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, rng)
    weights_at_2 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    newest = save_checkpoint(tmp_path, 4, model, optimizer, scheduler, rng)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn by a disk fault
    assert load_latest(tmp_path, model, optimizer, scheduler) == 2
    assert all(torch.equal(v, weights_at_2[k]) for k, v in model.state_dict().items())
    err = capsys.readouterr().err
    assert "ckpt-000002.pt" in err and "skipped the unreadable ckpt-000004.pt" in err
    (tmp_path / "ckpt-000002.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="no readable checkpoint"):
        load_latest(tmp_path, model, optimizer, scheduler)


def test_partial_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"event": "train", "step": step})
    with open(log.path, "a") as f:
        f.write('{"event": "train", "st')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropping a partial last line"):
        assert [r["step"] for r in log.read()] == [1, 2, 3]
    with pytest.warns(UserWarning):
        truncate_metrics(log.path, 2)
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2]
    log.path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage before the end is not a torn write
    with pytest.raises(UsageError, match=r"metrics.jsonl:2"):
        read_jsonl(log.path)


def test_writes_are_fsynced_before_the_rename(tmp_path, tokenizer, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    model, optimizer, scheduler = small_state(tmp_path, tokenizer)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, [checkpoint.rng_state()])
    assert events[:2] == ["fsync", "replace"]
    events.clear()
    MetricsLog(tmp_path / "m.jsonl").write({"step": 1})
    assert events == ["fsync"]


@pytest.fixture
def run_folder(tmp_path):
    """A run folder whose config.json is what a fresh run would save."""
    args = cli.resolve(cli.build_parser().parse_args(["--run-dir", str(tmp_path)]))
    (tmp_path / "config.json").write_text(json.dumps(vars(args)))
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.pop("steps"), "missing steps"),
    (lambda c: c.update(steps="240"), "steps = '240' is not a valid --steps"),
    (lambda c: c.update(steps=2.5), "not a valid --steps"),
    (lambda c: c.update(top_p=3), "not a valid --top-p"),
    (lambda c: c.update(arms="grpo"), "not a valid --arms"),
    (lambda c: c.update(hint_form="all"), "not a valid --hint-form"),
    (lambda c: c.update(progress="yes"), "not a valid --no-progress"),
    (lambda c: c.update(colour=1), "unknown colour")])
def test_damaged_config_is_refused(run_folder, damage, message, capsys):
    config = json.loads((run_folder / "config.json").read_text())
    damage(config)
    (run_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(["--resume", str(run_folder)])
    assert message in capsys.readouterr().err


def test_truncated_config_is_refused(run_folder, capsys):
    text = (run_folder / "config.json").read_text()
    (run_folder / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(SystemExit):
        cli.main(["--resume", str(run_folder)])
    assert "not JSON" in capsys.readouterr().err


def test_saved_config_round_trips(run_folder):
    config = cli.load_saved_config(cli.build_parser(), run_folder / "config.json")
    assert config["steps"] == 120 and config["lr"] == 1e-3 and config["seeds"] == "1"


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "1+2=", "hint": ""}\n\xff\xfe\n', r":2: not UTF-8"),
    (b'{"prompt": "1+2=", "hint": ""}\n\n["1+2=", ""]\n', r":3: expected a JSON object"),
    (b'{"prompt": "1+2=", "hint": "abc"}\n', r":1: characters outside the tokenizer's vocabulary: 'abc'"),
    (b'{"prompt": "' + b"1" * 40 + b'", "hint": ""}\n', r":1: prompt \+ hint is 41 tokens; with --max-new-tokens 4"),
    (b'{"prompt": "' + b"1" * 20000 + b'", "hint": ""}\n', r":1: prompt \+ hint is 20000 characters"),
    (b'{"prompt": "1=", "hint": "", "answer": [1]}\n', r":1: field 'answer' must be a string or a number"),
    (b'{"prompt": "", "hint": "1"}\n', r":1: field 'prompt' is empty")])
def test_bad_data_lines_name_the_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_jsonl(str(path), "--data", example_checker(tokenizer, max_positions=32, max_new_tokens=4))


def test_good_data_loads(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+2=", "hint": "1+2+0=03;", "answer": 30}\n\n{"prompt": "3+4=", "hint": ""}\n')
    examples = load_jsonl(str(path), "--data", example_checker(tokenizer, max_positions=32, max_new_tokens=4))
    assert [(e.prompt, e.answer) for e in examples] == [("1+2=", "30"), ("3+4=", None)]
