"""Student sampler: HF ``generate`` -> a self-contained ``RolloutBatch``.

Sampling is done by a logits processor that draws each token from ``sampling_logprobs`` with the
sampler's own ``torch.Generator`` (saved in checkpoints, so a resumed run draws the same tokens) and
records the drawn token's log-prob; ``generate`` itself runs greedy over the forced choice. The
recorded ``sampler_logprobs`` are therefore exactly those of the distribution sampled from.

Every decode of the project goes through this sampler or its twin ``FastSampler``: training rollouts,
the training eval hook, benchmark evaluation and the demo world. Greedy decoding is the same code with
``SamplingSettings(greedy=True)`` (``draw_tokens`` takes the argmax; the recorded log-prob is 0, that of
a point mass), and ``eos_token_ids`` is the one end-of-sequence rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from opdplus.ops.logprobs import sampling_logprobs
from opdplus.rollout.types import RolloutBatch
from opdplus.tasks.base import TaskItem, render_prompt


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k
    top_p: float = 1.0  # 1 = no nucleus cut
    batch_size: int = 64  # rows per generate call
    greedy: bool = False  # argmax at every step (evaluation); temperature, top_k and top_p are then unused

    @property
    def is_untempered(self) -> bool:
        """True when the sampler draws from the student's own distribution (on-policy)."""
        return not self.greedy and self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


def multinomial_sample(logweights_B_V: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_B, logprob_B)``: one token per row drawn from ``softmax(logweights)`` by ``torch.multinomial``,
    and its log-prob under that distribution."""
    logprobs_B_V = torch.log_softmax(logweights_B_V, dim=-1)
    token_B = torch.multinomial(logprobs_B_V.exp(), 1, generator=generator).squeeze(-1)
    return token_B, logprobs_B_V.gather(-1, token_B[:, None]).squeeze(-1)


def draw_tokens(
    logits_B_V: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator,
    sample: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] = multinomial_sample,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_B, logprob_B)``: the next token of every row and its log-prob under the distribution
    drawn from (``sampling_logprobs`` of ``settings``, sampled with ``sample``, which takes unnormalised
    log-weights); with ``settings.greedy`` the argmax of the logits, with log-prob 0."""
    if settings.greedy:
        token_B = logits_B_V.argmax(-1)
        return token_B, torch.zeros(token_B.shape, device=logits_B_V.device)
    if settings.is_untempered:  # the student's own distribution: the logits are its log-weights
        return sample(logits_B_V.float(), generator)
    logprobs_B_V = sampling_logprobs(
        logits_B_V, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p
    )
    return sample(logprobs_B_V, generator)


class _SampleAndRecord(LogitsProcessor):
    """Draws the next token with ``generator`` and forces ``generate`` to take it; records log-probs."""

    def __init__(self, settings: SamplingSettings, generator: torch.Generator) -> None:
        self.settings = settings
        self.generator = generator
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        token_B, logprob_B = draw_tokens(scores, self.settings, self.generator)
        self.tokens.append(token_B)
        self.logprobs.append(logprob_B)
        forced_B_V = torch.full_like(scores, float("-inf"))
        return forced_B_V.scatter(-1, token_B[:, None], 0.0)


