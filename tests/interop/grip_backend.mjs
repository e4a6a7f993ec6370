// A WebSocket-over-HTTP backend written with the published npm GRIP libraries: `@fanoutio/serve-grip`
// (its `ServeGrip` middleware, run on a plain `node:http` server) and `@fanoutio/grip`
// (`WebSocketContext`, `validateSig`, `Publisher`, `WebSocketMessageFormat`).
//
// Used by tests/interop.rs; behaves like grip_backend.py beside it. It binds 127.0.0.1 on an
// ephemeral port, prints `LISTENING <port>` on stdout, and runs until stdin closes.
//
// The packages are loaded from the directory in WSGATE_NODE_MODULES (scripts/test installs them
// under target/interop-node/node_modules).
//
// Per WebSocket-over-HTTP request (any path, POST):
// - OPEN: accept, subscribe to channel `room`, bind metadata `user=alice` (serve-grip turns the
//   changed `wsContext.meta` into `Set-Meta-User`).
// - TEXT: echo through `wsContext.send` (adds `m:`).
// - CLOSE: answer CLOSE with the same code.
// With GRIP_KEY set, `Grip-Sig` is checked with `validateSig` (issuer GRIP_ISS when set). serve-grip's
// own `req.grip.isSigned` is not used: serve-grip 2.0.0 passes the promise returned by the async
// `validateSig` to `Array.prototype.some`, so it reports any signature as valid.
//
// GET /log[?until=TYPE&timeout=SECONDS] and POST /publish?control_uri=&channel=&text=[&iss=][&key=]
// as in grip_backend.py (`Publisher` with `control_iss` and `key` sends a JWT; with `key` alone it
// sends the key itself as the bearer token).

import http from 'node:http';
import path from 'node:path';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const modules = process.env.WSGATE_NODE_MODULES;
if (!modules) {
  console.error('grip_backend.mjs: WSGATE_NODE_MODULES is not set');
  process.exit(2);
}
const requireFrom = createRequire(path.join(modules, 'resolve-anchor.js'));
const load = (name) => import(pathToFileURL(requireFrom.resolve(name)).href);
const { Publisher, WebSocketMessageFormat, validateSig } = await load('@fanoutio/grip');
const { ServeGrip } = await load('@fanoutio/serve-grip');

const GRIP_KEY = process.env.GRIP_KEY;
const GRIP_ISS = process.env.GRIP_ISS;

// serve-grip needs a GRIP configuration to run at all; the control URI is only used for
// publishing, which /publish does with its own Publisher.
const serveGrip = new ServeGrip({
  grip: { control_uri: 'http://127.0.0.1:1/', ...(GRIP_KEY ? { verify_key: GRIP_KEY } : {}) },
});

const log = [];
let waiters = [];

function record(entry) {
  log.push(entry);
  const still = [];
  for (const w of waiters) {
    if (w.check()) w.resolve();
    else still.push(w);
  }
  waiters = still;
}

function waitUntil(type, timeoutMs) {
  const check = () => log.some((r) => r.events.some((e) => e.type === type));
  if (check()) return Promise.resolve();
  return new Promise((resolve) => {
    const w = { check, resolve };
    waiters.push(w);
    setTimeout(() => {
      waiters = waiters.filter((x) => x !== w);
      resolve();
    }, timeoutMs);
  });
}

const decoder = new TextDecoder();

function describe(event) {
  const out = { type: event.type };
  let content = event.content;
  if (typeof content === 'string') content = new TextEncoder().encode(content);
  if (['TEXT', 'BINARY', 'PING', 'PONG'].includes(event.type) && content != null) {
    out.text = decoder.decode(content);
  } else if (event.type === 'CLOSE' && content != null && content.length > 0) {
    if (content.length >= 2) out.code = (content[0] << 8) | content[1];
    out.reason = decoder.decode(content.slice(2));
  }
  return out;
}

function reply(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

async function publish(res, query) {
  try {
    const config = { control_uri: query.get('control_uri') };
    if (query.has('iss')) config.control_iss = query.get('iss');
    if (query.has('key')) config.key = query.get('key');
    const publisher = new Publisher(config);
    await publisher.publishFormats(query.get('channel'), new WebSocketMessageFormat(query.get('text')));
  } catch (e) {
    reply(res, 500, `publish failed: ${e?.message ?? ''} ${JSON.stringify(e)}\n`);
    return;
  }
  reply(res, 200, 'published\n');
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://backend');
  if (req.method === 'GET' && url.pathname === '/log') {
    if (url.searchParams.has('until')) {
      const seconds = Number(url.searchParams.get('timeout') ?? '10');
      await waitUntil(url.searchParams.get('until'), seconds * 1000);
    }
    reply(res, 200, JSON.stringify({ requests: log }), { 'Content-Type': 'application/json' });
    return;
  }
  if (req.method === 'POST' && url.pathname === '/publish') {
    req.resume();
    await publish(res, url.searchParams);
    return;
  }
  if (!(await serveGrip.run(req, res))) {
    return; // serve-grip already answered (bad events, missing Connection-Id, ...)
  }
  const ws = req.grip.wsContext;
  if (ws == null) {
    reply(res, 400, 'expected a WebSocket-over-HTTP request\n');
    return;
  }
  const sig = req.headers['grip-sig'];
  const meta = {};
  for (const [name, value] of Object.entries(req.headers)) {
    if (name.startsWith('meta-')) meta[name.slice(5)] = value;
  }
  record({
    path: req.url,
    connection_id: ws.id,
    meta,
    grip_extension: req.headers['sec-websocket-extensions'] ?? null,
    sig_present: sig != null,
    sig_valid: GRIP_KEY == null ? null : sig != null && (await validateSig(sig, GRIP_KEY, GRIP_ISS)),
    events: ws._inEvents.map(describe),
  });

  if (ws.isOpening()) {
    ws.accept();
    ws.subscribe('room');
    ws.meta.user = 'alice';
  }
  while (ws.canRecv()) {
    let message;
    try {
      message = ws.recv();
    } catch {
      break; // DISCONNECT
    }
    if (message == null) {
      ws.close(ws.closeCode ?? undefined);
      break;
    }
    ws.send(message);
  }
  // serve-grip's patched writeHead/end add the events body and the GRIP headers.
  res.statusCode = 200;
  res.end();
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((e) => {
    console.error('grip_backend.mjs:', e);
    if (!res.headersSent) reply(res, 500, `${e}\n`);
    else res.destroy();
  });
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

// Run until the test closes stdin.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
