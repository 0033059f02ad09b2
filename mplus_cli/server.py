"""An OpenAI-compatible HTTP server that answers from one memory state (read only), so that harnesses which
call a model over HTTP (lm-eval's local-completions, RULER, HELMET, needle-in-a-haystack scripts, the
openai client) can ask a session.

Endpoints: GET /v1/models; POST /v1/completions (the prompt as given) and /v1/chat/completions (the
messages in the tokenizer's chat template), streamed as server-sent events with "stream": true. Decoding is
greedy unless the request gives a temperature above 0; `max_tokens`, `top_p`, `seed` and `stop` (strings
that end the answer, left out of it) are honoured; the request's "model" is not read (one model serves).
One request at a time: the model answers one question at a time anyway. With a token, every request needs
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import model as mp
from model.text.tokenizer import decode, encode, has_chat_template, render_chat

DEFAULT_MAX_TOKENS = 64
LOCAL_HOSTS = ("127.0.0.1", "localhost")
MAX_BODY_BYTES = 64 << 20


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error type go with the message."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class StopAnswer(Exception):
    """Raised from the token callback once the answer holds a stop string."""


@dataclass
class Answerer:
    """A model and the memory it answers from."""

    lm: mp.MemoryLLM
    state: mp.MemoryState
    name: str  # what responses call the model: the session's name, or the model's
    stop_ids: tuple[int, ...]

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        """The request's prompt (completions) or its messages in the chat template (chat), as token ids."""
        if not chat:
            prompt = body.get("prompt")
            prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
            if not isinstance(prompt, str) or not prompt:
                raise RequestError("'prompt' must be one non-empty string")
            return encode(self.lm.tokenizer, prompt)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content}")
        if not has_chat_template(self.lm.tokenizer):
            raise RequestError("this model's tokenizer has no chat template: use /v1/completions")
        try:
            turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        except (KeyError, TypeError) as e:
            raise RequestError("every message needs a 'role' and a 'content'") from e
        return encode(self.lm.tokenizer, render_chat(self.lm.tokenizer, turns, generation=True))

    def settings(self, body: dict[str, Any], prompt: list[int]) -> mp.DecodeSettings:
        """The request's decoding, checked against the context window left after the memory prefix."""
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError("'max_tokens' must be a positive integer")
        window = self.lm.cfg.context_window
        if window is not None and self.lm.prefix_length(self.state) + len(prompt) + max_tokens - 1 > window:
            raise RequestError(f"the prompt ({len(prompt)} tokens) and max_tokens {max_tokens} exceed the context")
        try:
            temperature = float(body.get("temperature") or 0.0)
            return mp.DecodeSettings(
                max_new_tokens=max_tokens,
                sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
                top_p=float(body.get("top_p") or 1.0),
                seed=int(body.get("seed") or 0),
                stop_token_ids=self.stop_ids,
            )
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from e

    def answer(
        self, prompt: list[int], settings: mp.DecodeSettings, stops: list[str], on_piece: Callable[[str], None]
    ) -> tuple[str, int]:
        """Answer `prompt`, handing the text to `on_piece` as tokens arrive, up to the first stop string; held
        back: an incomplete UTF-8 sequence, and as many characters as could start a stop string. (finish
        reason, tokens generated)."""
        ids, sent, hold = [], 0, max(map(len, stops), default=1) - 1

        def send(text: str, upto: int) -> None:
            nonlocal sent
            if upto > sent:
                on_piece(text[sent:upto])
                sent = upto

        def on_token(token: int) -> None:
            ids.append(token)
            text = decode(self.lm.tokenizer, ids)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                send(text, cut)
                raise StopAnswer
            send(text, len(text) - hold - text.endswith("\ufffd"))

        try:
            out = mp.generate(self.lm, self.state, prompt, settings, on_token=on_token)
        except StopAnswer:
            return "stop", len(ids)
        text = decode(self.lm.tokenizer, ids)
        send(text, len(text))
        return out.finish_reason, len(ids)


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a string or a list of non-empty strings")
    return stops


class Handler(BaseHTTPRequestHandler):
    """The HTTP side: routes, bearer token, JSON and server-sent events."""

    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # no line per request on stderr
        pass

    def do_GET(self) -> None:
        self.handle_request(lambda: self.models())

    def do_POST(self) -> None:
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        self.handle_request(lambda: self.complete(routes[self.path]) if self.path in routes else self.not_found())

    def handle_request(self, route: Callable[[], None]) -> None:
        try:
            self.authorize()
            route()
        except RequestError as e:
            self.send_json({"error": {"message": str(e), "type": e.kind, "code": None}}, e.status)

    def authorize(self) -> None:
        token = self.server.token
        given = self.headers.get("Authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise RequestError("a valid 'Authorization: Bearer <token>' header is needed", 401, "authentication_error")

    def not_found(self) -> None:
        raise RequestError(f"no route {self.path}: use /v1/completions or /v1/chat/completions", 404, "not_found")

    def models(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self.not_found()
        model = {
            "id": self.server.answerer.name,
            "object": "model",
            "created": self.server.started,
            "owned_by": "mplus",
        }
        self.send_json({"object": "list", "data": [model]})

    def body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the request is over {MAX_BODY_BYTES >> 20} MiB", 413)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def complete(self, chat: bool) -> None:
        body, answerer = self.body(), self.server.answerer
        prompt = answerer.prompt_ids(body, chat)
        settings, stops = answerer.settings(body, prompt), stop_strings(body)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": answerer.name,
        }
        if body.get("stream"):
            self.stream(head, chat, lambda on_piece: answerer.answer(prompt, settings, stops, on_piece))
            return
        pieces: list[str] = []
        reason, tokens = answerer.answer(prompt, settings, stops, pieces.append)
        text = "".join(pieces)
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        usage = {"prompt_tokens": len(prompt), "completion_tokens": tokens, "total_tokens": len(prompt) + tokens}
        self.send_json(head | {"choices": [{"index": 0, **choice, "finish_reason": reason}], "usage": usage})

    def stream(self, head: dict[str, Any], chat: bool, run: Callable[[Callable[[str], None]], tuple[str, int]]) -> None:
        """Server-sent events: a chunk per piece of text, one with the finish reason, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

        def event(data: str) -> None:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def chunk(text: str | None, reason: str | None) -> str:
            if chat:
                delta = {} if text is None else {"role": "assistant", "content": text}
                return json.dumps(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return json.dumps(head | {"choices": [choice]})

        reason, _ = run(lambda piece: event(chunk(piece, None)))
        event(chunk(None, reason))
        event("[DONE]")

    def send_json(self, document: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(HTTPServer):
    """One request at a time (HTTPServer), answered from `answerer`; `token`: the bearer token, or None."""

    def __init__(self, address: tuple[str, int], answerer: Answerer, token: str | None):
        super().__init__(address, Handler)
        self.answerer, self.token, self.started = answerer, token, int(time.time())
