"""The training loop: one step moves only the student; a killed and resumed run equals an uninterrupted one."""

import copy
import json

import pytest
import torch

from dopd_trainer import train
from dopd_trainer.models import tiny_llama
from dopd_trainer.task import ALPHABET, addition_splits, exact_match
from dopd_trainer.tokenizer import build_char_tokenizer
from dopd_trainer.train import TIMING_FIELDS, TrainConfig, batch_indices, train_arm


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_char_tokenizer(ALPHABET)
    train_set, eval_set = addition_splits(1, 60, 12, seed=0)
    student = tiny_llama(tokenizer, hidden=16, layers=1, heads=2, seed=1)
    teacher = tiny_llama(tokenizer, hidden=24, layers=1, heads=2, seed=2)  # hidden sizes may differ
    return tokenizer, train_set, eval_set, student, teacher


def tiny_config(**changes):
    base = dict(steps=4, prompts_per_step=3, samples_per_prompt=2, max_new_tokens=4, lr=1e-2, warmup_steps=1,
                eval_every=2, save_every=2, seed=3, backend="torch")
    return TrainConfig(**{**base, **changes})


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("changes", [dict(arm="dopd"), dict(arm="dopd", anchor="teacher-no-hint"),
                                     dict(arm="dopd", priv_student="ema"),
                                     dict(arm="vanilla-opd", divergence="js", granularity="full"),
                                     dict(arm="tpriv-opd", divergence="reverse_kl", granularity="sampled"),
                                     dict(arm="self-distill", priv_student="frozen")])
def test_one_step_changes_the_student_and_not_the_teacher(setup, tmp_path, changes):
    tokenizer, train_set, eval_set, student0, teacher = setup
    student = copy.deepcopy(student0)
    teacher_before, student_before = params(teacher), params(student)
    records = train_arm(tmp_path, tiny_config(steps=1, **changes), student, teacher, tokenizer, train_set, eval_set,
                        exact_match, show_progress=False)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "lm_head.weight" in changed and any("layers.0" in k for k in changed)
    step = [r for r in records if r["event"] == "train"][0]
    for key in ("loss", "entropy", "tokens_per_s", "peak_mem_mb", "sample_reward"):
        assert key in step
    if changes["arm"] == "dopd":
        assert abs(sum(step["regime"].values()) - 1) < 1e-9 and step["adv_gap"] >= 0
        assert set(step["regime_loss"]) <= set(step["regime"]) and all(v >= 0 for v in step["regime_loss"].values())
    evals = [r for r in records if r["event"] == "eval"]
    assert all(0 <= r["priv_accuracy_with_hint"] <= 1 for r in evals)


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_resume_after_a_kill_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    tokenizer, train_set, eval_set, student0, teacher = setup
    cfg = tiny_config(steps=6, priv_student="ema")  # the EMA copy must be restored too
    full = copy.deepcopy(student0)
    expected = train_arm(tmp_path / "full", cfg, full, teacher, tokenizer, train_set, eval_set, exact_match, False)

    # Kill the run while it logs step 3: the newest checkpoint is step 2 and step 3 is half-logged.
    real_write = train.MetricsLog.write

    def write_then_die(self, record):
        real_write(self, record)
        if record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.MetricsLog, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_arm(tmp_path / "cut", cfg, copy.deepcopy(student0), teacher, tokenizer, train_set, eval_set,
                  exact_match, False)
    monkeypatch.setattr(train.MetricsLog, "write", real_write)
    torch.manual_seed(12345)  # whatever happened in between must not matter
    resumed = copy.deepcopy(student0)
    got = train_arm(tmp_path / "cut", cfg, resumed, teacher, tokenizer, train_set, eval_set, exact_match, False)

    assert deterministic(got) == deterministic(expected)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1


def test_data_order_is_a_permutation_per_epoch_and_a_function_of_the_step():
    n, batch = 10, 3
    seen = [i for step in range(10) for i in batch_indices(step, batch, n, seed=7)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]
    assert batch_indices(4, batch, n, seed=7) == seen[12:15]


@pytest.mark.parametrize("field, value", [("arms", "grpo"), ("priv-student", "old"), ("divergence", "kl"), ("granularity", "all"),
                                          ("anchor", "self")])
def test_bad_names_are_value_errors_naming_the_option(field, value):
    name = {"arms": "arm", "priv-student": "priv_student"}.get(field, field)
    with pytest.raises(ValueError, match=f"--{field}"):
        TrainConfig(**{name: value})
