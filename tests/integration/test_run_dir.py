"""The run directory keeps what it holds: --overwrite only replaces an opdplus run, and only once the new run
is built; nothing is written before a run is valid; unwritable places and full disks are one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import opdplus.train.state as state
from opdplus.train import ConfigError, RunDirError, train
from opdplus.train.checkpoint import CheckpointWriteError, list_checkpoints, verify_checkpoint


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_train_config):
    precious = tmp_path / "precious"
    (precious / "notes").mkdir(parents=True)
    (precious / "f").write_text("hi")
    with pytest.raises(RunDirError, match=r"--overwrite refuses .*precious: it is not an opdplus run.*f, notes/"):
        train(tiny_train_config(precious, "run.steps=1"), overwrite=True)
    assert (precious / "f").read_text() == "hi" and sorted(p.name for p in precious.iterdir()) == ["f", "notes"]


def test_overwrite_with_a_bad_model_keeps_the_finished_run(tmp_path, tiny_train_config):
    run_dir = tmp_path / "good"
    train(tiny_train_config(run_dir, "run.steps=1"))
    before = _files(run_dir)
    with pytest.raises(Exception, match="typo"):
        train(tiny_train_config(run_dir, "run.steps=1", f"student.model={tmp_path / 'typo'}"), overwrite=True)
    assert _files(run_dir) == before
    with pytest.raises(ConfigError, match="nosuchtask"):
        train(tiny_train_config(run_dir, "run.steps=1", "data.tasks=[nosuchtask]"), overwrite=True)
    assert _files(run_dir) == before
    # a valid overwrite replaces it; the old run moved aside is gone once the new run has its checkpoint
    (run_dir / "marker").write_text("x")
    train(tiny_train_config(run_dir, "run.steps=1", "run.seed=3"), overwrite=True)
    assert not (run_dir / "marker").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["good"]


@pytest.mark.parametrize(
    "bad", ["student.model={tmp}/nowhere", "teacher.model={tmp}/nowhere", "data.tasks=[nosuchtask]"]
)
def test_an_invalid_run_writes_nothing(tmp_path, tiny_train_config, bad):
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="nowhere|nosuchtask"):
        train(tiny_train_config(run_dir, "run.steps=1", bad.format(tmp=tmp_path)))
    assert not run_dir.exists()
    train(tiny_train_config(run_dir, "run.steps=1"))  # the corrected command needs no --overwrite
    assert (run_dir / "config.yaml").is_file()


def test_run_dir_that_is_a_file_or_under_a_file(tmp_path, tiny_train_config, capsys):
    from opdplus.commands import main

    (tmp_path / "afile").write_text("keep")
    for run_dir in [tmp_path / "afile", tmp_path / "afile" / "sub"]:
        with pytest.raises(RunDirError, match=r"afile is a file, not a directory; choose another run.dir"):
            train(tiny_train_config(run_dir, "run.steps=1"))
    preset = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert main(["train", "--config", preset, f"run.dir={tmp_path / 'afile'}", "run.steps=1"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep"


def test_run_dir_on_a_read_only_place(tmp_path, tiny_train_config):
    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    elif not os.access("/proc/sys", os.W_OK):  # root writes anywhere but here
        read_only = Path("/proc/sys")
    else:
        pytest.skip("no read-only directory on this machine")
    with pytest.raises(RunDirError, match="cannot write into .*read-only file system or no permission"):
        train(tiny_train_config(read_only / "run", "run.steps=1"))


def _fill_disk_at_step(monkeypatch, step: int) -> None:
    """The checkpoint of ``step`` hits a full disk: its trainer_state.pt is a link to /dev/full (ENOSPC)."""
    save_student = state.save_student

    def saving_onto_a_full_disk(model, tokenizer, directory, state_dict=None):
        save_student(model, tokenizer, directory, state_dict)
        if f"step_{step:08d}" in directory.parent.name:
            (directory.parent / "trainer_state.pt").symlink_to("/dev/full")

    monkeypatch.setattr(state, "save_student", saving_onto_a_full_disk)


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, tiny_train_config, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = tiny_train_config(run_dir, "run.steps=2", "run.checkpoint_every=1", "run.keep_checkpoints=1")
    _fill_disk_at_step(monkeypatch, 2)
    with pytest.raises(CheckpointWriteError, match=r"no space left on device.*step_00000001 is intact.*--resume"):
        train(cfg)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]  # no temp directory left
    verify_checkpoint(run_dir / "checkpoints" / "step_00000001")


def test_resume_on_a_still_full_disk(tmp_path, tiny_train_config):
    run_dir = tmp_path / "run"
    cfg = tiny_train_config(run_dir, "run.steps=1")
    train(cfg)
    config_before = (run_dir / "config.yaml").read_text()
    full = run_dir / f".config.yaml.tmp-{os.getpid()}"  # where the next config.yaml is written
    full.symlink_to("/dev/full")
    with pytest.raises(RunDirError, match="no space left on device"):
        train(tiny_train_config(run_dir, "run.steps=2"), resume=True)
    assert not full.is_symlink() and (run_dir / "config.yaml").read_text() == config_before


# ---------------------------------------------------------------- resume uses the checkpoint's config


def _cli_run(tmp_path: Path, *extra: str) -> tuple[Path, list[str]]:
    preset = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--config",
        preset,
        f"run.dir={run_dir}",
        "run.steps=2",
        "rollout.max_new_tokens=4",
        "eval.at_end=false",
        "run.progress=none",
        *extra,
    ]
    return run_dir, args


def _rewrite_in_checkpoint(checkpoint: Path, name: str, text: str) -> None:
    """Edit a checkpoint file and its manifest entry (as an older version would have written it)."""
    (checkpoint / name).write_text(text)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_resume_refuses_an_edited_config_with_one_line(tmp_path, capsys):
    from opdplus.commands import main

    run_dir, args = _cli_run(tmp_path)
    assert main(args) == 0
    saved = (run_dir / "config.yaml").read_text()
    edits = {
        "loss.divergence": ("divergence: reverse_kl", "divergence: jsd"),
        "teacher.tiny.seed": ("seed: 1\n", "seed: 5\n"),
        "student.tiny.hidden_size": ("hidden_size: 64", "hidden_size: 32"),
    }
    for key, (old, new) in edits.items():
        assert old in saved, key
        (run_dir / "config.yaml").write_text(saved.replace(old, new, 1))
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir), "run.steps=3"]) == 2
        err = capsys.readouterr().err
        assert f"cannot change {key} when resuming" in err and len(err.strip().splitlines()) == 1, err
    (run_dir / "config.yaml").write_text(saved)
    assert main(["train", "--resume", str(run_dir), "run.steps=3", "eval.num_prompts=2", "run.log_every=2"]) == 0


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(tmp_path, capsys):
    from opdplus.commands import main

    run_dir, args = _cli_run(tmp_path)
    assert main(args) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "run.steps=1"]) == 2
    out = capsys.readouterr()
    assert "newest checkpoint is at step 2; pass run.steps=2 or more" in out.err and '"step": 1' not in out.out


def test_a_failed_resume_writes_nothing(tmp_path, capsys):
    from opdplus.commands import main

    run_dir, args = _cli_run(tmp_path, "run.checkpoint_every=1", "run.keep_checkpoints=0")
    assert main(args) == 0
    before = _files(run_dir)
    (run_dir / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    del before["checkpoints/step_00000002/manifest.json"]
    assert main(["train", "--resume", str(run_dir), "run.steps=30"]) == 2
    assert "step_00000002 is partial" in capsys.readouterr().err
    assert _files(run_dir) == before
    assert main(["train", "--resume", str(run_dir), "loss.divergence=jsd", "run.steps=30"]) == 2
    assert _files(run_dir) == before


def test_a_checkpoint_of_an_older_version_resumes(tmp_path, tiny_train_config):
    """Keys absent from a stored config count as their defaults; renamed keys go through RENAMED_KEYS."""
    import yaml

    run_dir = tmp_path / "run"
    train(tiny_train_config(run_dir, "run.steps=1"))
    checkpoint = list_checkpoints(run_dir)[-1]
    stored = yaml.safe_load((checkpoint / "config.yaml").read_text())
    del stored["eval"], stored["rollout"]["top_p"]
    stored["loss"]["ppo_epochs"] = stored["update"].pop("ppo_epochs")  # the old name of update.ppo_epochs
    _rewrite_in_checkpoint(checkpoint, "config.yaml", yaml.safe_dump(stored))
    (checkpoint / "run_meta.json").unlink()  # older checkpoints have no metadata
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]["run_meta.json"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert train(tiny_train_config(run_dir, "run.steps=2"), resume=True).step == 2


def test_run_metadata_is_stored_and_checked_on_resume(tmp_path, tiny_train_config):
    from opdplus.models.fingerprint import tokenizer_fingerprint
    from opdplus.models.tiny import build_char_tokenizer

    run_dir = tmp_path / "run"
    train(tiny_train_config(run_dir, "run.steps=1"))
    checkpoint = list_checkpoints(run_dir)[-1]
    meta = json.loads((checkpoint / "run_meta.json").read_text())
    assert json.loads((run_dir / "run_meta.json").read_text()) == meta
    assert meta["versions"]["torch"] and meta["versions"]["python"] and "commit" in meta
    fingerprint = tokenizer_fingerprint(build_char_tokenizer())
    assert fingerprint.startswith("sha256:") and meta["student_tokenizer_fingerprint"] == fingerprint
    assert meta["teachers"] == [{"model": "tiny", "tokenizer_fingerprint": fingerprint}]
    meta["student_tokenizer_fingerprint"] = "sha256:other"
    _rewrite_in_checkpoint(checkpoint, "run_meta.json", json.dumps(meta))
    with pytest.raises(RunDirError, match="student tokenizer differs from the checkpoint's"):
        train(tiny_train_config(run_dir, "run.steps=2"), resume=True)
