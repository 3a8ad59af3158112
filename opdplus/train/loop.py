"""The training loop as a recipe: sample -> score -> advantages -> update -> log -> eval -> checkpoint.

``train(cfg)`` reads top to bottom. What it calls lives in modules named for what they hold:
``builders`` (student, teacher, tasks, sampler, each step's prompts), ``schedule`` (optimizer and
learning-rate schedule), ``update`` (the optimizer steps and their losses), ``metrics`` (what a step logs,
timings, the writer), ``state`` (RNG and checkpoints), ``run_dir`` (the run directory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import opdplus.train.distributed as dist_utils
from opdplus.models.forward import HiddenForward
from opdplus.models.load import resolve_device
from opdplus.rollout.cross_tokenizer import rollout_advantages, score_rollouts
from opdplus.rollout.types import TopKTeacher
from opdplus.train.builders import (
    build_divergence,
    build_sampler,
    build_student,
    build_tasks,
    build_teacher,
    check_prompt_share,
    check_single_turn_teacher,
    loss_tokens_per_row,
    prompts_for_step,
    sampling_settings,
)
from opdplus.train.config import TrainConfig
from opdplus.train.evaluate import held_out_metrics
from opdplus.train.metrics import (
    count_loss_tokens,
    open_metrics_writer,
    read_metrics,
    reset_peak_memory,
    step_metrics,
    timed,
    truncate_metrics,
)
from opdplus.train.precision import autocast_for
from opdplus.train.run_dir import check_run_dir, open_run_dir, remove_replaced_runs
from opdplus.train.schedule import build_optimizer
from opdplus.train.state import (
    load_checkpoint_weights,
    rank_seed,
    restore_trainer_state,
    seed_everything,
    write_checkpoint,
)
from opdplus.train.update import student_logprobs_no_grad, update_loss_for, update_policy


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]  # the last step's metrics, including its eval when there was one
    checkpoint: Path | None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Distil ``cfg.teacher`` into ``cfg.student``; writes config.yaml, metrics.jsonl and checkpoints into
    ``cfg.run.dir``. With ``resume=True`` it continues from the newest checkpoint there."""
    process_group = dist_utils.process_group(resolve_device(cfg.run.device), cfg.parallel.mode)
    with torch_threads(cfg.run.threads), process_group as (ctx, device):
        # --- run directory, models, teacher, tasks
        check_prompt_share(cfg.data.prompts_per_step, ctx.world_size)
        check_run_dir(cfg, resume=resume, overwrite=overwrite)  # reads only: nothing is written before the builds
        seed_everything(cfg.run.seed)
        student, tokenizer = build_student(cfg, device)
        teacher = build_teacher(cfg, tokenizer, student, device)
        tasks = build_tasks(cfg, tokenizer)
        check_single_turn_teacher(teacher, tasks)
        divergence = build_divergence(cfg.loss)
        run_dir, meta = open_run_dir(cfg, resume=resume, student_tokenizer=tokenizer, ctx=ctx)

        # --- weights, optimizer, sampler, RNG (from the newest checkpoint when resuming)
        last_checkpoint, saved = (
            load_checkpoint_weights(run_dir, student, lora=cfg.student.lora.enabled, ctx=ctx)
            if resume
            else (None, None)
        )
        policy = dist_utils.wrap_model(HiddenForward(student), ctx, device)
        optimizer, scheduler = build_optimizer(policy, cfg)
        generator = torch.Generator(device=device).manual_seed(rank_seed(cfg.run.seed, ctx.rank))
        settings = sampling_settings(cfg)
        sampler = build_sampler(cfg, tasks, student, tokenizer, settings, generator)
        update_loss = update_loss_for(cfg.loss, divergence, teacher)
        start_step = (
            0
            if saved is None
            else restore_trainer_state(saved, policy, optimizer, scheduler, generator, seed=cfg.run.seed, ctx=ctx)
        )
        if ctx.is_main and resume:
            truncate_metrics(run_dir, start_step)
        dist_utils.barrier(ctx)

        # --- metrics writer
        writer = open_metrics_writer(cfg, run_dir, start_step, is_main=ctx.is_main)
        if resume:
            writer.message(
                f"resuming {run_dir} from {last_checkpoint or 'the start (no checkpoint)'} at step {start_step}"
            )
        if ctx.enabled:
            writer.message(f"{ctx.world_size} processes, {cfg.parallel.mode}")
        previous = read_metrics(run_dir)  # a resumed run that has nothing left to do still reports its last step
        metrics = {k: v for k, v in previous[-1].items() if k not in ("step", "time")} if previous else {}

        try:
            if cfg.eval.at_start and start_step == 0 and not previous:
                metrics = held_out_metrics(cfg, policy, student, tokenizer, teacher, tasks)
                writer.log(0, metrics)  # step 0: the starting policy
            for step in range(start_step + 1, cfg.run.steps + 1):
                reset_peak_memory(device)
                seconds: dict[str, float] = {}

                # --- sample: this step's prompts (a pure function of seed and step), completions of the student
                with timed("sample", seconds, device), autocast_for(cfg.run.precision, device):
                    prompts = prompts_for_step(tasks, cfg.data.prompts_per_step, cfg.run.seed, step)
                    items = dist_utils.shard_for_rank(prompts, ctx)
                    with dist_utils.gathered(policy):
                        batch = sampler.sample(items)

                # --- score: the teacher's log-probs of the sampled tokens (and its top-k for that signal)
                with timed("score", seconds, device):
                    score_rollouts(teacher, batch)  # a cross-tokenizer teacher also sets the span layout
                    if cfg.loss.teacher_signal == "topk":
                        assert isinstance(teacher, TopKTeacher)  # checked by the builder
                        batch.teacher_topk_ids_B_T_K, batch.teacher_topk_logprobs_B_T_K = teacher.score_topk(
                            batch, cfg.loss.topk
                        )

                with timed("update", seconds, device), autocast_for(cfg.run.precision, device):
                    # --- advantages: from the log-probs of the policy that sampled; with temperature / top-k /
                    # top-p the sampler's distribution is not the student's, so pi_theta is recomputed
                    if settings.is_untempered:
                        rollout_student_lp_B_T = batch.sampler_logprobs_B_T
                    else:
                        with dist_utils.gathered(policy):
                            rollout_student_lp_B_T = student_logprobs_no_grad(
                                student,
                                batch,
                                micro_batch_size=cfg.update.micro_batch_size,
                                chunk_size=cfg.update.logprob_chunk_size,
                            )
                    advantages_B_T = rollout_advantages(
                        batch,
                        rollout_student_lp_B_T,
                        divergence=divergence,
                        estimator=cfg.loss.estimator,
                        gamma=cfg.loss.gamma,
                        log_ratio_clip=cfg.loss.log_ratio_clip,
                    )

                    # --- update: update.ppo_epochs optimizer steps over micro-batches
                    update = update_policy(
                        policy,
                        optimizer,
                        scheduler,
                        batch,
                        advantages_B_T,
                        ppo_epochs=cfg.update.ppo_epochs,
                        micro_batch_size=cfg.update.micro_batch_size,
                        clip_eps=cfg.loss.clip_eps,
                        max_grad_norm=cfg.optim.max_grad_norm,
                        chunk_size=cfg.update.logprob_chunk_size,
                        loss=update_loss,
                        ctx=ctx,
                        tokens_per_row=loss_tokens_per_row(cfg, tasks),
                    )

                # --- log: what the step did, per loss token, averaged over processes
                metrics = step_metrics(
                    update,
                    batch,
                    rollout_student_lp_B_T,
                    advantages_B_T,
                    divergence=divergence,
                    log_ratio_clip=cfg.loss.log_ratio_clip,
                    teacher=teacher,
                    seconds=seconds,
                    update_passes=cfg.update.ppo_epochs,
                    device=device,
                )
                metrics = dist_utils.reduce_metrics(metrics, ctx, weight=float(count_loss_tokens(batch.loss_mask_B_T)))

                # --- eval: held-out prompts every eval.every steps and at the end
                if (cfg.eval.every and step % cfg.eval.every == 0) or (cfg.eval.at_end and step == cfg.run.steps):
                    metrics.update(held_out_metrics(cfg, policy, student, tokenizer, teacher, tasks))
                writer.log(step, metrics)

                # --- checkpoint: every run.checkpoint_every steps and at the end
                if (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or step == cfg.run.steps:
                    last_checkpoint = write_checkpoint(
                        cfg, step, policy, student, tokenizer, optimizer, scheduler, generator, ctx, meta
                    )
        finally:
            writer.close()
        remove_replaced_runs(run_dir)  # also when no checkpoint was due (run.steps=0)
    return TrainResult(run_dir=run_dir, step=cfg.run.steps, metrics=metrics, checkpoint=last_checkpoint)


# ---------------------------------------------------------------- what train() runs in


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (0: unchanged) inside the block; HF progress bars off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
