"""The update's policy-gradient loss with the fused LM head (a HiddenForward policy) against the unfused
path (the bare model: checkpointed chunked log-probs): same loss, metrics and weights after the step."""

import pytest
import torch

from opdplus.models.forward import HiddenForward
from opdplus.ops.advantages import advantages
from opdplus.rollout.fast_sampler import FastSampler
from opdplus.rollout.sampler import SamplingSettings
from opdplus.train.builders import build_student, build_tasks, build_teacher, prompts_for_step
from opdplus.train.schedule import build_optimizer
from opdplus.train.update import fusable_head_weight, update_policy

CPU = torch.device("cpu")


@pytest.mark.parametrize("clip_eps,epochs", [(None, 1), (0.2, 2)], ids=["one_step", "ppo_two_epochs"])
def test_fused_update_equals_the_unfused_one(tiny_train_config, tmp_path, clip_eps, epochs):
    cfg = tiny_train_config(tmp_path / "run", "data.prompts_per_step=4", "rollout.max_new_tokens=10")
    student, tok = build_student(cfg, CPU)
    teacher = build_teacher(cfg, tok, student, CPU)
    settings = SamplingSettings(max_new_tokens=10, samples_per_prompt=2)
    batch = FastSampler(student, tok, settings, torch.Generator().manual_seed(0)).sample(
        prompts_for_step(build_tasks(cfg, tok), 4, 0, 1)
    )
    batch.teacher_logprobs_B_T = teacher.score(batch)
    adv = advantages(
        batch.sampler_logprobs_B_T,
        batch.teacher_logprobs_B_T,
        batch.loss_mask_B_T,
        divergence="reverse_kl",
        estimator="opd_plus",
    )
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    results = {}
    for fused in (True, False):
        student.load_state_dict(initial)
        model = HiddenForward(student) if fused else student
        assert (fusable_head_weight(model) is not None) == fused
        optimizer, scheduler = build_optimizer(model, cfg)
        metrics = update_policy(
            model,
            optimizer,
            scheduler,
            batch,
            adv,
            micro_batch_size=3,
            clip_eps=clip_eps,
            ppo_epochs=epochs,
            chunk_size=8,
        )
        results[fused] = (metrics, {k: v.clone() for k, v in student.state_dict().items()})
    (fused_metrics, fused_state), (plain_metrics, plain_state) = results[True], results[False]
    assert any(not torch.equal(initial[k], fused_state[k]) for k in initial)
    for key in ("loss/policy", "loss/policy_last_epoch", "loss/grad_norm", "loss/ratio_clip_frac"):
        assert fused_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-5, abs=1e-7), key
    for k in plain_state:
        torch.testing.assert_close(fused_state[k], plain_state[k], atol=1e-6, rtol=1e-5)
