"""The update step: ``update.ppo_epochs`` optimizer steps on one rollout batch, accumulated over
micro-batches, with the loss of the run's teacher signal behind one small interface (``UpdateLoss``):

- ``PolicyGradientLoss`` (``loss.teacher_signal=sampled``): the clipped policy-gradient loss of the
  per-token advantages (OPD+ arXiv 2606.01039; PPO arXiv 1707.06347 clipping);
- ``PerPositionLoss`` (``topk`` / ``exact``): the divergence over the teacher's top-k plus a tail bucket,
  or over the full vocabulary, differentiated directly, plus a policy-gradient term for future positions
  when gamma > 0 (docs/training.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

import opdplus.train.distributed as dist_utils
from opdplus.models.forward import completion_logprobs, decoder_and_head, hidden_forward_of, softcapped
from opdplus.ops.chunked import chunked_exact_divergence, chunked_topk_divergence
from opdplus.ops.divergences import Divergence
from opdplus.ops.fused_head import fused_head_loss
from opdplus.ops.logprobs import shifted_completion_logprobs
from opdplus.ops.loss import policy_loss, ratio_clip_fraction
from opdplus.ops.signals import per_position_divergence_loss
from opdplus.rollout.types import RolloutBatch
from opdplus.train.config import LossConfig
from opdplus.train.distributed import DistContext
from opdplus.train.metrics import count_loss_tokens


@dataclass
class MicroBatchLoss:
    """One micro-batch's loss (already divided by the step's normalizer) and what the step logs of it."""

    loss: torch.Tensor
    student_logprobs_B_T: torch.Tensor  # at the current weights, with gradient
    # metric -> sum over loss tokens, a 0-d tensor on the device (read once per step, divided by the normalizer)
    logged_sums: dict[str, torch.Tensor]


class UpdateLoss(Protocol):
    def micro_batch(
        self,
        model: torch.nn.Module,
        mb: RolloutBatch,
        advantages_B_T: torch.Tensor,
        *,
        clip_eps: float | None,
        normalizer: float,
        chunk_size: int,
    ) -> MicroBatchLoss: ...


@dataclass(frozen=True)
class PolicyGradientLoss:
    """``loss.teacher_signal=sampled``: the (PPO-clipped) policy-gradient loss of the advantages."""

    def micro_batch(
        self,
        model: torch.nn.Module,
        mb: RolloutBatch,
        advantages_B_T: torch.Tensor,
        *,
        clip_eps: float | None,
        normalizer: float,
        chunk_size: int,
    ) -> MicroBatchLoss:
        weight_V_H = fusable_head_weight(model)
        if weight_V_H is not None:
            return self.fused(model, weight_V_H, mb, advantages_B_T, clip_eps, normalizer, chunk_size)
        student_lp_B_T = completion_logprobs(
            model, mb.input_ids_B_T, mb.attention_mask_B_T, mb.prompt_len, chunk_size=chunk_size
        )
        loss = policy_loss(
            student_lp_B_T,
            mb.sampler_logprobs_B_T,
            advantages_B_T,
            mb.loss_mask_B_T,
            clip_eps=clip_eps,
            normalizer=normalizer,
        )
        return MicroBatchLoss(loss, student_lp_B_T, {})

    @staticmethod
    def fused(
        model: torch.nn.Module,
        weight_V_H: torch.Tensor,
        mb: RolloutBatch,
        advantages_B_T: torch.Tensor,
        clip_eps: float | None,
        normalizer: float,
        chunk_size: int,
    ) -> MicroBatchLoss:
        """The same loss with the LM head, log-probs and the loss's gradient in one pass per block of logits
        (``opdplus.ops.fused_head``): no recompute of the head in the backward."""
        start = mb.prompt_len
        hidden_B_T_H = model(mb.input_ids_B_T, mb.attention_mask_B_T)

        def token_loss(lp_B_c: torch.Tensor, cols: slice) -> torch.Tensor:
            at = slice(start + cols.start, start + cols.start + lp_B_c.shape[1])
            return policy_loss(
                lp_B_c,
                mb.sampler_logprobs_B_T[:, at],
                advantages_B_T[:, at],
                mb.loss_mask_B_T[:, at],
                clip_eps=clip_eps,
                normalizer=normalizer,
            )

        loss, lp_B_C = fused_head_loss(
            hidden_B_T_H[:, start - 1 : -1], weight_V_H, mb.input_ids_B_T[:, start:], token_loss, chunk_size=chunk_size
        )
        student_lp_B_T = torch.cat([lp_B_C.new_zeros(mb.batch_size, start), lp_B_C], dim=1)
        return MicroBatchLoss(loss, student_lp_B_T, {})


def fusable_head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight when the update can fuse head and loss: a ``HiddenForward`` policy (maybe in DDP)
    whose logits are a plain bias-free ``nn.Linear`` without soft-capping, not sharded by FSDP; else None."""
    policy = hidden_forward_of(model)
    parts = decoder_and_head(policy.model) if policy is not None else None
    if parts is None or parts[2] is not None or dist_utils.is_fsdp(model):
        return None
    head = parts[1]
    return head.weight if type(head) is torch.nn.Linear and head.bias is None else None


