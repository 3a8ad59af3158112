"""Static-shape decode loop for the fast sampler on CUDA: the per-token step replayed as one CUDA graph.

``FastSampler`` on CPU drops finished rows and lets attention read only the filled prefix, so its shapes
change every step; on a GPU that costs a kernel launch per op per token and a host-device sync per token
(to decide whether to stop). Here every shape is fixed for the whole block, so the step is captured once:

* **Static KV cache** (``StaticLayer``): the prefill fills ``PreallocatedLayer`` buffers of capacity
  prompt + ``max_new_tokens``; each step writes column ``column_1`` (a one-element device tensor, advanced
  inside the step) with ``index_copy_``, and attention reads the whole capacity under a key mask
  (``valid_B_S``, also updated inside the step). Finished rows keep decoding (static batch); what they emit
  after their EOS is replaced by ``pad_id`` / 0, as in ``FastSampler``.
* **CUDA graph**: ``DirectDecoder``'s one-token forward (token -> logits into a static buffer) is captured
  with ``torch.cuda.graph`` after one warm-up run and replayed per token; sampling stays eager on the
  device (inverse-CDF from the sampler's generator, as on CPU), a handful of kernels per token.
* **No per-token host sync**: whether every row is done is read every ``check_every`` tokens (default
  32); the trailing all-padding columns are cut once at the end.

The output is ``FastSampler.decode``'s: ``(completion_B_C, sampler_logprobs_B_C)`` on CPU, assembled into the
same ``RolloutBatch``. ``static_decode(..., cuda_graph=False)`` runs the same static step eagerly (any
device), which is how the CPU tests check it against the dynamic decode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from opdplus.rollout.fast_sampler import DirectDecoder, PreallocatedLayer, inverse_cdf_sample, new_kv_cache
from opdplus.rollout.sampler import draw_tokens

if TYPE_CHECKING:
    from opdplus.rollout.fast_sampler import FastSampler

Decode = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StaticLayer:
    """One layer's keys/values ``[B, H, capacity, D]``; ``update`` writes the step's column (``column_1``,
    shared by all layers) in place and returns the whole buffers, so every step has the same shapes."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, column_1: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer, self.column_1 = key_buffer, value_buffer, column_1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (as PreallocatedLayer's copy_, in the dtype the prefill allocated the buffers with)
        self.key_buffer.index_copy_(2, self.column_1, key_states.to(self.key_buffer.dtype))
        self.value_buffer.index_copy_(2, self.column_1, value_states.to(self.value_buffer.dtype))
        return self.key_buffer, self.value_buffer


class StaticCache:
    """The layers ``DirectDecoder`` reads (it only calls ``layer.update``)."""

    def __init__(self, layers: list[StaticLayer]) -> None:
        self.layers = layers


class StaticStep:
    """The per-token step over static buffers: mark column ``column_1`` valid, run ``DirectDecoder`` on
    ``token_B`` at ``position_B`` (writing that column of the cache), put the logits in ``logits_B_V``, then
    advance the column and the positions. Everything it reads and writes lives in these buffers, so it
    can be captured in a CUDA graph and replayed."""

    def __init__(
        self,
        decoder: DirectDecoder,
        cache: StaticCache,
        valid_B_S: torch.Tensor,
        column_1: torch.Tensor,
        position_B: torch.Tensor,
        vocab: int,
        dtype: torch.dtype,
    ) -> None:
        self.decoder, self.cache, self.valid_B_S, self.column_1, self.position_B = (
            decoder,
            cache,
            valid_B_S,
            column_1,
            position_B,
        )
        self.token_B = torch.zeros_like(position_B)
        self.logits_B_V = torch.zeros(position_B.shape[0], vocab, dtype=dtype, device=position_B.device)

    def __call__(self) -> None:
        self.valid_B_S.index_fill_(1, self.column_1, True)
        logits_B_V = self.decoder(self.token_B, self.position_B, self.valid_B_S, cast(Any, self.cache))
        self.logits_B_V.copy_(logits_B_V)
        self.column_1.add_(1)
        self.position_B.add_(1)


def captured(step: StaticStep) -> Callable[[], None]:
    """``step`` as a CUDA graph replay. One warm-up run on a side stream (as ``torch.cuda.graph`` requires),
    after which the step's state (column, positions) is restored; the warm-up's cache write lands in the
    column the first real step overwrites. Autocast, when on, is kept but without its weight-cast cache
    (cached casts would be freed after capture)."""
    column, position = step.column_1.clone(), step.position_B.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    step.column_1.copy_(column)
    step.position_B.copy_(position)
    graph = torch.cuda.CUDAGraph()
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False), torch.cuda.graph(graph):
        step()
    return graph.replay


