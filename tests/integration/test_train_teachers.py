"""Teacher variants in the training loop: top-k and exact signals, several teachers routed by task,
a served teacher over HTTP (equal to the local one), and a served teacher that dies mid-training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from serving import REPO, ServerProcess

from opdplus.models.tiny import save_tiny_model_dir
from opdplus.tasks.base import register_task
from opdplus.tasks.trivial import ContainsTask
from opdplus.train.checkpoint import latest_checkpoint, verify_checkpoint
from opdplus.train.config import ConfigError
from opdplus.train.loop import train
from opdplus.train.metrics import read_metrics

TEACHER_SHAPE = ["teacher.tiny.hidden_size=32", "teacher.tiny.intermediate_size=64", "teacher.tiny.num_layers=2"]


class OtherTask(ContainsTask):
    name = "other"


register_task("other", OtherTask)


def first_step(run_dir: Path) -> dict:
    return read_metrics(run_dir)[0]


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("signal", ["topk", "exact"])
def test_topk_and_exact_signals_train(tiny_train_config, tmp_path, signal, divergence):
    cfg = tiny_train_config(
        tmp_path / "run",
        f"loss.teacher_signal={signal}",
        f"loss.divergence={divergence}",
        "loss.topk=4",
        "loss.gamma=1.0",
    )
    result = train(cfg)
    for m in read_metrics(result.run_dir):
        assert math.isfinite(m["loss/policy"]) and m[f"div/{divergence}_{signal}"] >= 0
    assert m["loss/grad_norm"] > 0


def test_topk_with_k_equal_to_vocab_matches_exact(tiny_train_config, tmp_path, char_tokenizer):
    vocab = len(char_tokenizer)
    values = {}
    for signal in ("exact", "topk"):
        cfg = tiny_train_config(
            tmp_path / signal,
            f"loss.teacher_signal={signal}",
            f"loss.topk={vocab}",
            "loss.divergence=jsd",
            "run.steps=1",
        )
        values[signal] = first_step(train(cfg).run_dir)
    assert values["topk"]["div/jsd_topk"] == pytest.approx(values["exact"]["div/jsd_exact"], rel=1e-4)
    assert values["topk"]["loss/policy"] == pytest.approx(values["exact"]["loss/policy"], rel=1e-4)


def routed(teacher_seed_b: int = 2) -> list[str]:
    shape = "{hidden_size: 32, intermediate_size: 64, num_layers: 2, seed: %d}"
    return [
        f"teachers=[{{task: contains, teacher: {{model: tiny, tiny: {shape % 1}}}}}, "
        f"{{task: other, teacher: {{model: tiny, tiny: {shape % teacher_seed_b}}}}}]",
        "data.tasks=[contains, other]",
    ]


def test_several_teachers_routed_by_task(tiny_train_config, tmp_path):
    result = train(tiny_train_config(tmp_path / "run", *routed()))
    m = first_step(result.run_dir)
    assert m["perf/teacher/contains/rows"] > 0 and m["perf/teacher/other/rows"] > 0
    assert math.isfinite(m["div/contains/reverse_kl"]) and math.isfinite(m["div/other/reverse_kl"])
    assert m["div/contains/reverse_kl"] != m["div/other/reverse_kl"]  # different teachers


def test_task_without_teacher_is_a_config_error(tiny_train_config, tmp_path):
    register_task("contains_x", lambda: type("X", (ContainsTask,), {"name": "x"})())
    cfg = tiny_train_config(tmp_path / "run", *routed(), "data.tasks=[contains, contains_x]")
    with pytest.raises(ConfigError, match="tagged 'x'.*add \\{task: x"):
        train(cfg)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The tiny teacher the `tiny` config builds (same seed and shape), saved to serve it over HTTP."""
    return save_tiny_model_dir(
        tmp_path_factory.mktemp("teacher"), seed=1, hidden_size=32, intermediate_size=64, num_layers=2
    )


def test_served_teacher_trains_like_the_local_one(tiny_train_config, tmp_path, teacher_dir):
    server = ServerProcess(teacher_dir, tmp_path / "server.log")
    server.wait_healthy()
    try:
        http = first_step(
            train(tiny_train_config(tmp_path / "http", f"teacher.url={server.url}", "run.steps=1")).run_dir
        )
    finally:
        server.stop()
    local = first_step(
        train(tiny_train_config(tmp_path / "local", f"teacher.model={teacher_dir}", "run.steps=1")).run_dir
    )
    for key in ("div/reverse_kl", "loss/policy", "adv/mean"):
        assert http[key] == pytest.approx(local[key], rel=1e-4, abs=1e-5), key


@pytest.mark.timeout(900)  # waits on subprocesses with their own 300 s timeouts
def test_served_teacher_killed_mid_training_stops_cleanly_and_resumes(tmp_path, teacher_dir, tiny_run_overrides):
    server = ServerProcess(teacher_dir, tmp_path / "server.log")
    server.wait_healthy()
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_run_overrides,
        f"run.dir={run_dir}",
        f"teacher.url={server.url}",
        "teacher.max_retries=2",
        "teacher.timeout_s=5",
        "run.steps=400",
        "run.checkpoint_every=1",
        "run.keep_checkpoints=2",
        "eval.every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "opdplus", "train", "--config", "configs/tiny.yaml", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # generous: CI machines are shared
        while latest_checkpoint(run_dir) is None or len(read_metrics(run_dir)) < 2:
            assert trainer.poll() is None and time.monotonic() < deadline, "trainer never checkpointed"
            time.sleep(0.2)
        server.stop()
        _, stderr = trainer.communicate(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 3, stderr[-2000:]
    assert server.url in stderr and "--resume" in stderr
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    verify_checkpoint(checkpoint)  # intact
    restarted = ServerProcess(teacher_dir, tmp_path / "server2.log", port=server.port)
    restarted.wait_healthy()
    try:
        step = int(checkpoint.name.split("_")[-1])
        resumed = subprocess.run(
            [sys.executable, "-m", "opdplus", "train", "--resume", str(run_dir), f"run.steps={step + 1}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        restarted.stop()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["train"]["step"] == step + 1
    resumed_checkpoint = latest_checkpoint(run_dir)
    assert resumed_checkpoint is not None
    assert torch.load(resumed_checkpoint / "trainer_state.pt", weights_only=False)["step"] == step + 1
