"""`ripple-gguf serve`: an OpenAI-compatible HTTP server around one `RippleLlama`.

Our own small FastAPI app rather than llama-cpp-python's server module: that one keeps its model
and settings in module globals and builds `llama_cpp.Llama` itself, so running it on the sparse
runtime meant swapping the global class; its error wrapper also answers request-validation errors
with HTTP 500. Here the model is an argument, every route (the runtime counters included) sits
behind `--api-key`, a malformed body is a 4xx with a message, and a runtime failure fails that
request only (503 with the error; the next request reloads the model). Requests run one at a time
(one model, one llama context); the request and response shapes are llama-cpp-python's own types.
"""

import hmac
import json
import sys
import threading
import time
from typing import Callable

from .errors import RippleError


def make_app(load: Callable[[], object], alias: str, api_key: str | None = None):
    """The FastAPI app serving the model `load()` returns (called now, and again after a runtime
    failure so that a restored pack is picked up)."""
    import anyio
    import llama_cpp
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from llama_cpp.server.app import prepare_request_resources
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from starlette.concurrency import run_in_threadpool

    bearer = HTTPBearer(auto_error=False)

    def authenticate(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                headers={"WWW-Authenticate": "Bearer"})

    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="ripple-gguf", dependencies=[Depends(authenticate)], **docs)
    state = {"llm": load(), "broken": None, "requests": 0, "failed": 0}
    lock = anyio.Lock()  # one request at a time on the one model
    reload_lock = threading.Lock()

    def model():
        """The model, reloaded once after a runtime failure; RippleError if that fails too."""
        with reload_lock:
            if state["broken"] is not None:
                old, state["llm"] = state["llm"], None
                if old is not None:
                    old.close()
                try:
                    state["llm"] = load()
                except RippleError as e:
                    state["broken"] = str(e)
                    raise RippleError(f"the model could not be reloaded after a runtime error: {e}") from None
                state["broken"] = None
            return state["llm"]

    def failed(e: Exception):
        state["failed"] += 1
        if isinstance(e, RippleError):
            state["broken"] = str(e)
            print(f"error: request failed: {e}", file=sys.stderr, flush=True)
            return JSONResponse({"error": {"message": str(e), "type": "ripple_runtime_error", "code": 503}}, 503)
        if isinstance(e, (ValueError, RuntimeError)):  # prompt too long for the context, bad grammar, ...
            return JSONResponse({"error": {"message": str(e) or type(e).__name__, "type": "invalid_request_error",
                                           "code": 400}}, 400)
        raise e

    def prepared(body, exclude: set) -> tuple[object, dict]:
        llm = model()
        if body.grammar is not None:
            check_grammar(llm, body.grammar)
        kwargs = body.model_dump(exclude=exclude)
        prepare_request_resources(body, lambda _name: llm, None, kwargs)  # logit_bias, grammar, min_tokens
        return llm, kwargs

    def sse(call: Callable, body, exclude: set):
        async def events():
            async with lock:
                it = None
                try:
                    llm, kwargs = await run_in_threadpool(prepared, body, exclude)
                    it = await run_in_threadpool(lambda: call(llm, **kwargs))
                    while True:
                        chunk = await run_in_threadpool(next, it, None)
                        if chunk is None:
                            break
                        yield f"data: {json.dumps(chunk)}\n\n"
                except Exception as e:  # the status line has gone out: report in the stream
                    resp = failed(e)
                    yield f"data: {resp.body.decode()}\n\n"
                finally:
                    if it is not None:
                        with anyio.CancelScope(shield=True):
                            await run_in_threadpool(it.close)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def complete(call: Callable, body, exclude: set):
        state["requests"] += 1
        if body.grammar is not None:  # before a stream starts: a bad grammar is a 400, not an event
            async with lock:
                try:
                    await run_in_threadpool(lambda: check_grammar(model(), body.grammar))
                except Exception as e:
                    return failed(e)
        if body.stream:
            return sse(call, body, exclude)
        async with lock:
            try:
                def run():
                    llm, kwargs = prepared(body, exclude)
                    return call(llm, **kwargs)
                return await run_in_threadpool(run)
            except Exception as e:
                return failed(e)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: CreateChatCompletionRequest):
        return await complete(llama_cpp.Llama.create_chat_completion, body,
                              {"n", "logit_bias_type", "user", "min_tokens"})

    @app.post("/v1/completions")
    async def completions(body: CreateCompletionRequest):
        if isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise HTTPException(400, "one prompt per request")
            body.prompt = body.prompt[0] if body.prompt else ""
        return await complete(llama_cpp.Llama.__call__, body, {"n", "best_of", "logit_bias_type", "user", "min_tokens"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "me", "permissions": []}]}

    @app.get("/ripple/stats")
    async def ripple_stats():
        """Runtime counters of the loaded model, and the server's request counts."""
        async with lock:
            llm = state["llm"]
            st = llm.ripple_stats() if llm is not None else {"mode": "unloaded"}
        return {**st, "server": {"requests": state["requests"], "failed": state["failed"], "broken": state["broken"]}}

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        where = lambda e: ("body (not valid JSON)" if e.get("type") == "json_invalid"  # noqa: E731
                           else ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body")
        msg = "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in errs[:3]) or "invalid request body"
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "code": 422}}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": {"message": exc.detail, "type": "invalid_request_error", "code": exc.status_code}},
                            exc.status_code, headers=exc.headers)

    app.state.ripple = state
    return app


def check_grammar(llm, grammar: str) -> None:
    """ValueError for a GBNF grammar llama.cpp cannot parse. llama-cpp-python hands such a grammar on
    as a NULL sampler, which crashes the process at the first token: a request must not do that."""
    import llama_cpp
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise ValueError("grammar: llama.cpp's GBNF parser refused it (see its rules in llama.cpp's grammars/README.md)")
    llama_cpp.llama_sampler_free(sampler)


class BackgroundServer:
    """uvicorn in a thread on 127.0.0.1 (tests, and anything that embeds the server)."""

    def __init__(self, app, port: int, host: str = "127.0.0.1"):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
