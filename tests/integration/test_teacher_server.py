"""`opdplus serve-teacher` as a real subprocess on loopback, with a tiny random Llama teacher.

HTTP scores equal local scores; bad requests get the right 4xx and the server keeps serving;
disconnecting clients, a bounded load test, the API key, and HTTPTeacher's retries when the
server dies.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
from serving import ServerProcess

from opdplus.rollout.http_teacher import HTTPTeacher, TeacherUnavailableError
from opdplus.rollout.types import RolloutBatch

API_KEY = "sesame"
VOCAB = 256
MAX_PROMPT_TOKENS = 64
MAX_PROMPTS = 8
MAX_REQUEST_BYTES = 32 * 1024
LIMITS = (
    "--max-prompt-tokens",
    str(MAX_PROMPT_TOKENS),
    "--max-prompts-per-request",
    str(MAX_PROMPTS),
    "--max-request-mb",
    str(MAX_REQUEST_BYTES / 2**20),
)


# ------------------------------------------------------------------------------ fixtures


def build_tiny_teacher(out: Path) -> None:
    """A random 2-layer Llama (vocab 256) and a character-level tokenizer, saved like a HF model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 32 + VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_teacher")
    build_tiny_teacher(out)
    return out


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "server.log", *LIMITS, "--api-key", API_KEY)
    proc.wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def local_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------ helpers


def score_body(prompt, **overrides) -> dict:
    return {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 0} | overrides


