"""Two real processes (torchrun, gloo): one update on a global batch equals the single-process update,
for DDP and FSDP2; a 2-process run checkpoints once and resumes with 2 or 1 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_case import build_case

from opdplus.models.forward import HiddenForward
from opdplus.train.distributed import torchrun_command
from opdplus.train.metrics import read_metrics
from opdplus.train.update import update_policy

# torchrun calls carry their own 300 s timeout (which kills the process group); a test makes up to three
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    process = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers, so no orphan outlives the test
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s:\n{stdout[-3000:]}{stderr[-5000:]}")
    assert process.returncode == 0 or not check, stdout[-3000:] + stderr[-5000:]
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def single_process_update(micro_batch_size: int):
    student, optimizer_fn, batch, advantages_B_T = build_case()
    policy = HiddenForward(student)
    optimizer, scheduler = optimizer_fn(policy)
    metrics = update_policy(
        policy, optimizer, scheduler, batch, advantages_B_T, micro_batch_size=micro_batch_size, max_grad_norm=1.0
    )
    return {f"model.{k}": v for k, v in student.state_dict().items()}, metrics


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_process_update_matches_single_process(parallelism, tmp_path):
    out = tmp_path / "weights.pt"
    torchrun([str(HERE / "ddp_worker.py"), parallelism, str(out), "1"])
    distributed = torch.load(out)
    reference, ref_metrics = single_process_update(micro_batch_size=4)
    initial = {f"model.{k}": v for k, v in build_case()[0].state_dict().items()}
    moved = 0
    for name, value in reference.items():
        torch.testing.assert_close(distributed["weights"][name], value, rtol=0, atol=1e-5, msg=name)
        moved += int(not torch.equal(value, initial[name]))
    assert moved > 0  # the update did change the weights
    for key in ("loss/policy", "loss/grad_norm"):
        assert distributed["metrics"][key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7)


def test_torchrun_command_and_nproc_validation():
    cmd = torchrun_command(2, ["train", "--config", "x.yaml"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and cmd[-4:] == [
        "opdplus",
        "train",
        "--config",
        "x.yaml",
    ]
    with pytest.raises(ValueError, match="nproc"):
        torchrun_command(0, [])


TINY = [
    "run.threads=1",
    "run.progress=none",
    "data.prompts_per_step=4",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=6",
    "update.micro_batch_size=2",
    "eval.at_end=false",
    "student.tiny.hidden_size=32",
    "student.tiny.intermediate_size=64",
    "teacher.tiny.hidden_size=32",
    "teacher.tiny.intermediate_size=64",
    "teacher.tiny.num_layers=2",
]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_process_run_checkpoints_once_and_resumes_with_two_or_one(parallelism, tmp_path):
    run_dir = tmp_path / "run"
    sampler = "fast" if parallelism == "fsdp" else "hf"  # the fast sampler calls layers directly: needs full unshard
    base = [
        "-m",
        "opdplus",
        "train",
        "--config",
        "configs/tiny.yaml",
        *TINY,
        f"run.dir={run_dir}",
        f"parallel.mode={parallelism}",
        "run.checkpoint_every=1",
        f"rollout.sampler={sampler}",
    ]
    torchrun([*base, "run.steps=2"])
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2]  # written once (rank 0), not once per rank
    assert lines[0]["rollout/sequences"] == 8.0  # 4 prompts x 2 samples over both ranks
    from transformers import AutoModelForCausalLM

    from opdplus.train.checkpoint import checkpoint_dir

    AutoModelForCausalLM.from_pretrained(checkpoint_dir(run_dir, 2) / "model")
    # resume with 2 processes, then with 1
    torchrun(["-m", "opdplus", "train", "--resume", str(run_dir), "run.steps=3"])
    single = subprocess.run(
        [sys.executable, "-m", "opdplus", "train", "--resume", str(run_dir), "run.steps=4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert json.loads(single.stdout.strip().splitlines()[-1])["train"]["step"] == 4


def test_two_process_run_with_an_error_exits_with_the_message(tmp_path):
    result = torchrun(
        [
            "-m",
            "opdplus",
            "train",
            "--config",
            "configs/tiny.yaml",
            *TINY,
            f"run.dir={tmp_path / 'run'}",
            "data.prompts_per_step=3",
        ],
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "data.prompts_per_step=3 must be divisible by the number of processes (2)" in result.stdout + result.stderr
