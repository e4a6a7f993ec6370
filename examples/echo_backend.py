#!/usr/bin/env python3
"""The smallest useful wsgate backend: a WebSocket echo server written as plain HTTP.

Python 3 standard library only, no GRIP library: it shows the WebSocket-over-HTTP protocol
itself. wsgate turns each client's WebSocket into HTTP POSTs with `Content-Type:
application/websocket-events`; this server answers each POST with the events to send back.

    python3 examples/echo_backend.py                  # http://127.0.0.1:3000
    cargo run --release -- gateway --listen 127.0.0.1:8080 --backend http://127.0.0.1:3000

then connect a WebSocket client to ws://127.0.0.1:8080/ (a browser console will do:
`ws = new WebSocket("ws://127.0.0.1:8080/"); ws.onmessage = e => console.log(e.data); ws.send("hi")`).

`--port 0` picks a free port; the first line printed on stdout always ends with the port.
"""

import argparse
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EVENTS = "application/websocket-events"


def decode_events(body):
    """Parses `NAME SIZE\\r\\nCONTENT\\r\\n` / `NAME\\r\\n` events into (name, content) pairs."""
    events = []
    pos = 0
    while pos < len(body):
        end = body.index(b"\r\n", pos)
        line = body[pos:end].decode("ascii")
        pos = end + 2
        name, _, size = line.partition(" ")
        content = b""
        if size:
            n = int(size, 16)
            content = body[pos : pos + n]
            if len(content) != n or body[pos + n : pos + n + 2] != b"\r\n":
                raise ValueError("truncated event %s" % name)
            pos += n + 2
        events.append((name, content))
    return events


def encode_events(events):
    """The inverse of decode_events; events without content are written `NAME\\r\\n`."""
    out = b""
    for name, content in events:
        if content:
            out += b"%s %x\r\n%s\r\n" % (name.encode("ascii"), len(content), content)
        else:
            out += name.encode("ascii") + b"\r\n"
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("echo_backend: " + (fmt % args) + "\n")

    def send(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        # Plain HTTP requests (no WebSocket upgrade) are passed through by wsgate.
        self.send(200, "text/plain", b"wsgate echo backend: connect a WebSocket client to the gateway\n")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Type", "").split(";")[0].strip() != EVENTS:
            self.send(415, "text/plain", b"expected %s\n" % EVENTS.encode())
            return
        try:
            events = decode_events(body)
        except ValueError as e:
            self.send(400, "text/plain", ("bad events: %s\n" % e).encode())
            return
        out = []
        for name, content in events:
            if name == "OPEN":
                out.append(("OPEN", b""))  # accept the connection
            elif name in ("TEXT", "BINARY"):
                out.append((name, content))  # echo
            elif name == "PING":
                out.append(("PONG", content))
            elif name == "CLOSE":
                out.append(("CLOSE", content))  # answer with the same code and reason
            # DISCONNECT: the client is gone; nothing to answer.
        # An empty POST is a keep-alive; it gets an empty 200.
        self.send(200, EVENTS, encode_events(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print("echo backend listening on http://%s:%d" % (host, port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
