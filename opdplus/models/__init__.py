"""Models and tokenizers: loading from local directories, tiny random models for tests, LoRA, and
forward passes that return target-token log-probs."""

from opdplus.models.forward import completion_logprobs, position_ids_from_mask
from opdplus.models.load import (
    apply_lora,
    check_same_vocabulary,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    torch_dtype,
)
from opdplus.models.tiny import build_char_tokenizer, build_tiny_model, save_tiny_model_dir

__all__ = [
    "apply_lora",
    "build_char_tokenizer",
    "build_tiny_model",
    "check_same_vocabulary",
    "completion_logprobs",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "position_ids_from_mask",
    "resolve_device",
    "save_tiny_model_dir",
    "torch_dtype",
]
