"""Forward passes of HF causal LMs that return target-token log-probs (never full-vocab float logits).

``completion_logprobs`` runs the decoder once, then the LM head in chunks over the completion
positions only (``opdplus.ops.logprobs``). Position ids come from the attention mask, so left or
right padding gives the same scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opdplus.ops.logprobs import shifted_completion_logprobs

# Config attributes that mean the logits are not plain ``lm_head(hidden)``: such models take the
# full-logits path (correct, but it materialises [B, T, V] logits in the model's dtype).
_LOGIT_TRANSFORM_ATTRS = ("logits_scaling", "logit_scale", "output_multiplier_scale")


def position_ids_from_mask(attention_mask_B_T: torch.Tensor) -> torch.Tensor:
    return (attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft or DDP wrapper (LoRA layers stay injected)."""
    while True:
        inner = getattr(model, "module", None)
        get_base_model = getattr(model, "get_base_model", None)
        if isinstance(inner, torch.nn.Module):  # DDP
            model = inner
        elif isinstance(model, HiddenForward):
            model = model.model
        elif get_base_model is not None:  # peft
            model = get_base_model()
        else:
            return model


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None] | None:
    """(decoder, lm_head, final_logit_softcap) when logits are plain ``lm_head(decoder(x))``, else None."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORM_ATTRS):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    get_output_embeddings = getattr(base, "get_output_embeddings", None)
    head = get_output_embeddings() if get_output_embeddings is not None else None
    if decoder is None or decoder is base or head is None:
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def completion_logprobs(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    start: int,
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``logprobs_B_T[b, t] = log p_model(input_ids[b, t] | input_ids[b, :t])`` for t >= start, else 0.

    Float32; differentiable when called with autograd enabled.
    """
    policy = hidden_forward_of(model)
    if policy is None:
        policy = forward = HiddenForward(model)
    else:  # a wrapped HiddenForward is called through its (DDP / FSDP) wrapper, so gradient sync sees the forward
        forward = model
    return shifted_completion_logprobs(
        forward(input_ids_B_T, attention_mask_B_T),
        policy.head,
        input_ids_B_T,
        start,
        chunk_size=chunk_size,
        temperature=temperature,
        logit_softcap=policy.softcap,
    )


class HiddenForward(torch.nn.Module):
    """A causal LM split at its LM head, as one module: ``forward`` runs the decoder and returns
    hidden states (or the logits, for models whose logits are not plain ``lm_head(hidden)``); ``head``
    maps them to logits chunk by chunk outside. DDP / FSDP wrap this module, so their gradient
    synchronisation sees every forward; parameter names are those of the model under ``model.``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        parts = decoder_and_head(model)
        self.softcap = parts[2] if parts is not None else None

    def forward(self, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor) -> torch.Tensor:
        kwargs = dict(
            input_ids=input_ids_B_T,
            attention_mask=attention_mask_B_T.long(),
            position_ids=position_ids_from_mask(attention_mask_B_T),
            use_cache=False,
        )
        parts = decoder_and_head(self.model)
        if parts is None:
            return self.model(**kwargs).logits
        return parts[0](**kwargs).last_hidden_state

    def head(self, hidden_B_C_H: torch.Tensor) -> torch.Tensor:
        parts = decoder_and_head(self.model)
        return hidden_B_C_H if parts is None else parts[1](hidden_B_C_H)


def hidden_forward_of(model: torch.nn.Module) -> HiddenForward | None:
    """The ``HiddenForward`` that ``model`` is or wraps (DDP keeps it in ``.module``), else None."""
    inner = getattr(model, "module", model) if not isinstance(model, HiddenForward) else model
    return inner if isinstance(inner, HiddenForward) else None


def softcapped(
    head: Callable[[torch.Tensor], torch.Tensor], softcap: float | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``head`` followed by Gemma-style final soft-capping ``c * tanh(z / c)`` (when ``softcap`` is set)."""
    if softcap is None:
        return head
    return lambda hidden: torch.tanh(head(hidden).float() / softcap) * softcap