def eos_token_ids(tokenizer, model) -> list[int]:
    """End-of-sequence ids, the one rule for every decode: the tokenizer's EOS, the model generation
    config's EOS ids (chat models often have several) and the chat template's end-of-turn token."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [
        tokenizer.eos_token_id,
        *(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]),
        end_of_turn_id(tokenizer),
    ]
    ids: list[int] = []
    for value in candidates:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token; generation could never stop")
    return ids


_TURN_PROBE = "opdplus-end-of-turn-probe"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``, ...); None without a chat template or when none follows."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return None  # a template that rejects this conversation: no end-of-turn token to learn from it
    if not isinstance(text, str) or _TURN_PROBE not in text:
        return None
    after = text[text.rindex(_TURN_PROBE) + len(_TURN_PROBE) :]
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    if not ids:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    special = ids[0] in tokenizer.all_special_ids or bool(getattr(added, "special", False))
    return int(ids[0]) if special else None


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_prompts(tokenizer, items: list[TaskItem]) -> list[list[int]]:
    """Token ids of each rendered prompt; chat-rendered text already carries its special tokens."""
    out = []
    for item in items:
        ids = tokenizer(render_prompt(tokenizer, item), add_special_tokens=isinstance(item.prompt, str)).input_ids
        if not ids:
            if tokenizer.bos_token_id is None:
                raise ValueError(f"prompt of item {item.id!r} is empty and the tokenizer has no BOS token")
            ids = [tokenizer.bos_token_id]
        out.append(list(ids))
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_B_P, mask_B_P)`` with every row right-aligned (left padding)."""
    width = max(len(r) for r in rows)
    ids_B_P = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_B_P = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids_B_P[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask_B_P[i, width - len(row) :] = True
    return ids_B_P, mask_B_P


def completion_mask(completion_B_C: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask_B_C, truncated_B)``: tokens up to and including the first EOS; truncated = no EOS."""
    is_eos_B_C = torch.isin(completion_B_C, torch.tensor(eos_ids, device=completion_B_C.device))
    eos_seen_before_B_C = (is_eos_B_C.long().cumsum(-1) - is_eos_B_C.long()) > 0
    return ~eos_seen_before_B_C, ~is_eos_B_C.any(-1)


class Sampler:
    """Samples ``samples_per_prompt`` completions per task item from ``model``."""

    def __init__(self, model, tokenizer, settings: SamplingSettings, generator: torch.Generator) -> None:
        if settings.temperature != 1.0 and not settings.greedy:
            warnings.warn(
                f"sampling temperature {settings.temperature} != 1: rollouts are off-policy for the student; "
                "the importance ratio uses the tempered sampler log-probs",
                stacklevel=2,
            )
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.generator = generator
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def sample(self, items: list[TaskItem]) -> RolloutBatch:
        n = self.settings.samples_per_prompt
        prompts = [ids for ids in tokenize_prompts(self.tokenizer, items) for _ in range(n)]
        batch = self.sample_ids(prompts)
        batch.tasks = [item.task for item in items for _ in range(n)]
        batch.meta = [  # the prompt: a teacher with another tokenizer renders it with its own chat template
            {"item_id": item.id, "sample": j, "prompt": item.prompt, "tools": item.meta.get("tools")}
            for item in items
            for j in range(n)
        ]
        return batch

    @torch.no_grad()
    def sample_ids(self, prompts: list[list[int]]) -> RolloutBatch:
        """One completion per prompt (token ids), ``settings.batch_size`` prompts per ``decode`` call."""
        prompt_ids_B_P, prompt_mask_B_P = left_pad(prompts, self.pad_id)
        was_training = self.model.training
        self.model.eval()
        try:
            size = self.settings.batch_size
            parts = [
                self.decode(prompt_ids_B_P[i : i + size], prompt_mask_B_P[i : i + size])
                for i in range(0, len(prompts), size)
            ]
        finally:
            self.model.train(was_training)
        return assemble_rollouts(prompt_ids_B_P, prompt_mask_B_P, parts, pad_id=self.pad_id, eos_ids=self.eos_ids)

    def decode(self, prompt_ids_B_P: torch.Tensor, prompt_mask_B_P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``generate`` call: ``(completion_B_C, sampler_logprobs_B_C)`` on CPU."""
        recorder = _SampleAndRecord(self.settings, self.generator)
        config = GenerationConfig(
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        sequences = self.model.generate(
            input_ids=prompt_ids_B_P.to(self.device),
            attention_mask=prompt_mask_B_P.long().to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        completion_B_C = sequences[:, prompt_ids_B_P.shape[1] :].cpu()
        steps = completion_B_C.shape[1]
        recorded_B_C = torch.stack(recorder.tokens[:steps], dim=1).cpu()
        logprobs_B_C = torch.stack(recorder.logprobs[:steps], dim=1).cpu()
        mask_B_C, _ = completion_mask(completion_B_C, self.eos_ids)
        if not torch.equal(recorded_B_C[mask_B_C], completion_B_C[mask_B_C]):
            raise RuntimeError("generate did not follow the sampler's tokens; a generation-config processor interfered")
        return completion_B_C, logprobs_B_C


def assemble_rollouts(
    prompt_ids_B_P: torch.Tensor,
    prompt_mask_B_P: torch.Tensor,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    pad_id: int,
    eos_ids: list[int],
) -> RolloutBatch:
    """The ``RolloutBatch`` of left-padded prompts and the generated blocks ``(completion_B_C,
    sampler_logprobs_B_C)``: completions right-padded, masked after EOS. A row that ends exactly at
    max_new_tokens with EOS is not truncated; shorter rows are not either."""
    width = max(p[0].shape[1] for p in parts)
    completion_B_C = torch.cat([_pad_right(p[0], width, pad_id) for p in parts])
    logprobs_B_C = torch.cat([_pad_right(p[1], width, 0.0) for p in parts])
    mask_B_C, truncated_B = completion_mask(completion_B_C, eos_ids)
    return RolloutBatch(
        input_ids_B_T=torch.cat([prompt_ids_B_P, completion_B_C.where(mask_B_C, pad_id)], dim=1),
        attention_mask_B_T=torch.cat([prompt_mask_B_P, mask_B_C], dim=1),
        loss_mask_B_T=torch.cat([torch.zeros_like(prompt_mask_B_P), mask_B_C], dim=1),
        sampler_logprobs_B_T=torch.cat([torch.zeros(prompt_ids_B_P.shape), logprobs_B_C.where(mask_B_C, 0.0)], dim=1),
        prompt_len=prompt_ids_B_P.shape[1],
        truncated_B=truncated_B,
    )


def _pad_right(x_B_C: torch.Tensor, width: int, value: float | int) -> torch.Tensor:
    if x_B_C.shape[1] == width:
        return x_B_C
    pad = torch.full((x_B_C.shape[0], width - x_B_C.shape[1]), value, dtype=x_B_C.dtype)
    return torch.cat([x_B_C, pad], dim=1)