def supports_static_decode(sampler: FastSampler) -> bool:
    """A Llama-family model whose every layer is full attention (``DirectDecoder`` with a preallocated cache)."""
    return DirectDecoder.supports(sampler.model, new_kv_cache(sampler.model, 1))


def cuda_decoder_for(sampler: FastSampler) -> Decode | None:
    """The CUDA-graph decode for ``sampler`` on a CUDA device with a model it covers (and no
    ``compile=True``, which keeps the compiled dynamic step); None otherwise (the dynamic decode runs)."""
    if sampler.device.type != "cuda" or sampler.compile or not supports_static_decode(sampler):
        return None
    return lambda prompt_ids_B_P, prompt_mask_B_P: static_decode(
        sampler, prompt_ids_B_P, prompt_mask_B_P, cuda_graph=True
    )


@torch.no_grad()
def static_decode(
    sampler: FastSampler,
    prompt_ids_B_P: torch.Tensor,
    prompt_mask_B_P: torch.Tensor,
    *,
    cuda_graph: bool,
    check_every: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one left-padded block with static shapes: ``(completion_B_C, sampler_logprobs_B_C)`` on CPU,
    ``pad_id`` / 0 after a row's EOS (``FastSampler.decode``'s contract). ``cuda_graph`` replays the step as
    a CUDA graph (CUDA only); all-done is read from the device every ``check_every`` tokens."""
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    model, settings, device = sampler.model, sampler.settings, sampler.device
    steps = settings.max_new_tokens
    batch, width = prompt_ids_B_P.shape
    cache = new_kv_cache(model, width + steps)
    if not DirectDecoder.supports(model, cache):
        raise ValueError(f"{type(model).__name__}: static decoding needs a Llama-family model with full attention")
    attention_B_P = prompt_mask_B_P.long().to(device)
    position_B_P = (attention_B_P.cumsum(-1) - 1).clamp(min=0)
    first_logits_B_V = model(
        input_ids=prompt_ids_B_P.to(device),
        attention_mask=attention_B_P,
        position_ids=position_B_P,
        use_cache=True,
        logits_to_keep=1,
        **{sampler._cache_kwarg: cache},
    ).logits[:, -1]
    column_1 = torch.full((1,), width, dtype=torch.long, device=device)
    layers = cast(list[PreallocatedLayer], cache.layers)  # supports() checked every layer
    for layer in layers:  # masked keys still meet the values in attention: no NaN from uninitialised memory
        layer.key_buffer[:, :, width:].zero_()
        layer.value_buffer[:, :, width:].zero_()
    static = StaticCache([StaticLayer(layer.key_buffer, layer.value_buffer, column_1) for layer in layers])
    valid_B_S = torch.zeros(batch, width + steps, dtype=torch.bool, device=device)
    valid_B_S[:, :width] = attention_B_P.bool()
    step = StaticStep(
        DirectDecoder(model),
        static,
        valid_B_S,
        column_1,
        position_B_P[:, -1] + 1,
        first_logits_B_V.shape[-1],
        first_logits_B_V.dtype,
    )
    run = captured(step) if cuda_graph else step
    eos_E = torch.tensor(sampler.eos_ids, device=device)
    done_B = torch.zeros(batch, dtype=torch.bool, device=device)
    emitted_B = torch.zeros(batch, dtype=torch.long, device=device)  # tokens up to and including the EOS
    tokens_B_C = torch.full((batch, steps), sampler.pad_id, dtype=torch.long, device=device)
    logprobs_B_C = torch.zeros((batch, steps), device=device)
    logits_B_V = first_logits_B_V
    for index in range(steps):
        token_B, logprob_B = draw_tokens(logits_B_V, settings, sampler.generator, inverse_cdf_sample)
        tokens_B_C[:, index] = token_B.masked_fill(done_B, sampler.pad_id)
        logprobs_B_C[:, index] = logprob_B.masked_fill(done_B, 0.0)
        emitted_B += ~done_B
        done_B |= torch.isin(token_B, eos_E)
        if index == steps - 1 or ((index + 1) % check_every == 0 and bool(done_B.all())):
            break
        step.token_B.copy_(token_B)
        run()
        logits_B_V = step.logits_B_V
    used = int(emitted_B.max())  # the dynamic decode stops after the last row's last token
    return tokens_B_C[:, :used].cpu(), logprobs_B_C[:, :used].cpu()
