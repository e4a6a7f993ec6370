//! `echo`: N connections, each keeping K messages of S bytes in flight for D seconds; every
//! echoed message is answered by the next one (closed loop). Reports round trips per second,
//! round-trip percentiles and CPU per message of the watched processes and of the generator.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::args::Args;
use crate::stats::{self, Json, Latencies};
use crate::ws::{self, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Target, WsConn};

struct ConnResult {
    received: u64,
    lat: Latencies,
    error: Option<String>,
}

/// Runs the scenario and prints one JSON line.
pub async fn run(a: &Args) -> Result<()> {
    let target = Target::parse(&a.req::<String>("url")?)?;
    let conns: usize = a.get("conns", 100)?;
    let inflight: usize = a.get("inflight", 1)?;
    let size: usize = a.get("size", 64)?;
    let duration = a.secs("duration", 5.0)?;
    let concurrency: usize = a.get("concurrency", 64)?;
    let sources: usize = a.get("sources", 50)?;
    let watch: Vec<u32> = a.list("watch-pid")?;
    // The rest of the chain under test (the backend behind a gateway): its CPU is reported
    // apart from the target's.
    let env: Vec<u32> = a.list("env-pid")?;
    let label = a.opt("label").unwrap_or_default();
    a.finish()?;
    if conns == 0 || inflight == 0 || conns > 19_000 {
        bail!("--conns must be 1..=19000 and --inflight at least 1");
    }

    let (opened, handshake_retries) = open_all(&target, conns, concurrency, sources).await?;
    let mut frame = BytesMut::new();
    ws::put_frame(&mut frame, OP_TEXT, &vec![b'x'; size]);
    let frame: Arc<[u8]> = Arc::from(&frame[..]);

    let before = stats::sample(&watch);
    let env_before = stats::sample(&env);
    let self_before = stats::self_cpu_us();
    let load_before = stats::loadavg();
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|c| tokio::spawn(echo_conn(c, frame.clone(), inflight, deadline)))
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let after = stats::sample(&watch);
    let env_after = stats::sample(&env);
    let self_after = stats::self_cpu_us();
    let elapsed = start.elapsed().as_secs_f64();

    let mut lat = Latencies::default();
    let mut received = 0u64;
    let mut errors = 0u64;
    let mut first_error = String::new();
    for t in tasks {
        // Each task stops at the deadline; the join is bounded anyway.
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(r)) => {
                received += r.received;
                lat.merge(r.lat);
                if let Some(e) = r.error {
                    errors += 1;
                    if first_error.is_empty() {
                        first_error = e;
                    }
                }
            }
            _ => errors += 1,
        }
    }
    lat.sort();
    let n = received.max(1) as f64;
    let json = Json::new()
        .str("scenario", "echo")
        .str("label", &label)
        .num("conns", conns as f64)
        .num("inflight", inflight as f64)
        .num("size", size as f64)
        .num("duration_s", elapsed)
        .num("messages", received as f64)
        .num("msgs_per_s", received as f64 / elapsed)
        .opt("p50_ms", lat.percentile_ms(50.0))
        .opt("p99_ms", lat.percentile_ms(99.0))
        .opt("p999_ms", lat.percentile_ms(99.9))
        .num("cpu_us_per_msg", (after.cpu_us - before.cpu_us) / n)
        .num("cpu_util", (after.cpu_us - before.cpu_us) / 1e6 / elapsed)
        .num("procs", after.procs as f64)
        .num("rss_kib", after.rss_kib as f64)
        .num("gen_cpu_us_per_msg", (self_after - self_before) / n)
        .num("env_cpu_us_per_msg", (env_after.cpu_us - env_before.cpu_us) / n)
        .num("gen_cpu_util", (self_after - self_before) / 1e6 / elapsed)
        .num("loadavg_before", load_before)
        .num("loadavg_after", stats::loadavg())
        .num("handshake_retries", handshake_retries as f64)
        .num("errors", errors as f64)
        .str("first_error", &first_error)
        .end();
    println!("{json}");
    Ok(())
}

/// Handshake attempts per connection in [`open_all`] (Pushpin answers some handshakes of a
/// burst with `502`; a client would retry).
const HANDSHAKE_ATTEMPTS: u32 = 5;

/// Opens `n` connections, at most `concurrency` handshakes at a time, retrying a refused
/// handshake up to [`HANDSHAKE_ATTEMPTS`] times. Returns the connections and the retries made.
pub async fn open_all(t: &Target, n: usize, concurrency: usize, sources: usize) -> Result<(Vec<WsConn>, u64)> {
    let results: Vec<(Result<WsConn>, u64)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let t = t.clone();
            async move {
                let src = Some(ws::source_ip(i, sources));
                let mut retries = 0;
                // Bounded: HANDSHAKE_ATTEMPTS tries, each bounded by its timeout.
                loop {
                    match ws::connect(&t, src, Duration::from_secs(30)).await {
                        Err(_) if retries + 1 < u64::from(HANDSHAKE_ATTEMPTS) => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(50 * retries)).await;
                        }
                        r => return (r, retries),
                    }
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut out = Vec::with_capacity(n);
    let mut retries = 0;
    for (r, k) in results {
        out.push(r?);
        retries += k;
    }
    Ok((out, retries))
}

async fn echo_conn(mut c: WsConn, frame: Arc<[u8]>, inflight: usize, deadline: Instant) -> ConnResult {
    let mut r = ConnResult {
        received: 0,
        lat: Latencies::default(),
        error: None,
    };
    if let Err(e) = echo_loop(&mut c, &frame, inflight, deadline, &mut r).await {
        r.error = Some(e.to_string());
    }
    r
}

async fn echo_loop(c: &mut WsConn, frame: &[u8], inflight: usize, deadline: Instant, r: &mut ConnResult) -> Result<()> {
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(inflight);
    let mut wbuf = BytesMut::with_capacity(frame.len() * inflight);
    let now = Instant::now();
    for _ in 0..inflight {
        wbuf.extend_from_slice(frame);
        sent.push_back(now);
    }
    c.stream.write_all(&wbuf).await?;
    wbuf.clear();
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    // Bounded by the deadline.
    loop {
        let n = tokio::select! {
            res = c.stream.read_buf(&mut c.rbuf) => res?,
            () = &mut sleep => return Ok(()),
        };
        if n == 0 {
            bail!("connection closed by the server");
        }
        let now = Instant::now();
        let mut consumed = 0;
        while let Some((f, len)) = ws::parse_frame(&c.rbuf[consumed..])? {
            consumed += len;
            match f.opcode {
                OP_TEXT | OP_BINARY if f.fin => {
                    if let Some(t0) = sent.pop_front() {
                        r.lat.push_us(now.duration_since(t0).as_micros() as u64);
                        r.received += 1;
                    }
                    if now < deadline {
                        wbuf.extend_from_slice(frame);
                        sent.push_back(now);
                    }
                }
                OP_PING => ws::put_frame(&mut wbuf, OP_PONG, f.payload),
                OP_CLOSE => bail!("server closed the connection"),
                _ => {}
            }
        }
        c.rbuf.advance(consumed);
        if !wbuf.is_empty() {
            c.stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if now >= deadline {
            return Ok(());
        }
    }
}
