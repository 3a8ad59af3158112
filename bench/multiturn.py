"""Multi-turn rollouts: ``FastSampler`` continuing each episode from its KV cache vs recomputing the history.

Same random Llama-style student over the character tokenizer, same episodes of a scripted environment whose
tool answers are ``--tool-chars`` characters long, greedy decoding (a random model never ends a turn, so every
turn runs to ``--new-tokens`` and both variants do the same work and produce the same tokens, which is checked).
``kv``: ``run_episodes`` with the cache kept across turns (each turn prefills only the appended tokens);
``recompute``: ``run_episodes(..., kv_cache=False)``, every turn prefills the whole history. Variants run
alternately; the median seconds per batch of episodes are reported. Last line:
``{"bench": {"multiturn": {"kv_over_recompute": ...}}}`` (> 1 = the cache is faster).

    python bench/multiturn.py [--quick] [--turns 4] [--new-tokens 32] [--tool-chars 200] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, format_table, median, ratio  # noqa: E402

QUICK = dict(hidden=128, layers=2, batch=4, turns=3, new_tokens=16, tool_chars=100, rounds=2)
FULL = dict(hidden=256, layers=4, batch=8, turns=4, new_tokens=32, tool_chars=200, rounds=3)


def main(argv: list[str] | None = None) -> int:
    import torch

    from opdplus.envs.base import EnvReply
    from opdplus.envs.scripted import ScriptedEnvironment, ScriptedToolsTask
    from opdplus.models.tiny import build_char_tokenizer, build_tiny_model
    from opdplus.rollout.fast_sampler import FastSampler
    from opdplus.rollout.multiturn import EpisodeLimits, run_episodes
    from opdplus.rollout.sampler import SamplingSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(1)

    class LongAnswers(ScriptedEnvironment):
        def step(self, turn):
            reply = super().step(turn)
            if reply.done:
                return reply
            return EnvReply(messages=[{"role": "tool", "content": ("{'value': 42} " * 200)[: args.tool_chars]}])

    class LongAnswerTask(ScriptedToolsTask):
        def environment(self, item):
            return LongAnswers(dict(item.meta["table"]), item.answer, replies=self.replies)

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer),
        hidden_size=args.hidden,
        num_layers=args.layers,
        intermediate_size=4 * args.hidden,
        max_positions=4096,
        initializer_range=0.02,
    ).eval()
    task = LongAnswerTask(replies=args.turns)
    items = task.items("eval", args.batch)
    limits = EpisodeLimits(max_turns=args.turns, max_new_tokens=args.new_tokens, max_episode_tokens=100_000)
    settings = SamplingSettings(max_new_tokens=args.new_tokens, batch_size=args.batch, greedy=True)
    seconds: dict[str, list[float]] = {"kv": [], "recompute": []}
    outputs, tokens = {}, {}
    for _ in range(args.rounds):
        for name in seconds:
            sampler = FastSampler(model, tokenizer, settings, torch.Generator())
            start = time.perf_counter()
            batch, results = run_episodes(sampler, task, items, limits, kv_cache=name == "kv")
            seconds[name].append(time.perf_counter() - start)
            outputs[name] = batch.input_ids_B_T
            tokens[name] = int(batch.loss_mask_B_T.sum())
            episode_tokens = int(batch.attention_mask_B_T.sum())
    if not torch.equal(outputs["kv"], outputs["recompute"]):
        raise SystemExit("the KV-cache continuation and the recompute gave different tokens")
    rows = [[name, median(s), tokens[name] / median(s)] for name, s in seconds.items()]
    print(
        f"{args.batch} episodes x {args.turns} turns x {args.new_tokens} sampled tokens, tool answers of "
        f"{args.tool_chars} characters, d={args.hidden} x {args.layers} layers, {episode_tokens} tokens in the batch, "
        f"{args.rounds} rounds, 1 thread"
    )
    print(format_table(["variant", "s / batch", "sampled tok/s"], rows))
    speedup = ratio(median(seconds["recompute"]), median(seconds["kv"]))
    print(f"kv / recompute speed: {speedup}")
    emit(
        "multiturn",
        {"kv_over_recompute": speedup, "kv_s": median(seconds["kv"]), "recompute_s": median(seconds["recompute"])},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
