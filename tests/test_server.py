"""The OpenAI-compatible server, end to end: a real `vattn serve` process on a tiny random model.

One module-scoped server serves most tests; the errors, disconnects and the 32-stream test leave it serving.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.server_utils import RemoteServer, wait_for

MAX_MODEL_LEN = 4096  # the server's tiny llama is built with this many positions: long requests outlive a client
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def model_dir(tiny_model_root):
    from tests.tiny_models import get_tiny_model

    return str(get_tiny_model("llama", tiny_model_root, max_position_embeddings=MAX_MODEL_LEN))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"  # kept, for post-mortems
    with RemoteServer(model_dir, "--max-num-seqs", "32", "--max-model-len", str(MAX_MODEL_LEN),
                      "--kv-cache-memory", "16M", "--device", "cpu", log_path=str(log)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def n_tokens(server, prompt: str) -> int:
    return server.post("/tokenize", {"prompt": prompt}).json()["count"]


def sse_events(lines) -> list[dict | str]:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- basics ---------------------------------------------------------------------------------


def test_health_models_tokenize(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [server.model_name]
    tok = server.post("/tokenize", {"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 1 and tok["max_model_len"] == MAX_MODEL_LEN
    assert server.post("/detokenize", {"tokens": tok["tokens"]}).json()["prompt"].endswith("Hello world")
    chat_tok = server.post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat_tok["count"] > 2


def test_completion_matches_offline_engine(server, client, model_dir):
    """The server returns what the library returns for the same greedy request, with exact usage."""
    from vattn import LLM, SamplingParams

    prompt = "The quick brown fox"
    resp = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=10, **GREEDY)
    with LLM(model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=2, kv_cache_memory=4 << 20, device="cpu") as llm:
        ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert resp.object == "text_completion" and resp.model == server.model_name and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids) == n_tokens(server, prompt)
    assert resp.usage.completion_tokens == 10 and resp.usage.total_tokens == resp.usage.prompt_tokens + 10


def test_token_id_prompt_equals_text_prompt(server, client):
    prompt = "def main():"
    ids = server.post("/tokenize", {"prompt": prompt}).json()["tokens"]
    a = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=6, **GREEDY)
    b = client.completions.create(model=server.model_name, prompt=ids, max_tokens=6, **GREEDY)
    assert a.choices[0].text == b.choices[0].text
    assert b.usage.prompt_tokens == len(ids)


def test_batch_prompts_and_n(server, client):
    prompts = ["Once upon a time", "import os"]
    resp = client.completions.create(model=server.model_name, prompt=prompts, n=2, max_tokens=5, temperature=1.0,
                                     seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.prompt_tokens == sum(n_tokens(server, p) for p in prompts)
    assert resp.usage.completion_tokens == 4 * 5
    # choices 0,1 belong to prompt 0; each prompt's n samples come from different seeds
    again = client.completions.create(model=server.model_name, prompt=prompts[1], n=2, max_tokens=5, temperature=1.0,
                                      seed=7, extra_body={"ignore_eos": True})
    by_index = {c.index: c.text for c in resp.choices}
    assert [by_index[2], by_index[3]] == [c.text for c in sorted(again.choices, key=lambda c: c.index)]


def test_stop_string_and_extensions(server, client):
    full = client.completions.create(model=server.model_name, prompt="for i in", max_tokens=24, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = client.completions.create(model=server.model_name, prompt="for i in", max_tokens=24, stop=[stop], **GREEDY)
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kept = client.completions.create(model=server.model_name, prompt="for i in", max_tokens=24, stop=stop,
                                     temperature=0, extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]
    # min_tokens / top_k / repetition_penalty / unknown fields are accepted
    ext = client.completions.create(model=server.model_name, prompt="x", max_tokens=4, temperature=0.7, seed=1,
                                    extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.2, "min_tokens": 4,
                                                "not_a_field": 1})
    assert ext.usage.completion_tokens == 4


def test_completion_logprobs_and_echo(server, client):
    resp = client.completions.create(model=server.model_name, prompt="while True:", max_tokens=6, logprobs=3,
                                     **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and chosen <= 0  # top-3 plus the chosen one; texts may coincide
        assert chosen == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely one
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(model=server.model_name, prompt="while True:", max_tokens=6, logprobs=1,
                                     echo=True, **GREEDY)
    n_prompt = n_tokens(server, "while True:")
    assert echo.choices[0].text == "while True:" + resp.choices[0].text
    assert len(echo.choices[0].logprobs.tokens) == n_prompt + 6
    assert echo.choices[0].logprobs.token_logprobs[0] is None  # nothing precedes the first prompt token
    assert echo.choices[0].logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs)


def test_chat_completion(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    resp = client.chat.completions.create(model=server.model_name, messages=messages, max_completion_tokens=7,
                                          logprobs=True, top_logprobs=2, **GREEDY)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens == server.post("/tokenize", {"messages": messages}).json()["count"]
    content = choice.logprobs.content
    assert len(content) == 7
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token
        assert entry.bytes == list(entry.token.encode())
    # a string of list-of-parts content is the same conversation
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]
    again = client.chat.completions.create(model=server.model_name, messages=parts, max_tokens=7, **GREEDY)
    assert again.choices[0].message.content == choice.message.content


# ---- streaming ------------------------------------------------------------------------------


def test_completion_stream_equals_non_stream(server, client):
    kw = dict(model=server.model_name, prompt="class Foo:", max_tokens=12, temperature=0.9, seed=1234, n=2,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, logprobs=0, **kw))
    texts, finish, tokens = {0: "", 1: ""}, {}, {0: 0, 1: 0}
    for c in chunks[:-1]:
        (choice,) = c.choices
        assert choice.index not in finish, "nothing after a choice's finish_reason"
        texts[choice.index] += choice.text
        tokens[choice.index] += len(choice.logprobs.tokens)
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in plain.choices}
    assert finish == {0: "length", 1: "length"} and tokens == {0: 12, 1: 12}
    assert len(chunks) - 1 >= 12, "about one chunk per token"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_chat_stream_equals_non_stream(server, client):
    kw = dict(model=server.model_name, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10,
              temperature=0.8, seed=99, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_format(server):
    body = {"model": server.model_name, "prompt": "abc", "max_tokens": 3, "stream": True, "temperature": 0,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


# ---- errors ---------------------------------------------------------------------------------

LONG = "word " * (MAX_MODEL_LEN + 200)  # more than MAX_MODEL_LEN tokens

ERROR_CASES = [
    # (path, body, status, param)
    ("/v1/completions", b'{"prompt": "x",', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/nope", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", ERROR_CASES, ids=[f"{i}" for i in range(len(ERROR_CASES))])
def test_errors_are_openai_shaped(server, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        r = server.post(path, {"model": server.model_name, **body} if "model" not in body else body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param or param in err["message"], err


def test_openai_client_sees_errors_and_server_keeps_serving(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=server.model_name, prompt="x", max_tokens=MAX_MODEL_LEN)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "x"}],
                                       temperature=5.5 - 10)
    ok = client.completions.create(model=server.model_name, prompt="still there?", max_tokens=3, **GREEDY)
    assert ok.usage.completion_tokens == 3
    assert server.proc.poll() is None


# ---- disconnects free the KV cache --------------------------------------------------------


def _kv(server) -> dict:
    m = server.metrics()
    return {"running": m["vattn:num_requests_running"], "used": m["vattn:kv_cache_pages_used{kv_cache=vattention}"],
            "live": m["vattn:kv_cache_live_tokens{kv_cache=vattention}"],
            "aborts": m.get("vattn:request_success_total{finished_reason=abort}", 0.0)}


def test_stream_disconnect_aborts_and_frees_pages(server):
    before = _kv(server)
    body = {"model": server.model_name, "prompt": "Stream until I hang up", "max_tokens": 4000, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        seen = [line for _, line in zip(range(8), lines)]
        assert any(line.startswith("data: ") for line in seen)
        # /metrics refreshes every 50 ms while the engine steps: wait for a snapshot taken mid-generation
        wait_for(lambda: (k := _kv(server))["running"] >= 1 and k["used"] >= 1 and k["live"] > 0,
                 what="the stream to show as running in /metrics")
    # the connection is closed with hundreds of tokens still to go
    after = wait_for(lambda: (k := _kv(server))["running"] == 0 and k["used"] == 0 and k, what="pages freed")
    assert after["live"] == 0
    assert after["aborts"] == before["aborts"] + 1
    assert "finish_reason=abort" in server.log()


def test_non_stream_disconnect_aborts(server):
    before = _kv(server)
    body = {"model": server.model_name, "prompt": "Wait for me", "max_tokens": 4000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    wait_for(lambda: _kv(server)["aborts"] == before["aborts"] + 1, what="abort of a non-streaming request")
    after = wait_for(lambda: (k := _kv(server))["running"] == 0 and k["used"] == 0 and k, what="pages freed")
    assert after["live"] == 0


# ---- concurrency ----------------------------------------------------------------------------


def test_32_concurrent_streams_are_batched(server):
    async def one(aclient, i):
        stream = await aclient.completions.create(
            model=server.model_name, prompt=f"Request number {i}:", max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        return text, finish, usage

    async def main():
        aclient = server.async_client(timeout=120)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))
        finally:
            await aclient.close()

    before = server.metrics()
    results = asyncio.run(main())
    assert all(finish == "length" and usage.completion_tokens == 16 and text for text, finish, usage in results)
    after = server.metrics()
    # steps that advanced more than 4 requests at once: continuous batching, not one request at a time
    big = (after["vattn:step_batch_requests_count"] - after["vattn:step_batch_requests_bucket{le=4.0}"]) - (
        before["vattn:step_batch_requests_count"] - before["vattn:step_batch_requests_bucket{le=4.0}"])
    assert big > 0
    assert after["vattn:generation_tokens_total"] - before["vattn:generation_tokens_total"] == 32 * 16
    assert after["vattn:request_success_total{finished_reason=length}"] - before.get(
        "vattn:request_success_total{finished_reason=length}", 0) == 32
    # a streamed answer equals the same request answered alone, without streaming
    text0 = results[0][0]
    alone = server.client().completions.create(model=server.model_name, prompt="Request number 0:", max_tokens=16,
                                               **GREEDY)
    assert alone.choices[0].text == text0


def test_metrics_exposition(server):
    m = server.metrics()
    for name in ("vattn:time_to_first_token_seconds_count", "vattn:inter_token_latency_seconds_count",
                 "vattn:e2e_request_latency_seconds_count", "vattn:prompt_tokens_total",
                 "vattn:kv_cache_mapped_bytes{kv_cache=vattention}", "vattn:kv_cache_pages_mapped{kv_cache=vattention}",
                 "vattn:num_requests_waiting", "vattn:num_preemptions_total", "vattn:prefix_cache_hits_total{kv_cache=vattention}",
                 "vattn:prefix_cache_queries_total{kv_cache=vattention}"):
        assert name in m, name
    assert m["vattn:time_to_first_token_seconds_count"] > 0 and m["vattn:e2e_request_latency_seconds_sum"] > 0
    assert m["vattn:kv_cache_pages_mapped{kv_cache=vattention}"] >= m["vattn:kv_cache_pages_used{kv_cache=vattention}"]


def test_cached_prompt_tokens_are_reported_in_usage_and_metrics(server, client):
    """A second request with the same long prefix is served partly from the prefix cache, and says so."""
    prompt = "Cached prefix test: " + " ".join(f"item{i}" for i in range(400))
    n = n_tokens(server, prompt)
    unit = 512  # one 64 KiB page of the tiny model's K (2 kv heads x 16 dims x fp32) holds 512 tokens
    assert n > unit + 1
    before = server.metrics().get("vattn:prompt_tokens_cached_total", 0)
    first = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == n
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == unit * ((n - 1) // unit)
    assert second.choices[0].text == first.choices[0].text
    stream = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=2, stream=True, stream_options={"include_usage": True},
                                            **GREEDY)
    again = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=2, stream=True, stream_options={"include_usage": True},
                                           **GREEDY)
    usages = [[c.usage for c in s if c.usage is not None][-1] for s in (stream, again)]
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert usages[1].prompt_tokens_details.cached_tokens >= unit
    expected = before + second.usage.prompt_tokens_details.cached_tokens + usages[1].prompt_tokens_details.cached_tokens
    wait_for(lambda: server.metrics().get("vattn:prompt_tokens_cached_total") == expected, what="cached-token counter")
