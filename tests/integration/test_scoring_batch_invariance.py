"""The teacher server's scores of a prompt do not depend on which other prompts share its batch."""

from __future__ import annotations

import random

import torch

from opdplus.rollout.server import ScoringEngine


def test_scores_are_independent_of_batch_composition():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    engine = ScoringEngine(LlamaForCausalLM(config).eval())
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(2, 90))] for _ in range(10)]
    alone = [engine.score([p], 3)[0] for p in prompts]
    for _ in range(6):
        rows = rng.sample(range(len(prompts)), rng.randint(2, len(prompts)))
        for i, scores in zip(rows, engine.score([prompts[i] for i in rows], 3)):
            assert scores.token_logprobs == alone[i].token_logprobs  # bitwise
            assert scores.top_ids == alone[i].top_ids and scores.top_logprobs == alone[i].top_logprobs
