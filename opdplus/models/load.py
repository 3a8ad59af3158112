"""Load Hugging Face causal LMs and tokenizers from local directories, or build tiny ones from a config.

Nothing here downloads: a model spec is a local directory (``save_pretrained`` layout), a
``gguf:<package>/<file.gguf>`` spec (``opdplus.models.sources``), or ``"tiny"``.
Functions take plain arguments (no config objects); ``opdplus.train`` translates its config.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from opdplus.models.tiny import (
    TINY_MERGES,
    build_char_tokenizer,
    build_merged_char_tokenizer,
    build_tiny_model,
    special_token_ids,
)

TINY = "tiny"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


class DeviceError(ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu. DeviceError for a device this machine
    does not have (``cuda`` without CUDA) or a name torch does not know."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise DeviceError(f"unknown device {name!r} ({err}); use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                "use auto or cpu"
            )
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _local_dir(spec: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} {spec!r} is not a local directory (opdplus never downloads; give a directory written by "
            f"save_pretrained, or 'tiny' for a tiny random model)"
        )
    return path


def load_tokenizer(spec: str) -> Any:
    """A local tokenizer directory, or ``tiny-merges`` (``opdplus.models.tiny.build_merged_char_tokenizer``)."""
    if spec == TINY_MERGES:
        return build_merged_char_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(_local_dir(spec, "tokenizer"), local_files_only=True)
    return tokenizer


def load_model_and_tokenizer(
    model: str,
    *,
    tokenizer: str | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    tiny: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``, the one model loader: ``model`` is a local HF directory or a
    ``gguf:<package>/<file.gguf>`` spec (converted once, ``opdplus.models.sources``); ``model="tiny"``
    builds a random Llama of shape ``tiny`` (kwargs of ``build_tiny_model``) over the character
    tokenizer (or over ``tokenizer`` when given). Loading shows no progress bars."""
    hf_logging.disable_progress_bar()
    if model == TINY:
        tok = load_tokenizer(tokenizer) if tokenizer else build_char_tokenizer()
        pad, bos, eos = special_token_ids(tok)
        lm = build_tiny_model(len(tok), pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, **(tiny or {}))
    else:
        from opdplus.models.sources import resolve_model  # local HF dir, or a gguf:<package>/<file> spec

        path = Path(resolve_model(model))
        tok = load_tokenizer(tokenizer or str(path))
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), local_files_only=True)
    # transformers declares PreTrainedModel.to as functools.wraps(nn.Module.to), which hides the bound self
    return lm.to(device=device, dtype=torch_dtype(dtype)), tok  # pyright: ignore[reportCallIssue]


def apply_lora(
    model: torch.nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str]
) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs peft: pip install 'opdplus[lora]'") from err
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,  # pyright: ignore[reportArgumentType]  (peft annotates an int; it is used as a float)
        lora_dropout=dropout,
        target_modules=list(target_modules),
    )
    return get_peft_model(model, config)


def load_lora_weights(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Load adapter weights saved by ``PeftModel.save_pretrained`` into an existing LoRA model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"adapter in {adapter_dir} has keys this model does not: {unexpected[:5]}")


def model_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output (LM head) matrix."""
    get_head = getattr(model, "get_output_embeddings", None)
    weight = getattr(get_head(), "weight", None) if get_head is not None else None
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config: Any = getattr(model, "config", None)  # a transformers PreTrainedConfig
    return int(config.vocab_size)


PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 (x + y) * z = 42? Ça coûte 5€ — naïve 日本語"


def probe_token_ids(tokenizer: Any, spread: int = 32) -> list[int]:
    """Token ids that tell two vocabularies apart, for a teacher whose tokenizer cannot be read (a served one):
    the special tokens, the tokens of ``PROBE_TEXT``, and ``spread`` ids spaced evenly over the whole vocabulary
    (the last one included). Distinct, in that order."""
    size = len(tokenizer)
    ids = [*list(tokenizer.all_special_ids)[:16], *tokenizer.encode(PROBE_TEXT, add_special_tokens=False)[:64]]
    ids += [round(i * (size - 1) / (spread - 1)) for i in range(spread)]
    return list(dict.fromkeys(int(i) for i in ids if 0 <= i < size))


def decoded_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id decoded alone, as vLLM and ``opdplus serve-teacher`` write the ``tokens`` of an echo response."""
    return [tokenizer.decode([i]) for i in ids]


def first_token_difference(ids: list[int], student_tokens: list[str], teacher_tokens: list[str]) -> str | None:
    """``"id 5 is 'a' for the student, 'b' for the teacher"`` for the first id whose tokens differ, else None."""
    for i, ours, theirs in zip(ids, student_tokens, teacher_tokens):
        if ours != theirs:
            return f"id {i} is {ours!r} for the student, {theirs!r} for the teacher"
    return None


def _vocabulary_difference(student_tokenizer: Any, teacher_tokenizer: Any) -> str:
    ids = list(range(min(len(student_tokenizer), len(teacher_tokenizer))))
    found = first_token_difference(
        ids, student_tokenizer.convert_ids_to_tokens(ids), teacher_tokenizer.convert_ids_to_tokens(ids)
    )
    return f" (first difference: {found})" if found else ""


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """ValueError, with both sizes and the first differing token, unless both tokenizers map the same token
    strings to the same ids."""
    student_size, teacher_size = len(student_tokenizer), len(teacher_tokenizer)
    if student_size != teacher_size:
        raise ValueError(
            f"vocabulary mismatch: student tokenizer has {student_size} tokens, teacher tokenizer has "
            f"{teacher_size}{_vocabulary_difference(student_tokenizer, teacher_tokenizer)}; the teacher must use "
            "the student's tokenizer (or set teacher.cross_tokenizer=auto to score spans across tokenizers)"
        )
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"vocabulary mismatch: student and teacher tokenizers both have {student_size} tokens but map "
            f"them to different ids{_vocabulary_difference(student_tokenizer, teacher_tokenizer)}; the teacher "
            "must use the student's tokenizer"
        )


def check_same_vocabulary(
    student_tokenizer: Any, teacher_tokenizer: Any, student_model: torch.nn.Module, teacher_model: torch.nn.Module
) -> None:
    """The teacher scores the student's token ids, so both must use one vocabulary.

    Raises ValueError, with both sizes, when the tokenizers differ (``check_same_tokenizer``) or when the
    teacher's output layer has fewer rows than the student's (the student could sample ids the teacher cannot
    score). A model head smaller than the tokenizer only warns (families often leave a few added tokens out of
    the head).
    """
    check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    student_size = len(student_tokenizer)
    student_rows, teacher_rows = model_vocab_size(student_model), model_vocab_size(teacher_model)
    if teacher_rows < student_rows:
        raise ValueError(
            f"vocabulary mismatch: the teacher model's output layer has {teacher_rows} rows but the student's has "
            f"{student_rows}; the student could sample token ids the teacher cannot score"
        )
    if min(student_rows, teacher_rows) < student_size:
        warnings.warn(
            f"the tokenizer has {student_size} tokens but the model output layers have {student_rows} (student) "
            f"and {teacher_rows} (teacher) rows; prompts must not contain the missing token ids",
            stacklevel=2,
        )
