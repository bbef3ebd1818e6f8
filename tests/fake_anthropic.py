"""A Messages API server on loopback that replays scripted replies, for driving the real
Anthropic SDK without a network. Records every request body it receives."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def tool_use(name: str, tool_input: dict, n: int) -> dict:
    return _message([{"type": "tool_use", "id": f"toolu_{n:04d}", "name": name, "input": tool_input}], "tool_use")


def text(body: str) -> dict:
    return _message([{"type": "text", "text": body}], "end_turn")


def rate_limited() -> dict:
    return {"status": 429, "headers": {"retry-after-ms": "10"},
            "body": {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}}


def _message(content: list, stop_reason: str) -> dict:
    return {"status": 200, "headers": {}, "body": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "claude-test", "content": content,
        "stop_reason": stop_reason, "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 10}}}


class FakeAnthropic:
    def __init__(self, script: list[dict]):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                reply = outer.script.pop(0) if outer.script else {
                    "status": 500, "headers": {}, "body": {"type": "error", "error": {"type": "api_error", "message": "script exhausted"}}}
                data = json.dumps(reply["body"]).encode()
                self.send_response(reply["status"])
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in reply["headers"].items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
