"""The ``opdplus`` console script: top-level and per-command ``--help`` work and list every command."""

from __future__ import annotations

import pytest

from opdplus.commands import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, help_text in COMMANDS.items():
        assert name in out and help_text.split()[0] in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: opdplus {name}" in capsys.readouterr().out


def test_one_command_module_per_verb_and_argparse_only_there():
    """``opdplus/commands/<verb>.py`` for every verb of ``opdplus --help`` (and nothing else); no other
    module under ``opdplus/`` parses arguments."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "opdplus"
    modules = {p.stem for p in (package / "commands").glob("*.py")} - {"__init__"}
    assert modules == {verb.replace("-", "_") for verb in COMMANDS}
    parsing = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if "commands" not in p.parts and re.search(r"^\s*(import argparse|from argparse )", p.read_text(), re.M)
    )
    assert parsing == []


def test_overrides_are_accepted_after_flags(monkeypatch):
    from opdplus.commands import train

    seen = {}
    monkeypatch.setattr(train, "run", lambda args: seen.setdefault("args", args) and 0)
    main(["train", "--config", "c.yaml", "run.steps=2", "--overwrite", "student.model=Y", "run.seed=3"])
    args = seen["args"]
    assert args.overwrite and args.overrides == ["run.steps=2", "student.model=Y", "run.seed=3"]


def test_unknown_arguments_are_still_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "c.yaml", "--overwrite", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "run.steps=2"])  # a verb without overrides takes no KEY=VALUE


@pytest.mark.parametrize("limit", ["0", "-3", "abc"])
def test_eval_limit_must_be_positive(limit, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "m", "--task", "gsm8k", "--limit", limit])
    assert exit_info.value.code == 2
    assert "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_teacher_rejects_a_port_out_of_range(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-teacher", "--model", "m", "--port", port])
    assert exit_info.value.code == 2
    assert "a TCP port is a whole number from 1 to 65535" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_teacher_on_cuda_without_cuda_is_a_one_line_error(capsys):
    assert main(["serve-teacher", "--model", "m", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "this machine has no CUDA device" in err and "Traceback" not in err


def test_eval_with_a_model_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--task", "gsm8k", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "neither a local HF directory" in err and "Traceback" not in err


@pytest.mark.parametrize("override", ["run.device=cuda", "teacher.device=cuda:1"])
def test_a_device_this_machine_lacks_is_a_one_line_error(override, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    rc = main(["train", "--config", str(config), f"run.dir={tmp_path / 'run'}", "run.progress=none", override])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    key = override.split("=")[0]
    assert err.strip() == f"error: {key}: device {override.split('=')[1]!r}: this machine has no CUDA device " + (
        "(torch.cuda.is_available() is False); use auto or cpu"
    )
