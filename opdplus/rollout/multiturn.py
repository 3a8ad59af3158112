"""Multi-turn rollouts: the student decodes an assistant turn, the environment answers, the student continues.

``run_episodes(sampler, task, items, limits)`` runs one episode per item and sample (``samples_per_prompt`` of
the sampler's settings; greedy when they say so) and returns one ``RolloutBatch`` row per episode plus an
``EpisodeResult`` each. A row is the opening prompt (left-padded; ``prompt_len`` is its padded length) followed
by the episode's tokens: the student's sampled tokens exactly as sampled (never decoded and re-tokenized; the
end-of-turn token included as sampled), and between turns the environment's messages as token ids framed by
the chat template (``framing_ids``). ``loss_mask`` is True exactly on the sampled tokens and
``sampler_logprobs`` holds their recorded log-probs, so a teacher scores the whole trajectory as one token
sequence and the advantages' discount counts only student tokens (docs/derivations.md, "Multi-turn episodes").

Every episode is bounded: ``max_turns`` assistant turns, ``max_new_tokens`` per turn, ``max_episode_tokens``
after the opening prompt (student and environment tokens), and ``tool_timeout_s`` per environment step; an
episode stopped by a limit before the environment said ``done`` is ``truncated``. A turn cut by
``max_new_tokens`` is still handed to the environment (the framing closes it).

With a ``FastSampler`` (and ``kv_cache=True``) the episodes of a block share one KV cache across turns: each
turn prefills only the tokens appended since the previous one (the last sampled token and the environment's
framed reply). Otherwise every turn decodes the whole history as a fresh prompt (``Sampler.decode``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jinja2 import TemplateError

from opdplus.envs.base import AssistantTurn, Environment, EnvReply, MultiTurnTask
from opdplus.rollout.sampler import Sampler, draw_tokens, left_pad
from opdplus.rollout.types import RolloutBatch
from opdplus.tasks.base import TaskItem, render_prompt
from opdplus.tasks.bfcl_match import parse_calls


@dataclass(frozen=True)
class EpisodeLimits:
    """Bounds of one episode: assistant turns, sampled tokens per turn, tokens after the opening prompt
    (student + environment), and seconds per environment step (0 = no time limit)."""

    max_turns: int = 4
    max_new_tokens: int = 64
    max_episode_tokens: int = 1024
    tool_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "max_episode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpisodeLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not self.tool_timeout_s >= 0:
            raise ValueError(f"EpisodeLimits.tool_timeout_s must be >= 0 (0 = no limit), got {self.tool_timeout_s}")


@dataclass
class EpisodeResult:
    """One finished episode. ``score`` from ``Environment.score``; ``turns`` assistant turns decoded;
    ``tool_calls`` / ``tool_errors`` as the environment counted them; ``parse_failures`` turns whose call did not
    parse; ``env_tokens`` / ``student_tokens`` tokens appended by the environment's framing / sampled;
    ``truncated`` stopped by a limit (``stop`` says which: done, max_turns, max_episode_tokens, tool_timeout);
    ``record`` is ``Environment.record()``; ``text`` the decoded transcript after the opening prompt."""

    item_id: str
    sample: int
    score: float
    turns: int
    tool_calls: int
    tool_errors: int
    parse_failures: int
    env_tokens: int
    student_tokens: int
    truncated: bool
    stop: str
    record: dict[str, Any]
    text: str

    def metrics(self) -> dict[str, float]:
        """The per-episode numbers that training logs as ``rollout/<name>`` (means over the step's episodes)."""
        return {
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "parse_failures": self.parse_failures,
            "env_tokens": self.env_tokens,
        }


@dataclass
class _Episode:
    """A running episode: its item, environment, chat history (for framing) and token sequence after the
    prompt, with the loss mask and sampler log-probs of each token."""

    item: TaskItem
    sample: int
    env: Environment
    prompt_ids: list[int]
    messages: list[dict[str, Any]]
    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # appended tokens not yet in the KV cache
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    parse_failures: int = 0
    env_tokens: int = 0
    stop: str = ""

    @property
    def active(self) -> bool:
        return not self.stop


def run_episodes(
    sampler: Sampler, task: MultiTurnTask, items: list[TaskItem], limits: EpisodeLimits, *, kv_cache: bool = True
) -> tuple[RolloutBatch, list[EpisodeResult]]:
    """One episode per item and sample of ``task`` with ``sampler``'s model and settings; see the module docstring.
    ``kv_cache=False`` makes a ``FastSampler`` recompute the whole history every turn (for comparison)."""
    n = sampler.settings.samples_per_prompt
    episodes = [_open_episode(sampler.tokenizer, task, item, j) for item in items for j in range(n)]
    size = sampler.settings.batch_size
    model = sampler.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(episodes), size):
                _run_block(sampler, episodes[start : start + size], limits, kv_cache=kv_cache)
        results = [_finish(sampler.tokenizer, ep) for ep in episodes]
    finally:
        model.train(was_training)
        for ep in episodes:
            ep.env.close()
    batch = _episode_batch(episodes, results, sampler.pad_id)
    return batch, results


