"""A small, real OpenAI-compatible chat-completions server on 127.0.0.1 for the endpoint tests: it answers over HTTP
like vLLM or llama.cpp (`top_logprobs` of the first token included when asked), and can be told to misbehave."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.ray_nodes import free_port


def intervenes(messages: list[dict[str, Any]]) -> bool:
    """The fake model's decision, the same for a task whatever the harness adds or merges: from a hash of the first
    line of its first user turn."""
    first = next(m["content"] for m in messages if m["role"] == "user").split("\n")[0]
    return int(hashlib.sha256(first.encode()).hexdigest(), 16) % 2 == 0


@dataclass
class Fault:
    """What the server does instead of answering: a status (with headers and a body), a hang, or a broken body."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "overloaded"}}'
    hang_s: float = 0.0
    raw: str | None = None  # sent as is, with status 200: a body that is not JSON, or JSON with no choices


@dataclass
class Seen:
    at: float
    body: dict[str, Any]
    authorization: str

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.body, sort_keys=True).encode()).hexdigest()


class ChatServer:
    """The server, in a thread of the test process. `fault(n)` decides what the n-th request (from 0) gets (None:
    an answer); `key` is the API key it accepts (None: any); `logprobs` whether it returns them when asked."""

    def __init__(
        self,
        key: str | None = None,
        logprobs: bool = True,
        fault: Callable[[int], Fault | None] = lambda n: None,
        port: int | None = None,
    ):
        self.key, self.logprobs, self.fault = key, logprobs, fault
        self.port = port or free_port()
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with chat.lock:
                    number = len(chat.seen)
                    chat.seen.append(Seen(time.monotonic(), body, self.headers.get("Authorization", "")))
                if chat.key is not None and self.headers.get("Authorization") != f"Bearer {chat.key}":
                    self._send(401, '{"error": {"message": "Incorrect API key provided."}}')
                    return
                fault = chat.fault(number)
                if fault is not None:
                    if fault.hang_s:
                        time.sleep(fault.hang_s)
                    if fault.raw is not None:
                        self._send(200, fault.raw)
                    elif fault.status:
                        self._send(fault.status, fault.body, fault.headers)
                    return
                if body.get("model") != "fake-clinician":
                    self._send(404, '{"error": {"message": "The model does not exist."}}')
                    return
                self._send(200, json.dumps(chat.completion(body)))

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The fake model's answer: a behavior token (or option letter, when asked to choose) and a sentence."""
        messages = body["messages"]
        proactive = intervenes(messages)
        choosing = "Reply with the letter" in messages[-1]["content"]
        first, other = ("B", "A") if choosing else ("<behavior:proactive>", "<behavior:reactive>")
        if not proactive:
            first, other = other, first
        content = first if choosing else f"{first} {'Caution: check this first.' if proactive else 'Done.'}"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }
        if body.get("logprobs") and self.logprobs:
            top = [
                {"token": first, "logprob": -0.1},
                {"token": other, "logprob": -2.4},
                {"token": "The", "logprob": -5},
            ]
            choice["logprobs"] = {"content": [{"token": first, "logprob": -0.1, "top_logprobs": top}]}
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3},
        }
