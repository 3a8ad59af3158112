"""A served teacher is checked before training: its vocabulary must be the student's (a probe of token ids
it decodes), and a refused probe (API key, model name) is a one-line error that names the key to fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from serving import ServerProcess
from test_teacher_server import build_tiny_teacher

from opdplus.commands import main
from opdplus.models.tiny import save_tiny_model_dir
from opdplus.train.config import ConfigError
from opdplus.train.loop import train
from opdplus.train.metrics import read_metrics

API_KEY = "sesame"
KEY_ENV = "OPDPLUS_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory) -> Path:
    """A tiny teacher over a 256-token tokenizer (the student's has 102)."""
    out = tmp_path_factory.mktemp("teacher256")
    build_tiny_teacher(out)
    return out


@pytest.fixture(scope="module")
def same_vocab_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(
        tmp_path_factory.mktemp("teacher"), seed=1, hidden_size=32, intermediate_size=64, num_layers=2
    )


@pytest.fixture(scope="module")
def other_vocab_server(other_vocab_dir, tmp_path_factory):
    server = ServerProcess(other_vocab_dir, tmp_path_factory.mktemp("log") / "server.log", "--api-key", API_KEY)
    server.wait_healthy()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def same_vocab_server(same_vocab_dir, tmp_path_factory):
    server = ServerProcess(same_vocab_dir, tmp_path_factory.mktemp("log") / "server.log", "--api-key", API_KEY)
    server.wait_healthy()
    yield server
    server.stop()


def served(server: ServerProcess) -> list[str]:
    return [f"teacher.url={server.url}", f"teacher.api_key_env={KEY_ENV}", "teacher.max_retries=0", "run.steps=1"]


def test_a_served_teacher_with_another_vocabulary_is_a_config_error(
    tiny_train_config, tmp_path, other_vocab_server, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    cfg = tiny_train_config(tmp_path / "run", *served(other_vocab_server))
    with pytest.raises(
        ConfigError,
        match=r"does not use the student's vocabulary: .*\(102 tokens\), the teacher's model takes 256 token ids, "
        r"and id \d+ is",
    ) as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or read_metrics(tmp_path / "run") == []


def test_a_served_teacher_whose_known_tokenizer_differs_scores_spans_unless_false(
    tiny_train_config, tmp_path, other_vocab_server, other_vocab_dir, monkeypatch, capsys
):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    known = [*served(other_vocab_server), f"teacher.tokenizer={other_vocab_dir}"]
    cfg = tiny_train_config(tmp_path / "false", *known, "teacher.cross_tokenizer=false")
    with pytest.raises(ConfigError, match=r"teacher.tokenizer=.* is not the student's vocabulary .*cross_tokenizer"):
        train(cfg)
    result = train(tiny_train_config(tmp_path / "auto", *known))
    (row,) = read_metrics(result.run_dir)
    assert "align/spans_per_token" in row and "scoring spans of text across tokenizers" in capsys.readouterr().err


def test_a_served_cross_tokenizer_teacher_scores_like_the_local_one(other_vocab_server, other_vocab_dir, monkeypatch):
    """The trainer tokenizes with the teacher's tokenizer and sends ids: served and local scores agree."""
    import torch

    from opdplus.models.load import load_model_and_tokenizer
    from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
    from opdplus.rollout.cross_tokenizer import CrossTokenizerTeacher
    from opdplus.rollout.http_teacher import HTTPTeacher
    from opdplus.rollout.sampler import Sampler, SamplingSettings
    from opdplus.rollout.teacher import LocalTeacher
    from opdplus.tasks.base import get_task

    student_tokenizer = build_char_tokenizer()
    student = build_tiny_model(len(student_tokenizer), hidden_size=32, intermediate_size=64, seed=0)
    sampler = Sampler(student, student_tokenizer, SamplingSettings(max_new_tokens=10), torch.Generator().manual_seed(0))
    batch = sampler.sample(get_task("contains").items("train", 4, seed=0))
    model, teacher_tokenizer = load_model_and_tokenizer(str(other_vocab_dir))
    local = CrossTokenizerTeacher(LocalTeacher(model), student_tokenizer, teacher_tokenizer).score_spans(batch)
    with HTTPTeacher(other_vocab_server.url, api_key=API_KEY, max_retries=0) as http:
        remote = CrossTokenizerTeacher(http, student_tokenizer, teacher_tokenizer).score_spans(batch)
    assert torch.equal(local.loss_mask_B_T, remote.loss_mask_B_T) and bool(local.loss_mask_B_T.any())
    assert torch.equal(local.span_end_B_T, remote.span_end_B_T)
    torch.testing.assert_close(local.teacher_logprobs_B_T, remote.teacher_logprobs_B_T, rtol=1e-4, atol=1e-4)


def test_a_served_teacher_with_the_students_vocabulary_trains(
    tiny_train_config, tmp_path, same_vocab_server, same_vocab_dir, monkeypatch, capsys
):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    probed = train(tiny_train_config(tmp_path / "probed", *served(same_vocab_server)))
    assert len(read_metrics(probed.run_dir)) == 1
    named = train(
        tiny_train_config(tmp_path / "named", *served(same_vocab_server), f"teacher.tokenizer={same_vocab_dir}")
    )
    assert len(read_metrics(named.run_dir)) == 1
    assert "teacher.tokenizer is set and equals the student's vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key,extra,message",
    [
        (None, [], r"HTTP 401: .*put the server's API key in the environment variable {env} .*it is not set"),
        ("wrong", [], r"HTTP 401: .*environment variable {env} .*holds a key the server refused"),
        (API_KEY, ["teacher.model_name=nosuch"], r"HTTP 404: .*set teacher.model_name to the model the server serves"),
    ],
)
def test_a_refused_served_teacher_is_a_one_line_error(
    tmp_path, same_vocab_server, monkeypatch, capsys, tiny_run_overrides, key, extra, message
):
    if key is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, key)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    overrides = [*tiny_run_overrides, f"run.dir={tmp_path / 'run'}", *served(same_vocab_server), *extra]
    rc = main(["train", "--config", str(config), *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"teacher.url={same_vocab_server.url}" in lines[0]
    assert re.search(message.format(env=KEY_ENV), lines[0]), lines[0]
