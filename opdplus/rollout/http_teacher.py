"""``HTTPTeacher``: a Teacher scored by an OpenAI/vLLM-compatible server (`opdplus serve-teacher`, `vllm serve`).

Each row's real tokens (prompt + completion, padding stripped) are sent as token ids with
``echo=true, max_tokens=0`` and ``prompt_logprobs=0`` (or ``logprobs=0``), several rows per request
and several requests in flight; the returned per-token log-probs are put back at the row's
columns of ``teacher_logprobs_B_T``. The teacher must share the student's tokenizer.

Transient failures (connection errors, timeouts, HTTP 5xx / 408 / 429) are retried with
exponential backoff; after ``max_retries`` retries ``TeacherUnavailableError`` names the URL.
Other 4xx answers raise ``TeacherRequestError`` at once with the server's message.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from opdplus.rollout.openai_protocol import prompt_token_logprobs, prompt_topk, scoring_request_body
from opdplus.rollout.types import RolloutBatch

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class TeacherRequestError(RuntimeError):
    """The teacher server refused a request or answered with something that is not a scoring response;
    ``status`` is the HTTP status of a refusal (None otherwise)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TeacherUnavailableError(TeacherRequestError):
    """The teacher server could not be reached (or kept failing) after all retries."""


@dataclass
class HTTPTeacherStats:
    requests: int = 0
    retries: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0


