"""A WebSocket-over-HTTP backend written with the published Python GRIP library (`gripcontrol`).

Used by tests/interop.rs. It binds 127.0.0.1 on an ephemeral port and prints `LISTENING <port>`
on stdout once it accepts requests. It runs until stdin closes (the test holds the pipe), so it
never outlives the test that started it.

Behaviour, per WebSocket-over-HTTP request (any path, POST):
- OPEN: accept (`OPEN` + `Sec-WebSocket-Extensions: grip`), subscribe the connection to channel
  `room` with a `c:` control message, and bind metadata `user=alice` (`Set-Meta-User`).
- TEXT: echo it back through `WebSocketContext.send`, which adds the `m:` prefix.
- CLOSE: answer with CLOSE carrying the same code.
- DISCONNECT: record it, answer nothing.

When the environment variable GRIP_KEY is set, every request's `Grip-Sig` is checked with
`gripcontrol.validate_sig` (issuer `GRIP_ISS` when set) and the result recorded.

`GET /log` answers JSON `{"requests": [...]}`, one entry per events request: path,
connection id, the `Meta-*` headers, `sig_present`, `sig_valid` (null when GRIP_KEY is unset),
and the decoded events. `GET /log?until=TYPE` waits (up to `timeout` seconds, default 10) until
an event of that type has been recorded, so the test needs no polling.

`POST /publish?control_uri=URI&channel=NAME&text=MESSAGE[&iss=ISS][&key=KEY]` publishes a text
message to the GRIP control URI (the gateway's admin listener) with `GripPubControl.publish` and
a `WebSocketMessageFormat`, as an application would (with `iss` and `key`, the library signs a
JWT for `Authorization: Bearer`); answers 200 `published` or 500 with the library's error.
"""

import json
import os
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from gripcontrol import (
    WebSocketContext,
    WebSocketEvent,
    WebSocketMessageFormat,
    decode_websocket_events,
    encode_websocket_events,
    validate_sig,
)

GRIP_KEY = os.environ.get("GRIP_KEY")
GRIP_ISS = os.environ.get("GRIP_ISS")

LOG = []
LOG_CHANGED = threading.Condition()


def describe(event):
    """A JSON-friendly view of one decoded event."""
    out = {"type": event.type}
    content = event.content
    if event.type in ("TEXT", "BINARY", "PING", "PONG") and content is not None:
        out["text"] = content.decode("utf-8", errors="replace")
    elif event.type == "CLOSE" and content:
        if len(content) >= 2:
            out["code"] = struct.unpack(">H", content[:2])[0]
        out["reason"] = content[2:].decode("utf-8", errors="replace")
    return out


def read_body(handler):
    """The request body, with Content-Length or chunked transfer encoding."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                # Trailers (none expected) end with an empty line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def wait_until(event_type, timeout):
    """Waits until an event of `event_type` is in the log; returns whether one is."""

    def seen():
        return any(e["type"] == event_type for r in LOG for e in r["events"])

    with LOG_CHANGED:
        return LOG_CHANGED.wait_for(seen, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("grip_backend: " + (fmt % args) + "\n")

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/log":
            self.reply(404, b"not found\n")
            return
        query = parse_qs(url.query)
        if "until" in query:
            timeout = float(query.get("timeout", ["10"])[0])
            wait_until(query["until"][0], timeout)
        with LOG_CHANGED:
            body = json.dumps({"requests": LOG}).encode("utf-8")
        self.reply(200, body, [("Content-Type", "application/json")])

    def do_POST(self):
        url = urlparse(self.path)
        body = read_body(self)
        if url.path == "/publish":
            self.publish(parse_qs(url.query))
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/websocket-events":
            self.reply(400, b"expected application/websocket-events\n")
            return
        try:
            events = decode_websocket_events(body)
        except Exception as e:  # the library raises ValueError and others on bad input
            self.reply(400, ("bad events: %s\n" % e).encode("utf-8"))
            return

        sig = self.headers.get("Grip-Sig")
        meta = {}
        for name, value in self.headers.items():
            if name.lower().startswith("meta-"):
                meta[name[5:].lower()] = value
        entry = {
            "path": self.path,
            "connection_id": self.headers.get("Connection-Id"),
            "meta": meta,
            "grip_extension": self.headers.get("Sec-WebSocket-Extensions"),
            "sig_present": sig is not None,
            "sig_valid": None if GRIP_KEY is None else bool(sig and validate_sig(sig, GRIP_KEY, GRIP_ISS)),
            "events": [describe(e) for e in events],
        }
        with LOG_CHANGED:
            LOG.append(entry)
            LOG_CHANGED.notify_all()

        ctx = WebSocketContext(entry["connection_id"], meta, events)
        headers = [("Content-Type", "application/websocket-events")]
        if ctx.is_opening():
            ctx.accept()
            ctx.subscribe("room")
            headers.append(("Sec-WebSocket-Extensions", "grip"))
            headers.append(("Set-Meta-User", "alice"))
        while ctx.can_recv():
            try:
                message = ctx.recv()
            except IOError:  # DISCONNECT
                break
            if message is None:  # CLOSE
                ctx.close(ctx.close_code)
                break
            ctx.send(message)

        out = []
        if ctx.accepted:
            out.append(WebSocketEvent("OPEN"))
        out.extend(ctx.out_events)
        if ctx.closed:
            code = ctx.out_close_code
            out.append(WebSocketEvent("CLOSE", struct.pack(">H", code) if code else None))
        self.reply(200, encode_websocket_events(out), headers)

    def publish(self, query):
        from gripcontrol import GripPubControl
        from pubcontrol import Item

        try:
            config = {"control_uri": query["control_uri"][0]}
            if "iss" in query:
                config["control_iss"] = query["iss"][0]
            if "key" in query:
                config["key"] = query["key"][0]
            pub = GripPubControl(config)
            item = Item(WebSocketMessageFormat(query["text"][0]))
            pub.publish(query["channel"][0], item, blocking=True)
        except Exception as e:  # report any publish failure to the test
            self.reply(500, ("publish failed: %r\n" % e).encode("utf-8"))
            return
        self.reply(200, b"published\n")


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("LISTENING %d" % server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # Run until the test closes our stdin (or dies).
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
