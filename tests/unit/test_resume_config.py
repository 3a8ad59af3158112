"""What a resumed run may change, how two configs differ, and the tokenizer fingerprint."""

from __future__ import annotations

import pytest

from opdplus.models.fingerprint import tokenizer_fingerprint
from opdplus.models.tiny import build_char_tokenizer
from opdplus.train.config import config_changes, load_config, resume_may_change, stored_config, to_yaml


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("run.steps", True),
        ("run.dir", True),
        ("run.tensorboard", True),
        ("eval.num_prompts", True),
        ("teacher.url", True),
        ("teachers.1.teacher.timeout_s", True),
        ("run.seed", False),
        ("loss.divergence", False),
        ("teacher.model_name", False),
        ("teachers.0.teacher.tiny.seed", False),
        ("teachers.len", False),
        ("evaluation.x", False),
    ],
)
def test_resume_may_change(key, allowed):
    assert resume_may_change(key) is allowed


def test_config_changes_names_each_leaf_and_list_entries():
    old = load_config(None, [])
    new = load_config(None, ["loss.divergence=jsd", "student.tiny.hidden_size=32"])
    assert config_changes(old, new) == [
        ("loss.divergence", old.loss.divergence, "jsd"),
        ("student.tiny.hidden_size", old.student.tiny.hidden_size, 32),
    ]
    assert config_changes(old, old) == []
    routed = load_config(None, ["teachers=[{task: a, teacher: {url: 'http://x'}}]"])
    assert ("teachers.0.teacher.url", None, "http://x") in config_changes(old, routed)


def test_stored_config_fills_absent_keys_with_defaults_and_translates_old_names():
    cfg = load_config(None, ["update.ppo_epochs=2"])
    assert stored_config(to_yaml(cfg), "x") == cfg
    assert stored_config("loss:\n  ppo_epochs: 2\n", "x") == cfg


def test_tokenizer_fingerprint_sees_ids_and_special_tokens():
    tokenizer = build_char_tokenizer()
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert fingerprint == tokenizer_fingerprint(build_char_tokenizer()) and fingerprint.startswith("sha256:")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_fingerprint(tokenizer) != fingerprint
    other = build_char_tokenizer()
    other.eos_token = other.convert_ids_to_tokens(5)  # same ids, another special token
    assert tokenizer_fingerprint(other) != fingerprint
