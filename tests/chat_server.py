"""A local OpenAI-compatible chat-completions endpoint for the LLM judge's tests (no network beyond 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """A local OpenAI-compatible /chat/completions endpoint on 127.0.0.1 with scripted behaviour."""

    def __init__(
        self, fail_first: int = 0, status: int = 503, always_fail: bool = False, fail_after: int = 0, reply=None
    ) -> None:
        """``reply(response)``: the reply's ``content`` for the judged response text, or for the whole user message
        when the judge ranks candidates (default: a grader of "#### 4")."""
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_first, self.status, self.always_fail = fail_first, status, always_fail
        self.fail_after = fail_after  # serve this many requests, then fail every one
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # a client that followed a redirect by switching to GET: recorded, refused
                server.headers.append(dict(self.headers))
                self.send_response(405)
                self.end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                assert self.path.split("?")[0] == "/v1/chat/completions"
                late = server.fail_after and len(server.requests) > server.fail_after
                if server.always_fail or late or len(server.requests) <= server.fail_first:
                    self.send_response(server.status)
                    self.end_headers()
                    return
                message = body["messages"][1]["content"]
                if "Response:\n" in message:  # grading one response: the reply sees that response
                    response = message.split("Response:\n")[1].split("Reference answer:")[0]
                else:  # ranking: the reply sees the whole message
                    response = message
                if reply is not None:
                    content = reply(response)
                elif "gibberish" in response:
                    content = "I cannot decide."
                else:
                    content = "Right answer, clear steps.\nScore: 5" if "#### 4" in response else "Wrong.\nScore: 2"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
