"""Property-based requests built from the server's own OpenAPI schema: whatever a client sends, never a 5xx.

Bodies follow each route's request schema (fetched from the running server's /openapi.json), and some fields
are then swapped for arbitrary JSON, so both well-formed and malformed requests arrive. Bounded (a few dozen
examples per route, a handful of generated tokens each) and, under CI=true, derandomized (tests/conftest.py).

The strategy is built here from the JSON Schema subset pydantic emits ($ref, anyOf, objects, arrays, scalars):
hypothesis-jsonschema does not run on the installed Hypothesis (it uses an internal API since removed).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import RemoteServer

ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
MAX_GENERATED = 8  # tokens a generated request may ask for, so that the run takes seconds

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
INTS = st.integers(-3, 40) | st.sampled_from([-(2**63), -1, 0, 2**31, 2**32, 2**63, 10**30])
FLOATS = st.floats(-5, 5, allow_nan=False) | st.sampled_from([0.0, -0.0, 1e-9, 1e30, -1e30])


def from_schema(schema: dict, defs: dict) -> st.SearchStrategy:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs) for s in schema[key]])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = {k: from_schema(v, defs) for k, v in props.items() if k in required}
        optional = {k: from_schema(v, defs) for k, v in props.items() if k not in required}
        if props:
            return st.fixed_dictionaries(fixed, optional=optional)
        extra = schema.get("additionalProperties")
        values = from_schema(extra, defs) if isinstance(extra, dict) else JSON
        return st.dictionaries(st.text(max_size=6), values, max_size=3)
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=max(schema.get("minItems", 0), 4))
    if kind == "string":  # lone surrogates too: JSON can carry them, a tokenizer cannot
        return st.text(max_size=24) | st.text(st.characters(categories=["Ll", "Cs"]), max_size=4)
    if kind == "integer":
        return INTS
    if kind == "number":
        return FLOATS | INTS
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON


@pytest.fixture(scope="module")
def server(tiny_model):
    with RemoteServer(tiny_model("llama"), "--max-num-seqs", "8", "--max-model-len", "256", "--kv-cache-memory", "8M",
                      "--max-n", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def bodies(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    defs = spec["components"]["schemas"]
    strategies = {}
    for route in ROUTES:
        schema = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        strategies[route] = from_schema(schema, defs)
    return strategies


@st.composite
def request_body(draw, base: st.SearchStrategy, model: str):
    body = draw(base)
    if not isinstance(body, dict):
        return body
    if draw(st.integers(0, 3)):  # mostly the served model, so that requests get as far as the engine
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > MAX_GENERATED:
            body[key] = MAX_GENERATED
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    for key in draw(st.lists(st.sampled_from(sorted(body) or ["prompt"]), max_size=2)):  # malformed fields
        body[key] = draw(JSON)
    return body


def check_response(r: httpx.Response, sent) -> None:
    assert r.status_code < 500, f"{r.status_code} for {json.dumps(sent)[:500]}: {r.text[:500]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                err = json.loads(line[6:])["error"]
                assert err["type"] != "internal_server_error", f"{err} for {json.dumps(sent)[:500]}"


@pytest.mark.parametrize("route", ROUTES)
def test_no_request_built_from_the_schema_gets_a_5xx(server, bodies, route):
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=request_body(bodies[route], server.model_name))
    def run(body):
        content = json.dumps(body, allow_nan=True).encode()
        r = httpx.post(f"{server.url}{route}", content=content, headers={"content-type": "application/json"},
                       timeout=60)
        check_response(r, body)

    run()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
