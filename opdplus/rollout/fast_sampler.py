"""Fast student sampler: our own decode loop over an HF causal LM -> the same ``RolloutBatch`` as ``Sampler``.

Drop-in twin of ``opdplus.rollout.sampler.Sampler`` (same constructor, same ``sample(items)``), faster
because it skips ``generate``'s per-step machinery and wasted work:

* **Preallocated KV cache** (``PreallocatedLayer``): keys/values live in one buffer per layer sized for
  prompt + ``max_new_tokens``; each step writes one column in place and attention reads only the filled
  prefix, so no per-step concatenation (``DynamicCache``) and no attention over empty slots (``StaticCache``).
  Models with sliding-window or other non-full attention layers fall back to ``DynamicCache(config=...)``.
* **Ragged prompts without waste**: prompts are left-padded once for the prefill with position ids
  ``mask.cumsum - 1``; only the last position goes through the LM head (``logits_to_keep=1``); a row that
  emits EOS is dropped from the batch (and from the cache), so finished rows cost nothing.
* **Direct decode step** (``DirectDecoder``) for Llama-family models (llama, mistral, qwen2, qwen3): each
  step calls the model's own modules (LoRA layers included) without HF's per-call mask building and
  output plumbing; other models use their HF forward with the same cache.
* Tokens are drawn by the same ``draw_tokens`` as ``Sampler`` (same distribution, the sampler's own
  generator) with inverse-CDF sampling, ~8x cheaper than ``torch.multinomial`` on CPU; the drawn token's
  log-prob is recorded. ``SamplingSettings(greedy=True)`` takes the argmax in the same loop.
* ``compile=True`` wraps the decode step in ``torch.compile(dynamic=True)``. Measured on CPU
  (``bench/sampler.py``) it gains a few percent after a compile of tens of seconds, so it is off by default.

The random stream therefore differs from ``Sampler``'s (same distribution, different draws); greedy
decoding gives the same tokens as HF ``generate``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs

from opdplus.models.forward import decoder_and_head, unwrap_model
from opdplus.rollout.sampler import Sampler, SamplingSettings, draw_tokens


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer backed by one ``[B, H, capacity, D]`` buffer written in place.

    ``update`` returns views of the filled prefix, so attention costs O(filled) rather than O(capacity).
    ``batch_select_indices`` (drop finished rows) compacts the buffer once per drop event.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded (need {end})")
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to hold at least ``capacity`` positions (a multi-turn episode continues past the
        first turn's size); the filled prefix is kept."""
        if capacity <= self.capacity:
            return
        if self.is_initialized:
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                grown = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
                grown[:, :, : self.length].copy_(old[:, :, : self.length])
                setattr(self, name, grown)
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]
        self.capacity = capacity

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.key_buffer = self.key_buffer[indices]
        self.value_buffer = self.value_buffer[indices]
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def reset(self) -> None:
        super().reset()
        self.length = 0


def new_kv_cache(model: torch.nn.Module, capacity: int) -> Cache:
    """A preallocated cache when every layer is full attention; else HF's ``DynamicCache`` for the model's config."""
    model_config: Any = model.config  # a transformers PreTrainedConfig
    layer_types, _ = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
    if all(kind == "full_attention" for kind in layer_types):
        return Cache(layers=[PreallocatedLayer(capacity) for _ in layer_types])
    return DynamicCache(config=model_config)


