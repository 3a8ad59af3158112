"""Training over multi-turn episodes: configs/tiny_multiturn.yaml, the multi-turn metrics, the eval hook,
mixed single- and multi-turn tasks, and ``loss.normalizer``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdplus.envs.scripted import ScriptedToolsTask
from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
from opdplus.rollout.multiturn import EpisodeLimits, EpisodeSampler
from opdplus.rollout.sampler import Sampler, SamplingSettings
from opdplus.tasks.base import get_task
from opdplus.train.config import load_config
from opdplus.train.loop import train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_multiturn.yaml"
FAST = ["run.steps=2", "run.progress=none", "eval.every=0", "data.prompts_per_step=2", "rollout.max_new_tokens=6"]
EPISODE_KEYS = {f"rollout/{k}" for k in ("turns", "tool_calls", "tool_errors", "parse_failures", "env_tokens")}


def test_tiny_multiturn_config_trains_and_logs_the_multi_turn_metrics(tmp_path):
    overrides = [*FAST, f"run.dir={tmp_path / 'run'}", "eval.score_decoding=greedy", "eval.forward_kl=true"]
    cfg = load_config(CONFIG, overrides)
    result = train(cfg)
    assert EPISODE_KEYS <= set(result.metrics)
    assert result.metrics["rollout/turns"] > 1 and result.metrics["rollout/env_tokens"] > 0
    assert 0.0 <= result.metrics["eval/scripted_tools/score"] <= 1.0
    assert result.metrics["eval/reverse_kl"] > 0 and result.metrics["eval/forward_kl"] > 0  # over teacher episodes


def test_single_and_multi_turn_tasks_train_together(tmp_path):
    cfg = load_config(CONFIG, [*FAST, f"run.dir={tmp_path / 'run'}", "data.tasks=[contains,scripted_tools]"])
    result = train(cfg)
    assert EPISODE_KEYS <= set(result.metrics)
    assert {"eval/contains/score", "eval/scripted_tools/score"} <= set(result.metrics)


def test_episode_sampler_keeps_the_items_order():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=0)
    mixed = [*get_task("contains").items("train", 2), *ScriptedToolsTask().items("train", 2)]
    items = [mixed[2], mixed[0], mixed[3], mixed[1]]
    settings = SamplingSettings(max_new_tokens=4, samples_per_prompt=2)
    sampler = EpisodeSampler(
        Sampler(model, tokenizer, settings, torch.Generator().manual_seed(0)),
        [ScriptedToolsTask()],
        EpisodeLimits(max_turns=2, max_new_tokens=4),
    )
    batch = sampler.sample(items)
    assert [m["item_id"] for m in batch.meta] == [item.id for item in items for _ in range(2)]
    assert batch.tasks == [item.task for item in items for _ in range(2)]
    assert ["episode" in m for m in batch.meta] == [True, True, False, False, True, True, False, False]
    assert len(sampler.results) == 4


@pytest.mark.parametrize("signal", ["sampled", "exact"])
def test_constant_normalizer_divides_by_rows_times_the_most_sampled_tokens(tmp_path, signal):
    runs = {}
    for normalizer in ("tokens", "constant"):
        overrides = [*FAST, "run.steps=1", f"run.dir={tmp_path / normalizer}", f"loss.normalizer={normalizer}"]
        runs[normalizer] = train(load_config(CONFIG, [*overrides, f"loss.teacher_signal={signal}"])).metrics
    tokens, rows = runs["tokens"]["rollout/tokens"], runs["tokens"]["rollout/sequences"]
    per_row = min(4 * 6, 400)  # rollout.max_turns x rollout.max_new_tokens, bounded by rollout.max_episode_tokens
    expected = runs["tokens"]["loss/policy"] * tokens / (rows * per_row)
    assert runs["constant"]["loss/policy"] == pytest.approx(expected, rel=1e-5)
    assert runs["constant"]["rollout/tokens"] == tokens
