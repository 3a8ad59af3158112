"""HTTPTeacher against an in-process fake server (httpx.MockTransport): realignment, both vLLM
response shapes, retries with backoff, clear errors. No sockets, no model."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from opdplus.rollout.http_teacher import (
    HTTPTeacher,
    TeacherRequestError,
    TeacherUnavailableError,
    completions_url,
)
from opdplus.rollout.openai_protocol import (
    PromptScores,
    RequestError,
    ServerLimits,
    format_completion_response,
    parse_completion_request,
)
from opdplus.rollout.types import RolloutBatch

VOCAB = 50


def fake_logprob(ids: list[int], j: int) -> float:
    """A context-dependent stand-in for log q(ids[j] | ids[:j])."""
    return -0.5 - 0.01 * ids[j] - 0.001 * sum(ids[:j])


def fake_topk(ids: list[int], j: int, k: int) -> tuple[list[int], list[float]]:
    """Top-k alternatives at position j: ids 30.. (never in the test prompts), decreasing log-probs."""
    return [30 + (ids[j - 1] + i) % 20 for i in range(k)], [-0.01 * (i + 1) - 0.001 * j for i in range(k)]


def fake_scores(ids: list[int], k: int) -> PromptScores:
    lps = [fake_logprob(ids, j) for j in range(1, len(ids))]
    tops = [fake_topk(ids, j, k) for j in range(1, len(ids))]
    return PromptScores(lps, [k + 1] * len(lps), [t[0] for t in tops], [t[1] for t in tops])


class FakeServer:
    """Answers /v1/completions like a vLLM server would; can fail the first ``fail_first`` calls."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, drop: str | None = None):
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.drop = drop  # remove this response field, to force the other shape
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-teacher"}]})
        self.bodies.append(json.loads(request.content))
        if len(self.bodies) <= self.fail_first:
            return httpx.Response(self.fail_status, json={"error": {"message": "overloaded"}})
        req = parse_completion_request(
            self.bodies[-1], limits=ServerLimits(), vocab_size=VOCAB, model_name="fake-teacher"
        )
        scores = [fake_scores(p, req.top_k) for p in req.prompts]
        payload = format_completion_response(
            req, scores, model_name="fake-teacher", decode=str, decode_text=lambda ids: ""
        )
        if self.drop:
            for choice in payload["choices"]:
                choice[self.drop] = None
        return httpx.Response(200, json=payload)


def make_batch() -> RolloutBatch:
    """3 rows: prompts left-padded to 4, completions right-padded to 3 (row 2 has no completion)."""
    prompts = [[1, 2, 3, 4], [5, 6], [9, 8, 7]]
    completions = [[10, 11, 12], [13], []]
    rows, attn, loss = [], [], []
    for p, c in zip(prompts, completions):
        pad_left, pad_right = 4 - len(p), 3 - len(c)
        rows.append([0] * pad_left + p + c + [0] * pad_right)
        attn.append([False] * pad_left + [True] * (len(p) + len(c)) + [False] * pad_right)
        loss.append([False] * 4 + [True] * len(c) + [False] * pad_right)
    ids = torch.tensor(rows)
    return RolloutBatch(
        ids, torch.tensor(attn), torch.tensor(loss), torch.zeros(ids.shape), prompt_len=4, tasks=["a", "b", "a"]
    )


def expected_scores(batch: RolloutBatch) -> torch.Tensor:
    out = torch.zeros(batch.input_ids_B_T.shape)
    for b in range(batch.batch_size):
        cols = batch.attention_mask_B_T[b].nonzero().squeeze(-1).tolist()
        ids = batch.input_ids_B_T[b, cols].tolist()
        for j, col in enumerate(cols):
            if batch.loss_mask_B_T[b, col]:
                out[b, col] = fake_logprob(ids, j)
    return out


def teacher_for(server: FakeServer, **kwargs) -> HTTPTeacher:
    kwargs.setdefault("backoff_s", 0.001)
    return HTTPTeacher("http://teacher.test:8000", transport=httpx.MockTransport(server), **kwargs)


@pytest.mark.parametrize("shape", ["prompt_logprobs", "echo"])
@pytest.mark.parametrize("rows_per_request", [1, 2, 8])
def test_scores_are_realigned_with_the_padded_batch(shape: str, rows_per_request: int) -> None:
    batch = make_batch()
    server = FakeServer()
    with teacher_for(server, response_shape=shape, rows_per_request=rows_per_request) as teacher:
        got = teacher.score(batch)
    torch.testing.assert_close(got, expected_scores(batch), rtol=0, atol=1e-6)
    assert got[~batch.loss_mask_B_T].abs().max() == 0
    sent = [ids for body in server.bodies for ids in body["prompt"]]
    assert sent == [[1, 2, 3, 4, 10, 11, 12], [5, 6, 13]]  # padding stripped; the row without loss tokens skipped
    assert all(
        body["echo"] is True and body["max_tokens"] == 0 and body["model"] == "fake-teacher" for body in server.bodies
    )


@pytest.mark.parametrize("dropped", ["prompt_logprobs", "logprobs"])
def test_either_response_shape_is_understood(dropped: str) -> None:
    """vLLM returns both blocks when echo+logprobs; a server may return only one of them."""
    batch = make_batch()
    with teacher_for(FakeServer(drop=dropped), response_shape="echo") as teacher:
        torch.testing.assert_close(teacher.score(batch), expected_scores(batch), rtol=0, atol=1e-6)