def completions_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or ``http://h:p/v1/completions`` -> the completions endpoint."""
    url = url.rstrip("/")
    if url.endswith("/v1/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


class HTTPTeacher:
    """Scores rollouts through a served teacher (see the module docstring).

    Args:
        url: server base URL (``http://127.0.0.1:8000``) or its ``/v1`` or ``/v1/completions`` URL.
        api_key: sent as ``Authorization: Bearer <key>``.
        model: model id to request; ``None`` asks the server's ``/v1/models`` once.
        timeout_s: per-request timeout (connect, read, write).
        max_retries: retries of one request after the first attempt.
        backoff_s, max_backoff_s: retry ``i`` waits ``min(max_backoff_s, backoff_s * 2**i)`` (+ up to 25 % jitter).
        max_concurrency: requests in flight at once.
        rows_per_request: rollout rows sent in one request.
        response_shape: ``"prompt_logprobs"`` (vLLM extension, default) or ``"echo"`` (OpenAI ``logprobs``).
        transport: an ``httpx`` transport (for tests); default is a real connection pool.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 16.0,
        max_concurrency: int = 4,
        rows_per_request: int = 8,
        response_shape: str = "prompt_logprobs",
        transport: httpx.BaseTransport | None = None,
    ):
        if max_concurrency < 1 or rows_per_request < 1 or max_retries < 0:
            raise ValueError("max_concurrency and rows_per_request must be >= 1 and max_retries >= 0")
        scoring_request_body([[0]], model=None, shape=response_shape)  # validates the shape name
        self.url = completions_url(url)
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_concurrency = max_concurrency
        self.rows_per_request = rows_per_request
        self.response_shape = response_shape
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="opdplus-http-teacher")
        self._lock = threading.Lock()
        self.stats = HTTPTeacherStats()

    def __repr__(self) -> str:
        return f"HTTPTeacher({self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ Teacher protocol

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """``teacher_logprobs_B_T`` aligned with ``batch.input_ids_B_T``; 0 where ``loss_mask`` is False."""
        start = time.perf_counter()
        plan = _RowPlan.of(batch)
        scored = self.score_token_ids(plan.prompts)
        out_B_T = torch.zeros(plan.loss_B_T.shape, dtype=torch.float32)
        for b, values in zip(plan.rows, scored):
            out_B_T[b, plan.columns[b][1:]] = torch.tensor(values, dtype=torch.float32)
        out_B_T = torch.where(plan.loss_B_T, out_B_T, torch.zeros_like(out_B_T))
        self._count(plan, time.perf_counter() - start)
        return out_B_T.to(batch.input_ids_B_T.device)

    def score_topk(self, batch: RolloutBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k at every column: ``(ids_B_T_K, logprobs_B_T_K)``, best first.

        Column t holds the top-k of q(. | input_ids[:t]) (the distribution the token at t was drawn
        from, as in ``teacher_logprobs_B_T``). Where ``loss_mask`` is False the ids are 0..k-1 and the
        log-probs -log(k) (a harmless uniform placeholder that must still be masked). Needs a server
        returning ``prompt_logprobs`` (ours, or vLLM with ``--max-logprobs >= k``).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        start = time.perf_counter()
        plan = _RowPlan.of(batch)
        scored = self.topk_token_ids(plan.prompts, k)
        shape = (*plan.loss_B_T.shape, k)
        ids_B_T_K = torch.zeros(shape, dtype=torch.long)
        logprobs_B_T_K = torch.zeros(shape, dtype=torch.float32)
        for b, (top_ids, top_lps) in zip(plan.rows, scored):
            cols = plan.columns[b][1:]
            ids_B_T_K[b, cols] = torch.tensor(top_ids, dtype=torch.long).reshape(len(cols), k)
            logprobs_B_T_K[b, cols] = torch.tensor(top_lps, dtype=torch.float32).reshape(len(cols), k)
        keep_B_T_1 = plan.loss_B_T[..., None]
        ids_B_T_K = torch.where(keep_B_T_1, ids_B_T_K, torch.arange(k).expand(shape))
        logprobs_B_T_K = torch.where(keep_B_T_1, logprobs_B_T_K, torch.full_like(logprobs_B_T_K, -math.log(k)))
        self._count(plan, time.perf_counter() - start)
        device = batch.input_ids_B_T.device
        return ids_B_T_K.to(device), logprobs_B_T_K.to(device)

    def _count(self, plan: _RowPlan, seconds: float) -> None:
        with self._lock:
            self.stats.rows += len(plan.rows)
            self.stats.tokens += sum(len(p) for p in plan.prompts)
            self.stats.seconds += seconds

    # ------------------------------------------------------------------ token-id API

    def score_token_ids(self, prompts: list[list[int]]) -> list[list[float]]:
        """For each prompt p: [log q(p[j] | p[:j]) for j = 1..len(p)-1], in order."""
        return self._map_chunks(prompts, 0)

    def topk_token_ids(self, prompts: list[list[int]], k: int) -> list[tuple[list[list[int]], list[list[float]]]]:
        """For each prompt p: (top-k ids, top-k log-probs) of q(. | p[:j]) for j = 1..len(p)-1."""
        return self._map_chunks(prompts, k)

    def decoded_tokens(self, ids: list[int], tokens_per_prompt: int = 32) -> list[str] | None:
        """How the server decodes each of ``ids``: the ``tokens`` of an echo request (one request; vLLM and
        ``opdplus serve-teacher`` decode each token alone), to compare with the student's tokenizer. None when
        the server writes tokens as ``token_id:N`` (vLLM's ``--return-tokens-as-token-ids``)."""
        if self.model is None:
            self.model = self._served_model()
        prompts = [ids[i : i + tokens_per_prompt] for i in range(0, len(ids), tokens_per_prompt)]
        body = {"prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 0, "temperature": 1.0}
        if self.model is not None:
            body["model"] = self.model
        choices = sorted(self._post(body).get("choices") or [], key=lambda c: c.get("index", 0))
        tokens: list[str] = []
        for choice, prompt in zip(choices, prompts):
            got = (choice.get("logprobs") or {}).get("tokens")
            if not isinstance(got, list) or len(got) < len(prompt) or not all(isinstance(t, str) for t in got):
                raise TeacherRequestError(f"teacher at {self.url} did not echo the prompt's `tokens` (logprobs.tokens)")
            tokens += got[: len(prompt)]
        if len(tokens) != len(ids):
            raise TeacherRequestError(
                f"teacher at {self.url} returned {len(choices)} choices for {len(prompts)} prompts"
            )
        if all(t.startswith("token_id:") for t in tokens):
            return None
        return tokens

    def vocabulary_size(self, at_least: int = 1, at_most: int = 2**24) -> int | None:
        """The number of token ids the server accepts (its model's vocabulary), found by scoring one-token
        prompts (about 2 log2(size) small requests); None when it accepts ``at_most`` ids or refuses an id for
        another reason than HTTP 400."""

        def accepted(token_id: int) -> bool:
            try:
                self._post(scoring_request_body([[token_id]], model=self.model, shape="echo"))
            except TeacherRequestError as err:
                if err.status == 400:
                    return False
                raise
            return True

        try:
            if not accepted(at_least - 1):
                return None
            low, high = at_least - 1, at_least  # accepted(low); find the first refused id above it
            while accepted(high):
                low, high = high, 2 * high
                if high > at_most:
                    return None
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if accepted(mid) else (low, mid)
        except TeacherRequestError:
            return None
        return high

    def _map_chunks(self, prompts: list[list[int]], top_k: int) -> list:
        if not prompts:
            return []
        if self.model is None:
            self.model = self._served_model()
        chunks = [prompts[i : i + self.rows_per_request] for i in range(0, len(prompts), self.rows_per_request)]
        results = list(self._pool.map(lambda chunk: self._score_chunk(chunk, top_k), chunks))
        return [values for chunk in results for values in chunk]

    def _score_chunk(self, prompts: list[list[int]], top_k: int) -> list:
        shape = "prompt_logprobs" if top_k else self.response_shape
        payload = self._post(scoring_request_body(prompts, model=self.model, shape=shape, top_k=top_k))
        choices = sorted(payload.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise TeacherRequestError(
                f"teacher at {self.url} returned {len(choices)} choices for {len(prompts)} prompts"
            )
        try:
            if top_k:
                return [prompt_topk(choice, ids, top_k) for choice, ids in zip(choices, prompts)]
            return [prompt_token_logprobs(choice, ids) for choice, ids in zip(choices, prompts)]
        except ValueError as exc:
            raise TeacherRequestError(f"teacher at {self.url} returned an unusable response: {exc}") from None

    def _served_model(self) -> str:
        models_url = self.url.removesuffix("/completions") + "/models"
        payload = self._request("GET", models_url, None)
        try:
            return payload["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise TeacherRequestError(f"teacher at {models_url} listed no model; pass model=... explicitly") from None

    # ------------------------------------------------------------------ transport with retries

    def _post(self, body: dict) -> dict:
        return self._request("POST", self.url, body)

    def _request(self, method: str, url: str, body: dict | None) -> dict:
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(self._backoff(attempt - 1))
            with self._lock:
                self.stats.requests += 1
            try:
                response = self._client.request(method, url, json=body)
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                last_problem = f"HTTP {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code != 200:
                raise TeacherRequestError(
                    f"teacher at {url} rejected the request with HTTP {response.status_code}: "
                    f"{_error_message(response)}",
                    status=response.status_code,
                )
            try:
                return response.json()
            except ValueError:
                raise TeacherRequestError(f"teacher at {url} answered 200 with a body that is not JSON") from None
        raise TeacherUnavailableError(
            f"teacher at {url} failed after {self.max_retries + 1} attempts; last error: {last_problem}"
        )

    def _backoff(self, retry: int) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**retry)
        return delay * (1.0 + 0.25 * random.random())

    # ------------------------------------------------------------------ lifecycle / metrics

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters since construction (or the last reset): requests (incl. retries), retries, rows, tokens,
        seconds in ``score``."""
        with self._lock:
            out = {
                "requests": self.stats.requests,
                "retries": self.stats.retries,
                "rows": self.stats.rows,
                "tokens": self.stats.tokens,
                "seconds": self.stats.seconds,
            }
            if reset:
                self.stats = HTTPTeacherStats()
            return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()

    def __enter__(self) -> HTTPTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _RowPlan:
    """What to send for a batch: each row's real columns up to its last loss token, as token ids."""

    loss_B_T: torch.Tensor
    columns: list[torch.Tensor]
    rows: list[int]  # rows with something to score
    prompts: list[list[int]]  # token ids sent for those rows

    @classmethod
    def of(cls, batch: RolloutBatch) -> _RowPlan:
        ids_B_T, attn_B_T, loss_B_T = (
            t.cpu() for t in (batch.input_ids_B_T, batch.attention_mask_B_T, batch.loss_mask_B_T)
        )
        if (loss_B_T & ~attn_B_T).any():
            raise ValueError("loss_mask_B_T is True at padding positions (attention_mask_B_T False)")
        columns = [_scored_columns(attn_B_T[b], loss_B_T[b], b) for b in range(ids_B_T.shape[0])]
        rows = [b for b, cols in enumerate(columns) if len(cols) > 1]
        return cls(loss_B_T, columns, rows, [ids_B_T[b, columns[b]].tolist() for b in rows])


def _scored_columns(attn_T: torch.Tensor, loss_T: torch.Tensor, row: int) -> torch.Tensor:
    """Columns of the row's real tokens up to its last loss token (later tokens cannot change scores)."""
    cols = attn_T.nonzero().squeeze(-1)
    in_loss = loss_T[cols].nonzero().squeeze(-1)
    if len(in_loss) == 0:
        return cols[:0]
    if in_loss[0] == 0:
        raise ValueError(
            f"row {row}: the first real token is in the loss mask, but a teacher cannot score a "
            "token without context (the prompt must be non-empty)"
        )
    return cols[: int(in_loss[-1]) + 1]


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500] or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in payload:  # vLLM's older flat error body
            return str(payload["message"])
    return str(payload)[:500]
