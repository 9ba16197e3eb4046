"""The comparison's arms (issue 13): each arm's models read the contexts the paper gives them, the
frozen and EMA privileged students hold still within a step, and the table is computed from the
runs' own metrics files."""

import copy
import json
import statistics

import pytest
import torch

from dopd_trainer import report, train
from dopd_trainer.contexts import build_contexts
from dopd_trainer.models import HiddenAndHead, tiny_llama
from dopd_trainer.rollout import encode_prompts
from dopd_trainer.task import ALPHABET, HINT_FORMS, addition_splits, exact_match, make_addition_example
from dopd_trainer.tokenizer import build_char_tokenizer
from dopd_trainer.train import ARMS, TrainConfig, cosine_schedule, optimizer_step, privileged_student


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_char_tokenizer(ALPHABET)
    examples = addition_splits(1, 6, 0, seed=0)[0]
    prompts, hints = encode_prompts(tokenizer, examples)
    responses = [tokenizer(e.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for e in examples]
    contexts = build_contexts(prompts, hints, responses, tokenizer.pad_token_id)
    student = tiny_llama(tokenizer, hidden=16, layers=1, heads=2, seed=1)
    teacher = tiny_llama(tokenizer, hidden=24, layers=1, heads=2, seed=2)
    # Tokens that occur only in hints: the order markers and the separator.
    hint_only = set(tokenizer.convert_tokens_to_ids(["|", "f", "r"]))
    return tokenizer, contexts, student, teacher, hint_only


def config(**changes):
    return TrainConfig(**{**dict(lr=1e-2, warmup_steps=1, steps=4, top_k=8, backend="torch"), **changes})


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("priv_student", ["live", "frozen"])
def test_each_arm_sends_each_model_its_context(setup, monkeypatch, arm, priv_student):
    tokenizer, contexts, student0, teacher, hint_only = setup
    student = copy.deepcopy(student0)
    cfg = config(arm=arm, priv_student=priv_student)
    priv = privileged_student(cfg, student)
    seen = []  # (model, input_ids, grad enabled) of every forward of the loss
    real = train.hidden_states

    def recording(model, input_ids, attention_mask):
        seen.append((model, input_ids, torch.is_grad_enabled()))
        return real(model, input_ids, attention_mask)

    monkeypatch.setattr(train, "hidden_states", recording)
    forward = HiddenAndHead(student)
    monkeypatch.setattr(forward, "forward", lambda ids, mask: (seen.append((student, ids, True)),
                                                               HiddenAndHead.forward(forward, ids, mask))[1])
    train.distillation_loss(cfg, student, forward, teacher, contexts, priv=priv)
    s_ids, p_ids = contexts.student.input_ids, contexts.privileged.input_ids

    def reads(model, ids, grad=False):
        return any(m is model and torch.equal(i, ids) and g == grad for m, i, g in seen)

    assert reads(student, s_ids, grad=True)  # the trained student reads x,y
    expected = {"vanilla-opd": [(teacher, s_ids)], "tpriv-opd": [(teacher, p_ids)], "self-distill": [(priv, p_ids)],
                "dopd": [(teacher, p_ids), (priv, p_ids)]}[arm]
    assert all(reads(model, ids) for model, ids in expected)
    assert len(seen) == 1 + len(expected)
    teacher_inputs = [i for m, i, _ in seen if m is teacher]
    if arm == "vanilla-opd":  # a vanilla-OPD teacher never sees a hint token
        assert teacher_inputs and not any(set(i.flatten().tolist()) & hint_only for i in teacher_inputs)
    if arm == "self-distill":
        assert not teacher_inputs
    assert set(p_ids.flatten().tolist()) & hint_only  # (the privileged context does carry hint tokens)


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_frozen_and_ema_privileged_students_hold_still_within_a_step(setup, mode):
    _, contexts, student0, teacher, _ = setup
    student = copy.deepcopy(student0)
    cfg = config(arm="dopd", priv_student=mode, ema_decay=0.9)
    priv = privileged_student(cfg, student)
    assert priv is not student and not any(p.requires_grad for p in priv.parameters())
    before = {k: v.clone() for k, v in priv.state_dict().items()}
    during = []
    priv.base_model.register_forward_pre_hook(lambda *_: during.append(
        all(torch.equal(v, before[k]) for k, v in priv.state_dict().items())))
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    for _ in range(2):
        before = {k: v.clone() for k, v in priv.state_dict().items()}
        student_before = {k: v.clone() for k, v in student.state_dict().items()}
        optimizer_step(cfg, student, HiddenAndHead(student), teacher, contexts, optimizer,
                       cosine_schedule(optimizer, 1, 4), train.Workers(), contexts.student.tokens.shape[0], priv)
        assert during and all(during)  # every forward of the privileged stream saw the weights of the step's start
        moved = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
        assert moved
        for k, v in priv.state_dict().items():
            expected = before[k] if mode == "frozen" else before[k].lerp(student.state_dict()[k], 0.1)
            torch.testing.assert_close(v, expected, rtol=0, atol=1e-7, msg=k)


def test_live_privileged_student_is_the_student(setup):
    _, _, student, _, _ = setup
    assert privileged_student(config(priv_student="live"), student) is student


def test_hint_forms_share_the_order_and_differ_in_what_they_reveal():
    for order in ("f", "r"):
        hints = {form: make_addition_example(58, 75, 2, order, form) for form in HINT_FORMS}
        assert {e.answer for e in hints.values()} == {"133" if order == "f" else "331"}
        assert all(e.hint.startswith(f"{order}|") for e in hints.values())
        assert hints["cues"].hint == f"{order}|11;"  # carries only: no digit of the answer, no trace
        assert hints["working"].hint == f"{order}|8+5+0=13,5+7+1=13;"
        assert hints["answer"].hint == f"{order}|{hints['answer'].answer};"
    e = make_addition_example(58, 75, 2, "f")
    assert exact_match("133", e) == exact_match("331", e) == 1.0 and exact_match("313", e) == 0.0


def test_orders_are_balanced_and_independent_of_the_prompt():
    train_set, eval_set = addition_splits(2, 2000, 500, seed=0)
    firsts = [e.hint[0] for e in train_set + eval_set]
    assert 0.45 < firsts.count("f") / len(firsts) < 0.55
    assert {e.prompt for e in train_set}.isdisjoint(e.prompt for e in eval_set)


def write_metrics(path, accuracies, entropies, regimes=None):
    path.mkdir(parents=True)
    lines = [{"event": "eval", "step": 0, "eval_accuracy": 0.1, "eval_accuracy_with_hint": 0.2,
              "priv_accuracy_with_hint": 0.2}]
    for step, entropy in enumerate(entropies, 1):
        record = {"event": "train", "step": step, "entropy": entropy}
        if regimes:
            record.update(regime=regimes, regime_loss={"LH": 0.5, "HT": 2.0})
        lines.append(record)
    lines.append({"event": "eval", "step": len(entropies), "eval_accuracy": accuracies[0],
                  "eval_accuracy_with_hint": accuracies[1], "priv_accuracy_with_hint": accuracies[2]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_table_is_computed_from_the_metrics_files(tmp_path):
    (tmp_path / "references.json").write_text(json.dumps({
        "eval_examples": 500, "student_without_hint": 0.2, "student_with_hint": 0.3, "teacher_without_hint": 0.6,
        "teacher_with_hint": 0.9}))
    finals = {"vanilla-opd": [0.50, 0.54, 0.58], "dopd": [0.61, 0.63, 0.68]}
    mix = {"LH": 0.5, "LL": 0.2, "HT": 0.2, "HS": 0.1}
    for arm, accs in finals.items():
        for seed, acc in zip((1, 2, 3), accs):
            write_metrics(tmp_path / f"seed-{seed}" / arm, (acc, 0.7, 0.75), [1.0] * 10 + [0.2 * seed] * 10,
                          mix if arm == "dopd" else None)
    summary = report.summarize(tmp_path, ["vanilla-opd", "dopd"], [1, 2, 3])
    table = report.format_table(summary)
    for arm, accs in finals.items():
        mean, sd = statistics.fmean(accs), statistics.stdev(accs)
        assert summary["arms"][arm]["accuracy"]["mean"] == pytest.approx(mean)
        assert f"| {100 * mean:.1f} ± {100 * sd:.1f} (n=3) |" in table
    assert f"| {100 * (statistics.fmean(finals['dopd']) - statistics.fmean(finals['vanilla-opd'])):+.1f} |" in table
    assert summary["arms"]["dopd"]["entropy_end"]["mean"] == pytest.approx(0.4)  # seeds end at 0.2, 0.4, 0.6
    assert "| HT | teacher, JS ×1 | 20.0% | 2.0000 |" in table and "| LL | sg[student], top-K RKL ×0.3 | 20.0% | – |" in table
    assert "| teacher with hint | – | 90.0" in table
    # Change one file and the table follows it.
    write_metrics(tmp_path / "seed-9" / "dopd", (0.0, 0.0, 0.0), [1.0])
    assert report.summarize(tmp_path, ["dopd"], [9])["arms"]["dopd"]["accuracy"]["mean"] == 0.0
    report.plot_run(tmp_path / "report.png", tmp_path, summary)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # Run folders written separately (one per seed) pool into the same table.
    (tmp_path / "seed-9").rename(tmp_path / "elsewhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / "references.json").write_text((tmp_path / "references.json").read_text())
    (tmp_path / "seed-3").rename(other / "seed-3")
    assert report.summarize([tmp_path, other], ["vanilla-opd", "dopd"]) == {**summary, "run_dir": f"{tmp_path}, {other}"}


def test_the_hint_form_comparison_is_computed_from_each_forms_metrics(tmp_path, capsys):
    finals = {"cues": {"vanilla-opd": [0.50, 0.54], "dopd": [0.30, 0.36]},
              "working": {"vanilla-opd": [0.40, 0.42], "dopd": [0.10, 0.20]}}
    folders = []
    for form, arms in finals.items():
        run_dir = tmp_path / form
        for arm, accs in arms.items():
            for seed, acc in zip((1, 2), accs):
                write_metrics(run_dir / f"seed-{seed}" / arm, (acc, 0.7, 0.25 if form == "cues" else 0.05), [1.0] * 4)
        (run_dir / "config.json").write_text(json.dumps({"hint_form": form, "lr": 1e-3}))
        (run_dir / "references.json").write_text(json.dumps({
            "eval_examples": 500, "student_without_hint": 0.1, "student_with_hint": 0.4 if form == "cues" else 0.6,
            "teacher_without_hint": 0.9, "teacher_with_hint": 0.95}))
        folders.append(run_dir)
    assert report.main([*map(str, folders), "--by", "hint_form", "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert table in capsys.readouterr().out
    assert ("| cues | 1, 2 | 4 | 10.0 / 40.0 | 90.0 / 95.0 | 52.0 ± 2.8 (n=2) | 33.0 ± 4.2 (n=2) | DOPD -19.0 | "
            "25.0 ± 0.0 (n=2) |") in table
    assert ("| working | 1, 2 | 4 | 10.0 / 60.0 | 90.0 / 95.0 | 41.0 ± 1.4 (n=2) | 15.0 ± 7.1 (n=2) | DOPD -26.0 | "
            "5.0 ± 0.0 (n=2) |") in table
    assert "--hint-form working (seeds 1, 2), accuracy without the hint (%): Vanilla OPD 40.0 / 42.0; DOPD 10.0 / 20.0." in table
    # Folders with the same value pool their seeds; a folder without a configuration is refused by name.
    assert list(report.group_by_config(folders + [folders[0]], "hint_form")) == ["cues", "working"]
    (folders[1] / "config.json").unlink()
    with pytest.raises(ValueError, match="working/config.json"):
        report.group_by_config(folders, "hint_form")
