#!/usr/bin/env python3
"""A mock OpenAI-compatible judge with injected faults, for exercising `ual annotate` at scale.

Replies to POST /v1/chat/completions with a score derived from the prompt, but on a fixed
pseudo-random share of requests returns HTTP 500, HTTP 429 (Retry-After: 1), a garbage reply,
or answers slowly. Prints the number of requests it served on SIGINT/exit, and appends one line
per request to the file given with --log.

    python scripts/mock_judge.py --port 8911 --log /tmp/judge.log
"""
import argparse
import hashlib
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8911)
    parser.add_argument("--log", default="judge.log")
    args = parser.parse_args()
    log = open(args.log, "a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            turns = len(body["messages"])
            h = int(hashlib.sha256(f"{prompt}|{turns}|{time.time_ns() % 7}".encode()).hexdigest(), 16) % 100
            log.write(json.dumps({"turns": turns, "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest()[:16]}) + "\n")
            if h < 5:
                return self.reply(500, {"error": {"message": "injected server error"}})
            if h < 8:
                return self.reply(429, {"error": {"message": "injected rate limit"}}, {"Retry-After": "1"})
            if h < 10:
                time.sleep(3)  # longer than the client's timeout in the demo
            content = "I am not sure." if h < 15 else str(1 + int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10)
            self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

        def reply(self, status, obj, headers=None):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
