"""One fingerprint of a tokenizer: two tokenizers with equal fingerprints map every id to the same token
and have the same special tokens, so a teacher may score the student's ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``sha256:<hex>`` over id -> token bytes (every id, added tokens included) plus the special tokens
    (their names, strings and ids). Works for any Hugging Face tokenizer (``get_vocab``)."""
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t".encode())
        digest.update(token.encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    special = {
        name: [getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)]
        for name in ("bos", "eos", "pad", "unk")
    }
    extra = sorted(str(token) for token in getattr(tokenizer, "all_special_tokens", []))
    digest.update(json.dumps({"special": special, "all_special": extra}, sort_keys=True, default=str).encode())
    return f"sha256:{digest.hexdigest()}"