def _open_episode(tokenizer: Any, task: MultiTurnTask, item: TaskItem, sample: int) -> _Episode:
    ids = tokenizer(render_prompt(tokenizer, item), add_special_tokens=isinstance(item.prompt, str)).input_ids
    if not ids:
        raise ValueError(f"the opening prompt of item {item.id!r} of task {item.task!r} renders to no tokens")
    messages = [dict(m) for m in item.prompt] if isinstance(item.prompt, list) else []
    ep = _Episode(item=item, sample=sample, env=task.environment(item), prompt_ids=list(ids), messages=messages)
    ep.pending = list(ids)
    return ep


def _run_block(sampler: Sampler, episodes: list[_Episode], limits: EpisodeLimits, *, kv_cache: bool) -> None:
    """Decode the block's episodes turn by turn until every one has stopped."""
    from opdplus.rollout.fast_sampler import FastSampler

    decoder = _CachedTurns(sampler) if kv_cache and isinstance(sampler, FastSampler) else _RecomputedTurns(sampler)
    eos_ids = set(sampler.eos_ids)
    while True:
        active = [ep for ep in episodes if ep.active]
        for ep in active:
            if limits.max_episode_tokens - len(ep.ids) < 1:
                ep.stop = "max_episode_tokens"
        active = [ep for ep in active if ep.active]
        if not active:
            return
        budgets = [min(limits.max_new_tokens, limits.max_episode_tokens - len(ep.ids)) for ep in active]
        for ep, (tokens, logprobs) in zip(active, decoder.turn(active, budgets)):
            ep.ids += tokens
            ep.sampled += [True] * len(tokens)
            ep.logprobs += logprobs
            ep.pending = tokens[-1:]
            ep.turns += 1
            ended_turn = bool(tokens) and tokens[-1] in eos_ids
            turn = assistant_turn(sampler.tokenizer, tokens[:-1] if ended_turn else tokens)
            ep.parse_failures += int(turn.malformed)
            reply = step_with_timeout(ep.env, turn, limits.tool_timeout_s)
            if reply is None:
                ep.tool_errors += 1
                ep.stop = "tool_timeout"
                continue
            ep.tool_calls += reply.tool_calls
            ep.tool_errors += reply.tool_errors
            ep.messages.append({"role": "assistant", "content": turn.text})
            if reply.done:
                ep.stop = "done"
                continue
            if ep.turns >= limits.max_turns:
                ep.stop = "max_turns"
                continue
            turn_end = sampler.tokenizer.decode(tokens[-1:]) if ended_turn else ""
            env_ids = framing_ids(sampler.tokenizer, ep.item, ep.messages, reply.messages, turn_end=turn_end)
            ep.messages += [dict(m) for m in reply.messages]
            if len(ep.ids) + len(env_ids) >= limits.max_episode_tokens:
                ep.stop = "max_episode_tokens"
                continue
            ep.ids += env_ids
            ep.sampled += [False] * len(env_ids)
            ep.logprobs += [0.0] * len(env_ids)
            ep.env_tokens += len(env_ids)
            ep.pending += env_ids


