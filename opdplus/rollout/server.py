"""A teacher served over HTTP: OpenAI/vLLM-compatible prompt scoring with dynamic batching.

``create_app(engine, ...)`` builds a Starlette app with

* ``GET /health``: 200 ``{"status": "ok"}`` while the scoring worker runs (never needs a key);
* ``GET /v1/models``: the served model, OpenAI list format;
* ``POST /v1/completions``: prompt log-probs for token-id or text prompts, plus at most one generated
  token (see ``openai_protocol``);
* ``GET /stats``: batching counters (requests, rows, batches, largest batch, forward seconds).

Requests are validated before they are queued; a ``DynamicBatcher`` collects the prompts of all
pending requests up to a padded-token budget, runs one forward pass in a worker thread under
``torch.no_grad`` and resolves each request's futures. A request whose client disconnects is
dropped from the queue. ``serve`` runs the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from opdplus.rollout.openai_protocol import (
    PromptScores,
    RequestError,
    Sampling,
    ServerLimits,
    format_completion_response,
    parse_completion_request,
)

log = logging.getLogger("opdplus.serve")

# (prompts, top_k, one Sampling per prompt or None: no token generated) -> scores
ScoreFn = Callable[[list[list[int]], int, list[Sampling | None]], list[PromptScores]]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

WIDTH_MULTIPLE = 16  # padded batch widths are multiples of this (see ScoringEngine._pad)


class ScoringEngine:
    """Log-probs of every prompt token under a causal LM (plus ranks and top-k alternatives)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        get_input_embeddings = getattr(model, "get_input_embeddings", None)
        if get_input_embeddings is None:
            raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); pass a Hugging Face causal LM")
        self.vocab_size = int(get_input_embeddings().num_embeddings)
        self.decode = functools.lru_cache(maxsize=None)(self._decode)

    @torch.no_grad()
    def score(
        self, prompts: list[list[int]], top_k: int, samplings: list[Sampling | None] | None = None
    ) -> list[PromptScores]:
        """One right-padded forward over ``prompts``; returns their scores in order. A prompt with a
        ``Sampling`` also gets one generated token (its score follows the prompt's)."""
        rows: list[Sampling | None] = list(samplings) if samplings is not None else [None] * len(prompts)
        ids_B_T, mask_B_T = self._pad(prompts)
        logits_B_T_V = self.model(input_ids=ids_B_T, attention_mask=mask_B_T.long(), use_cache=False).logits
        out = []
        for b, (p, sampling) in enumerate(zip(prompts, rows)):
            positions = len(p) if sampling is not None else len(p) - 1
            targets_T = ids_B_T[b, 1 : len(p)]
            if sampling is not None:
                generated = self._sample(logits_B_T_V[b, len(p) - 1], sampling)
                targets_T = torch.cat([targets_T, targets_T.new_tensor([generated])])
            scores = self._row(logits_B_T_V[b, :positions], targets_T, top_k)
            scores.generated = None if sampling is None else int(targets_T[-1])
            out.append(scores)
        return out

    @staticmethod
    def _sample(logits_V: torch.Tensor, sampling: Sampling) -> int:
        """Greedy at temperature 0, else a draw from softmax(logits / temperature) (seeded if asked)."""
        if sampling.temperature == 0:
            return int(logits_V.argmax())
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=logits_V.device).manual_seed(sampling.seed)
        probs_V = torch.softmax(logits_V.double() / sampling.temperature, dim=-1)
        return int(torch.multinomial(probs_V, 1, generator=generator))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt, special tokens added as the tokenizer does by default (as vLLM does)."""
        return list(self.tokenizer(text).input_ids)

    def _pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded to a multiple of ``WIDTH_MULTIPLE``: a prompt's scores then do not depend on which
        other prompts share its batch (the kernels' blocking over positions changes with the width; measured
        on SmolLM2-135M on CPU: up to 3.4e-5 apart with exact widths, bitwise equal with this padding)."""
        width = -(-max(len(p) for p in prompts) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        ids_B_T = torch.zeros(len(prompts), width, dtype=torch.long)
        mask_B_T = torch.zeros(len(prompts), width, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids_B_T[b, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask_B_T[b, : len(p)] = True
        return ids_B_T.to(self.device), mask_B_T.to(self.device)

    @staticmethod
    def _row(logits_T_V: torch.Tensor, targets_T: torch.Tensor, top_k: int) -> PromptScores:
        logp_T_V = torch.log_softmax(logits_T_V.float(), dim=-1)
        lp_T = logp_T_V.gather(-1, targets_T[:, None]).squeeze(-1)
        if torch.isnan(lp_T).any():
            raise RuntimeError("the model produced NaN log-probs")
        rank_T = (logp_T_V > lp_T[:, None]).sum(-1) + 1
        if top_k > 0:
            top_lp_T_K, top_ids_T_K = logp_T_V.topk(min(top_k, logp_T_V.shape[-1]), dim=-1)
            top_ids, top_lps = top_ids_T_K.tolist(), top_lp_T_K.tolist()
        else:
            top_ids, top_lps = [[] for _ in range(lp_T.shape[0])], [[] for _ in range(lp_T.shape[0])]
        return PromptScores(lp_T.tolist(), rank_T.tolist(), top_ids, top_lps)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


# --------------------------------------------------------------------------------------------
# dynamic batching
# --------------------------------------------------------------------------------------------


class ServerBusy(Exception):
    """The queue is full or the worker is down; answered with 503 (clients retry)."""


@dataclass
class BatchStats:
    requests: int = 0
    rows: int = 0
    tokens: int = 0
    batches: int = 0
    max_batch_rows: int = 0
    forward_s: float = 0.0
    failed_batches: int = 0


@dataclass
class _Job:
    ids: list[int]
    top_k: int
    sampling: Sampling | None
    future: asyncio.Future


class DynamicBatcher:
    """Queues prompts from concurrent requests and scores them in padded batches.

    A batch takes queued prompts in arrival order while ``rows * longest <= max_batch_tokens``
    and ``rows <= max_batch_rows`` (a single prompt always fits). Prompts whose request was
    cancelled are skipped. ``max_queued_tokens`` bounds the backlog (``ServerBusy`` beyond it).
    """

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch_tokens: int = 16384,
        max_batch_rows: int = 64,
        max_queued_tokens: int = 2**20,
    ):
        self._score_fn = score_fn
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.max_queued_tokens = max_queued_tokens
        self._pending: deque[_Job] = deque()
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opdplus-score")
        self._task: asyncio.Task | None = None
        self.stats = BatchStats()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="opdplus-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ServerBusy("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, prompts: list[list[int]], top_k: int, sampling: Sampling | None = None) -> list[PromptScores]:
        """Queue the prompts and wait for their scores (cancelling this drops them from the queue)."""
        if not self.alive:
            raise ServerBusy("the scoring worker is not running")
        n_tokens = sum(len(p) for p in prompts)
        if self._queued_tokens + n_tokens > self.max_queued_tokens:
            raise ServerBusy(
                f"{self._queued_tokens} tokens are queued already (limit {self.max_queued_tokens}); retry later"
            )
        loop = asyncio.get_running_loop()
        jobs = [_Job(p, top_k, sampling, loop.create_future()) for p in prompts]
        self._pending.extend(jobs)
        self._queued_tokens += n_tokens
        self.stats.requests += 1
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        finally:
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()  # dropped from future batches
                elif not job.future.cancelled():
                    job.future.exception()  # mark a batch failure as seen (no "never retrieved" warnings)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._take_batch()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            top_k = max(job.top_k for job in batch)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._score_fn, [j.ids for j in batch], top_k, [j.sampling for j in batch]
                )
            except Exception as exc:  # a failed forward fails its batch, not the server
                log.exception("scoring a batch of %d prompts failed", len(batch))
                self.stats.failed_batches += 1
                self._resolve(batch, error=exc)
                continue
            self._record(batch, time.perf_counter() - start)
            self._resolve(batch, results=results)

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        longest = 0
        while self._pending and len(batch) < self.max_batch_rows:
            job = self._pending[0]
            width = max(longest, len(job.ids))
            if batch and not job.future.done() and width * (len(batch) + 1) > self.max_batch_tokens:
                break
            self._pending.popleft()
            self._queued_tokens -= len(job.ids)
            if not job.future.done():  # done here = cancelled by a client that went away
                batch.append(job)
                longest = width
        return batch

    def _record(self, batch: list[_Job], seconds: float) -> None:
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.tokens += sum(len(j.ids) for j in batch)
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(batch))
        self.stats.forward_s += seconds

    @staticmethod
    def _resolve(
        batch: list[_Job], *, results: list[PromptScores] | None = None, error: Exception | None = None
    ) -> None:
        for i, job in enumerate(batch):
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(RuntimeError(f"scoring failed: {error}"))
            else:
                assert results is not None, "_resolve needs results or an error"
                job.future.set_result(results[i])


# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


def _json(payload: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(payload, allow_nan=False, separators=(",", ":")), status_code=status, media_type="application/json"
    )


def _error(status: int, message: str) -> Response:
    return _json(RequestError(status, message).body(), status)


async def _read_json(request: Request, limit: int) -> Any:
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError(415, f"the request body must be JSON (Content-Type: application/json), got {media_type}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply to be a completions request") from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable) -> tuple[bool, Any]:
    """Await ``work`` unless the client disconnects first (then ``work`` is cancelled)."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(_until_disconnect(request))
    await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    if work_task.done():
        gone_task.cancel()
        return True, work_task.result()
    work_task.cancel()
    return False, None


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(handler: Handler, *, api_key: str | None) -> Handler:
    """Auth check + turning refusals into JSON error responses."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`")
        try:
            return await handler(request)
        except RequestError as exc:
            return _json(exc.body(), exc.status)
        except ServerBusy as exc:
            return _error(503, str(exc))
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening

    return wrapped


def create_app(
    engine: ScoringEngine,
    *,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits = ServerLimits(),
    max_batch_tokens: int = 16384,
    max_batch_rows: int = 64,
    max_queued_tokens: int = 2**20,
) -> Starlette:
    """The Starlette app serving ``engine`` as ``model_name`` (see the module docstring)."""
    batcher = DynamicBatcher(
        engine.score,
        max_batch_tokens=max_batch_tokens,
        max_batch_rows=max_batch_rows,
        max_queued_tokens=max_queued_tokens,
    )

    async def health(request: Request) -> Response:
        if not batcher.alive:
            return _error(503, "the scoring worker is not running")
        return _json({"status": "ok"})

    async def models(request: Request) -> Response:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "opdplus",
            "max_model_len": limits.max_prompt_tokens,
        }
        return _json({"object": "list", "data": [card]})

    async def stats(request: Request) -> Response:
        return _json(asdict(batcher.stats) | {"queued_tokens": batcher._queued_tokens})

    async def completions(request: Request) -> Response:
        body = await _read_json(request, limits.max_request_bytes)
        score_request = parse_completion_request(
            body,
            limits=limits,
            vocab_size=engine.vocab_size,
            model_name=model_name,
            tokenize=engine.tokenize if engine.tokenizer is not None else None,
        )
        answered, scores = await _unless_disconnected(
            request, batcher.score(score_request.prompts, score_request.top_k, score_request.sampling)
        )
        if not answered:
            return Response(status_code=499)
        payload = functools.partial(
            format_completion_response,
            score_request,
            scores,
            model_name=model_name,
            decode=engine.decode,
            decode_text=engine.decode_text,
        )
        return await asyncio.to_thread(lambda: _json(payload()))  # big top-k answers take a while to encode

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return _error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        batcher.start()
        yield
        await batcher.stop()

    guard = functools.partial(_endpoint, api_key=api_key)
    routes = [
        Route("/health", _endpoint(health, api_key=None), methods=["GET"]),
        Route("/v1/models", guard(models), methods=["GET"]),
        Route("/stats", guard(stats), methods=["GET"]),
        Route("/v1/completions", guard(completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.batcher = batcher
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "info",
    limit_concurrency: int = 1024,
) -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the teacher", host)
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, limit_concurrency=limit_concurrency, timeout_graceful_shutdown=5
    )
