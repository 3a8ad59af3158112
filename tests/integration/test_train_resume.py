"""Resume exactness: a run killed with SIGKILL after a checkpoint and resumed logs the same metrics as
an uninterrupted run with the same seed (real subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 12


def _config(tmp_path: Path, tiny_run: list[str]) -> Path:
    overrides = [o for o in tiny_run if not o.startswith("run.steps")] + [
        f"run.steps={STEPS}",
        "run.checkpoint_every=3",
        "run.keep_checkpoints=0",
        "eval.every=4",
        "optim.schedule=cosine",
        "optim.warmup_steps=2",
        "rollout.temperature=0.9",  # scheduler + tempered path
    ]
    data: dict = {}
    for text in overrides:
        key, value = text.split("=", 1)
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "opdplus", "train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows]


@pytest.mark.timeout(900)  # waits on subprocesses with their own 300 s timeouts
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tmp_path, tiny_run_overrides):
    config = _config(tmp_path, tiny_run_overrides)
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = _train("--config", str(config), f"run.dir={full_dir}")
    victim = _train("--config", str(config), f"run.dir={killed_dir}")
    first = killed_dir / "checkpoints" / "step_00000003" / "manifest.json"  # exists only once renamed into place
    deadline = time.monotonic() + 240
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    _, err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    checkpoints = sorted((killed_dir / "checkpoints").glob("step_*"))
    killed_at = int(checkpoints[-1].name.split("_")[1])
    assert 3 <= killed_at < STEPS

    resumed = _train("--resume", str(killed_dir))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"at step {killed_at}" in err
    out_full, err_full = full.communicate(timeout=300)
    assert full.returncode == 0, err_full[-3000:]

    expected, got = _metrics(full_dir), _metrics(killed_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == expected  # bit-identical: same weights, optimizer, schedule, RNG streams and data
    assert any("eval/reverse_kl" in r for r in got[killed_at:])
