"""Build a smaller student from a teacher by keeping K of its decoder layers (`opdplus make-student`).

The student keeps the teacher's tokenizer, embeddings, final norm and LM head, so it starts from
the teacher's weights and shares its vocabulary (no cross-tokenizer issues). Which layers stay:

* ``first``: layers 0..K-1 (the bottom of the stack);
* ``uniform``: K layers spread evenly from the first to the last, both included.

The saved directory is a plain HF model: ``config.num_hidden_layers`` (and ``layer_types`` when the
architecture has it) describe the kept layers, and every kept attention module gets its new
``layer_idx`` so the KV cache is indexed correctly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STRATEGIES = ("first", "uniform")


def select_layers(num_layers: int, keep: int, strategy: str) -> list[int]:
    """Indices of the ``keep`` layers to keep out of ``num_layers``, ascending."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not 1 <= keep <= num_layers:
        raise ValueError(f"--layers must be in [1, {num_layers}] for a teacher with {num_layers} layers, got {keep}")
    if strategy == "first" or keep == 1:
        return list(range(keep))
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder layers of a causal LM (``model.model.layers`` in HF)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__} (expected model.model.layers)")
    return layers


def prune_layers(model: Any, keep_idx: list[int]) -> Any:
    """Keep only the decoder layers ``keep_idx`` of ``model`` in place; fixes config and layer_idx."""
    import torch

    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep_idx)
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                # torch types module attributes as Tensor | Module; layer_idx is a plain int of HF's attention
                module.layer_idx = new_idx  # pyright: ignore[reportArgumentType]
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep_idx]
    config.num_hidden_layers = len(keep_idx)
    return model


def prune_to(model: Any, layers: int, strategy: str = "uniform") -> list[int]:
    """Keep ``layers`` of ``model``'s decoder layers, chosen by ``strategy``, in place; returns their indices."""
    keep_idx = select_layers(model.config.num_hidden_layers, layers, strategy)
    prune_layers(model, keep_idx)
    return keep_idx


def make_student(teacher: str, layers: int, out_dir: str | Path, strategy: str = "uniform") -> list[int]:
    """Save a ``layers``-layer student of ``teacher`` (any model spec) to ``out_dir``; returns kept indices."""
    from opdplus.models.load import load_model_and_tokenizer

    model: Any
    model, tokenizer = load_model_and_tokenizer(teacher)
    keep_idx = prune_to(model, layers, strategy)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "STUDENT").write_text(f"teacher: {teacher}\nstrategy: {strategy}\nkept_layers: {keep_idx}\n")
    return keep_idx
