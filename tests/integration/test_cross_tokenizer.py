"""Training with a teacher of another tokenizer (span path): the same numbers as the token path with one
tokenizer, a run with a merging tokenizer, routed teachers, and the config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdplus.models.tiny import build_char_tokenizer, build_merged_char_tokenizer, build_tiny_model
from opdplus.rollout.cross_tokenizer import CrossTokenizerTeacher
from opdplus.rollout.sampler import Sampler, SamplingSettings
from opdplus.rollout.teacher import LocalTeacher
from opdplus.tasks.base import get_task
from opdplus.train.config import ConfigError, load_config
from opdplus.train.loop import train
from opdplus.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
SHORT = ["run.steps=6", "eval.every=3", "run.progress=none", "run.checkpoint_every=0"]
COMPARED = ("loss/", "div/", "adv/", "eval/", "rollout/")


@pytest.mark.parametrize("extra", [[], ["loss.divergence=jsd", "loss.gamma=1.0"]])
def test_one_tokenizer_on_the_span_path_is_the_token_path(tmp_path, extra):
    runs = {}
    for name, switch in (("token", []), ("span", ["teacher.cross_tokenizer=true"])):
        cfg = load_config(REPO / "configs/tiny.yaml", [*SHORT, f"run.dir={tmp_path / name}", *extra, *switch])
        runs[name] = read_metrics(train(cfg).run_dir)
    assert len(runs["token"]) == len(runs["span"]) == 6
    for token, span in zip(runs["token"], runs["span"]):
        compared = [k for k in token if k.startswith(COMPARED)]
        assert len(compared) > 10
        for key in compared:
            assert span[key] == pytest.approx(token[key], rel=1e-5, abs=1e-5), key
        assert span["align/spans_per_token"] == 1.0 and span["align/masked_fraction"] == 0.0
        assert not any(k.startswith("align/") for k in token)


def test_tiny_cross_tokenizer_preset_trains_across_tokenizers(tmp_path, capsys):
    cfg = load_config(REPO / "configs/tiny_cross_tokenizer.yaml", [*SHORT, f"run.dir={tmp_path / 'run'}"])
    rows = read_metrics(train(cfg).run_dir)
    assert len(rows) == 6
    assert "scoring spans of text across tokenizers" in capsys.readouterr().err
    assert all(0.0 < row["align/spans_per_token"] <= 1.0 for row in rows)
    assert min(row["align/spans_per_token"] for row in rows) < 1.0  # some spans hold several student tokens
    assert max(row["align/max_span_tokens"] for row in rows) >= 2
    assert all(torch.isfinite(torch.tensor(row["adv/mean"])) for row in rows)


def test_routed_teachers_mix_span_and_token_paths(tmp_path):
    teachers = (
        "teachers=[{task: contains, teacher: {model: tiny, tokenizer: tiny-merges, "
        "tiny: {hidden_size: 32, intermediate_size: 64, num_layers: 2, seed: 1}}}]"
    )
    cfg = load_config(
        REPO / "configs/tiny_cross_tokenizer.yaml", [*SHORT, "run.steps=2", teachers, f"run.dir={tmp_path}"]
    )
    rows = read_metrics(train(cfg).run_dir)
    assert len(rows) == 2 and "align/spans_per_token" in rows[-1]


def test_span_scores_of_a_merging_teacher_sum_to_its_token_log_probs():
    student_tokenizer, teacher_tokenizer = build_char_tokenizer(), build_merged_char_tokenizer()
    student = build_tiny_model(len(student_tokenizer), hidden_size=32, intermediate_size=64, seed=0)
    teacher_model = build_tiny_model(len(teacher_tokenizer), hidden_size=32, intermediate_size=64, seed=1)
    settings = SamplingSettings(max_new_tokens=12, samples_per_prompt=2)
    sampler = Sampler(student, student_tokenizer, settings, torch.Generator().manual_seed(0))
    batch = sampler.sample(get_task("contains").items("train", 3, seed=0))
    cross = CrossTokenizerTeacher(LocalTeacher(teacher_model), student_tokenizer, teacher_tokenizer)
    scores = cross.score_spans(batch)
    is_end_B_T = scores.span_end_B_T == torch.arange(batch.input_ids_B_T.shape[1])
    kept_ends_B_T = is_end_B_T & scores.loss_mask_B_T
    assert int(kept_ends_B_T.sum()) > 0
    # the teacher's own log-prob of its tokenization of each completion equals the sum over kept spans
    for row in range(batch.batch_size):
        alignment = cross.align_row(batch.input_ids_B_T[row][batch.loss_mask_B_T[row]].tolist())
        if not all(alignment.canonical):
            continue
        prompt = cross.teacher_prompt_ids(batch, row)
        ids = torch.tensor([prompt + alignment.teacher_ids])
        logp = torch.log_softmax(teacher_model(ids).logits[0, :-1].double(), -1)
        expected = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]].sum()
        got = scores.teacher_logprobs_B_T[row][scores.loss_mask_B_T[row]].double().sum()
        assert float(got) == pytest.approx(float(expected), abs=1e-3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["teacher.cross_tokenizer=true", "loss.teacher_signal=topk"], r"set loss.teacher_signal=sampled"),
        (
            ["teacher.cross_tokenizer=true", "teacher.url=http://127.0.0.1:9"],
            r"needs its tokenizer: set teacher.tokenizer",
        ),
    ],
)
def test_config_errors_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", overrides)


def test_different_tokenizers_with_topk_or_false_are_errors(tmp_path):
    cfg = load_config(
        REPO / "configs/tiny_cross_tokenizer.yaml", [*SHORT, "loss.teacher_signal=topk", f"run.dir={tmp_path / 'a'}"]
    )
    with pytest.raises(ConfigError, match=r"teacher's tokenizer differs.*set loss.teacher_signal=sampled"):
        train(cfg)
    cfg = load_config(
        REPO / "configs/tiny_cross_tokenizer.yaml",
        [*SHORT, "teacher.cross_tokenizer=false", f"run.dir={tmp_path / 'b'}"],
    )
    with pytest.raises(ConfigError, match=r"vocabulary mismatch"):
        train(cfg)
    cfg = load_config(
        REPO / "configs/tiny_cross_tokenizer.yaml", [*SHORT, "eval.forward_kl=true", f"run.dir={tmp_path / 'c'}"]
    )
    with pytest.raises(ConfigError, match=r"eval.forward_kl=true samples from the teacher"):
        train(cfg)


def test_world_teacher_with_another_tokenizer_builds(tmp_path):
    from transformers import AutoTokenizer

    from opdplus.models.fingerprint import tokenizer_fingerprint
    from opdplus.rollout.cross_tokenizer import TokenizerBytes
    from opdplus.world.build import (
        SMOKE_SPEC,
        WORLD_TASKS,
        ensure_cross_tokenizer_teacher,
        train_tokenizer,
        world_texts,
    )

    out = ensure_cross_tokenizer_teacher(tmp_path / "xtok", SMOKE_SPEC, log=lambda _: None)
    assert (out / "config.json").exists() and (out / "world.json").exists()
    teacher_tokenizer = AutoTokenizer.from_pretrained(out)
    world_tokenizer = train_tokenizer(world_texts(WORLD_TASKS, SMOKE_SPEC.tokenizer_items), SMOKE_SPEC.vocab_size)
    assert tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(world_tokenizer)
    # pre-tokens are runs of non-space characters: " 6." is one, so "6." may still grow until a space follows
    assert TokenizerBytes(teacher_tokenizer).final_bytes(b" 6. 6") == 3
    assert TokenizerBytes(world_tokenizer).final_bytes(b" 6. 6") == 3
    assert ensure_cross_tokenizer_teacher(tmp_path / "xtok", SMOKE_SPEC) == out  # cached


def test_multi_turn_tasks_with_a_span_teacher_are_a_config_error(tmp_path):
    cfg = load_config(
        REPO / "configs" / "tiny_multiturn.yaml", [f"run.dir={tmp_path}/run", "teacher.cross_tokenizer=true"]
    )
    with pytest.raises(ConfigError, match="multi-turn task.*scripted_tools.*another tokenizer"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
