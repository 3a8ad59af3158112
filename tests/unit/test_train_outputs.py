"""Run outputs: atomic checkpoints (manifest verification, pruning, interrupted saves) and metrics.jsonl."""

import json

import pytest
import torch

from opdplus.train import checkpoint as ckpt


def _save(run_dir, step, payload=b"weights", keep=0):
    def write_model(directory):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(payload)

    return ckpt.save_checkpoint(
        run_dir,
        step,
        write_model=write_model,
        trainer_state={"step": step, "x": torch.ones(2)},
        config_yaml="run: {}\n",
        keep=keep,
    )


def test_save_verify_load(tmp_path):
    path = _save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {"model/model.safetensors", "trainer_state.pt", "config.yaml"}
    state = ckpt.load_trainer_state(path)
    assert state["step"] == 7 and torch.equal(state["x"], torch.ones(2))
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_prunes_oldest_and_resave_replaces(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    _save(tmp_path, 3, payload=b"new weights", keep=2)
    assert (ckpt.checkpoint_dir(tmp_path, 3) / "model" / "model.safetensors").read_bytes() == b"new weights"
    ckpt.verify_checkpoint(ckpt.checkpoint_dir(tmp_path, 3))


def test_damage_is_detected_and_named(tmp_path):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    (path / "model" / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(
        ckpt.CorruptCheckpointError, match=r"step_00000002 is corrupt: file model/model.safetensors does not match"
    ):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"previous one is .*step_00000001"):
        ckpt.latest_checkpoint(tmp_path)
    (path / "config.yaml").unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match="file config.yaml is missing"):
        ckpt.verify_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ckpt.CorruptCheckpointError, match="unreadable manifest.json"):
        ckpt.verify_checkpoint(path)


def test_interrupted_save_leaves_only_an_ignored_temp_dir(tmp_path):
    _save(tmp_path, 1)

    def crash(directory):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, write_model=crash, trainer_state={}, config_yaml="")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 1)
    removed = ckpt.remove_temp_dirs(tmp_path)
    assert [p.name for p in removed] == [f".tmp-step_00000002-{__import__('os').getpid()}"]
    assert json.loads((ckpt.checkpoint_dir(tmp_path, 1) / "manifest.json").read_text())["step"] == 1


def test_metrics_writer_plain_lines_bar_and_truncation(tmp_path):
    import io

    from opdplus.train.metrics import MetricsWriter, read_metrics, truncate_metrics

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    plain, terminal = io.StringIO(), Terminal()
    for stream, sub in ((plain, "plain"), (terminal, "bar")):
        run_dir = tmp_path / sub
        run_dir.mkdir()
        writer = MetricsWriter(run_dir, total_steps=4, progress="auto", log_every=2, stream=stream)
        for step in range(1, 5):
            writer.log(step, {"loss/policy": 1.0 / step, "div/reverse_kl": torch.tensor(0.5), "adv/max": float("inf")})
        writer.close()
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["div/reverse_kl"] == 0.5
        assert rows[0]["adv/max"] == "inf"  # JSON has no inf; kept visible as a string
        truncate_metrics(run_dir, 2)
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert plain.getvalue().splitlines() == ["step 2/4 loss=0.5 rkl=0.5", "step 4/4 loss=0.25 rkl=0.5"]
    assert "4/4" in terminal.getvalue() and "loss=0.25" in terminal.getvalue()


def test_timed_phases_give_the_step_throughput():
    from opdplus.train.metrics import throughput_metrics, timed

    seconds: dict[str, float] = {}
    for phase in ("sample", "score", "update"):
        with timed(phase, seconds, torch.device("cpu")):
            sum(range(1000))
    with pytest.raises(RuntimeError), timed("eval", seconds):
        raise RuntimeError("a failing block records nothing")
    assert sorted(seconds) == ["sample", "score", "update"] and all(s >= 0 for s in seconds.values())
    perf = throughput_metrics({"sample": 2.0, "score": 0.5, "update": 1.0}, tokens=100.0, update_passes=2)
    assert perf == {
        "perf/sample_tok_s": 50.0,
        "perf/score_tok_s": 200.0,
        "perf/update_tok_s": 200.0,
        "perf/step_s": 3.5,
    }


def test_each_teacher_signal_has_its_update_loss():
    import typing

    from opdplus.ops.divergences import get_divergence
    from opdplus.train.config import TeacherSignalName, load_config
    from opdplus.train.update import PerPositionLoss, PolicyGradientLoss, update_loss_for

    divergence = get_divergence("jsd")
    losses = {
        s: update_loss_for(load_config(None, [f"loss.teacher_signal={s}"]).loss, divergence, None)
        for s in typing.get_args(TeacherSignalName)
    }
    assert isinstance(losses["sampled"], PolicyGradientLoss)
    assert losses["topk"] == PerPositionLoss("topk", divergence, 0.0, None)
    assert losses["exact"] == PerPositionLoss("exact", divergence, 0.0, None)