@dataclass(frozen=True)
class PerPositionLoss:
    """``loss.teacher_signal`` topk / exact: the per-position divergence loss (the advantages are unused).
    Logs ``div/<divergence>_<kind>``, the divergence it used per loss token before the update."""

    kind: str  # "topk" (needs batch.teacher_topk_*) | "exact" (needs a LocalTeacher)
    divergence: Divergence
    gamma: float = 0.0
    teacher: Any = None

    def micro_batch(
        self,
        model: torch.nn.Module,
        mb: RolloutBatch,
        advantages_B_T: torch.Tensor,
        *,
        clip_eps: float | None,
        normalizer: float,
        chunk_size: int,
    ) -> MicroBatchLoss:
        student_lp_B_T, divergence_B_T = self.divergence_of(model, mb, chunk_size)
        loss = per_position_divergence_loss(
            divergence_B_T,
            student_lp_B_T,
            mb.sampler_logprobs_B_T,
            mb.loss_mask_B_T,
            gamma=self.gamma,
            clip_eps=clip_eps,
            normalizer=normalizer,
        )
        used = torch.where(mb.loss_mask_B_T, divergence_B_T.detach(), 0.0).sum()
        return MicroBatchLoss(loss, student_lp_B_T, {f"div/{self.divergence.name}_{self.kind}": used})

    def divergence_of(
        self, model: torch.nn.Module, mb: RolloutBatch, chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student_logprobs_B_T, divergence_B_T) of a micro-batch from one student forward; both 0 before
        the completion. The LM heads run in chunks of positions (never a full [B, T, V] tensor)."""
        policy = hidden_forward_of(model)
        if policy is None:
            raise ValueError("teacher_signal topk / exact needs the student wrapped in HiddenForward")
        start = mb.prompt_len
        hidden_B_T_H = model(mb.input_ids_B_T, mb.attention_mask_B_T)
        student_lp_B_T = shifted_completion_logprobs(
            hidden_B_T_H, policy.head, mb.input_ids_B_T, start, chunk_size=chunk_size, logit_softcap=policy.softcap
        )
        student_head = softcapped(policy.head, policy.softcap)
        hidden_B_C_H = hidden_B_T_H[:, start - 1 : -1]
        if self.kind == "exact":
            teacher_hidden_B_T_H, teacher_head = self.teacher.hidden_states(mb)
            divergence_B_C = chunked_exact_divergence(
                hidden_B_C_H,
                student_head,
                teacher_hidden_B_T_H[:, start - 1 : -1].to(hidden_B_C_H.device),
                teacher_head,
                self.divergence,
                chunk_size=chunk_size,
            )
        else:
            ids_B_T_K, logprobs_B_T_K = mb.teacher_topk_ids_B_T_K, mb.teacher_topk_logprobs_B_T_K
            if ids_B_T_K is None or logprobs_B_T_K is None:
                raise ValueError("teacher_signal topk: the batch has no teacher top-k (score it with score_topk)")
            divergence_B_C = chunked_topk_divergence(
                hidden_B_C_H,
                student_head,
                ids_B_T_K[:, start:],
                logprobs_B_T_K[:, start:],
                self.divergence,
                chunk_size=chunk_size,
            )
        divergence_B_T = torch.cat([divergence_B_C.new_zeros(mb.batch_size, start), divergence_B_C.float()], dim=1)
        return student_lp_B_T, divergence_B_T


def update_loss_for(loss: LossConfig, divergence: Divergence, teacher: Any) -> UpdateLoss:
    """The loss of ``loss.teacher_signal``."""
    if loss.teacher_signal == "sampled":
        return PolicyGradientLoss()
    return PerPositionLoss(loss.teacher_signal, divergence, loss.gamma, teacher)


def micro_batch_slices(batch_size: int, micro_batch_size: int) -> list[slice]:
    return [slice(i, min(i + micro_batch_size, batch_size)) for i in range(0, batch_size, micro_batch_size)]


def trim_right_padding(batch: RolloutBatch) -> RolloutBatch:
    """Drop trailing columns where no row has a real token (saves work on short micro-batches)."""
    width = int(batch.attention_mask_B_T.any(0).nonzero().max()) + 1
    width = max(width, batch.prompt_len)
    if width == batch.input_ids_B_T.shape[1]:
        return batch
    return batch.columns(width)


@torch.no_grad()
def student_logprobs_no_grad(
    model: torch.nn.Module, batch: RolloutBatch, *, micro_batch_size: int, chunk_size: int
) -> torch.Tensor:
    """log pi_theta of the batch's tokens at the current weights (0 off the loss mask), [B, T]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    for rows in micro_batch_slices(batch.batch_size, micro_batch_size):
        mb = batch.select(rows).to(device)
        lp = completion_logprobs(model, mb.input_ids_B_T, mb.attention_mask_B_T, mb.prompt_len, chunk_size=chunk_size)
        parts.append(lp.where(mb.loss_mask_B_T, 0.0).cpu())
    model.train(was_training)
    return torch.cat(parts).to(batch.input_ids_B_T.device)


