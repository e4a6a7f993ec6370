#!/usr/bin/env python3
"""Turns the load generator's JSON lines (one per run) into the Markdown report of benches/run:
tables with absolute numbers, ratios (wsgate/direct, wsgate/Pushpin) and the issue-7 targets."""

import argparse
import datetime
import json
import os
import platform
import sys


def load(path):
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            label = r.get("label", "")
            if r.get("round"):
                label += f"#r{int(r['round'])}"
            rows[label] = r
    return rows


def num(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def ratio(a, b, digits=2):
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.{digits}f}×"


def get(rows, label, key):
    r = rows.get(label)
    if not r or r.get("failed"):
        return None
    return r.get(key)


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pct(a, b):
    """(a / b - 1) as a signed percentage, or "–"."""
    if a is None or b in (None, 0):
        return "–"
    return f"{(a / b - 1) * 100:+.1f} %"


def echo_row(first, second, r, backend_column=True):
    """One row of an echo table: rate, latencies, CPU, (backend CPU,) generator CPU and load."""
    if r.get("failed") or not r:
        return f"| {first} | {second} | failed | | | | | | |{' |' if backend_column else ''} |"
    backend = ""
    if backend_column:
        backend = (num(r.get("env_cpu_us_per_msg"), 2) if second != "direct" else "–") + " | "
    return (f"| {first} | {second} | {num(r.get('msgs_per_s'), 0)} | {num(r.get('p50_ms'), 2)} | "
            f"{num(r.get('p99_ms'), 2)} | {num(r.get('p999_ms'), 2)} | {num(r.get('cpu_us_per_msg'), 2)} | "
            f"{num(r.get('cpu_util'), 2)} | {backend}{num(r.get('gen_cpu_us_per_msg'), 2)} | {num(r.get('loadavg_before'), 2)} |")


