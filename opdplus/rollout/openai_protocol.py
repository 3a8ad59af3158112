"""The slice of the OpenAI / vLLM ``/v1/completions`` protocol used to score token ids.

A scoring request gives prompts as token ids (or text, tokenized with the served model's tokenizer) and
asks for their log-probs, without generating (``max_tokens=0``) or with one generated token
(``max_tokens=1``, as scripts written for ``vllm serve`` often send):

    {"model": "m", "prompt": [[1, 5, 9], [1, 7]], "echo": true, "max_tokens": 0, "logprobs": 0}
    {"model": "m", "prompt": [1, 5, 9], "max_tokens": 0, "prompt_logprobs": 5}
    {"model": "m", "prompt": "2 + 2 = 4", "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0}

and each choice of the response carries them in one or both of vLLM's shapes:

* ``choices[i].prompt_logprobs``: one entry per prompt token; the first is ``null`` (nothing
  precedes it), the others map token id (a JSON string) to ``{"logprob", "rank",
  "decoded_token"}`` for the prompt token itself plus the top-k.
* ``choices[i].logprobs`` (with ``echo``): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, one entry per prompt token, the first ``token_logprobs`` being ``null``;
  ``top_logprobs`` maps decoded token text to log-prob. With ``max_tokens=1`` the generated token
  follows the prompt's entries (without ``echo``: it is the only entry).

Log-probs are clamped at -9999.0 as vLLM does (JSON has no -inf). Server side:
``parse_completion_request`` and ``format_completion_response``; client side:
``prompt_token_logprobs``. No web framework is imported here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOGPROB_FLOOR = -9999.0


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code, the message says what is wrong."""

    def __init__(self, status: int, message: str, *, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = {
            400: "BadRequestError",
            401: "AuthenticationError",
            404: "NotFoundError",
            405: "MethodNotAllowedError",
            413: "RequestTooLargeError",
            415: "UnsupportedMediaTypeError",
            503: "ServiceUnavailableError",
        }.get(self.status, "Error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; anything beyond is answered with a 4xx."""

    max_request_bytes: int = 16 * 2**20
    max_prompts_per_request: int = 256
    max_prompt_tokens: int = 8192
    max_top_logprobs: int = 20


@dataclass(frozen=True)
class Sampling:
    """How the one generated token of a ``max_tokens=1`` request is drawn: greedy at temperature 0, else
    from softmax(logits / temperature), seeded when ``seed`` is given. Its reported log-prob is the model's
    own (untempered), like the prompt's."""

    temperature: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class ScoreRequest:
    prompts: list[list[int]]
    top_k: int  # how many top alternatives each position needs (max of logprobs / prompt_logprobs)
    logprobs: int | None  # k for the ``logprobs`` block, None = no block
    prompt_logprobs: int | None  # k for ``prompt_logprobs``, None = not returned
    echo: bool
    return_token_ids: bool
    return_tokens_as_token_ids: bool
    sampling: Sampling | None = None  # set when max_tokens=1: one token is generated after each prompt

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class PromptScores:
    """Scores of one prompt of L tokens; lists have L - 1 entries (positions 1..L-1). With generation, one
    more entry each for the generated token ``generated`` (position L)."""

    token_logprobs: list[float]
    token_ranks: list[int]  # 1 = the model's most likely token
    top_ids: list[list[int]]  # [L-1][k], best first (k may exceed what a request asked for)
    top_logprobs: list[list[float]]
    generated: int | None = None


# --------------------------------------------------------------------------------------------
# server side: request validation
# --------------------------------------------------------------------------------------------

_SCORING_ONLY = (
    "this is a scoring server: it returns prompt log-probs and generates at most one token; send "
    "max_tokens=0 (scores only) or max_tokens=1 (scores plus one generated token), with echo=true and "
    "logprobs=N, or with prompt_logprobs=N"
)


def parse_completion_request(
    body: Any,
    *,
    limits: ServerLimits,
    vocab_size: int,
    model_name: str,
    tokenize: Callable[[str], list[int]] | None = None,
) -> ScoreRequest:
    """Validate a decoded JSON body; raise ``RequestError`` (4xx) naming the first problem. Text prompts
    are tokenized with ``tokenize`` (the served model's tokenizer; without one they are refused)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"the model `{model}` does not exist; this server serves `{model_name}`", param="model")
    max_tokens = _get_max_tokens(body)
    echo = _get_bool(body, "echo", default=False)
    logprobs_k = _get_k(body, "logprobs", limits)
    prompt_k = _get_k(body, "prompt_logprobs", limits)
    if prompt_k is None and echo and logprobs_k is not None:
        prompt_k = logprobs_k  # vLLM: echo + logprobs implies prompt_logprobs = logprobs
    if prompt_k is None and max_tokens == 0:
        raise RequestError(400, "nothing to score: set echo=true with logprobs=N, or prompt_logprobs=N (N >= 0)")
    prompts = _get_prompts(body, limits, vocab_size, tokenize)
    return ScoreRequest(
        prompts=prompts,
        top_k=max(prompt_k or 0, logprobs_k or 0),
        logprobs=logprobs_k,
        prompt_logprobs=prompt_k,
        echo=echo,
        return_token_ids=_get_bool(body, "return_token_ids", default=False),
        return_tokens_as_token_ids=_get_bool(body, "return_tokens_as_token_ids", default=False),
        sampling=_get_sampling(body) if max_tokens == 1 else None,
    )


def _get_max_tokens(body: dict) -> int:
    """0 or 1. An omitted ``max_tokens`` is refused: vLLM would generate 16 tokens, which this server does not."""
    if "max_tokens" not in body or body["max_tokens"] is None:
        raise RequestError(400, f"missing field `max_tokens`; {_SCORING_ONLY}", param="max_tokens")
    max_tokens = body["max_tokens"]
    if not _is_int(max_tokens):
        raise RequestError(400, f"`max_tokens` must be an integer, got {type(max_tokens).__name__}", param="max_tokens")
    if max_tokens not in (0, 1):
        raise RequestError(400, f"max_tokens={max_tokens} is not supported; {_SCORING_ONLY}", param="max_tokens")
    _check_single_choice(body)
    return max_tokens


def _get_sampling(body: dict) -> Sampling:
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < 1e6:
        raise RequestError(400, f"`temperature` must be a number >= 0, got {temperature!r}", param="temperature")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(400, f"`seed` must be an integer, got {seed!r}", param="seed")
    return Sampling(temperature=float(temperature), seed=seed)


def _check_single_choice(body: dict) -> None:
    if body.get("stream"):
        raise RequestError(400, "stream=true is not supported: scores are returned in one response", param="stream")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise RequestError(400, f"n={n!r}: only n=1 is supported on a scoring-only server", param="n")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get_bool(body: dict, key: str, *, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"`{key}` must be true or false, got {value!r}", param=key)
    return value


def _get_k(body: dict, key: str, limits: ServerLimits) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise RequestError(
            400, f"`{key}` must be an integer >= 0 (top-k alternatives per token), got {value!r}", param=key
        )
    if value > limits.max_top_logprobs:
        raise RequestError(400, f"`{key}`={value} exceeds this server's limit of {limits.max_top_logprobs}", param=key)
    return value


def _get_prompts(
    body: dict, limits: ServerLimits, vocab_size: int, tokenize: Callable[[str], list[int]] | None
) -> list[list[int]]:
    if "prompt" not in body:
        raise RequestError(
            400, "missing field `prompt` (text, a list of texts, token ids or a list of lists of ids)", param="prompt"
        )
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(
            400,
            "`prompt` must be a non-empty list of token ids or of such lists, a text or a list of texts",
            param="prompt",
        )
    if isinstance(prompt[0], str):
        prompt = [_tokenized(i, text, limits, tokenize) for i, text in enumerate(prompt)]
    prompts: list[Any] = [prompt] if _is_int(prompt[0]) else prompt
    if len(prompts) > limits.max_prompts_per_request:
        raise RequestError(
            400, f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request}", param="prompt"
        )
    for i, ids in enumerate(prompts):
        _check_token_ids(i, ids, limits, vocab_size)
    return prompts  # checked: lists of ints


def _tokenized(i: int, text: Any, limits: ServerLimits, tokenize: Callable[[str], list[int]] | None) -> Any:
    """Token ids of a text prompt (its token count is checked with the other prompts')."""
    if not isinstance(text, str):
        return text  # a mixed list; _check_token_ids names the bad entry
    if tokenize is None:
        raise RequestError(
            400, "this server has no tokenizer to encode text prompts: send token ids instead", param="prompt"
        )
    max_chars = 64 * limits.max_prompt_tokens  # no tokenizer run on a text far beyond the token limit
    if len(text) > max_chars:
        raise RequestError(
            400,
            f"prompt[{i}] has {len(text)} characters; the limit is {max_chars} (and {limits.max_prompt_tokens} tokens)",
            param="prompt",
        )
    return tokenize(text)


def _check_token_ids(i: int, ids: Any, limits: ServerLimits, vocab_size: int) -> None:
    where = f"prompt[{i}]"
    if not isinstance(ids, list) or not ids:
        raise RequestError(
            400, f"{where} must be a non-empty list of token ids, got {type(ids).__name__}", param="prompt"
        )
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(
            400, f"{where} has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}", param="prompt"
        )
    for j, tok in enumerate(ids):
        if not _is_int(tok):
            raise RequestError(400, f"{where}[{j}] = {tok!r} is not an integer token id", param="prompt")
        if not 0 <= tok < vocab_size:
            raise RequestError(
                400, f"{where}[{j}] = {tok} is out of range: token ids must be in [0, {vocab_size})", param="prompt"
            )


# --------------------------------------------------------------------------------------------
# server side: response
# --------------------------------------------------------------------------------------------


def format_completion_response(
    request: ScoreRequest,
    scores: list[PromptScores],
    *,
    model_name: str,
    decode: Callable[[int], str],
    decode_text: Callable[[list[int]], str],
) -> dict:
    """The vLLM-shaped ``text_completion`` response for a validated request and its scores."""
    token_str = (lambda t: f"token_id:{t}") if request.return_tokens_as_token_ids else decode
    choices = []
    for i, (ids, sc) in enumerate(zip(request.prompts, scores)):
        output = [] if sc.generated is None else [sc.generated]
        choice: dict[str, Any] = {
            "index": i,
            "text": (decode_text(ids) if request.echo else "") + (decode_text(output) if output else ""),
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        if request.logprobs is not None and (request.echo or output):
            block = _logprobs_block(ids + output, sc, request.logprobs, token_str)
            if not request.echo:  # the generated token only, its offset counted from the start of `text`
                block = {key: values[len(ids) :] for key, values in block.items()}
                block["text_offset"] = [offset - block["text_offset"][0] for offset in block["text_offset"]]
            choice["logprobs"] = block
        if request.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs_block(ids, sc, request.prompt_logprobs, decode)
        if request.return_token_ids:
            choice["prompt_token_ids"] = ids
            if output:
                choice["token_ids"] = output
        choices.append(choice)
    n_tokens = request.num_tokens
    generated = sum(sc.generated is not None for sc in scores)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": n_tokens, "completion_tokens": generated, "total_tokens": n_tokens + generated},
    }


def _floor(lp: float) -> float:
    return max(lp, LOGPROB_FLOOR)


def _prompt_logprobs_block(ids: list[int], sc: PromptScores, k: int, decode: Callable[[int], str]) -> list:
    block: list[dict | None] = [None]
    for pos, tok in enumerate(ids[1:]):  # the prompt only, never a generated token
        entry = {
            str(tok): {
                "logprob": _floor(sc.token_logprobs[pos]),
                "rank": sc.token_ranks[pos],
                "decoded_token": decode(tok),
            }
        }
        for rank, (alt, lp) in enumerate(zip(sc.top_ids[pos][:k], sc.top_logprobs[pos][:k]), start=1):
            entry.setdefault(str(alt), {"logprob": _floor(lp), "rank": rank, "decoded_token": decode(alt)})
        block.append(entry)
    return block


def _logprobs_block(ids: list[int], sc: PromptScores, k: int, token_str: Callable[[int], str]) -> dict:
    """The OpenAI ``logprobs`` block of ``ids`` (the prompt, then a generated token if there is one)."""
    tokens = [token_str(t) for t in ids]
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top: list[dict | None] = [None]
    for pos in range(len(ids) - 1):
        entry = {tokens[pos + 1]: _floor(sc.token_logprobs[pos])}
        for alt, lp in zip(sc.top_ids[pos][:k], sc.top_logprobs[pos][:k]):
            entry.setdefault(token_str(alt), _floor(lp))
        top.append(entry)
    return {
        "text_offset": offsets,
        "token_logprobs": [None] + [_floor(lp) for lp in sc.token_logprobs],
        "tokens": tokens,
        "top_logprobs": top,
    }


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------


def scoring_request_body(
    prompts: list[list[int]], *, model: str | None, shape: str = "prompt_logprobs", top_k: int = 0
) -> dict:
    """The request body that asks an OpenAI/vLLM server for the log-prob of every prompt token.

    ``shape="prompt_logprobs"`` asks for vLLM's ``prompt_logprobs`` (exact token-id keys);
    ``shape="echo"`` for the OpenAI echo ``logprobs`` block (``token_logprobs``). ``top_k > 0``
    also asks for each position's top-k alternatives (only the ``prompt_logprobs`` shape has ids).
    """
    body: dict[str, Any] = {"prompt": prompts, "echo": True, "max_tokens": 0, "temperature": 1.0}
    if model is not None:
        body["model"] = model
    if shape == "prompt_logprobs":
        body["prompt_logprobs"] = top_k
    elif shape == "echo":
        if top_k:
            raise ValueError("top-k alternatives need shape='prompt_logprobs' (echo top_logprobs are keyed by text)")
        body["logprobs"] = 0
    else:
        raise ValueError(f"unknown response shape {shape!r}; use 'prompt_logprobs' or 'echo'")
    return body


def prompt_token_logprobs(choice: dict, ids: list[int]) -> list[float]:
    """log p(ids[j] | ids[:j]) for j = 1..L-1 from one response choice (either vLLM shape).

    Raises ``ValueError`` when the choice holds neither shape or has too few entries.
    """
    n_needed = len(ids)
    block = choice.get("prompt_logprobs")
    if block is not None:
        if len(block) < n_needed:
            raise ValueError(f"prompt_logprobs has {len(block)} entries for a prompt of {n_needed} tokens")
        return [_logprob_of(block[j], ids[j], j) for j in range(1, n_needed)]
    echo = choice.get("logprobs")
    if echo is not None and echo.get("token_logprobs") is not None:
        values = echo["token_logprobs"]  # a server may append generated tokens after the echo: ignored
        if len(values) < n_needed:
            raise ValueError(f"logprobs.token_logprobs has {len(values)} entries for a prompt of {n_needed} tokens")
        if any(v is None for v in values[1:n_needed]):
            raise ValueError("logprobs.token_logprobs has null entries after the first prompt token")
        return [float(v) for v in values[1:n_needed]]
    raise ValueError(
        "the response choice has neither `prompt_logprobs` nor `logprobs.token_logprobs`; "
        "is the server vLLM-compatible and did it accept echo/max_tokens=0?"
    )


def _logprob_of(entry: Any, token_id: int, pos: int) -> float:
    if not isinstance(entry, dict):
        raise ValueError(f"prompt_logprobs[{pos}] is {entry!r}, expected a mapping token id -> logprob")
    value = entry.get(str(token_id), entry.get(token_id))  # type: ignore[call-overload]
    if value is None:
        raise ValueError(f"prompt_logprobs[{pos}] has no entry for the prompt token {token_id}")
    return float(value["logprob"] if isinstance(value, dict) else value)


def prompt_topk(choice: dict, ids: list[int], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The top-k token ids and log-probs (best first) at positions 1..L-1 of one choice's ``prompt_logprobs``."""
    block = choice.get("prompt_logprobs")
    if block is None or len(block) < len(ids):
        raise ValueError(
            f"top-k needs `prompt_logprobs` with one entry per prompt token ({len(ids)}), got "
            f"{None if block is None else len(block)}"
        )
    top_ids, top_lps = [], []
    for pos in range(1, len(ids)):
        entry = block[pos]
        if not isinstance(entry, dict):
            raise ValueError(f"prompt_logprobs[{pos}] is {entry!r}, expected a mapping token id -> logprob")
        ranked = sorted(
            (v["rank"], int(tok), float(v["logprob"]))
            for tok, v in entry.items()
            if isinstance(v, dict) and v.get("rank") is not None and v["rank"] <= k
        )
        if len(ranked) < k:
            raise ValueError(
                f"prompt_logprobs[{pos}] holds {len(ranked)} entries ranked <= {k}; "
                f"did the server cap prompt_logprobs (vLLM: --max-logprobs)?"
            )
        top_ids.append([tok for _, tok, _ in ranked[:k]])
        top_lps.append([lp for _, _, lp in ranked[:k]])
    return top_ids, top_lps