# Decoders whose layers are exactly: RMSNorm -> attention (q/k/v/o projections, optional q/k norm, RoPE)
# -> residual -> RMSNorm -> MLP -> residual; logits = lm_head(norm(h)). Their decode step can skip HF's
# per-call machinery (mask building, output capturing, kwargs plumbing).
DIRECT_DECODE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class DirectDecoder:
    """One-token decode step that calls the model's own modules (so LoRA-injected layers still apply) and
    reads the ``PreallocatedLayer`` cache: the same math as the HF forward without its per-call overhead."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        parts = decoder_and_head(model)
        if parts is None:
            raise ValueError(f"{type(model).__name__}: logits are not plain lm_head(decoder(x)); use the HF step")
        # the decoder's submodules (embed_tokens, rotary_emb, layers, norm) are reached by name
        self.decoder: Any = parts[0]
        self.head = parts[1]
        self.apply_rotary = apply_rotary_pos_emb

    @staticmethod
    def head_of(model: torch.nn.Module) -> torch.nn.Module:
        """The LM head of a model that ``supports`` allows."""
        parts = decoder_and_head(model)
        assert parts is not None, "DirectDecoder.supports(model) is False"
        return parts[1]

    @staticmethod
    def supports(model: torch.nn.Module, cache: Cache) -> bool:
        """Llama-like model, plain ``lm_head`` logits, and every layer full attention (a preallocated cache)."""
        return (
            getattr(unwrap_model(model).config, "model_type", None) in DIRECT_DECODE_MODEL_TYPES
            and decoder_and_head(model) is not None
            and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
        )

    def __call__(
        self,
        token_b: torch.Tensor,
        position_b: torch.Tensor,
        key_valid_b_S: torch.Tensor,
        cache: Cache,
        head_weight_H_V: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[b, V]`` for the next token; appends this step's keys/values to ``cache``.
        ``head_weight_H_V``: the head's weight laid out by ``cpu_head_weight_H_V``, or None."""
        hidden_b_1_H = self.decoder.embed_tokens(token_b[:, None])
        cos, sin = self.decoder.rotary_emb(hidden_b_1_H, position_ids=position_b[:, None])
        mask_b_1_1_S = key_valid_b_S[:, None, None, :]
        layer_caches = cast(list[PreallocatedLayer], cache.layers)  # supports() checked every layer
        for layer, layer_cache in zip(self.decoder.layers, layer_caches):
            hidden_b_1_H = hidden_b_1_H + self._attention(
                layer.self_attn, layer.input_layernorm(hidden_b_1_H), cos, sin, mask_b_1_1_S, layer_cache
            )
            hidden_b_1_H = hidden_b_1_H + layer.mlp(layer.post_attention_layernorm(hidden_b_1_H))
        return head_logits(self.head, self.decoder.norm(hidden_b_1_H)[:, -1], head_weight_H_V)

    def _attention(self, attn, x_b_1_H, cos, sin, mask_b_1_1_S, layer_cache: PreallocatedLayer) -> torch.Tensor:
        batch = x_b_1_H.shape[0]
        shape = (batch, 1, -1, attn.head_dim)
        query, key = attn.q_proj(x_b_1_H).view(shape), attn.k_proj(x_b_1_H).view(shape)
        if hasattr(attn, "q_norm"):  # qwen3
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = self.apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        value = attn.v_proj(x_b_1_H).view(shape).transpose(1, 2)
        keys, values = layer_cache.update(key, value)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask_b_1_1_S, scale=attn.scaling, enable_gqa=keys.shape[1] != query.shape[1]
        )
        return attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))


CPU_HEAD_LAYOUT_MIN_VOCAB = 8192  # smaller heads are called as they are (``cpu_head_weight_H_V``)


def cpu_head_weight_H_V(head: torch.nn.Module, rows: int) -> torch.Tensor | None:
    """The LM head's weight as a contiguous ``[H, V]`` copy when a CPU decode step is faster with it, else None.

    For a large plain ``nn.Linear`` head on CPU and at most 8 rows, ``h @ W^T`` from a contiguous ``W^T`` runs
    1.5-2x faster than the ``nn.Linear`` call or ``(W @ h^T)^T`` at vocab 49152 (``bench/sampler.py --head``):
    same dot products, another summation order. The copy is made once per decoded block (the weights change
    between steps) and costs one more head's memory while the block decodes."""
    if (
        type(head) is torch.nn.Linear
        and head.weight.device.type == "cpu"
        and rows <= 8
        and head.out_features >= CPU_HEAD_LAYOUT_MIN_VOCAB
    ):
        return cast(torch.nn.Linear, head).weight.detach().t().contiguous()
    return None