def test_retries_5xx_with_backoff_then_succeeds() -> None:
    batch = make_batch()
    server = FakeServer(fail_first=2)
    with teacher_for(server, max_retries=3, rows_per_request=8) as teacher:
        got = teacher.score(batch)
        assert teacher.metrics()["retries"] == 2
        assert teacher.metrics(reset=True)["rows"] == int(
            batch.loss_mask_B_T.any(1).sum()
        )  # rows with loss tokens are sent
        assert teacher.metrics() == {"requests": 0, "retries": 0, "rows": 0, "tokens": 0, "seconds": 0.0}
    torch.testing.assert_close(got, expected_scores(batch), rtol=0, atol=1e-6)


def test_gives_up_after_retries_with_an_error_naming_the_url() -> None:
    server = FakeServer(fail_first=100)
    with teacher_for(server, max_retries=2, model="m") as teacher:
        with pytest.raises(TeacherUnavailableError, match=r"http://teacher.test:8000/v1/completions.*3 attempts.*503"):
            teacher.score(make_batch())
    assert len(server.bodies) == 3


def test_client_errors_are_not_retried_and_carry_the_server_message() -> None:
    server = FakeServer(fail_first=100, fail_status=400)
    with teacher_for(server, max_retries=5, model="m") as teacher:
        with pytest.raises(TeacherRequestError, match="HTTP 400: overloaded"):
            teacher.score(make_batch())
    assert len(server.bodies) == 1


def test_a_refusal_carries_its_http_status() -> None:
    with teacher_for(FakeServer(fail_first=100, fail_status=401), model="m") as teacher:
        with pytest.raises(TeacherRequestError, match="HTTP 401") as refused:
            teacher.score(make_batch())
    assert refused.value.status == 401


def vocabulary_server(token_str, vocab: int = VOCAB):
    """Answers echo requests over a ``vocab``-token vocabulary whose token ``i`` is ``token_str(i)``; an id out of
    range gets the 400 of ``parse_completion_request``."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-teacher"}]})
        try:
            req = parse_completion_request(
                json.loads(request.content), limits=ServerLimits(), vocab_size=vocab, model_name="fake-teacher"
            )
        except RequestError as err:
            return httpx.Response(err.status, json=err.body())
        scores = [fake_scores(p, req.top_k) for p in req.prompts]
        payload = format_completion_response(
            req, scores, model_name="fake-teacher", decode=token_str, decode_text=lambda ids: ""
        )
        return httpx.Response(200, json=payload)

    return answer


def test_decoded_tokens_are_the_echoed_tokens_in_order() -> None:
    ids = [7, 0, 49, *range(40)]
    with HTTPTeacher("http://t.test", transport=httpx.MockTransport(vocabulary_server(lambda i: f"<{i}>"))) as teacher:
        assert teacher.decoded_tokens(ids, tokens_per_prompt=5) == [f"<{i}>" for i in ids]
    as_ids = vocabulary_server(lambda i: f"token_id:{i}")
    with HTTPTeacher("http://t.test", transport=httpx.MockTransport(as_ids)) as teacher:
        assert teacher.decoded_tokens(ids) is None  # nothing to compare


@pytest.mark.parametrize("vocab", [2, 3, 50, 256, 1000])
def test_vocabulary_size_is_the_first_id_the_server_refuses(vocab: int) -> None:
    with HTTPTeacher("http://t.test", transport=httpx.MockTransport(vocabulary_server(str, vocab))) as teacher:
        assert teacher.vocabulary_size(at_least=1) == vocab
        assert teacher.vocabulary_size(at_least=vocab + 1) is None  # refuses even the smallest id asked about
        assert teacher.vocabulary_size(at_least=1, at_most=max(vocab // 2, 1) - 1) is None  # beyond the search


def test_connection_errors_are_retried() -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused")

    teacher = HTTPTeacher(
        "http://127.0.0.1:9/v1", model="m", max_retries=2, backoff_s=0.001, transport=httpx.MockTransport(refuse)
    )
    with pytest.raises(TeacherUnavailableError, match=r"127.0.0.1:9/v1/completions.*ConnectError"):
        teacher.score(make_batch())
    assert len(calls) == 3


def test_loss_on_the_first_real_token_is_rejected() -> None:
    batch = make_batch()
    batch.loss_mask_B_T[1, 2] = True  # row 1's first real token
    with teacher_for(FakeServer()) as teacher:
        with pytest.raises(ValueError, match="row 1: the first real token"):
            teacher.score(batch)


def test_topk_is_realigned_and_placeholder_off_the_mask() -> None:
    batch = make_batch()
    k = 3
    server = FakeServer()
    with teacher_for(server, rows_per_request=1) as teacher:
        ids_B_T_K, logprobs_B_T_K = teacher.score_topk(batch, k)
    assert all(body["prompt_logprobs"] == k for body in server.bodies)
    assert ids_B_T_K.shape == (*batch.input_ids_B_T.shape, k) and ids_B_T_K.dtype == torch.long
    for b in range(batch.batch_size):
        cols = batch.attention_mask_B_T[b].nonzero().squeeze(-1).tolist()
        ids = batch.input_ids_B_T[b, cols].tolist()
        for j, col in enumerate(cols):
            if batch.loss_mask_B_T[b, col]:
                want_ids, want_lps = fake_topk(ids, j, k)
                assert ids_B_T_K[b, col].tolist() == want_ids
                torch.testing.assert_close(logprobs_B_T_K[b, col], torch.tensor(want_lps))
    off = ~batch.loss_mask_B_T
    assert (ids_B_T_K[off] == torch.arange(k)).all()
    torch.testing.assert_close(logprobs_B_T_K[off], torch.full((int(off.sum()), k), -math.log(k)))


def test_completions_url_normalisation() -> None:
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"
