"""Teachers score whole multi-turn trajectories: a served teacher (`opdplus serve-teacher`, one request per
trajectory with the whole token sequence as the prompt), a routed one and a local one give the same scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving import ServerProcess

from opdplus.envs.scripted import ScriptedToolsTask
from opdplus.models.load import load_model_and_tokenizer
from opdplus.rollout.fast_sampler import FastSampler
from opdplus.rollout.http_teacher import HTTPTeacher
from opdplus.rollout.multiturn import EpisodeLimits, run_episodes
from opdplus.rollout.routing import RoutedTeacher
from opdplus.rollout.sampler import SamplingSettings
from opdplus.rollout.teacher import LocalTeacher


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("logs") / "server.log")
    proc.wait_healthy()
    yield proc
    proc.stop()


def test_served_routed_and_local_teachers_give_the_same_trajectory_scores(server, tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device=torch.device("cpu"))
    task = ScriptedToolsTask(replies=2)
    settings = SamplingSettings(max_new_tokens=8, samples_per_prompt=2)
    sampler = FastSampler(model, tokenizer, settings, torch.Generator().manual_seed(0))
    batch, results = run_episodes(sampler, task, task.items("eval", 2), EpisodeLimits(max_turns=3, max_new_tokens=8))
    assert min(r.turns for r in results) > 1 and min(r.env_tokens for r in results) > 0
    local_B_T = LocalTeacher(model).score(batch)
    with HTTPTeacher(server.url, rows_per_request=1) as served:
        served_B_T = served.score(batch)
        stats = served.metrics()
        routed_B_T = RoutedTeacher({task.name: served}).score(batch)
        local_ids_B_T_K, local_top_B_T_K = LocalTeacher(model).score_topk(batch, 3)
        served_ids_B_T_K, served_top_B_T_K = served.score_topk(batch, 3)
    assert local_B_T[batch.loss_mask_B_T].abs().min() > 0  # real scores at every student token
    assert (local_B_T[~batch.loss_mask_B_T] == 0).all()  # none at environment tokens or the prompt
    torch.testing.assert_close(served_B_T, local_B_T, rtol=0, atol=1e-4)
    torch.testing.assert_close(routed_B_T, local_B_T, rtol=0, atol=1e-4)
    torch.testing.assert_close(served_top_B_T_K, local_top_B_T_K, rtol=0, atol=1e-4)
    assert torch.equal(served_ids_B_T_K[batch.loss_mask_B_T], local_ids_B_T_K[batch.loss_mask_B_T])
    # one request per trajectory, each the trajectory's real tokens up to its last student token
    last_B = batch.loss_mask_B_T.long().cumsum(-1).argmax(-1)
    sent = sum(int(batch.attention_mask_B_T[b, : int(last_B[b]) + 1].sum()) for b in range(batch.batch_size))
    assert stats["rows"] == batch.batch_size and stats["tokens"] == sent
    assert stats["requests"] == batch.batch_size + 1  # plus the one /v1/models lookup of the served model's name