def head_logits(
    head: torch.nn.Module, hidden_b_H: torch.Tensor, weight_H_V: torch.Tensor | None = None
) -> torch.Tensor:
    """``head(hidden_b_H)``, the logits ``[b, V]`` of one decode step; ``hidden_b_H @ weight_H_V`` (plus the
    bias) when ``weight_H_V``, the head's weight from ``cpu_head_weight_H_V``, is given."""
    if weight_H_V is None:
        return head(hidden_b_H)
    logits_b_V = hidden_b_H @ weight_H_V
    bias = getattr(head, "bias", None)
    return logits_b_V if bias is None else logits_b_V + bias


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    parameters = inspect.signature(unwrap_model(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class FastSampler(Sampler):
    """Samples ``samples_per_prompt`` completions per task item; same interface and output as ``Sampler``,
    with our own decode loop in place of HF ``generate``."""

    def __init__(
        self, model, tokenizer, settings: SamplingSettings, generator: torch.Generator, *, compile: bool = False
    ) -> None:
        super().__init__(model, tokenizer, settings, generator)
        self.compile = compile
        self._cache_kwarg = cache_keyword(model)
        # direct? -> decode-step function (compiled once when asked)
        self._steps: dict[bool, Callable[..., torch.Tensor]] = {}

    def decode(self, prompt_ids_B_P: torch.Tensor, prompt_mask_B_P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one left-padded block: ``(completion_B_C, sampler_logprobs_B_C)`` on CPU; after a row's EOS
        its slots hold ``pad_id`` / 0. On CUDA, Llama-family models take the CUDA-graph loop (``cuda_decode``)."""
        from opdplus.rollout.cuda_decode import cuda_decoder_for

        if (cuda_decode := cuda_decoder_for(self)) is not None:
            return cuda_decode(prompt_ids_B_P, prompt_mask_B_P)
        device, steps = self.device, self.settings.max_new_tokens
        batch, width = prompt_ids_B_P.shape
        cache = new_kv_cache(self.model, width + steps)
        attention_B_S = prompt_mask_B_P.long().to(device)
        position_B_P = (attention_B_S.cumsum(-1) - 1).clamp(min=0)
        logits_b_V = self.model(
            input_ids=prompt_ids_B_P.to(device),
            attention_mask=attention_B_S,
            position_ids=position_B_P,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        ).logits[:, -1]
        next_position_b = position_B_P[:, -1] + 1
        direct = DirectDecoder.supports(self.model, cache)
        decode_step = self._decode_step(direct)
        head_weight_H_V = cpu_head_weight_H_V(DirectDecoder.head_of(self.model), batch) if direct else None
        rows_b = torch.arange(batch, device=device)  # original row of each row still decoding
        eos_E = torch.tensor(self.eos_ids, device=device)
        tokens_B_C = torch.full((batch, steps), self.pad_id, dtype=torch.long, device=device)
        logprobs_B_C = torch.zeros((batch, steps), device=device)
        used = 0
        for step in range(steps):
            token_b, logprob_b = draw_tokens(logits_b_V, self.settings, self.generator, inverse_cdf_sample)
            tokens_B_C[rows_b, step] = token_b
            logprobs_B_C[rows_b, step] = logprob_b
            used = step + 1
            running_b = ~torch.isin(token_b, eos_E)
            if step == steps - 1 or not bool(running_b.any()):
                break
            if not bool(running_b.all()):
                keep_b = running_b.nonzero().squeeze(1)
                cache.batch_select_indices(keep_b)
                rows_b, token_b, next_position_b, attention_B_S = (
                    rows_b[keep_b],
                    token_b[keep_b],
                    next_position_b[keep_b],
                    attention_B_S[keep_b],
                )
            attention_B_S = torch.cat([attention_B_S, attention_B_S.new_ones(attention_B_S.shape[0], 1)], dim=1)
            logits_b_V = decode_step(token_b, next_position_b, attention_B_S, cache, head_weight_H_V)
            next_position_b = next_position_b + 1
        return tokens_B_C[:, :used].cpu(), logprobs_B_C[:, :used].cpu()

    def _decode_step(self, direct: bool):
        """``step(token_b, position_b, attention_b_S, cache, head_weight_H_V) -> logits_b_V``: ``DirectDecoder``
        (``head_weight_H_V`` as for ``cpu_head_weight_H_V``) when the model
        allows it, else the model's own forward; wrapped in ``torch.compile`` when ``compile=True``."""
        if direct not in self._steps:
            step = self._direct_step(DirectDecoder(self.model)) if direct else self._hf_step
            self._steps[direct] = torch.compile(step, dynamic=True) if self.compile else step
        return self._steps[direct]

    @staticmethod
    def _direct_step(decoder: DirectDecoder):
        return lambda token_b, position_b, attention_b_S, cache, head_weight_H_V: decoder(
            token_b, position_b, attention_b_S.bool(), cache, head_weight_H_V
        )

    def _hf_step(
        self,
        token_b: torch.Tensor,
        position_b: torch.Tensor,
        attention_b_S: torch.Tensor,
        cache: Cache,
        head_weight_H_V: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(
            input_ids=token_b[:, None],
            attention_mask=attention_b_S,
            position_ids=position_b[:, None],
            use_cache=True,
            **{self._cache_kwarg: cache},
        ).logits[:, -1]


def inverse_cdf_sample(logweights_b_V: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_b, logprob_b)``: one token per row drawn exactly from ``softmax(logweights)``, the first index
    whose cumulative mass exceeds ``u * total``, ``u ~ U[0, 1)`` from ``generator``, and its log-prob
    ``logweight - max - log(total)``. Zero-mass tokens are never drawn (their cumulative mass equals their
    predecessor's). Three passes over the vocabulary (max, exp, cumsum); on CPU ~8x faster than
    ``torch.multinomial`` and 1.3-3x faster than a ``log_softmax`` before the draw."""
    max_b_1 = logweights_b_V.amax(-1, keepdim=True)
    cdf_b_V = (logweights_b_V - max_b_1).exp_().cumsum_(-1)
    total_b_1 = cdf_b_V[:, -1:]
    u_b_1 = torch.rand(cdf_b_V.shape[0], 1, generator=generator, device=cdf_b_V.device) * total_b_1
    token_b = torch.searchsorted(cdf_b_V, u_b_1, right=True).squeeze(-1).clamp_(max=cdf_b_V.shape[-1] - 1)
    logprob_b_1 = logweights_b_V.gather(-1, token_b[:, None]) - max_b_1 - total_b_1.log()
    return token_b, logprob_b_1.squeeze(-1)
