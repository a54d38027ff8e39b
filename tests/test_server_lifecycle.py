"""Server process lifecycle: SIGTERM/SIGINT shut down cleanly (exit 0, KV cache closed), the paged path serves,
and the `vattn` CLI (flags generated from EngineConfig, size suffixes, `vattn generate`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_utils import REPO, RemoteServer
from vattn.cli import build_parser, engine_config, main, parse_size
from vattn.config import EngineConfig


def test_sigterm_shuts_down_cleanly_mid_stream(tiny_model):
    """SIGTERM during a streaming request: exit code 0 within a few seconds, engine stopped, KV cache closed.

    (SIGINT takes the same path through uvicorn and our handler.)"""
    srv = RemoteServer(tiny_model("llama"), "--kv-cache", "paged", "--max-model-len", "256",
                       "--kv-cache-memory", "4M", "--shutdown-timeout", "2", "--device", "cpu")
    try:
        client = srv.client()
        # the paged path serves too (and /metrics labels it)
        ok = client.completions.create(model=srv.model_name, prompt="paged", max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
        assert ok.usage.completion_tokens == 4
        assert "vattn:kv_cache_pages_total{kv_cache=paged}" in srv.metrics()
        body = {"model": srv.model_name, "prompt": "long", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            srv.proc.wait(15)
            elapsed = time.monotonic() - t0
    finally:
        code = srv.stop(signal.SIGKILL)
        log = srv.log()
        srv.__exit__()
    assert code == 0, log
    assert elapsed < 8, f"shutdown took {elapsed:.1f}s"
    assert "engine stopped, KV cache closed" in log


def test_every_engine_config_field_is_a_flag():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    expected = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(EngineConfig)}
    assert {name: getattr(args, name) for name in expected} == expected
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(EngineConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name


def test_flags_map_onto_engine_config(tiny_model):
    args = build_parser().parse_args([
        "serve", "--model", tiny_model("llama"), "--kv-cache", "paged", "--kv-cache-memory", "64M",
        "--page-size", "2M", "--max-num-seqs", "3", "--max-model-len", "100", "--no-enable-prefix-caching",
        "--preemption-mode", "swap", "--no-background-mapping", "--seed", "5", "--attention-kernel", "torch",
        "--served-model-name", "m", "--port", "9"])
    cfg = engine_config(args)
    assert (cfg.kv_cache, cfg.kv_cache_memory, cfg.page_size, cfg.max_num_seqs, cfg.max_model_len) == (
        "paged", 64 << 20, 2 << 20, 3, 100)
    assert cfg.enable_prefix_caching is False and cfg.background_mapping is False
    assert (cfg.preemption_mode, cfg.seed, cfg.attention_kernel) == ("swap", 5, "torch")
    assert (args.served_model_name, args.port) == ("m", 9)


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64K", 65536), ("64k", 65536), ("2M", 2 << 20),
                                        ("1G", 1 << 30), ("1.5G", 3 << 29), ("512MiB", 512 << 20), ("1GB", 1 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("argv", [["serve", "--kv-cache-memory", "lots"], ["serve", "--page-size", "1.3K"],
                                  ["serve", "--kv-cache", "blocks"], ["serve", "--max-num-seqs", "x"],
                                  ["serve", "--attention-kernel", "warp"]])
def test_bad_flags_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "vattn.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_generate_prints_what_the_library_generates(tiny_model):
    from vattn import LLM, SamplingParams

    model = tiny_model("llama")
    res = _cli("generate", "--model", model, "--prompt", "Hello", "--prompt", "World", "--max-tokens", "6",
               "--max-model-len", "64", "--kv-cache-memory", "2M", "--attention-kernel", "sdpa", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    with LLM(model, max_model_len=64, kv_cache_memory=2 << 20, device="cpu") as llm:
        ref = llm.generate(["Hello", "World"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert res.stdout == "".join(o.outputs[0].text + "\n" for o in ref)


def test_cli_reports_config_errors(capsys):
    assert main(["serve", "--model", "/no/such/dir"]) == 2
    assert "model directory not found: /no/such/dir" in capsys.readouterr().err
