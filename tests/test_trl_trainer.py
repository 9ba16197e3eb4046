"""`DOPDTrainer` (dopd_kernels.integrations.trl) on TRL's `DistillationTrainer`, with tiny random models on CPU.

What is checked: training runs and moves the student only; each method sends the right contexts to the right
model, with identical completion tokens in every context; one step's loss and gradients equal the library
called by hand (float64 reference) on the same batch; `method="vanilla-opd"` equals TRL's own loss and
entropy; two-process DDP (gloo) equals one process on the same global batch; a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs the 'trl' extra (pip install 'dopd-kernels[trl]')")

sys.path.insert(0, os.path.dirname(__file__))
import trl_helpers as th  # noqa: E402


import dopd_kernels as dk  # noqa: E402
from dopd_kernels import hf  # noqa: E402
from dopd_kernels.integrations.trl import METHODS, DOPDTrainer, DOPDTrainerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NEEDS_CONTEXT = {"dopd": True, "vanilla-opd": False, "tpriv-opd": True, "self-distill": True}
TEACHER_READS_CONTEXT = {"dopd": True, "vanilla-opd": False, "tpriv-opd": True}
GREEDY = {"generation_kwargs": {"do_sample": False}}
# (student, teacher) families: plain heads, and heads with transforms (Cohere's logit scale, Gemma 2's soft-cap)
FAMILIES = {"plain": ("llama", "qwen2"), "transforms": ("cohere", "gemma2")}


@pytest.fixture(scope="module")
def tok():
    return th.char_tokenizer()


def make_trainer(tok, tmp_path, method="dopd", conversational=True, n=8, student=None, teacher=None,
                 families="plain", **overrides):
    student = student if student is not None else th.tiny_student(tok, FAMILIES[families][0])
    if teacher is None and method != "self-distill":
        teacher = th.tiny_teacher(tok, FAMILIES[families][1])
    args = th.config(tmp_path, method=method, **overrides)
    return DOPDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                       train_dataset=th.dataset(n, conversational=conversational))


def first_inputs(trainer):
    """The first micro-batch as the training loop sees it: generated, tokenized, privileged prompts added."""
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def spy_hidden(trainer):
    """Record every (model, input_ids, hidden) the trainer's backbone calls see."""
    calls = []
    original = trainer._get_last_hidden_state

    def spy(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        out = original(model, input_ids, attention_mask, logits_to_keep, **kwargs)
        calls.append((model, input_ids.clone(), out))
        return out

    trainer._get_last_hidden_state = spy
    return calls


def student_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_student_not_teacher(tok, tmp_path, method):
    trainer = make_trainer(tok, tmp_path, method=method)
    before = copy.deepcopy(trainer.model.state_dict())
    teacher_before = copy.deepcopy(trainer.teacher_model.state_dict()) if trainer.teacher_model else {}
    trainer.train()
    assert trainer.state.global_step == 2
    moved = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in moved and any("layers.0" in k for k in moved)
    if trainer.teacher_model is not None:
        for k, v in trainer.teacher_model.state_dict().items():
            assert torch.equal(v, teacher_before[k]), k
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(0.0 < h["entropy"] <= float(torch.log(torch.tensor(float(len(tok))))) + 1e-6 for h in logs)
    if method == "dopd":
        for h in logs:
            fractions = [h[f"dopd/regime_{r}"] for r in ("lh", "ll", "ht", "hs")]
            assert abs(sum(fractions) - 1.0) < 1e-9
            assert h["dopd/threshold_adv_gap"] > 0 and h["dopd/mean_adv_gap"] > 0
    else:
        assert not any(k.startswith("dopd/") for k in logs[0])


def test_gradient_checkpointing_and_eval(tok, tmp_path):
    """TRL's default activation checkpointing (the privileged student's no-grad forward runs inside the student's
    checkpointed forward) gives the same gradients; evaluation logs `eval_` metrics without a normalizer."""
    grads = []
    for checkpointing in (False, True):
        trainer = make_trainer(tok, tmp_path, gradient_checkpointing=checkpointing, **GREEDY)
        if checkpointing:  # Trainer.train() would turn it on; compute_loss is called directly here
            trainer.model.gradient_checkpointing_enable()
            assert trainer.model.model.gradient_checkpointing
        trainer.compute_loss(trainer.model, first_inputs(trainer)).backward()
        grads.append(student_grads(trainer.model))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    trainer = make_trainer(tok, tmp_path, eval_strategy="no", per_device_eval_batch_size=4)
    metrics = trainer.evaluate(th.dataset(4, conversational=True, seed=1))
    assert metrics["eval_loss"] > 0 and "eval_dopd/regime_ht" in metrics and "eval_entropy" in metrics


def test_peft_lora_student(tok, tmp_path):
    """A LoRA student (TRL's `peft_config`): the frozen base weights and head stay put, the adapters train, and the
    fused loss runs with a head that needs no gradient."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = DOPDTrainer(model=th.tiny_student(tok), teacher_model=th.tiny_teacher(tok), args=th.config(tmp_path),
                          processing_class=tok, train_dataset=th.dataset(8, conversational=True), peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert not trainer.model.get_output_embeddings().weight.requires_grad
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(p, after[n])}
    assert changed and all("lora_" in n for n in changed)


# -- contexts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_sends_the_right_contexts(tok, tmp_path, method, conversational):
    trainer = make_trainer(tok, tmp_path, method=method, conversational=conversational)
    student, teacher = trainer.model, trainer.teacher_model
    inputs = first_inputs(trainer)
    assert ("privileged_prompt_ids" in inputs) == NEEDS_CONTEXT[method]
    calls = spy_hidden(trainer)
    trainer.compute_loss(trainer.model, inputs)

    context_ids = th.context_token_ids(tok)
    completion, mask = inputs["completion_ids"], inputs["completion_mask"].bool()
    width = completion.shape[1]
    seen = {"student": [], "priv_student": [], "teacher": []}
    for model, ids, hidden in calls:
        prompt_part = ids[:, :-width]  # a random student may also sample context tokens in its completion
        reads_context = bool(torch.isin(prompt_part, torch.tensor(sorted(context_ids))).any())
        if model is teacher:
            seen["teacher"].append(reads_context)
        else:
            assert model is student
            seen["priv_student" if reads_context else "student"].append(reads_context)
            assert hidden.requires_grad == (not reads_context)  # the privileged student is stop-gradient
        # every context scores the same completion token ids, right after the chat template's assistant opener
        assert torch.equal(ids[:, -width:][mask], completion[mask])
        if conversational:
            assert (ids[:, -width - 1] == tok.convert_tokens_to_ids("<|assistant|>")).all()
        assert hidden.shape[1] == width
    assert len(seen["student"]) == 1
    assert len(seen["priv_student"]) == (1 if method in ("dopd", "self-distill") else 0)
    if method == "self-distill":
        assert seen["teacher"] == []
    else:
        assert seen["teacher"] == [TEACHER_READS_CONTEXT[method]]  # a vanilla-OPD teacher never sees a context token


def test_privileged_prompt_template_and_override(tok, tmp_path):
    args = th.config(tmp_path, privileged_prompt_template="[{privileged_context}] {prompt}")
    trainer = DOPDTrainer(model=th.tiny_student(tok), teacher_model=th.tiny_teacher(tok), args=args,
                          processing_class=tok, train_dataset=th.dataset(4, conversational=True))
    system = {"role": "system", "content": "be brief"}
    assert trainer.privileged_prompt([system, {"role": "user", "content": "1+1="}], "HINT A") == [
        system, {"role": "user", "content": "[HINT A] 1+1="}]
    assert trainer.privileged_prompt("1+1=", [{"role": "user", "content": "HINT"}]) == "[HINT] 1+1="
    with pytest.raises(ValueError, match="user turn"):
        trainer.privileged_prompt([{"role": "assistant", "content": "x"}], "HINT")

    class SystemContext(DOPDTrainer):  # the documented override: the context as a system turn
        def privileged_prompt(self, prompt, privileged_context):
            return [{"role": "system", "content": privileged_context}, *prompt]

    trainer = SystemContext(model=th.tiny_student(tok), teacher_model=th.tiny_teacher(tok), args=th.config(tmp_path),
                            processing_class=tok, train_dataset=th.dataset(4, conversational=True))
    inputs = first_inputs(trainer)
    system_id = tok.convert_tokens_to_ids("<|system|>")
    assert (inputs["privileged_prompt_ids"] == system_id).any(dim=1).all()
    assert not (inputs["prompt_ids"] == system_id).any()


def test_bad_configuration_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="method"):
        th.config(tmp_path, method="dpo")
    with pytest.raises(ValueError, match="privileged_context"):
        th.config(tmp_path, privileged_prompt_template="{prompt} only")
    with pytest.raises(ValueError, match="divergence"):
        th.config(tmp_path, divergence="tv")
    with pytest.raises(ValueError, match="js_beta|beta"):
        th.config(tmp_path, method="vanilla-opd", divergence="js", beta=1.0)
    with pytest.raises(ValueError, match="trim"):
        th.config(tmp_path, trim=1.5)
    with pytest.raises(ValueError, match="teacher_model"):
        DOPDTrainer(model=th.tiny_student(tok), args=th.config(tmp_path), processing_class=tok,
                    train_dataset=th.dataset(4))
    trainer = DOPDTrainer(model=th.tiny_student(tok), teacher_model=th.tiny_teacher(tok), args=th.config(tmp_path),
                          processing_class=tok, train_dataset=th.dataset(4).remove_columns("privileged_context"))
    with pytest.raises(ValueError, match="privileged_context"):
        first_inputs(trainer)


def test_config_is_a_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DOPDTrainerConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "False", "--method", "tpriv-opd", "--loss_top_k", "16", "--granularity", "topk",
         "--beta", "0.5", "--trim", "0.1", "--privileged_prompt_template", "{privileged_context}|{prompt}"])
    assert (args.method, args.loss_top_k, args.granularity, args.trim) == ("tpriv-opd", 16, "topk", 0.1)
    cfg = args.loss_config()
    assert (cfg.divergence, cfg.granularity, cfg.top_k, cfg.js_beta) == ("js", "topk", 16, 0.5)


# -- the loss equals the library by hand ---------------------------------------------------------


def backbone_hidden(model, prompt_ids, prompt_mask, inputs):
    """[B, C, H] hidden states predicting the completion tokens, straight from the model's backbone."""
    ids = torch.cat([prompt_ids, inputs["completion_ids"]], 1)
    mask = torch.cat([prompt_mask, inputs["completion_mask"]], 1)
    hidden = hf.final_hidden_states(model, ids, mask)
    p, c = prompt_ids.shape[1], inputs["completion_ids"].shape[1]
    return hidden[:, p - 1:p + c - 1]


@pytest.mark.parametrize("families", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_one_step_equals_library_by_hand(tok, tmp_path, method, families):
    """The trainer's loss and student gradients on one batch = `dopd_kernels.hf` + the fused loss called by hand
    (float64 reference backend) on the same batch, head transforms included."""
    trainer = make_trainer(tok, tmp_path, method=method, loss_top_k=5, beta=0.3, temperature=0.8,
                           families=families)
    student, teacher = trainer.model, trainer.teacher_model
    inputs = first_inputs(trainer)
    loss = trainer.compute_loss(student, inputs)
    loss.backward()
    grads = student_grads(student)
    student.zero_grad()

    tokens = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    normalizer = float(inputs["num_items_in_batch"])
    plain = inputs["prompt_ids"], inputs["prompt_mask"]
    priv = (inputs.get("privileged_prompt_ids"), inputs.get("privileged_prompt_mask"))
    h_s = backbone_hidden(student, *plain, inputs)
    with torch.no_grad():
        if method != "self-distill":
            h_t = backbone_hidden(teacher, *(plain if method == "vanilla-opd" else priv), inputs)
        if method in ("dopd", "self-distill"):
            h_p = backbone_hidden(student, *priv, inputs)
    head_s = hf.lm_head(student)
    head_t = hf.lm_head(teacher) if teacher is not None else None
    if families == "transforms":
        assert head_s.scale != 1.0 and (head_t is None or head_t.softcap is not None)
    if method == "dopd":
        cfg = dk.DOPDConfig(top_k=5, temperature=0.8)
        expected = dk.fused_linear_dopd_loss(h_s, head_s, h_t, head_t, h_p, tokens, config=cfg,
                                             normalizer=normalizer, backend="reference").loss
    else:
        target_h, target_w = (h_p, head_s) if method == "self-distill" else (h_t, head_t)
        expected = dk.fused_linear_opd_loss(h_s, head_s, target_h, target_w, tokens, divergence="js", js_beta=0.7,
                                            temperature=0.8, normalizer=normalizer, backend="reference").loss
    expected.backward()
    # atol: fp32 rounding of per-token terms of size log V (~4.4 nats), which matters where the divergence is tiny
    # (the self-distillation target is the same random model with a few more prompt tokens)
    torch.testing.assert_close(loss.detach().double(), expected.detach().double(), rtol=1e-5, atol=5e-7)
    for name, g in student_grads(student).items():
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(grads[name] / scale, g / scale, rtol=1e-5, atol=2e-5, msg=name)
    assert set(grads) == set(student_grads(student))


# -- drop-in for TRL's vanilla OPD ----------------------------------------------------------------


@pytest.mark.parametrize("families,beta,temperature", [("plain", 0.0, 1.0), ("plain", 0.5, 0.7), ("plain", 1.0, 1.3),
                                                      ("transforms", 0.2, 1.0), ("transforms", 1.0, 0.8)])
def test_vanilla_opd_is_trl_loss(tok, tmp_path, families, beta, temperature):
    """With method="vanilla-opd", TRL's `DistillationTrainer.compute_loss` (its `_chunked_divergence_loss`) and
    ours give the same loss, student gradients and logged entropy on the same batch: TRL's beta convention,
    temperature, head transforms and `sum / num_items_in_batch` reduction."""
    from trl import DistillationTrainer

    student, teacher = th.tiny_student(tok, FAMILIES[families][0]), th.tiny_teacher(tok, FAMILIES[families][1])
    ours = make_trainer(tok, tmp_path, method="vanilla-opd", student=student, teacher=teacher, beta=beta,
                        temperature=temperature)
    trl_student = copy.deepcopy(student)
    theirs = DistillationTrainer(model=trl_student, teacher_model=teacher, args=ours.args, processing_class=tok,
                                 train_dataset=th.dataset(8, conversational=True))
    inputs = first_inputs(ours)
    theirs.model.train()
    results = []
    for trainer in (ours, theirs):
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), student_grads(trainer.model), trainer._metrics["train"]["entropy"][-1]))
    (loss_a, grads_a, ent_a), (loss_b, grads_b, ent_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    assert abs(ent_a - ent_b) <= 1e-5 * abs(ent_b)
    for name, g in grads_b.items():
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(grads_a[name] / scale, g / scale, rtol=1e-5, atol=2e-5, msg=name)


# -- distributed and checkpoints -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_WORKER = r"""
import os, sys, torch
sys.path.insert(0, {tests!r})
import trl_helpers as th
from dopd_kernels.integrations.trl import DOPDTrainer
tok = th.char_tokenizer()
args = th.config({out!r}, per_device_train_batch_size={per_device}, max_steps=1, method="dopd", trim=0.25,
                 optim="sgd", generation_kwargs={{"do_sample": False}})
trainer = DOPDTrainer(model=th.tiny_student(tok), teacher_model=th.tiny_teacher(tok), args=args,
                      processing_class=tok, train_dataset=th.dataset(8, conversational=True))
trainer.train()
if trainer.accelerator.is_main_process:
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    torch.save({{"state": trainer.model.state_dict(), "log": log}}, {result!r})
# A clean shutdown: a rank that exits with its gloo process group alive may abort in the group's destructor
# ("terminate called without an active exception", exit code -6: seen once in ~10 runs of this test).
trainer.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def _run_worker(tmp_path, name, per_device, world):
    result = tmp_path / f"{name}.pt"
    script = tmp_path / f"{name}.py"
    script.write_text(DDP_WORKER.format(tests=os.path.dirname(__file__), out=str(tmp_path / name),
                                        per_device=per_device, result=str(result)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if world == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={_free_port()}", str(script)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun, gloo: two processes of 2 rows each equal one process of 4 rows (greedy completions, so both runs
    score the same tokens): DDP's gradient average with TRL's per-process normalizer, and routing thresholds over
    the data-parallel group, make the step independent of the split. SGD, so the weights after the step compare the
    gradients (Adam's first step divides each gradient by its own magnitude, amplifying rounding in tiny ones)."""
    one = _run_worker(tmp_path, "one", per_device=4, world=1)
    two = _run_worker(tmp_path, "two", per_device=2, world=2)
    for key in ("loss", "dopd/threshold_adv_gap", "dopd/threshold_q_teacher", "dopd/regime_ht", "entropy"):
        assert abs(one["log"][key] - two["log"][key]) <= 1e-5 * max(1.0, abs(one["log"][key])), key
    for name, v in one["state"].items():
        torch.testing.assert_close(two["state"][name], v, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_checkpoint_continues_the_run(tok, tmp_path):
    """Three steps straight through (a checkpoint after each), then a fresh trainer resumed from checkpoint-1: it
    replays steps 2 and 3 (weights, optimizer, scheduler and data order restored) to the same weights."""
    def trainer(out):
        return make_trainer(tok, out, method="dopd", max_steps=3, save_strategy="steps", save_steps=1, n=12,
                            student=th.tiny_student(tok), teacher=th.tiny_teacher(tok), **GREEDY)

    straight = trainer(tmp_path / "straight")
    straight.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    assert resumed.state.global_step == 3
    after_one = th.tiny_student(tok).from_pretrained(tmp_path / "straight" / "checkpoint-1").state_dict()
    final = straight.model.state_dict()
    assert any(not torch.equal(after_one[k], v) for k, v in final.items())  # steps 2 and 3 did move the weights
    for name, v in final.items():
        torch.testing.assert_close(resumed.model.state_dict()[name], v, rtol=1e-6, atol=1e-7, msg=name)


def test_example_script_runs(tmp_path):
    """examples/trl_dopd.py as a user runs it (flags through HfArgumentParser); the torch loss backend, so the test
    does not wait for the C++ extension's first JIT build."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "trl_dopd.py"), "--output_dir", str(tmp_path),
                           "--loss_backend", "torch"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dopd/regime_ht" in proc.stdout