def assistant_turn(tokenizer: Any, turn_ids: list[int]) -> AssistantTurn:
    """The ``AssistantTurn`` of a turn's sampled tokens (end-of-turn token excluded): its text and parsed calls;
    ``malformed`` when it starts like a call and does not parse (``parse_calls`` returns None)."""
    return assistant_turn_of_text(tokenizer.decode(turn_ids, skip_special_tokens=False))


def assistant_turn_of_text(text: str) -> AssistantTurn:
    """The ``AssistantTurn`` of a turn's text: the calls ``parse_calls`` finds, ``malformed`` when it returns None."""
    calls = parse_calls(text)
    return AssistantTurn(text=text, calls=calls or [], malformed=calls is None)


def step_with_timeout(env: Environment, turn: AssistantTurn, timeout_s: float) -> EnvReply | None:
    """``env.step(turn)``, or None when it has not returned after ``timeout_s`` seconds (0 = wait for it). The step
    runs in a daemon thread that is left behind on a timeout: an environment that must be stopped runs its tools
    in a process of its own."""
    if not timeout_s:
        return env.step(turn)
    out: list[EnvReply | BaseException] = []

    def run() -> None:
        try:
            out.append(env.step(turn))
        except BaseException as err:  # re-raised in the caller's thread
            out.append(err)

    worker = threading.Thread(target=run, name="opdplus-env-step", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not out:
        return None
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


# ---------------------------------------------------------------- environment messages as tokens

_PROBE = "opdplus-assistant-probe"


def framing_ids(
    tokenizer: Any,
    item: TaskItem,
    history: list[dict[str, Any]],
    new_messages: list[dict[str, Any]],
    *,
    turn_end: str,
) -> list[int]:
    """Token ids to append after an assistant turn (whose message ends ``history``) so that the sequence reads as
    the chat template renders ``history + new_messages`` with the generation prompt: the template's text after
    the rendered ``history``, preceded by what the template writes after an assistant message's content beyond
    the sampled end token whose text is ``turn_end`` ("" when the turn was cut: then all of it). Items with a plain-text
    prompt get a plain framing (``plain_framing``). Only these framing tokens are tokenized; the student's tokens
    are never re-tokenized."""
    if not isinstance(item.prompt, list):
        return tokenizer(plain_framing(new_messages), add_special_tokens=False).input_ids
    kwargs = {"tools": item.meta["tools"]} if item.meta.get("tools") else {}
    try:
        before = tokenizer.apply_chat_template(history, tokenize=False, **kwargs)
        after = tokenizer.apply_chat_template(
            history + new_messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        roles = [m.get("role") for m in new_messages]
        raise ValueError(
            f"the chat template cannot render the environment's messages (roles {roles}) after an assistant turn: "
            f"{err}; make the environment answer with roles the template accepts (tool, user)"
        ) from None
    if not after.startswith(before):
        raise ValueError(
            "the chat template re-renders earlier turns when messages are added (e.g. it drops earlier <think> "
            "blocks), so an episode is not one token sequence; multi-turn rollouts need a template whose "
            "rendering of a conversation extends the rendering of its prefix (docs/derivations.md, "
            '"Multi-turn episodes")'
        )
    tail = assistant_tail(tokenizer)
    glue = tail[len(turn_end) :] if turn_end and tail.startswith(turn_end) else tail
    return tokenizer(glue + after[len(before) :], add_special_tokens=False).input_ids


def plain_framing(messages: list[dict[str, Any]]) -> str:
    """The environment's messages for a model without a chat template: each as ``\\n\\n<role>: <content>``,
    then ``\\n\\nassistant:`` for the next turn."""
    lines = [f"\n\n{m.get('role', 'tool')}: {m.get('content', '')}" for m in messages]
    return "".join(lines) + "\n\nassistant:"


def assistant_tail(tokenizer: Any) -> str:
    """What the chat template writes after an assistant message's content (``<|im_end|>\\n`` for ChatML)."""
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text[text.rindex(_PROBE) + len(_PROBE) :] if _PROBE in text else ""


# ---------------------------------------------------------------- decoding one assistant turn


class _RecomputedTurns:
    """Each turn decodes the whole history (prompt and every token so far) as a fresh prompt."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def turn(self, episodes: list[_Episode], budgets: list[int]) -> list[tuple[list[int], list[float]]]:
        sampler = self.sampler
        ids_B_P, mask_B_P = left_pad([ep.prompt_ids + ep.ids for ep in episodes], sampler.pad_id)
        settings = sampler.settings
        sampler.settings = replace(settings, max_new_tokens=max(budgets))
        try:
            completion_B_C, logprobs_B_C = sampler.decode(ids_B_P, mask_B_P)
        finally:
            sampler.settings = settings
        return [
            _cut_turn(completion_B_C[b].tolist(), logprobs_B_C[b].tolist(), sampler.eos_ids, budgets[b])
            for b in range(len(episodes))
        ]


def _cut_turn(tokens: list[int], logprobs: list[float], eos_ids: Sequence[int], budget: int) -> tuple[list, list]:
    """The turn's tokens up to and including the first EOS, at most ``budget`` of them."""
    end = min(budget, len(tokens))
    for i, token in enumerate(tokens[:end]):
        if token in eos_ids:
            end = i + 1
            break
    return tokens[:end], [float(x) for x in logprobs[:end]]


class _CachedTurns:
    """The block's episodes share one KV cache across turns: a turn first prefills each episode's pending tokens
    (left-padded into one block, padding masked out), then decodes; an episode whose turn has ended feeds a
    masked padding token until the others end theirs. Its last sampled token is fed at the next turn's prefill.
    Stopped episodes are dropped from the cache."""

    def __init__(self, sampler: Sampler) -> None:
        from opdplus.rollout.fast_sampler import FastSampler

        assert isinstance(sampler, FastSampler)
        self.sampler = sampler
        self.cache: Any = None
        self.slots: list[int] = []  # id() of the episode in each cache row
        self.attention_B_S = torch.zeros(0, 0, dtype=torch.bool)
        self.next_position_B = torch.zeros(0, dtype=torch.long)

    def turn(self, episodes: list[_Episode], budgets: list[int]) -> list[tuple[list[int], list[float]]]:
        from opdplus.rollout.fast_sampler import DirectDecoder, cpu_head_weight_H_V, inverse_cdf_sample, new_kv_cache

        sampler = self.sampler
        device = sampler.device
        self._keep([id(ep) for ep in episodes])
        block_b_N, new_b_N = left_pad([ep.pending for ep in episodes], sampler.pad_id)
        block_b_N, new_b_N = block_b_N.to(device), new_b_N.to(device)
        steps = max(budgets)
        if self.cache is None:
            self.cache = new_kv_cache(sampler.model, block_b_N.shape[1] + steps)
            self.attention_B_S = new_b_N
            self.next_position_B = torch.zeros(len(episodes), dtype=torch.long, device=device)
        else:
            self.attention_B_S = torch.cat([self.attention_B_S, new_b_N], dim=1)
            for layer in getattr(self.cache, "layers", []):
                if hasattr(layer, "reserve"):
                    layer.reserve(self.attention_B_S.shape[1] + steps)
        position_b_N = self.next_position_B[:, None] + (new_b_N.long().cumsum(-1) - 1).clamp(min=0)
        logits_b_V = sampler.model(
            input_ids=block_b_N,
            attention_mask=self.attention_B_S.long(),
            position_ids=position_b_N,
            use_cache=True,
            logits_to_keep=1,
            **{sampler._cache_kwarg: self.cache},
        ).logits[:, -1]
        next_position_b = position_b_N[:, -1] + 1
        direct = DirectDecoder.supports(sampler.model, self.cache)
        decode_step = sampler._decode_step(direct)
        head_weight_H_V = cpu_head_weight_H_V(DirectDecoder.head_of(sampler.model), len(episodes)) if direct else None
        eos_E = torch.tensor(sampler.eos_ids, device=device)
        budget_b = torch.tensor(budgets, device=device)
        running_b = torch.ones(len(episodes), dtype=torch.bool, device=device)
        tokens_b_C = torch.full((len(episodes), steps), sampler.pad_id, dtype=torch.long, device=device)
        logprobs_b_C = torch.zeros((len(episodes), steps), device=device)
        drawn_b_C = torch.zeros((len(episodes), steps), dtype=torch.bool, device=device)
        for step in range(steps):
            token_b, logprob_b = draw_tokens(logits_b_V, sampler.settings, sampler.generator, inverse_cdf_sample)
            tokens_b_C[:, step], logprobs_b_C[:, step], drawn_b_C[:, step] = token_b, logprob_b, running_b
            running_b = running_b & ~torch.isin(token_b, eos_E) & (budget_b > step + 1)
            if not bool(running_b.any()):
                break
            self.attention_B_S = torch.cat([self.attention_B_S, running_b[:, None]], dim=1)
            fed_b = torch.where(running_b, token_b, torch.full_like(token_b, sampler.pad_id))
            logits_b_V = decode_step(fed_b, next_position_b, self.attention_B_S, self.cache, head_weight_H_V)
            next_position_b = next_position_b + running_b.long()
        self.next_position_B = next_position_b
        tokens_b_C, logprobs_b_C, drawn_b_C = tokens_b_C.cpu(), logprobs_b_C.cpu(), drawn_b_C.cpu()
        return [
            (tokens_b_C[b][drawn_b_C[b]].tolist(), logprobs_b_C[b][drawn_b_C[b]].tolist()) for b in range(len(episodes))
        ]

    def _keep(self, slots: list[int]) -> None:
        """Drop the cache rows of episodes that have stopped (``slots`` keeps the order of the rows)."""
        if self.cache is None or slots == self.slots:
            self.slots = slots
            return
        keep_b = torch.tensor([self.slots.index(s) for s in slots], dtype=torch.long, device=self.sampler.device)
        self.cache.batch_select_indices(keep_b)
        self.attention_B_S = self.attention_B_S[keep_b]
        self.next_position_B = self.next_position_B[keep_b]
        self.slots = slots


# ---------------------------------------------------------------- results and the rollout batch


def _finish(tokenizer: Any, ep: _Episode) -> EpisodeResult:
    return EpisodeResult(
        item_id=ep.item.id,
        sample=ep.sample,
        score=float(ep.env.score()),
        turns=ep.turns,
        tool_calls=ep.tool_calls,
        tool_errors=ep.tool_errors,
        parse_failures=ep.parse_failures,
        env_tokens=ep.env_tokens,
        student_tokens=sum(ep.sampled),
        truncated=ep.stop != "done",
        stop=ep.stop,
        record=dict(ep.env.record()),
        text=tokenizer.decode(ep.ids, skip_special_tokens=False),
    )


def _episode_batch(episodes: list[_Episode], results: list[EpisodeResult], pad_id: int) -> RolloutBatch:
    """Opening prompts left-padded, episode tokens right-padded; loss mask on sampled tokens only."""
    prompt_ids_B_P, prompt_mask_B_P = left_pad([ep.prompt_ids for ep in episodes], pad_id)
    width = max(1, max(len(ep.ids) for ep in episodes))
    ids_B_C = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    real_B_C = torch.zeros((len(episodes), width), dtype=torch.bool)
    sampled_B_C = torch.zeros((len(episodes), width), dtype=torch.bool)
    logprobs_B_C = torch.zeros((len(episodes), width))
    for b, ep in enumerate(episodes):
        n = len(ep.ids)
        ids_B_C[b, :n] = torch.tensor(ep.ids, dtype=torch.long)
        real_B_C[b, :n] = True
        sampled_B_C[b, :n] = torch.tensor(ep.sampled, dtype=torch.bool)
        logprobs_B_C[b, :n] = torch.tensor(ep.logprobs, dtype=torch.float32)
    return RolloutBatch(
        input_ids_B_T=torch.cat([prompt_ids_B_P, ids_B_C], dim=1),
        attention_mask_B_T=torch.cat([prompt_mask_B_P, real_B_C], dim=1),
        loss_mask_B_T=torch.cat([torch.zeros_like(prompt_mask_B_P), sampled_B_C], dim=1),
        sampler_logprobs_B_T=torch.cat([torch.zeros(prompt_ids_B_P.shape), logprobs_B_C], dim=1),
        prompt_len=prompt_ids_B_P.shape[1],
        tasks=[ep.item.task for ep in episodes],
        truncated_B=torch.tensor([r.truncated for r in results], dtype=torch.bool),
        meta=[{"item_id": ep.item.id, "sample": ep.sample, "episode": r.metrics()} for ep, r in zip(episodes, results)],
    )


class EpisodeSampler:
    """A sampler for a mix of tasks where some are multi-turn: ``sample(items)`` runs the items of multi-turn tasks
    (matched by their tag, ``TaskItem.task``) as episodes with ``limits`` and the others as single completions of
    ``sampler``, in one ``RolloutBatch`` whose rows follow the items (``samples_per_prompt`` each). An episode row's
    meta has ``score`` and ``episode`` (its ``EpisodeResult.metrics()``); ``results`` holds the last call's
    ``EpisodeResult``s."""

    def __init__(self, sampler: Sampler, tasks: Sequence[MultiTurnTask], limits: EpisodeLimits) -> None:
        self.sampler = sampler
        self.tasks = list(tasks)
        self.limits = limits
        self.results: list[EpisodeResult] = []

    @property
    def settings(self):
        return self.sampler.settings

    def task_of(self, item: TaskItem) -> MultiTurnTask | None:
        """The multi-turn task whose items carry ``item``'s tag (its name, or the tag of its items)."""
        for task in self.tasks:
            if item.task in (task.name, getattr(task, "tag", task.name)):
                return task
        return None

    def sample(self, items: list[TaskItem]) -> RolloutBatch:
        n = self.sampler.settings.samples_per_prompt
        groups: dict[int, list[int]] = {}  # task index (-1: single-turn) -> item positions
        for position, item in enumerate(items):
            task = self.task_of(item)
            groups.setdefault(-1 if task is None else self.tasks.index(task), []).append(position)
        parts, order, self.results = [], [], []
        for index, positions in groups.items():
            group = [items[p] for p in positions]
            if index < 0:
                parts.append(self.sampler.sample(group))
            else:
                batch, results = run_episodes(self.sampler, self.tasks[index], group, self.limits)
                for row, result in zip(batch.meta, results):
                    row["score"] = result.score
                parts.append(batch)
                self.results += results
            order += [p * n + j for p in positions for j in range(n)]
        batch = concat_batches(parts, self.sampler.pad_id)
        rows = sorted(range(len(order)), key=order.__getitem__)
        return batch if rows == list(range(len(rows))) else batch.select(rows)


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """The rows of ``batches`` in one ``RolloutBatch``: prompts left-padded to the longest ``prompt_len``,
    completions right-padded to the widest. Teacher fields must not be set yet."""
    if len(batches) == 1:
        return batches[0]
    if any(b.teacher_logprobs_B_T is not None or b.teacher_topk_ids_B_T_K is not None for b in batches):
        raise ValueError("concat_batches joins sampled batches before they are scored; these have teacher fields")
    prompt_len = max(b.prompt_len for b in batches)
    width = max(b.input_ids_B_T.shape[1] - b.prompt_len for b in batches)

    def padded(b: RolloutBatch, name: str, value: float | int | bool) -> torch.Tensor:
        x_B_T = getattr(b, name)
        left = torch.full((b.batch_size, prompt_len - b.prompt_len), value, dtype=x_B_T.dtype)
        right_width = width - (x_B_T.shape[1] - b.prompt_len)
        right = torch.full((b.batch_size, right_width), value, dtype=x_B_T.dtype)
        return torch.cat([left, x_B_T.cpu(), right], dim=1)

    fills = {"input_ids_B_T": pad_id, "attention_mask_B_T": False, "loss_mask_B_T": False, "sampler_logprobs_B_T": 0.0}
    truncated = [
        b.truncated_B.cpu() if b.truncated_B is not None else torch.zeros(b.batch_size, dtype=torch.bool)
        for b in batches
    ]
    return RolloutBatch(
        **{name: torch.cat([padded(b, name, value) for b in batches]) for name, value in fills.items()},
        prompt_len=prompt_len,
        tasks=[t for b in batches for t in (b.tasks or [""] * b.batch_size)],
        truncated_B=torch.cat(truncated),
        meta=[m for b in batches for m in (b.meta or [{}] * b.batch_size)],
    )
