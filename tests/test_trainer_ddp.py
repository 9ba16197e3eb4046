"""The trainer data-parallel over two gloo processes on CPU (what `torchrun --nproc_per_node 2` sets up).

One spawn runs three phases in each worker: (1) one optimizer step on a fixed global batch split
unevenly over the ranks, saved for comparison with a single-process step on the whole batch;
(2) `dopd-train` end to end under the torchrun environment, recording each rank's routing thresholds
and final weights; (3) `--resume` after losing the DOPD arm's last checkpoint (as if killed before
writing it), which must redo that step exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dopd_trainer import cli, train
from dopd_trainer.contexts import build_contexts
from dopd_trainer.distributed import Workers
from dopd_trainer.models import HiddenAndHead, tiny_llama
from dopd_trainer.rollout import encode_prompts
from dopd_trainer.task import ALPHABET, addition_splits
from dopd_trainer.tokenizer import build_char_tokenizer
from dopd_trainer.train import TrainConfig, cosine_schedule, distillation_loss, optimizer_step

from test_trainer_cli import TINY, strip_timing

WORLD = 2
PROMPTS, SAMPLES = 5, 2  # 5 prompts: 3 on rank 0, 2 on rank 1


@pytest.fixture(autouse=True, scope="module")
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def step_setup(workers: Workers):
    """Identical tiny models and this rank's contexts of a fixed global batch (every response is
    the answer or its reverse, then EOS)."""
    tokenizer = build_char_tokenizer(ALPHABET)
    examples = workers.shard(addition_splits(1, 60, 12, seed=0)[0][:PROMPTS])
    student = tiny_llama(tokenizer, hidden=16, layers=1, heads=2, seed=1)
    teacher = tiny_llama(tokenizer, hidden=24, layers=1, heads=2, seed=2)
    prompts, hints = encode_prompts(tokenizer, examples)
    answers = [tokenizer(e.answer, add_special_tokens=False).input_ids for e in examples]
    responses = [r + [tokenizer.eos_token_id] for a in answers for r in (a, a[::-1])]
    contexts = build_contexts([x for x in prompts for _ in range(SAMPLES)], [p for p in hints for _ in range(SAMPLES)],
                              responses, tokenizer.pad_token_id)
    return student, teacher, contexts


def step_config() -> TrainConfig:
    return TrainConfig(arm="dopd", lr=1e-2, warmup_steps=1, steps=4, top_k=8, backend="torch")


def one_step(workers: Workers):
    """Weights after one optimizer step on this rank's share of the batch, and the step's logs."""
    student, teacher, contexts = step_setup(workers)
    cfg = step_config()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.steps)
    logs = optimizer_step(cfg, student, workers.wrap(HiddenAndHead(student)), teacher, contexts, optimizer,
                          scheduler, workers, PROMPTS * SAMPLES)
    return student.state_dict(), logs


def worker(rank: int, step_port: int, run_port: int, resume_port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{step_port}", rank=rank, world_size=WORLD)
    torch.save(one_step(Workers(rank, WORLD)), os.path.join(root, f"step-{rank}.pt"))
    Workers(rank, WORLD).stop()

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(run_port))
    thresholds, finals = [], {}
    real_loss, real_arm = train.distillation_loss, cli.train_arm

    def recording_loss(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        if "thresholds" in logs:
            thresholds.append(logs["thresholds"])
        return loss, logs

    def recording_arm(arm_dir, cfg, student, *args):
        records = real_arm(arm_dir, cfg, student, *args)
        finals[cfg.arm_name] = student.state_dict()
        return records

    train.distillation_loss, cli.train_arm = recording_loss, recording_arm
    run_dir = os.path.join(root, "run")
    assert cli.main(TINY + ["--arms", "vanilla-opd,dopd", "--run-dir", run_dir,
                            "--cache-dir", os.path.join(root, "cache")]) == 0
    torch.save((thresholds, finals), os.path.join(root, f"run-{rank}.pt"))

    arm = os.path.join(run_dir, "seed-1", "dopd")
    if rank == 0:  # before joining the process group, so before any rank can look for checkpoints
        shutil.copy(os.path.join(arm, "metrics.jsonl"), os.path.join(root, "metrics-uncut.jsonl"))
        os.rename(os.path.join(arm, "final"), os.path.join(root, "final-uncut"))
        os.remove(os.path.join(arm, "ckpt-000003.pt"))
    # A fresh port: rank 0's store of the previous run may still be listening on the old one.
    os.environ["MASTER_PORT"] = str(resume_port)
    assert cli.main(["--resume", run_dir, "--no-progress"]) == 0


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(*free_ports(3), str(root)), nprocs=WORLD, join=True)
    return root


def test_a_data_parallel_step_equals_a_single_process_step_on_the_global_batch(ddp_run):
    expected_state, expected_logs = one_step(Workers())
    for rank in range(WORLD):
        state, logs = torch.load(ddp_run / f"step-{rank}.pt")
        assert logs["thresholds"] == pytest.approx(expected_logs["thresholds"], rel=1e-9, abs=1e-12)
        for name, value in expected_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The routing group matters: rank 0's tokens alone give other thresholds.
    student, teacher, contexts = step_setup(Workers(0, WORLD))
    _, local = distillation_loss(step_config(), student, HiddenAndHead(student), teacher, contexts)
    assert local["thresholds"] != pytest.approx(expected_logs["thresholds"], rel=1e-6)


def test_dopd_train_under_ddp_writes_rank_0_outputs_with_global_routing_and_equal_weights(ddp_run):
    run_dir = ddp_run / "run"
    for path in ("config.json", "summary.json", "table.md", "report.png", "seed-1/dopd/final/model.safetensors",
                 "seed-1/vanilla-opd/final/model.safetensors", "seed-1/dopd/ckpt-000003.pt"):
        assert (run_dir / path).exists(), path
    records = [json.loads(line) for line in (run_dir / "seed-1" / "dopd" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all(abs(sum(r["regime"].values()) - 1) < 1e-9 for r in train_records)
    (thresholds0, finals0), (thresholds1, finals1) = (torch.load(ddp_run / f"run-{r}.pt") for r in range(WORLD))
    assert len(thresholds0) == 3 and thresholds0 == thresholds1 == [r["thresholds"] for r in train_records]
    for arm in ("dopd", "vanilla-opd"):
        for name, value in finals0[arm].items():
            assert torch.equal(finals1[arm][name], value), (arm, name)


def test_resume_under_ddp_redoes_the_lost_step_exactly(ddp_run):
    """Every rank restores its own sampling RNG from the checkpoint, so step 3 is sampled and applied again
    as it was."""
    arm = ddp_run / "run" / "seed-1" / "dopd"
    assert strip_timing(arm / "metrics.jsonl") == strip_timing(ddp_run / "metrics-uncut.jsonl")
    weights = "model.safetensors"
    assert (arm / "final" / weights).read_bytes() == (ddp_run / "final-uncut" / weights).read_bytes()
