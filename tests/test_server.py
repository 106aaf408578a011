"""`ripple-gguf serve`: every route behind --api-key, 4xx for malformed requests, a runtime failure
fails one request and the server stays up, and a bounded soak on loopback (127.0.0.1 only)."""
from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest


pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
KW = dict(n_ctx=256, n_threads=2, seed=0, verbose=False, stock_when_dense=False)  # the runtime, not stock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body=None, key: str | None = KEY, timeout: float = 60) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def server(converted):
    """serve(**ripple_kwargs) -> (base url, app state): the app in this process on 127.0.0.1."""
    from ripple_gguf.runtime import RippleLlama
    from ripple_gguf.serve import BackgroundServer, make_app
    path = converted("tiny-llama-swiglu", "f16")
    servers = []

    def serve(**kw):
        app = make_app(lambda: RippleLlama(path, **KW, **kw), "tiny", KEY)
        port = free_port()
        s = BackgroundServer(app, port).__enter__()
        servers.append(s)
        return f"http://127.0.0.1:{port}", app.state.ripple
    yield serve
    for s in servers:
        s.__exit__(None, None, None)


CHAT = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8, "temperature": 0}


def test_every_route_needs_the_api_key(server):
    url, _ = server()
    routes = [("/v1/models", None), ("/ripple/stats", None), ("/v1/chat/completions", CHAT),
              ("/v1/completions", {"prompt": "def ", "max_tokens": 4})]
    for path, body in routes:
        for key in (None, "wrong"):
            status, text = call(url + path, body, key=key)
            assert status == 401 and "API key" in json.loads(text)["error"]["message"], (path, key, status)
        status, text = call(url + path, body)
        assert status == 200, (path, text)
    stats = json.loads(call(url + "/ripple/stats")[1])
    assert stats["mode"] == "sparse" and stats["tokens"] > 0
    for path in ("/docs", "/openapi.json", "/redoc"):  # no unauthenticated schema either
        assert call(url + path, key=None)[0] in (401, 404)


def test_malformed_requests_get_4xx_with_a_message(server):
    url, state = server()
    cases = [
        ("/v1/chat/completions", {"messages": "notalist"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
        ("/v1/chat/completions", b"{not json", "JSON"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt"),
        ("/v1/completions", {"prompt": "x " * 600, "max_tokens": 4}, "context"),
        ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, "grammar"),  # used to crash the server
        ("/v1/chat/completions", {**CHAT, "stream": True, "grammar": "root ::= ("}, "grammar"),
    ]
    for path, body, words in cases:
        status, text = call(url + path, body)
        msg = json.loads(text)["error"]["message"]
        print(f"{str(body)[:50]!r} -> {status}: {msg[:90]}")
        assert 400 <= status < 500 and msg and words in msg, (body, status, text)
    assert call(url + "/v1/chat/completions", CHAT)[0] == 200  # still serving
    assert state["broken"] is None


def test_runtime_failure_fails_that_request_and_the_server_stays_up(server, converted):
    from ripple_gguf.runtime import ripple_lib
    from ripple_gguf.pack import open_pack
    pk = open_pack(converted("tiny-llama-swiglu", "f16"))
    # one layer: every token reads; prompts sparse too, so that the failing read is the pack's
    url, state = server(cache_size=max(pk.n_ff) * pk.bundle_bytes, pin_percent=0, stream_prefill=0)
    assert call(url + "/v1/chat/completions", CHAT)[0] == 200
    ripple_lib().llama_ripple_inject_fault(state["llm"].model, 0, errno.EIO)
    status, text = call(url + "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "import os"}]})
    err = json.loads(text)["error"]
    print(f"during an injected read error: {status} {err['message'][:160]}")
    assert status == 503 and ".ripple" in err["message"] and "Input/output error" in err["message"]
    assert call(url + "/v1/chat/completions", CHAT)[0] == 200  # the next request is served (model reloaded)
    # streaming: the status line has gone out, so the error arrives as an event, then [DONE]
    ripple_lib().llama_ripple_inject_fault(state["llm"].model, 0, errno.EIO)
    status, text = call(url + "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 16})
    assert status == 200 and '"error"' in text and text.rstrip().endswith("data: [DONE]"), text[-500:]
    assert call(url + "/v1/completions", {"prompt": "def ", "max_tokens": 4})[0] == 200
    stats = json.loads(call(url + "/ripple/stats")[1])
    assert stats["server"]["failed"] == 2 and not stats["error"] and stats["server"]["broken"] is None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@pytest.mark.slow
def test_soak_on_loopback(converted):
    """8 clients x 200 requests (chat and completions, streaming and not) against `ripple-gguf serve`
    on 127.0.0.1 with a cache of half the FFN: 0 errors, RSS flat after warm-up."""
    path = converted("tiny-llama-swiglu", "f16")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ripple_gguf.cli", "serve", str(path), "--host", "127.0.0.1",
                             "--port", str(port), "--ctx", "512", "--cache-ratio", "0.5", "--api-key", KEY,
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    clients, per_client, deadline = 8, 200, time.time() + 600
    try:
        while not _up(url):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("server did not start")
            time.sleep(0.2)
        errors, done, samples = [], [0], []
        lock = threading.Lock()

        def client(c: int):
            for i in range(per_client):
                if time.time() > deadline:
                    errors.append((c, i, "time budget exhausted"))
                    return
                stream = (c + i) % 2 == 1
                if (c + i) % 4 < 2:
                    body = {"messages": [{"role": "user", "content": f"def f{c}_{i}(x):"}], "max_tokens": 6,
                            "temperature": 0.7, "seed": i, "stream": stream}
                    path_ = "/v1/chat/completions"
                else:
                    body = {"prompt": f"import os\n# {c} {i}\n", "max_tokens": 6, "temperature": 0.7, "seed": i,
                            "stream": stream}
                    path_ = "/v1/completions"
                try:
                    status, text = call(url + path_, body, timeout=120)
                    ok = status == 200 and (text.rstrip().endswith("data: [DONE]") if stream else "choices" in text)
                    if ok and stream:
                        ok = '"error"' not in text
                except Exception as e:  # noqa: BLE001
                    status, text, ok = -1, repr(e), False
                if not ok:
                    errors.append((c, i, status, text[:200]))
                with lock:
                    done[0] += 1
                    if done[0] % 100 == 0:
                        samples.append((done[0], rss_kib(proc.pid)))

        t0 = time.time()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - t0
        stats = json.loads(call(url + "/ripple/stats")[1])
        total = clients * per_client
        warm = next(kib for n, kib in samples if n >= total // 4)
        end = samples[-1][1]
        print(f"soak: {total} requests from {clients} clients in {seconds:.0f} s ({total / seconds:.1f}/s), "
              f"{len(errors)} errors; RSS {warm / 1024:.1f} MiB after warm-up ({total // 4} requests) -> "
              f"{end / 1024:.1f} MiB at the end (samples {[round(k / 1024, 1) for _, k in samples]}); "
              f"runtime: {stats['tokens']} tokens, {stats['reads']} reads, error {stats['error']}")
        assert not errors, errors[:5]
        assert stats["server"]["failed"] == 0 and not stats["error"]
        assert end - warm <= 8 * 1024, "RSS grew after warm-up"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _up(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/v1/models", timeout=1)
    except urllib.error.HTTPError:
        return True  # answering (401 without the key)
    except OSError:
        return False
    return True
