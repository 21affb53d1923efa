"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the tests and benchmarks/speed.py: the OpenAI
path of W4S (the real `openai` SDK, retries, the ledger) runs against it with no network and no key.

The executor "solves" `Compute A + B.` correctly only when the prompt asks it to work "carefully" (or A is even), so a
workflow change shows in the score; requests whose first message is `meta_system` get the scripted meta-agent
replies. Faults, latency and a context limit can be injected. Leaves out streaming, tools and every other endpoint.
"""
import http.server
import json
import re
import socket
import struct
import threading
import time


def executor_reply(text):
    m = re.search(r"Compute (\d+) \+ (\d+)", text)
    if not m:
        return "I don't know."
    a, b = int(m.group(1)), int(m.group(2))
    right = "carefully" in text or a % 2 == 0
    return f"The sum is \\boxed{{{a + b if right else a + b + 1}}}."


class OpenAIStub(http.server.ThreadingHTTPServer):
    """Speaks POST /v1/chat/completions. `faults` is a list of per-request actions consumed in order: "429" (with
    Retry-After), "429-no-retry-after", "500", "503", "reset" (connection closed abruptly), "timeout" (answers only
    after `fault_sleep` s, past a client timeout set by W4S_API_TIMEOUT), "empty" / "null" (content "" / null),
    "truncated" (a cut JSON body), "length" (finish_reason length, half the text). `meta_replies`: a list served in
    turn, or a function of the request body (deterministic under concurrency). `api_key`: other keys get 401.
    `requests` holds every POST body, `answered` those whose whole reply was sent. `halt_after=N`: once N replies
    were sent, hold every further request unanswered and call `on_halt()` once in a thread (tests kill the client
    there once `in_flight()` is 0, so "answered before the kill" is exact); `release()` lets the held handlers go.
    `context=N`: refuse, as llama.cpp does (HTTP 400, its error body with n_ctx), a request whose prompt (~4
    characters a token) plus max_tokens exceeds N tokens; `refused` counts those. `log` holds every answered body."""
    daemon_threads = True

    def __init__(self, meta_system=None, meta_replies=(), delay=0.0, faults=(), api_key=None, halt_after=None,
                 on_halt=None, fault_sleep=2.0, context=None):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.meta_system = meta_system
        self.meta_replies = meta_replies if callable(meta_replies) else list(meta_replies)
        self.delay, self.faults, self.api_key, self.fault_sleep = delay, list(faults), api_key, fault_sleep
        self.log, self.lock, self.meta_count = [], threading.Lock(), 0
        self.requests, self.answered, self.halt_after, self.on_halt = [], [], halt_after, on_halt
        self.halted, self.released, self.held = False, threading.Event(), 0
        self.context, self.refused = context, 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, body):
        messages = body["messages"]
        with self.lock:
            self.log.append(body)
            if self.meta_system is not None and messages[0]["content"] == self.meta_system:
                if callable(self.meta_replies):
                    return self.meta_replies(body)
                reply = self.meta_replies[self.meta_count % len(self.meta_replies)]
                self.meta_count += 1
                return reply
        return executor_reply(messages[-1]["content"])

    def should_hold(self):
        """Called under the lock for each request: True once the halt point is reached (the request stays unanswered)."""
        if self.halt_after is None or (len(self.answered) < self.halt_after and not self.halted):
            return False
        if not self.halted:
            self.halted = True
            threading.Thread(target=self.on_halt or (lambda: None), daemon=True).start()
        self.held += 1
        return True

    def in_flight(self):
        """Requests let through before the halt that are not answered yet (their replies are still to come)."""
        with self.lock:
            return len(self.requests) - self.held - len(self.answered)

    def release(self):
        self.released.set()


class StubHandler(http.server.BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # headers and body go out separately: Nagle + delayed ACK add ~40 ms a call
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers: a reset or a cut body hits a pooled connection

    def log_message(self, *a):
        pass

    def authorized(self):
        key = self.server.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self.send_json(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
        return False

    def do_GET(self):  # /v1/models: the client's up-front check
        if self.authorized():
            self.send_json(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.authorized():
            return
        with self.server.lock:
            self.server.requests.append(body)
            hold = self.server.should_hold()
            fault = None if hold else self.server.faults.pop(0) if self.server.faults else None
        if hold:
            self.server.released.wait()
            self.close_connection = True
            return
        time.sleep(self.server.delay)
        prompt_tokens = sum(len(m["content"] or "") for m in body["messages"]) // 4
        if self.server.context and prompt_tokens + (body.get("max_tokens") or 0) > self.server.context:
            with self.server.lock:
                self.server.refused += 1
            return self.send_json(400, {"error": {
                "code": 400, "message": "the request exceeds the available context size, try increasing it",
                "type": "exceed_context_size_error", "n_prompt_tokens": prompt_tokens, "n_ctx": self.server.context}})
        if fault == "429":
            return self.send_json(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})
        if fault == "429-no-retry-after":
            return self.send_json(429, {"error": {"message": "slow down"}})
        if fault in ("500", "503"):
            return self.send_json(int(fault), {"error": {"message": "boom"}})
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault == "timeout":
            time.sleep(self.server.fault_sleep)
        text = self.server.answer(body)
        finish = "stop"
        if fault in ("empty", "null"):
            text = "" if fault == "empty" else None
        if fault == "length":
            text, finish = text[:len(text) // 2], "length"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        try:
            self.send_json(200, reply, cut=fault == "truncated")
        except OSError:  # the client gave up (timeout) and closed the connection
            return
        if fault is None or fault == "length":
            with self.server.lock:
                self.server.answered.append(body)

    def send_json(self, code, obj, headers=None, cut=False):
        data = json.dumps(obj).encode()
        data = data[:len(data) // 2] if cut else data
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
