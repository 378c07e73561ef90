"""A fast OpenAI-compatible upstream for gateway tests and benchmarks.

Answers instantly (or after ``--token-delay`` per token) with deterministic text: each
completion token is the word "tok", at most 12 of them unless the request sets ignore_eos.
Model ``hang`` never answers (timeouts). Answers are shaped as vLLM's: a role-only first chat
chunk, ``"logprobs": null``, ``finish_reason`` "stop" at a natural end and "length" at the
limit, ``stream_options.include_usage`` honoured, ``n`` outputs per prompt. Request fields
for tests: ``stub_fail_after`` (an engine error event after that many chunks, as vLLM sends
one mid-stream), ``stub_json: "spaced"`` (JSON with spaces, as other servers write it),
``stub_burst`` (events per write), ``stub_error: {"status": 500, "shape": "plain"}`` (an
error answer: "plain" text, vLLM's older "flat" JSON, or OpenAI's "openai" shape),
``stub_echo: true`` (the chat answer is the JSON of the messages received),
``stub_unavailable: {"key": "k", "times": 2}`` (the first ``times`` requests naming ``key``
answer as the graph does while an engine restarts: 503, Retry-After, OpenAI's shape; with
``"drop": true`` they are cut before any byte instead, as a replica that dies does). A chat with
``tools`` and a ``tool_choice`` naming a function (or "required") calls it, as vLLM does with
a tool parser: ``tool_calls`` with arguments ``{"city": "Paris"}``, streamed as a first delta
with the id and name, then the arguments in pieces; ``logprobs: true`` adds vLLM's logprobs.
A model at zero (``--cold-models``, or ``POST /stub/scale {"model": m, "serving": false}``)
answers every request as the graph's router does for a model with no replica: 503 with
`llmops_contract.SCALED_TO_ZERO_CODE`, until ``{"serving": true}``; /stats counts those
answers per model (``cold_answers``).
With ``--tokenizer PATH`` (default: the environment's ``LLMOPS_STUB_TOKENIZER``) it serves that
tokenizer.json for each of its models where the graph's router does
(``llmops_contract.TOKENIZER_PATH``); without it that path answers 404, as a backend that is
not an llmops graph.

    python -m tests.fakes.openai_stub --port 9000 [--models a,b] [--token-delay 0.0]
        [--tokenizer tokenizer.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from llmops_contract import SCALED_TO_ZERO_CODE, TOKENIZER_PATH

EMBEDDING_DIM = 8
NATURAL_LENGTH = 12
"""Tokens after which the stub "stops" like a model at end-of-sequence (unless ignore_eos)."""
BURST = 64
"""Events written at once by a stream without a token delay (the request's ``stub_burst``
field changes it; 1 writes each event on its own, as vLLM does)."""


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(text) // 4)


def _failure(status: int, shape: str) -> web.Response:
    """An error answer in one of the shapes backends use."""
    if shape == "plain":  # Ray Serve's proxy when a replica fails
        return web.Response(status=status, text="Internal Server Error")
    message = f"stub failure {status}"
    if shape == "flat":  # vLLM before its errors took OpenAI's shape
        flat = {"object": "error", "message": message, "type": "BadRequestError", "code": status}
        return web.json_response(flat, status=status)
    error = {"message": message, "type": "stub_error", "param": None, "code": "stub_code"}
    return web.json_response({"error": error}, status=status)


def _restarting(model: str) -> web.Response:
    """What the graph's router answers while a model's engine restarts."""
    error = {
        "message": f"model {model!r} is restarting; retry shortly",
        "type": "server_error",
        "param": None,
        "code": "engine_unavailable",
    }
    return web.json_response({"error": error}, status=503, headers={"Retry-After": "1"})


def _scaled_to_zero(model: str) -> web.Response:
    """What the graph's router answers for a model with no running replica."""
    error = {
        "message": f"model {model!r} is scaled to zero; a replica is starting",
        "type": "server_error",
        "param": None,
        "code": SCALED_TO_ZERO_CODE,
    }
    return web.json_response({"error": error}, status=503, headers={"Retry-After": "5"})