@torch.no_grad()
def local_logprobs_T_V(model, ids: list[int]) -> torch.Tensor:
    """log q(. | ids[:j]) for j = 1..L-1 from one unpadded forward: [L-1, V]."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def make_rollout_batch(seed: int, rows: int) -> RolloutBatch:
    """Prompts left-padded to a common length, completions right-padded (the sampler's layout)."""
    gen = random.Random(seed)
    prompts = [[gen.randrange(4, VOCAB) for _ in range(gen.randint(2, 12))] for _ in range(rows)]
    completions = [[gen.randrange(4, VOCAB) for _ in range(gen.randint(1, 10))] for _ in range(rows)]
    p_len, c_len = max(map(len, prompts)), max(map(len, completions))
    ids, attn, loss = [], [], []
    for p, c in zip(prompts, completions):
        left, right = p_len - len(p), c_len - len(c)
        ids.append([0] * left + p + c + [0] * right)
        attn.append([False] * left + [True] * (len(p) + len(c)) + [False] * right)
        loss.append([False] * p_len + [True] * len(c) + [False] * right)
    ids_B_T = torch.tensor(ids)
    return RolloutBatch(
        ids_B_T,
        torch.tensor(attn),
        torch.tensor(loss),
        torch.zeros(ids_B_T.shape),
        prompt_len=p_len,
        tasks=["demo"] * rows,
    )


@torch.no_grad()
def local_teacher_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """The local teacher's way: one padded forward with position ids from the attention mask."""
    logits_B_T_V = model(
        input_ids=batch.input_ids_B_T,
        attention_mask=batch.attention_mask_B_T.long(),
        position_ids=batch.position_ids_B_T,
    ).logits.float()
    logp_B_T = torch.log_softmax(logits_B_T_V[:, :-1], -1).gather(-1, batch.input_ids_B_T[:, 1:, None]).squeeze(-1)
    out_B_T = torch.zeros(batch.input_ids_B_T.shape)
    out_B_T[:, 1:] = logp_B_T
    return torch.where(batch.loss_mask_B_T, out_B_T, 0.0)


# ------------------------------------------------------------------------------ scores


def test_http_teacher_scores_equal_local_scores(server: ServerProcess, local_model) -> None:
    batch = make_rollout_batch(seed=0, rows=11)
    with HTTPTeacher(server.url, api_key=API_KEY, rows_per_request=3, max_concurrency=3) as teacher:
        got_B_T = teacher.score(batch)
    want_B_T = local_teacher_logprobs(local_model, batch)
    assert got_B_T[batch.loss_mask_B_T].abs().min() > 0.1  # real values, not zeros
    torch.testing.assert_close(got_B_T, want_B_T, rtol=0, atol=1e-4)


def test_http_teacher_topk_equals_local_topk(server: ServerProcess, local_model) -> None:
    batch = make_rollout_batch(seed=2, rows=5)
    k = 4
    with HTTPTeacher(server.url, api_key=API_KEY, rows_per_request=2) as teacher:
        ids_B_T_K, logprobs_B_T_K = teacher.score_topk(batch, k)
    with torch.no_grad():
        logits_B_T_V = local_model(
            input_ids=batch.input_ids_B_T,
            attention_mask=batch.attention_mask_B_T.long(),
            position_ids=batch.position_ids_B_T,
        ).logits.float()
    want_lp_B_T_K, want_ids_B_T_K = torch.log_softmax(logits_B_T_V[:, :-1], -1).topk(k, dim=-1)
    mask_B_T = batch.loss_mask_B_T[:, 1:]
    assert torch.equal(ids_B_T_K[:, 1:][mask_B_T], want_ids_B_T_K[mask_B_T])
    torch.testing.assert_close(logprobs_B_T_K[:, 1:][mask_B_T], want_lp_B_T_K[mask_B_T], rtol=0, atol=1e-4)


def test_both_response_shapes_and_top_k_match_local(client: httpx.Client, local_model) -> None:
    ids = [2, 40, 41, 42, 43, 44, 45, 99]
    k = 5
    response = client.post("/v1/completions", json=score_body([ids], logprobs=k))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logp_T_V = local_logprobs_T_V(local_model, ids)
    want_T = logp_T_V.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    echo = choice["logprobs"]
    assert echo["token_logprobs"][0] is None and choice["prompt_logprobs"][0] is None
    assert len(echo["tokens"]) == len(ids) == len(choice["prompt_logprobs"])
    torch.testing.assert_close(torch.tensor(echo["token_logprobs"][1:]), want_T, rtol=0, atol=1e-4)
    for pos, entry in enumerate(choice["prompt_logprobs"][1:]):
        lp_V = logp_T_V[pos]
        token = ids[pos + 1]
        assert abs(entry[str(token)]["logprob"] - lp_V[token].item()) < 1e-4
        assert entry[str(token)]["rank"] == int((lp_V > lp_V[token]).sum()) + 1
        top_lp, top_ids = lp_V.topk(k)
        for rank, (alt, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
            if alt != token:
                assert abs(entry[str(alt)]["logprob"] - lp) < 1e-4 and entry[str(alt)]["rank"] == rank
        assert len(echo["top_logprobs"][pos + 1]) == len(entry)


def test_prompt_logprobs_without_echo_and_a_single_token_prompt(client: httpx.Client) -> None:
    body = {"prompt": [[7], [7, 8, 9]], "max_tokens": 0, "prompt_logprobs": 0}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert choices[0]["prompt_logprobs"] == [None] and choices[0]["logprobs"] is None
    assert [list(e) for e in choices[1]["prompt_logprobs"][1:]] == [["8"], ["9"]]


def test_max_tokens_1_returns_the_prompt_scores_and_one_greedy_token(client: httpx.Client, local_model) -> None:
    """What a script written for `vllm serve` sends to score a prompt: echo + logprobs + max_tokens=1."""
    ids = [2, 40, 41, 42, 43]
    body = score_body([ids], max_tokens=1, logprobs=1, temperature=0, return_token_ids=True)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    logits = local_model(input_ids=torch.tensor([ids])).logits[0].float()
    logp_T_V = torch.log_softmax(logits, -1)
    greedy = int(logp_T_V[-1].argmax())
    assert choice["token_ids"] == [greedy] and data["usage"]["completion_tokens"] == 1
    echo = choice["logprobs"]
    assert len(echo["tokens"]) == len(ids) + 1 and echo["token_logprobs"][0] is None
    want = logp_T_V[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist() + [logp_T_V[-1, greedy].item()]
    torch.testing.assert_close(torch.tensor(echo["token_logprobs"][1:]), torch.tensor(want), rtol=0, atol=1e-4)
    without_echo = client.post("/v1/completions", json=body | {"echo": False}).json()["choices"][0]
    assert without_echo["logprobs"]["token_logprobs"] == echo["token_logprobs"][-1:]
    assert len(without_echo["logprobs"]["tokens"]) == 1 and without_echo["logprobs"]["text_offset"] == [0]
    assert without_echo["prompt_logprobs"] is None
    seeded = [client.post("/v1/completions", json=body | {"temperature": 1.0, "seed": 5}).json() for _ in range(2)]
    assert seeded[0]["choices"][0]["token_ids"] == seeded[1]["choices"][0]["token_ids"]


def test_text_prompts_are_tokenized_with_the_served_tokenizer(client: httpx.Client, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    text = "2 + 2 = 4"
    ids = AutoTokenizer.from_pretrained(model_dir)(text).input_ids
    by_text = client.post("/v1/completions", json=score_body([text, text], return_token_ids=True)).json()
    by_ids = client.post("/v1/completions", json=score_body([ids])).json()
    assert by_text["choices"][0]["prompt_token_ids"] == ids and len(by_text["choices"]) == 2
    assert by_text["choices"][1]["logprobs"]["token_logprobs"] == by_ids["choices"][0]["logprobs"]["token_logprobs"]


def test_a_body_that_is_not_json_gets_415(client: httpx.Client, server: ServerProcess) -> None:
    content = json.dumps(score_body([1, 2, 3])).encode()
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "application/json" in response.json()["error"]["message"]
    assert client.post("/v1/completions", content=content).status_code == 200  # no content type: JSON assumed


def test_models_endpoint(client: httpx.Client, model_dir: Path) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [str(model_dir)]


# ------------------------------------------------------------------------------ bad requests

BAD_REQUESTS = [
    ("invalid JSON", b'{"prompt": [1, 2', 400, "not valid JSON"),
    ("not an object", [1, 2, 3], 400, "must be a JSON object"),
    ("missing prompt", {"echo": True, "max_tokens": 0, "logprobs": 0}, 400, "missing field `prompt`"),
    (
        "missing max_tokens",
        {"prompt": [1, 2], "echo": True, "logprobs": 0},
        400,
        r"missing field `max_tokens`.*max_tokens=0 \(scores only\) or max_tokens=1",
    ),
    ("generation", score_body([1, 2], max_tokens=16), 400, r"max_tokens=16 is not supported.*max_tokens=0"),
    ("negative max_tokens", score_body([1, 2], max_tokens=-1), 400, "max_tokens=-1 is not supported"),
    ("temperature", score_body([1, 2], max_tokens=1, temperature=-1), 400, "`temperature` must be a number >= 0"),
    ("text too long", score_body("x" * (64 * MAX_PROMPT_TOKENS + 1)), 400, "characters; the limit is"),
    ("text too many tokens", score_body("x" * (MAX_PROMPT_TOKENS + 1)), 400, f"the limit is {MAX_PROMPT_TOKENS}"),
    ("deeply nested", b"[" * 5_000 + b"]" * 5_000, 400, "nested too deeply"),
    ("token too large", score_body([1, VOCAB]), 400, f"out of range: token ids must be in \\[0, {VOCAB}\\)"),
    ("negative token", score_body([[1, 2], [3, -1]]), 400, r"prompt\[1\]\[1\] = -1 is out of range"),
    ("float token", score_body([1, 2.5]), 400, "is not an integer token id"),
    ("bool token", score_body([1, True]), 400, "is not an integer token id"),
    ("empty prompt", score_body([]), 400, "non-empty list"),
    ("empty row", score_body([[1], []]), 400, r"prompt\[1\] must be a non-empty list"),
    ("too long", score_body(list(range(MAX_PROMPT_TOKENS + 1))), 400, f"the limit is {MAX_PROMPT_TOKENS}"),
    ("too many prompts", score_body([[1, 2]] * (MAX_PROMPTS + 1)), 400, f"the limit is {MAX_PROMPTS}"),
    ("logprobs too large", score_body([1, 2], logprobs=21), 400, "exceeds this server's limit of 20"),
    ("logprobs wrong type", score_body([1, 2], logprobs="5"), 400, "must be an integer >= 0"),
    ("echo wrong type", score_body([1, 2], echo="yes"), 400, "`echo` must be true or false"),
    ("nothing to score", {"prompt": [1, 2], "max_tokens": 0}, 400, "nothing to score"),
    ("stream", score_body([1, 2], stream=True), 400, "stream=true is not supported"),
    ("unknown model", score_body([1, 2], model="gpt-17"), 404, "the model `gpt-17` does not exist"),
    ("body too large", score_body([[1] * 60] * 200), 413, "the limit is"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_a_message(
    client: httpx.Client, server: ServerProcess, name, body, status, message
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert re.search(message, error["message"]), error["message"]
    assert server.healthy()
    assert client.post("/v1/completions", json=score_body([1, 2, 3])).status_code == 200


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    assert client.get("/v2/anything").status_code == 404
    response = client.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


# ------------------------------------------------------------------------------ auth


def test_api_key_is_required_on_v1_routes(server: ServerProcess) -> None:
    body = score_body([1, 2, 3])
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # liveness probes need no key
    ok = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------ disconnects


def raw_request(port: int, body: bytes, *, send_bytes: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall((head + body)[: None if send_bytes is None else len(head) + send_bytes])
    return sock


def test_clients_that_disconnect_do_not_break_the_server(client: httpx.Client, server: ServerProcess) -> None:
    big = json.dumps(
        score_body([[random.randrange(VOCAB) for _ in range(MAX_PROMPT_TOKENS)]] * MAX_PROMPTS, logprobs=20)
    ).encode()
    raw_request(server.port, big, send_bytes=len(big) // 2).close()  # gone while sending the body
    for _ in range(5):
        raw_request(server.port, big).close()  # gone while its prompts are queued or being scored
    assert server.healthy()
    response = client.post("/v1/completions", json=score_body([[5, 6, 7]] * 4))
    assert response.status_code == 200 and len(response.json()["choices"]) == 4
    assert client.get("/stats").json()["failed_batches"] == 0


# ------------------------------------------------------------------------------ load


async def _client_loop(url: str, seed: int, n_requests: int) -> list[str]:
    gen = random.Random(seed)
    errors = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        for _ in range(n_requests):
            prompts = [[gen.randrange(VOCAB) for _ in range(gen.randint(2, 48))] for _ in range(gen.randint(1, 3))]
            response = await c.post("/v1/completions", json=score_body(prompts))
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                continue
            lengths = [len(ch["logprobs"]["token_logprobs"]) for ch in response.json()["choices"]]
            if lengths != [len(p) for p in prompts]:
                errors.append(f"wrong lengths {lengths} for prompts of {[len(p) for p in prompts]}")
    return errors


def test_load_32_clients_x_20_requests_without_errors(client: httpx.Client, server: ServerProcess) -> None:
    clients, per_client = 32, 20
    before = client.get("/stats").json()
    start = time.perf_counter()

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(_client_loop(server.url, seed, per_client) for seed in range(clients)))

    errors = [e for errs in asyncio.run(main()) for e in errs]
    elapsed = time.perf_counter() - start
    after = client.get("/stats").json()
    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    print(
        f"\nload: {clients * per_client} requests in {elapsed:.2f}s = {clients * per_client / elapsed:.0f} req/s; "
        f"{rows} prompts in {batches} forward passes ({rows / max(batches, 1):.1f} per batch, "
        f"largest {after['max_batch_rows']})"
    )
    assert errors == []
    assert batches < rows  # concurrent requests were batched together
    assert server.healthy()


# ------------------------------------------------------------------------------ server death


def test_http_teacher_retries_then_names_the_url_when_the_server_dies(model_dir: Path, tmp_path: Path) -> None:
    proc = ServerProcess(model_dir, tmp_path / "doomed.log")
    try:
        proc.wait_healthy()
        batch = make_rollout_batch(seed=1, rows=4)
        teacher = HTTPTeacher(proc.url, max_retries=3, backoff_s=0.05, timeout_s=5)
        assert teacher.score(batch)[batch.loss_mask_B_T].abs().min() > 0
        proc.stop()
        with pytest.raises(
            TeacherUnavailableError,
            match=rf"teacher at {proc.url}/v1/completions failed after 4 "
            r"attempts; last error: ConnectError",
        ):
            teacher.score(batch)
        assert teacher.metrics()["retries"] >= 3
        teacher.close()
    finally:
        proc.stop()