def chain_section(rows, w):
    """CPU per message of the whole chain (generator + target + backend) for the throughput
    targets against "direct": on cores shared by all three, throughput follows it."""
    cases = [(f"echo ×{k}", f"echo{k}", "msg", "msgs_per_s", 0.5) for k in (1, 16)]
    cases.append(("http", "http", "req", "reqs_per_s", 0.7))
    lines = []
    for name, key, unit, rate, target in cases:
        ws, d = rows.get(f"{key}:wsgate", {}), rows.get(f"{key}:direct", {})
        parts = [ws.get(f"gen_cpu_us_per_{unit}"), ws.get(f"cpu_us_per_{unit}"), ws.get(f"env_cpu_us_per_{unit}"),
                 d.get(f"gen_cpu_us_per_{unit}"), d.get(f"cpu_us_per_{unit}")]
        if any(v is None for v in parts) or not ws.get(rate) or not d.get(rate):
            continue
        gen_w, gw, be, gen_d, srv_d = parts
        chain_w, chain_d = gen_w + gw + be, gen_d + srv_d
        budget = chain_d / target - gen_w - be
        lines.append(f"| {name} | {num(gen_w, 2)} + {num(gw, 2)} + {num(be, 2)} = {num(chain_w, 2)} | "
                     f"{num(gen_d, 2)} + {num(srv_d, 2)} = {num(chain_d, 2)} | {ratio(chain_d, chain_w)} | "
                     f"{ratio(ws[rate], d[rate])} | {num(budget, 2)} ({target}×) | {num(gw, 2)} |")
    if not lines:
        return
    w("### Where the shared cores go (CPU µs per message of the whole chain)\n")
    w("The generator, the backend and the target share the machine's cores, so each target's "
      "throughput follows the CPU its whole chain spends per message. The last two columns: "
      "how much gateway CPU per message the throughput target leaves (the direct chain's cost "
      "divided by the target ratio, minus the generator's and the backend's cost measured with "
      "wsgate), and what the gateway spent.\n")
    w("| scenario | wsgate chain: gen + gateway + backend | direct chain: gen + server | "
      "direct chain / wsgate chain | measured throughput ratio | gateway CPU the target leaves | gateway CPU measured |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for l in lines:
        w(l)
    w("")


def tracing_section(rows, w):
    """Issue 6: the cost of tracing on the echo ×1 path. Rounds of three fresh gateways (off, on
    with every span exported, off again); each "on" run is compared with the two "off" runs of its
    own round, and off2/off is the run-to-run noise band."""
    import re
    import statistics

    runs = {}  # (round, mode) -> row
    for label, r in rows.items():
        m = re.match(r"^tracing:(off|on|off2)(?:#(\d+))?$", label)
        if m:
            runs[(int(m.group(2) or 1), m.group(1))] = r
    rounds = sorted({k for k, _ in runs})
    modes = ("off", "on", "off2")

    def val(k, m, key):
        r = runs.get((k, m))
        if not r or r.get("failed"):
            return None
        return r.get(key)

    w("## Tracing cost (echo ×1, 64 B; OTLP/HTTP protobuf to a local sink)\n")
    w(f"{len(rounds)} round(s) of three fresh gateways on the same backend, one after another: tracing off (no "
      "`OTEL_*` variables), on (`OTEL_EXPORTER_OTLP_ENDPOINT` = the sink, `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, "
      "`OTEL_TRACES_SAMPLER=always_on`), off again. Each \"on\" run is compared with the mean of the two \"off\" "
      "runs of its round; off2/off is the run-to-run noise band.\n")
    w("| round | tracing | msgs/s | p50 ms | p99 ms | p99.9 ms | CPU µs/msg | target CPU cores | gen CPU µs/msg | load |")
    w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in rounds:
        for m in modes:
            w(echo_row(k, m, runs.get((k, m), {}), backend_column=False))

    def paired(key, num_mode, den):
        """Per round: value(num_mode) / den(round)."""
        out = []
        for k in rounds:
            a, b = val(k, num_mode, key), den(k, key)
            if a is not None and b:
                out.append(a / b)
        return out

    def off_mean(k, key):
        v = [x for x in (val(k, "off", key), val(k, "off2", key)) if x is not None]
        return sum(v) / len(v) if v else None

    def summary(xs):
        if not xs:
            return "–"
        med = statistics.median(xs)
        if len(xs) == 1:
            return f"{med:.3f}×"
        return f"{med:.3f}× ({min(xs):.3f}–{max(xs):.3f})"

    def med(mode_set, key):
        v = [val(k, m, key) for k in rounds for m in mode_set]
        v = [x for x in v if x is not None]
        return statistics.median(v) if v else None

    w("")
    w("| | msgs/s | CPU µs/msg | p99 ms |")
    w("|---|---:|---:|---:|")
    w(f"| off, median of every off and off2 run | {num(med(('off', 'off2'), 'msgs_per_s'), 0)} | "
      f"{num(med(('off', 'off2'), 'cpu_us_per_msg'), 2)} | {num(med(('off', 'off2'), 'p99_ms'), 2)} |")
    w(f"| on, median | {num(med(('on',), 'msgs_per_s'), 0)} | {num(med(('on',), 'cpu_us_per_msg'), 2)} | "
      f"{num(med(('on',), 'p99_ms'), 2)} |")
    tp_on = paired("msgs_per_s", "on", off_mean)
    w(f"| on / mean(off, off2) of its round: median (range) | {summary(tp_on)} | "
      f"{summary(paired('cpu_us_per_msg', 'on', off_mean))} | {summary(paired('p99_ms', 'on', off_mean))} |")
    noise_tp = paired("msgs_per_s", "off2", lambda k, key: val(k, "off", key))
    noise_cpu = paired("cpu_us_per_msg", "off2", lambda k, key: val(k, "off", key))
    w(f"| noise band, off2 / off of a round: median (range) | {summary(noise_tp)} | {summary(noise_cpu)} | "
      f"{summary(paired('p99_ms', 'off2', lambda k, key: val(k, 'off', key)))} |")
    w("")
    sink = rows.get("tracing:sink")
    if sink:
        after = sink.get("after") or {}
        spans = after.get("spans") or 0
        names = after.get("names") or {}
        by_name = ", ".join(f"{k} {num(v, 0)}" for k, v in sorted(names.items(), key=lambda kv: -kv[1]))
        msgs = sum(val(k, "on", "messages") or 0 for k in rounds)
        per_msg = f"; {spans / msgs:.3f} spans per message echoed with tracing on" if msgs else ""
        cpu_s = sink.get("sink_cpu_us")
        cpu_txt = f"; the sink's own CPU {cpu_s / 1e6:.2f} s (not counted as the gateway's)" if cpu_s is not None else ""
        w(f"The sink received {num(after.get('requests') or 0, 0)} export request(s), "
          f"{num((after.get('bytes') or 0) / 1024, 0)} KiB, {num(spans, 0)} spans ({by_name or 'none'}){per_msg}"
          f"{cpu_txt}; the gateways with tracing off sent it {num(sink.get('off_requests') or 0, 0)} request(s).")
        made = msgs + (names.get("ws.handshake") or 0)  # echoed messages + one OPEN per connection
        got = names.get("backend.request") or 0
        if made and got < made:
            w(f"\n{num(made - got, 0)} backend requests ({(made - got) / made * 100:.2f} %) have no `backend.request` "
              "span at the sink: the SDK's batch queue (2,048 spans unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise) "
              "drops spans when its export thread falls behind.")
        if sink.get("failed"):
            w("\n**FAIL: no spans reached the sink with tracing on, or a gateway with tracing off exported: "
              "the rows above do not measure what they claim.**")
        w("")
    w("| target (issue 6) | measured | result |")
    w("|---|---:|---|")
    if tp_on:
        m = statistics.median(tp_on)
        w(f"| tracing on (always_on): throughput cost < 10 % | on = {m:.3f}× off (median of {len(tp_on)} round(s)) | "
          f"{'**pass**' if m >= 0.90 else '**FAIL**'} |")
    if noise_tp:
        w(f"| noise band (off2 / off, throughput; CPU/msg) | {summary(noise_tp)}; {summary(noise_cpu)} | n/a |")
    w("")

class Checks:
    def __init__(self):
        self.rows = []

    def add(self, what, measured, ok):
        verdict = "n/a" if ok is None else ("**pass**" if ok else "**FAIL**")
        self.rows.append((what, measured, verdict))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--load-start", default="?")
    ap.add_argument("--load-end", default="?")
    ap.add_argument("--elapsed", default="?")
    ap.add_argument("--build", default="?")
    ap.add_argument("--pushpin-version", default="?")
    ap.add_argument("--wsgate-rev", default="?")
    ap.add_argument("--quick", default="0")
    a = ap.parse_args()
    rows = load(a.results)
    out = []
    w = out.append
    checks = Checks()

    w("# wsgate benchmark: latest run\n")
    if a.quick == "1":
        w("**Smoke run (BENCH_QUICK=1): small counts, not the issue-7 scenarios.**\n")
    w(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
      f"wsgate {a.wsgate_rev}; Pushpin {a.pushpin_version} (Debian package); elapsed {a.elapsed} s, of which building {a.build} s")
    w(f"- machine: {os.cpu_count()} cores ({cpu_model()}), Linux {platform.release()}")
    w(f"- load average (1/5/15 min) at start: {a.load_start}; at end: {a.load_end}")
    w("- the load generator, the backend and the system under test share these cores, and other "
      "work on the machine adds to the load average: absolute numbers are noisy, the ratios "
      "between targets measured back to back in this run are what count.")
    w("- CPU is utime+stime of the target's process tree from /proc (Pushpin: runner, condure, "
      "pushpin-proxy, pushpin-handler and zurl); the backend's and the generator's CPU are not "
      "included in it (they are shown separately as \"backend\" and \"gen\").\n")

    # ---------------------------------------------------------------- echo
    w("## Echo (64-byte messages, closed loop)\n")
    w("| in flight | target | msgs/s | p50 ms | p99 ms | p99.9 ms | CPU µs/msg | target CPU cores | backend CPU µs/msg | gen CPU µs/msg | load |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in (1, 16):
        for t in ("wsgate", "direct", "pushpin"):
            lab = f"echo{k}:{t}"
            w(echo_row(k, t, rows.get(lab, {})))
    w("")
    w("| in flight | msgs/s wsgate/direct | CPU/msg wsgate/direct | msgs/s wsgate/Pushpin | CPU/msg wsgate/Pushpin |")
    w("|---|---:|---:|---:|---:|")
    for k in (1, 16):
        ws, d, p = (get(rows, f"echo{k}:{t}", "msgs_per_s") for t in ("wsgate", "direct", "pushpin"))
        cw, cd, cp = (get(rows, f"echo{k}:{t}", "cpu_us_per_msg") for t in ("wsgate", "direct", "pushpin"))
        w(f"| {k} | {ratio(ws, d)} | {ratio(cw, cd)} | {ratio(ws, p, 1)} | {ratio(cw, cp, 3)} |")
        if ws and d:
            checks.add(f"echo ×{k}: throughput ≥ 0.5× direct", f"{ws / d:.2f}×", ws / d >= 0.5)
        if k == 1 and cw and cd:
            checks.add("echo ×1: CPU/msg ≤ 2× direct", f"{cw / cd:.2f}×", cw / cd <= 2.0)
        if ws and p:
            checks.add(f"echo ×{k}: throughput ≥ 20× Pushpin", f"{ws / p:.1f}×", ws / p >= 20)
        if cw and cp:
            checks.add(f"echo ×{k}: CPU/msg ≤ 1/20 of Pushpin", f"{cw / cp:.3f}×", cw / cp <= 0.05)
    w("")

    # ---------------------------------------------------------------- tracing
    if any(l.startswith("tracing:") for l in rows):
        tracing_section(rows, w)

    # ---------------------------------------------------------------- http
    w("## HTTP pass-through (GET, keep-alive, small response)\n")
    w("| target | req/s | p50 ms | p99 ms | CPU µs/req | backend CPU µs/req | gen CPU µs/req | vs direct |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    d = get(rows, "http:direct", "reqs_per_s")
    for t in ("wsgate", "direct", "pushpin"):
        r = rows.get(f"http:{t}", {})
        if r.get("failed") or not r:
            w(f"| {t} | failed | | | | | | |")
            continue
        backend = num(r.get("env_cpu_us_per_req"), 2) if t != "direct" else "–"
        w(f"| {t} | {num(r.get('reqs_per_s'), 0)} | {num(r.get('p50_ms'), 2)} | {num(r.get('p99_ms'), 2)} | "
          f"{num(r.get('cpu_us_per_req'), 2)} | {backend} | {num(r.get('gen_cpu_us_per_req'), 2)} | {ratio(r.get('reqs_per_s'), d)} |")
    hw = get(rows, "http:wsgate", "reqs_per_s")
    if hw and d:
        checks.add("http: ≥ 0.7× the backend's direct rate", f"{hw / d:.2f}×", hw / d >= 0.7)
    w("\n\"direct\" is the load generator straight at the backend (the HTTP leg's limit); its CPU column is the backend's.\n")
    chain_section(rows, w)

    # ---------------------------------------------------------------- fanout
    fan = sorted({int(l[6:].split(":")[0]) for l in rows if l.startswith("fanout")})
    w("## Fanout (one channel; 64-byte publishes over HTTP)\n")
    w("Round \"burst\": each publish is sent once the previous one was answered (capacity). "
      "Round \"paced\": publishes at a fixed interval (latency under a sustainable load).\n")
    w("| subscribers | target | round | delivered / expected | deliveries/s | p50 ms | p99 ms | max ms | CPU µs/delivery | gen CPU µs/delivery | publish s | connect s |")
    w("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in fan:
        for t in ("wsgate", "pushpin"):
            for suffix in ("", "#r1"):
                lab = f"fanout{n}:{t}{suffix}"
                r = rows.get(lab)
                if r is None:
                    continue
                if r.get("failed"):
                    w(f"| {n:,} | {t} | | failed | | | | | | | | |")
                    continue
                iv = r.get("interval_ms") or 0
                rnd = "burst" if iv == 0 else f"paced {iv:.0f} ms"
                w(f"| {n:,} | {t} | {rnd} | {num(r.get('delivered'), 0)} / {num(r.get('expected'), 0)} | "
                  f"{num(r.get('deliveries_per_s'), 0)} | {num(r.get('p50_ms'), 1)} | {num(r.get('p99_ms'), 1)} | "
                  f"{num(r.get('max_ms'), 1)} | {num(r.get('cpu_us_per_delivery'), 2)} | "
                  f"{num(r.get('gen_cpu_us_per_delivery'), 2)} | {num(r.get('publish_s'), 2)} | {num(r.get('connect_s'), 1)} |")
    w("")
    w("| subscribers | deliveries/s wsgate/Pushpin | CPU/delivery wsgate/Pushpin |")
    w("|---:|---:|---:|")
    for n in fan:
        dw, dp = get(rows, f"fanout{n}:wsgate", "deliveries_per_s"), get(rows, f"fanout{n}:pushpin", "deliveries_per_s")
        cw, cp = get(rows, f"fanout{n}:wsgate", "cpu_us_per_delivery"), get(rows, f"fanout{n}:pushpin", "cpu_us_per_delivery")
        if dp is None and cp is None:
            continue
        w(f"| {n:,} | {ratio(dw, dp, 1)} | {ratio(cw, cp, 3)} |")
    main_n = 10000 if 10000 in fan else (max(fan) if fan else None)
    if main_n is not None:
        # Capacity (CPU per delivery) is judged on the burst round; latency on the paced round,
        # where the offered rate is one the gateway should sustain (a burst of 1,000,000
        # deliveries cannot all arrive within 250 ms of their publish on two shared cores).
        burst = rows.get(f"fanout{main_n}:wsgate", {})
        paced = rows.get(f"fanout{main_n}:wsgate#r1", {})
        for r, what in ((burst, "burst"), (paced, None)):
            if not r or r.get("failed"):
                continue
            rnd = what or f"paced {r.get('interval_ms', 0):.0f} ms"
            exp, dl = r.get("expected"), r.get("delivered")
            checks.add(f"fanout {main_n:,} ({rnd}): all {num(exp, 0)} deliveries complete", f"{num(dl, 0)}", dl == exp)
        lat_row = paced if paced and not paced.get("failed") else burst
        if lat_row and not lat_row.get("failed"):
            rnd = "burst" if not lat_row.get("interval_ms") else f"paced {lat_row['interval_ms']:.0f} ms"
            p99 = lat_row.get("p99_ms")
            checks.add(f"fanout {main_n:,} ({rnd}): p99 delivery latency < 250 ms", f"{num(p99, 1)} ms",
                       p99 is not None and p99 < 250)
        if burst and not burst.get("failed"):
            c = burst.get("cpu_us_per_delivery")
            checks.add(f"fanout {main_n:,} (burst): CPU ≤ 1 µs per delivery", f"{num(c, 2)} µs", c is not None and c <= 1.0)
        dw, dp = get(rows, f"fanout{main_n}:wsgate", "deliveries_per_s"), get(rows, f"fanout{main_n}:pushpin", "deliveries_per_s")
        if dw and dp:
            checks.add(f"fanout {main_n:,}: deliveries/s ≥ 20× Pushpin (burst)", f"{dw / dp:.1f}×", dw / dp >= 20)
    if len(fan) >= 2:
        lo, hi = min(fan), max(fan)
        cl, ch = get(rows, f"fanout{lo}:wsgate", "cpu_us_per_delivery"), get(rows, f"fanout{hi}:wsgate", "cpu_us_per_delivery")
        if cl and ch:
            checks.add(f"fanout scales linearly: CPU/delivery at {hi:,} ≤ 1.5× at {lo:,}", f"{ch / cl:.2f}×", ch / cl <= 1.5)
    w("\nThe subscribers and the publisher are one generator process; each message carries the time its publish request started, so latency is publish start → receipt. Pushpin's burst round waits at most 30 s for deliveries; its deliveries/s counts what arrived.\n")

    # ---------------------------------------------------------------- idle
    w("## Idle connections (4 generator processes, source addresses 127.0.0.2–101)\n")
    w("| target | open | setup conns/s | setup CPU µs/conn | RSS KiB/conn above baseline | RSS MiB (baseline) | failed |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    per_conn = {}
    for t in ("wsgate", "direct", "pushpin"):
        r = rows.get(f"idle:{t}", {})
        if r.get("failed") or not r:
            w(f"| {t} | failed | | | | | |")
            continue
        for s in r.get("steps", []):
            per_conn[(t, s.get("target"))] = s
            w(f"| {t} | {num(s.get('open'), 0)} | {num(s.get('setup_per_s'), 0)} | {num(s.get('setup_cpu_us_per_conn'), 0)} | "
              f"{num(s.get('rss_kib_per_conn'), 2)} | {num(s.get('rss_kib', 0) / 1024, 1)} ({num(s.get('rss_base_kib', 0) / 1024, 1)}) | "
              f"{num(s.get('failed'), 0)} |")
    w("\n\"direct\" is the plain tokio-tungstenite echo server with its default buffers; setup includes the backend OPEN round trip for wsgate and Pushpin (none for direct).\n")
    ws_steps = [s for (t, _), s in per_conn.items() if t == "wsgate"]
    if ws_steps:
        top = max(ws_steps, key=lambda s: s.get("open", 0))
        kib = top.get("rss_kib_per_conn")
        checks.add(f"idle: ≤ 4 KiB RSS per connection (at {num(top.get('open'), 0)})", f"{num(kib, 2)} KiB",
                   kib is not None and kib <= 4.0)
        rate = max((s.get("setup_per_s") or 0) for s in ws_steps)
        checks.add("idle: ≥ 10,000 new connections/s accepted (best step)", f"{num(rate, 0)}/s", rate >= 10000)
        if top.get("failed"):
            checks.add("idle: no failed connections", f"{top.get('failed')} failed", False)
        lo = min(ws_steps, key=lambda s: s.get("open", 0))
        if lo is not top and lo.get("rss_kib_per_conn") and kib:
            checks.add(f"idle scales linearly: KiB/conn at {num(top.get('open'), 0)} ≤ 1.5× at {num(lo.get('open'), 0)}",
                       f"{kib / lo['rss_kib_per_conn']:.2f}×", kib / lo["rss_kib_per_conn"] <= 1.5)

    # ---------------------------------------------------------------- targets
    w("## Targets (issue 7)\n")
    w("| target | measured | result |")
    w("|---|---:|---|")
    for what, measured, verdict in checks.rows:
        w(f"| {what} | {measured} | {verdict} |")
    failed = [r for r in rows.values() if r.get("failed")]
    if failed:
        w(f"\n{len(failed)} load-generator run(s) failed: {', '.join(r.get('label', '?') for r in failed)}.")
    notes = []
    for l, r in rows.items():
        if r.get("errors") and r.get("first_error"):
            notes.append(f"- {l}: {num(r['errors'], 0)} connection(s) ended early, first: {r['first_error']}")
        if r.get("handshake_retries"):
            notes.append(f"- {l}: {num(r['handshake_retries'], 0)} refused handshake(s) retried")
        if r.get("publish_errors"):
            notes.append(f"- {l}: {num(r['publish_errors'], 0)} publish(es) not answered 200")
    if notes:
        w("\nGenerator notes:\n")
        w("\n".join(notes))
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