def update_policy(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: RolloutBatch,
    advantages_B_T: torch.Tensor,
    *,
    ppo_epochs: int = 1,
    micro_batch_size: int = 8,
    clip_eps: float | None = None,
    max_grad_norm: float | None = None,
    chunk_size: int = 256,
    loss: UpdateLoss = PolicyGradientLoss(),
    ctx: DistContext = DistContext(),
    tokens_per_row: int | None = None,
) -> dict[str, float]:
    """``ppo_epochs`` optimizer steps on ``batch``; each accumulates gradients over micro-batches with the
    number of loss tokens in the whole step (summed over all processes) as the normalizer, so neither
    the micro-batch size nor the number of processes changes the update. DDP / FSDP average gradients
    over processes, so the loss is multiplied by the world size. With ``tokens_per_row`` (``loss.normalizer:
    constant``) the loss is divided by the step's rows times that number instead; logged metrics stay per token.
    The logged sums stay on the device until the micro-batches are done: one host-device sync per optimizer
    step (with the gradient norm), none per micro-batch."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    normalizer = max(dist_utils.all_reduce_sum(count_loss_tokens(batch.loss_mask_B_T), ctx), 1.0)
    loss_normalizer = normalizer
    if tokens_per_row is not None:
        loss_normalizer = dist_utils.all_reduce_sum(float(batch.batch_size), ctx) * tokens_per_row
    model.train()
    losses, grad_norms, clip_fracs, lrs, logged, skipped = [], [], [], [], [], 0
    for _ in range(ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64, device=device)}
        for rows in micro_batch_slices(batch.batch_size, micro_batch_size):
            mb = trim_right_padding(batch.select(rows)).to(device)
            adv_B_T = advantages_B_T[rows, : mb.input_ids_B_T.shape[1]].to(device)
            out = loss.micro_batch(
                model, mb, adv_B_T, clip_eps=clip_eps, normalizer=loss_normalizer, chunk_size=chunk_size
            )
            (out.loss * ctx.world_size).backward()
            clipped = {}
            if clip_eps is not None:
                frac = ratio_clip_fraction(
                    out.student_logprobs_B_T, mb.sampler_logprobs_B_T, adv_B_T, mb.loss_mask_B_T, clip_eps
                )
                clipped["clipped"] = frac * mb.loss_mask_B_T.sum()
            for key, value in {"loss": out.loss.detach(), **clipped, **out.logged_sums}.items():
                sums[key] = sums[key] + value.double() if key in sums else value.double()
        totals = dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # the step's one read of the sums
        loss_sum, clipped_sum = totals.pop("loss"), totals.pop("clipped", 0.0)
        grad_norm = dist_utils.total_grad_norm(params, max_grad_norm)
        lrs.append(optimizer.param_groups[0]["lr"])
        if math.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1  # never apply a NaN/inf update; the step still counts for the schedule
        scheduler.step()
        losses.append(dist_utils.all_reduce_sum(loss_sum, ctx))
        grad_norms.append(grad_norm)
        clip_fracs.append(dist_utils.all_reduce_sum(clipped_sum, ctx) / normalizer)
        logged.append({k: dist_utils.all_reduce_sum(v, ctx) / normalizer for k, v in totals.items()})
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss/policy": losses[0],
        "loss/policy_last_epoch": losses[-1],
        "loss/grad_norm": sum(grad_norms) / len(grad_norms),
        "loss/lr": lrs[0],
        "loss/ratio_clip_frac": sum(clip_fracs) / len(clip_fracs),
        "loss/skipped_steps": float(skipped),
        **logged[0],  # per loss token, before the update
    }