TOOL_ARGUMENTS = '{"city": "Paris"}'


def _called_tool(body: dict[str, Any]) -> str | None:
    """The function a chat request makes the model call: named, or the first when required."""
    choice, tools = body.get("tool_choice"), body.get("tools") or []
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name"))
    if choice == "required" and tools:
        return str(tools[0]["function"]["name"])
    return None


def _logprobs(count: int) -> dict[str, Any]:
    """vLLM's chat logprobs for ``count`` "tok" tokens."""
    entry = {"token": "tok", "logprob": -0.25, "bytes": [116, 111, 107], "top_logprobs": []}
    return {"content": [dict(entry) for _ in range(count)]}


def _generations(body: dict[str, Any]) -> int:
    """Outputs a request asks for: ``n`` per prompt (a list of texts or token lists)."""
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    return int(body.get("n") or 1) * (len(prompt) if many else 1)


def make_app(
    models: list[str],
    token_delay: float,
    max_model_len: int | None = None,
    cold_models: tuple[str, ...] = (),
) -> web.Application:
    """The stub's aiohttp application.

    With ``max_model_len``, /v1/models reports it as vLLM does and a request without an
    output limit may generate up to it, less the prompt (vLLM's default). ``cold_models``
    start at zero replicas.
    """
    state: dict[str, Any] = {"requests": 0, "cancelled": 0}
    unavailable: dict[str, int] = {}
    cold = set(cold_models)
    cold_answers: dict[str, int] = {}

    async def list_models(_: web.Request) -> web.Response:
        extra = {"max_model_len": max_model_len} if max_model_len else {}
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "stub", **extra} for m in models
        ]
        return web.json_response({"object": "list", "data": data})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(
            {**state, "unavailable": unavailable, "cold_answers": cold_answers}
        )

    async def scale(request: web.Request) -> web.Response:
        """Puts a model at zero (``serving: false``) or gives it a replica again."""
        body = await request.json()
        model = str(body["model"])
        if body["serving"]:
            cold.discard(model)
        else:
            cold.add(model)
        return web.json_response({"model": model, "serving": model not in cold})

    def at_zero(model: str) -> web.Response | None:
        if model not in cold:
            return None
        cold_answers[model] = cold_answers.get(model, 0) + 1
        return _scaled_to_zero(model)

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state["requests"] += 1
        # The trace context the gateway forwarded (the tracing tests read it from /stats).
        state["traceparent"] = request.headers.get("traceparent", "")
        model = body.get("model")
        if model == "hang":
            await asyncio.sleep(3600)
        if model not in models:
            return web.json_response(
                {
                    "error": {
                        "message": f"no model {model}",
                        "type": "not_found_error",
                        "param": "model",
                        "code": None,
                    }
                },
                status=404,
            )
        if (answer := at_zero(str(model))) is not None:
            return answer
        failure = body.get("stub_error")
        if failure:
            return _failure(int(failure["status"]), str(failure["shape"]))
        outage = body.get("stub_unavailable")
        if outage:
            key = str(outage["key"])
            unavailable[key] = unavailable.get(key, 0) + 1
            if unavailable[key] <= int(outage["times"]):
                if outage.get("drop"):
                    assert request.transport is not None
                    request.transport.close()
                    raise asyncio.CancelledError
                return _restarting(str(model))
        chat = request.path.endswith("/chat/completions")
        prompt = _prompt_tokens(body)
        # vLLM's chat takes max_completion_tokens first (protocol.py, to_sampling_params).
        limit = (body.get("max_completion_tokens") if chat else None) or body.get("max_tokens")
        if limit is None:
            limit = max(1, max_model_len - prompt) if max_model_len else 16
        limit = n_tokens = int(limit)
        if not body.get("ignore_eos"):
            n_tokens = min(n_tokens, NATURAL_LENGTH)
        generated = n_tokens * _generations(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
        }
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        # vLLM: "stop" when the model ended by itself, "length" when the limit cut it.
        finish = "length" if n_tokens == limit else "stop"
        separators = (", ", ": ") if body.get("stub_json") == "spaced" else (",", ":")

        def dumps(value: dict[str, Any]) -> str:
            return json.dumps(value, separators=separators)

        tool = _called_tool(body) if chat else None
        call = {"id": "chatcmpl-tool-stub", "type": "function"}
        if tool is not None:
            finish = "tool_calls"
        logprobs = _logprobs(n_tokens) if chat and body.get("logprobs") else None
        if not body.get("stream"):
            if token_delay:
                await asyncio.sleep(token_delay * n_tokens)
            text = " ".join(["tok"] * n_tokens)
            if body.get("stub_echo"):
                text = json.dumps(body.get("messages"))
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool is not None:
                function = {"name": tool, "arguments": TOOL_ARGUMENTS}
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {**call, "function": function}
                ]}  # fmt: skip
            choices: list[dict[str, Any]] = [
                {
                    "index": i,
                    **({"message": message} if chat else {"text": text}),
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
                for i in range(_generations(body))
            ]
            reply = {
                "id": "stub-1",
                "object": kind,
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
            }
            return web.Response(text=dumps(reply), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def chunk(choice: dict[str, Any]) -> bytes:
            value = {
                "id": "stub-1",
                "object": f"{kind}.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "logprobs": None, **choice}],
            }
            return f"data: {dumps(value)}\n\n".encode()

        def event(last: bool) -> bytes:
            text = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
            one = {"logprobs": _logprobs(1)} if logprobs else {}
            return chunk({**text, **one, "finish_reason": finish if last else None})

        fail_after = body.get("stub_fail_after")
        try:
            if chat:
                # vLLM's first chat chunk carries the role only (serving_chat.py).
                role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                await response.write(chunk(role))
            if tool is not None:
                # vLLM's streamed tool call: the id and name first, then the arguments.
                first = {**call, "index": 0, "function": {"name": tool, "arguments": ""}}
                await response.write(chunk({"delta": {"tool_calls": [first]}}))
                half = len(TOOL_ARGUMENTS) // 2
                for piece in (TOOL_ARGUMENTS[:half], TOOL_ARGUMENTS[half:]):
                    more = {"index": 0, "function": {"arguments": piece}}
                    await response.write(chunk({"delta": {"tool_calls": [more]}}))
                await response.write(chunk({"delta": {}, "finish_reason": finish}))
            elif fail_after is not None:
                # An engine error mid-stream, as vLLM reports it: an error event (its
                # create_streaming_error_response, json.dumps of ErrorResponse), then [DONE].
                for _ in range(int(fail_after)):
                    await response.write(event(False))
                error = {
                    "error": {
                        "message": "EngineCore encountered an issue",
                        "type": "InternalServerError",
                        "param": None,
                        "code": 500,
                    }
                }
                await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                return response
            elif token_delay:
                for i in range(n_tokens):
                    await asyncio.sleep(token_delay)
                    await response.write(event(i == n_tokens - 1))
            else:
                # As fast as the connection takes them, so relays (not the stub) are measured:
                # the same event, BURST at a time.
                middle, burst = event(False), max(1, int(body.get("stub_burst", BURST)))
                for start in range(0, n_tokens - 1, burst):
                    await response.write(middle * min(burst, n_tokens - 1 - start))
                await response.write(event(True))
            if (body.get("stream_options") or {}).get("include_usage"):
                final = {
                    "id": "stub-1",
                    "object": f"{kind}.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await response.write(f"data: {dumps(final)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            state["cancelled"] += 1
            raise
        return response

    async def responses(request: web.Request) -> web.StreamResponse:
        """The Responses API as vLLM serves it (serving_responses.py): "tok" tokens up to
        ``max_output_tokens`` (12 unless ignore_eos), usage as input/output tokens; streamed
        as response.created, the item and part openings, one response.output_text.delta per
        token, the closing events and response.completed carrying the usage."""
        body = await request.json()
        state["requests"] += 1
        model = body.get("model")
        if model not in models:
            error = {"message": f"no model {model}", "type": "NotFoundError", "code": 404}
            return web.json_response({"error": error}, status=404)
        if (answer := at_zero(str(model))) is not None:
            return answer
        prompt = max(1, len(json.dumps([body.get("instructions"), body.get("input")])) // 4)
        limit = int(body.get("max_output_tokens") or 16)
        n_tokens = limit if body.get("ignore_eos") else min(limit, NATURAL_LENGTH)
        text = " ".join(["tok"] * n_tokens)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + n_tokens,
        }
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "type": "message",
            "id": "msg_stub",
            "role": "assistant",
            "status": "completed",
            "content": [part],
        }
        done = {
            "id": "resp_stub",
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "completed" if n_tokens == NATURAL_LENGTH else "incomplete",
            "output": [message],
            "max_output_tokens": limit,
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(done)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sequence = 0

        async def send(kind: str, fields: dict[str, Any]) -> None:
            nonlocal sequence
            event = {"type": kind, **fields, "sequence_number": sequence}
            sequence += 1
            await response.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())

        started = {**done, "status": "in_progress", "output": [], "usage": None}
        try:
            await send("response.created", {"response": started})
            opened = {**message, "status": "in_progress", "content": []}
            await send("response.output_item.added", {"output_index": 0, "item": opened})
            where = {"item_id": "msg_stub", "output_index": 0, "content_index": 0}
            await send("response.content_part.added", {**where, "part": {**part, "text": ""}})
            for _ in range(n_tokens):
                if token_delay:
                    await asyncio.sleep(token_delay)
                await send("response.output_text.delta", {**where, "delta": "tok ", "logprobs": []})
            await send("response.output_text.done", {**where, "text": text, "logprobs": []})
            await send("response.content_part.done", {**where, "part": part})
            await send("response.output_item.done", {"output_index": 0, "item": message})
            await send("response.completed", {"response": done})
        except (ConnectionResetError, asyncio.CancelledError):
            state["cancelled"] += 1
            raise
        return response

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        state["requests"] += 1
        if (answer := at_zero(str(body.get("model")))) is not None:
            return answer
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.125] * EMBEDDING_DIM}
            for i in range(len(items))
        ]
        tokens = _prompt_tokens(body)
        return web.json_response(
            {
                "object": "list",
                "model": body.get("model"),
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stub/scale", scale)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def serve_tokenizer(app: web.Application, models: list[str], path: Path | None) -> None:
    """Serves ``path`` as the tokenizer.json of each of ``models`` (nothing without a path);
    ``GET /stub/tokenizer-fetches`` says how many times each model's was downloaded."""
    if path is None:
        return
    fetches: dict[str, int] = {}

    async def tokenizer_json(request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        if model not in models:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        fetches[model] = fetches.get(model, 0) + 1
        return web.FileResponse(path, headers={"Content-Type": "application/json"})

    async def fetch_counts(_: web.Request) -> web.Response:
        return web.json_response(fetches)

    app.router.add_get(TOKENIZER_PATH, tokenizer_json)
    app.router.add_get("/stub/tokenizer-fetches", fetch_counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="stub-chat,stub-embed")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--cold-models", default="", help="models at zero replicas until POST /stub/scale"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=os.environ.get("LLMOPS_STUB_TOKENIZER") or None
    )
    args = parser.parse_args()
    cold = tuple(name for name in args.cold_models.split(",") if name)
    app = make_app(args.models.split(","), args.token_delay, args.max_model_len, cold)
    serve_tokenizer(app, args.models.split(","), args.tokenizer)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
