//! `fanout`: N WebSocket subscribers to one channel (through a GRIP route: the backend answers
//! OPEN with a `subscribe` control message), then M publishes over HTTP at a fixed interval.
//! Each published message carries its publish time; subscribers measure delivery latency.
//!
//! Several measured rounds can run over the same subscribers (`--rounds 0,0.05`: one interval
//! per round, 0 = each publish right after the previous one was answered); each round prints
//! its own JSON line.
//!
//! Before measuring, a warm-up message is published every 200 ms until every subscriber has
//! seen one (subscriptions may become active shortly after the handshake, e.g. in Pushpin).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::args::Args;
use crate::echo::open_all;
use crate::httpc;
use crate::stats::{self, Json, Latencies};
use crate::ws::{self, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Target, WsConn};

/// Most measured rounds per run.
const MAX_ROUNDS: usize = 8;

struct Shared {
    epoch: Instant,
    warmed: AtomicUsize,
    delivered: [AtomicU64; MAX_ROUNDS],
    last_us: [AtomicU64; MAX_ROUNDS],
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

struct SubResult {
    got: [u64; MAX_ROUNDS],
    lat: Vec<Latencies>,
    error: Option<String>,
}

fn publish_body(channel: &str, content: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"items":[{{"channel":"{channel}","formats":{{"ws-message":{{"content":"{content}"}}}}}}]}}"#
    ))
}

/// Runs the scenario and prints one JSON line per round.
pub async fn run(a: &Args) -> Result<()> {
    let target = Target::parse(&a.req::<String>("url")?)?;
    let publish = Target::parse(&a.req::<String>("publish-url")?)?;
    let channel: String = a.get("channel", "bench".to_owned())?;
    let subs: usize = a.get("subs", 1000)?;
    let publishes: u64 = a.get("publishes", 100)?;
    let mut rounds: Vec<f64> = a.list("rounds")?;
    let size: usize = a.get("size", 64)?;
    let concurrency: usize = a.get("concurrency", 64)?;
    let sources: usize = a.get("sources", 100)?;
    let timeout = a.secs("timeout", 60.0)?;
    let watch_pids: Vec<u32> = a.list("watch-pid")?;
    let label = a.opt("label").unwrap_or_default();
    a.finish()?;
    if rounds.is_empty() {
        rounds.push(0.0);
    }
    if subs == 0 || subs > 19_500 || publishes == 0 {
        bail!("--subs must be 1..=19500 and --publishes at least 1");
    }
    if rounds.len() > MAX_ROUNDS || rounds.iter().any(|r| !(0.0..=10.0).contains(r)) {
        bail!("--rounds takes at most {MAX_ROUNDS} intervals of 0..=10 seconds");
    }
    if channel
        .bytes()
        .any(|b| !b.is_ascii_alphanumeric() && b != b'-' && b != b'_')
    {
        bail!("--channel must be [A-Za-z0-9_-]");
    }

    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        warmed: AtomicUsize::new(0),
        delivered: Default::default(),
        last_us: Default::default(),
    });
    let t_connect = Instant::now();
    let (conns, handshake_retries) = open_all(&target, subs, concurrency, sources).await?;
    let connect_s = t_connect.elapsed().as_secs_f64();
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(subscriber(c, sh.clone(), stop_rx.clone())))
        .collect();

    let mut pubc = httpc::Conn::open(&publish, None).await?;
    let post = hyper::Method::POST;
    let req_timeout = Duration::from_secs(30);
    // Warm-up, bounded to 60 s.
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    let mut warm_publishes = 0u64;
    while sh.warmed.load(Ordering::Relaxed) < subs && Instant::now() < warm_deadline {
        let (status, _) = pubc.request(&post, publish_body(&channel, "w"), req_timeout).await?;
        if status != 200 {
            bail!("warm-up publish answered {status}");
        }
        warm_publishes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let warmed = sh.warmed.load(Ordering::Relaxed);

    let expected = subs as u64 * publishes;
    let mut round_stats = Vec::new();
    for (round, &interval) in rounds.iter().enumerate() {
        // Let earlier messages drain before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let interval = Duration::from_secs_f64(interval);
        let before = stats::sample(&watch_pids);
        let self_before = stats::self_cpu_us();
        let load_before = stats::loadavg();
        let first_pub_us = sh.now_us();
        let start = Instant::now();
        let mut publish_errors = 0u64;
        for i in 0..publishes {
            tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
            let mut content = format!("t={} r={round} s={i} ", sh.now_us());
            while content.len() < size {
                content.push('x');
            }
            match pubc.request(&post, publish_body(&channel, &content), req_timeout).await {
                Ok((200, _)) => {}
                _ => publish_errors += 1,
            }
        }
        let publish_s = start.elapsed().as_secs_f64();
        let wait_deadline = Instant::now() + timeout;
        // Bounded by --timeout.
        while sh.delivered[round].load(Ordering::Relaxed) < expected && Instant::now() < wait_deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let after = stats::sample(&watch_pids);
        let self_after = stats::self_cpu_us();
        round_stats.push((
            interval,
            before,
            after,
            self_after - self_before,
            load_before,
            first_pub_us,
            publish_s,
            publish_errors,
        ));
    }
    let _ = stop_tx.send(true);

    let mut lat: Vec<Latencies> = (0..rounds.len()).map(|_| Latencies::default()).collect();
    let mut complete = vec![0u64; rounds.len()];
    let mut errors = 0u64;
    let mut first_error = String::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(10), t).await {
            Ok(Ok(r)) => {
                for (i, l) in r.lat.into_iter().enumerate().take(rounds.len()) {
                    if r.got[i] >= publishes {
                        complete[i] += 1;
                    }
                    lat[i].merge(l);
                }
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
    for (round, (interval, before, after, gen_cpu, load_before, first_pub_us, publish_s, publish_errors)) in
        round_stats.into_iter().enumerate()
    {
        let lat = &mut lat[round];
        lat.sort();
        let delivered = sh.delivered[round].load(Ordering::Relaxed);
        let last_us = sh.last_us[round].load(Ordering::Relaxed);
        let span_s = (last_us.saturating_sub(first_pub_us)) as f64 / 1e6;
        let n = delivered.max(1) as f64;
        let json = Json::new()
            .str("scenario", "fanout")
            .str("label", &label)
            .num("round", round as f64)
            .num("subs", subs as f64)
            .num("publishes", publishes as f64)
            .num("interval_ms", interval.as_secs_f64() * 1000.0)
            .num("connect_s", connect_s)
            .num("warmed", warmed as f64)
            .num("warm_publishes", warm_publishes as f64)
            .num("publish_s", publish_s)
            .num("publish_errors", publish_errors as f64)
            .num("expected", expected as f64)
            .num("delivered", delivered as f64)
            .num("complete_subs", complete[round] as f64)
            .num("span_s", span_s)
            .num(
                "deliveries_per_s",
                if span_s > 0.0 {
                    delivered as f64 / span_s
                } else {
                    f64::NAN
                },
            )
            .opt("p50_ms", lat.percentile_ms(50.0))
            .opt("p99_ms", lat.percentile_ms(99.0))
            .opt("max_ms", lat.percentile_ms(100.0))
            .num("cpu_us_per_delivery", (after.cpu_us - before.cpu_us) / n)
            .num("cpu_util", (after.cpu_us - before.cpu_us) / 1e6 / span_s.max(1e-3))
            .num("procs", after.procs as f64)
            .num("rss_kib", after.rss_kib as f64)
            .num("gen_cpu_us_per_delivery", gen_cpu / n)
            .num("loadavg_before", load_before)
            .num("loadavg_after", stats::loadavg())
            .num("handshake_retries", handshake_retries as f64)
            .num("errors", errors as f64)
            .str("first_error", &first_error)
            .end();
        println!("{json}");
    }
    Ok(())
}

async fn subscriber(mut c: WsConn, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) -> SubResult {
    let mut r = SubResult {
        got: [0; MAX_ROUNDS],
        lat: (0..MAX_ROUNDS).map(|_| Latencies::default()).collect(),
        error: None,
    };
    if let Err(e) = sub_loop(&mut c, &sh, &mut stop, &mut r).await {
        r.error = Some(e.to_string());
    }
    r
}

/// `(publish time in µs, round)` from a measured message `t=<us> r=<round> ...`.
fn parse_ts(payload: &[u8]) -> Option<(u64, usize)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(' ');
    let t = parts.next()?.strip_prefix("t=")?.parse().ok()?;
    let r = parts.next()?.strip_prefix("r=")?.parse().ok()?;
    Some((t, r))
}

async fn sub_loop(c: &mut WsConn, sh: &Shared, stop: &mut watch::Receiver<bool>, r: &mut SubResult) -> Result<()> {
    let mut warmed = false;
    let mut wbuf = BytesMut::new();
    // Bounded: ends when the coordinator sets `stop` (it always does, after its timeouts).
    loop {
        if c.rbuf.is_empty() || ws::parse_frame(&c.rbuf)?.is_none() {
            let n = tokio::select! {
                res = c.stream.read_buf(&mut c.rbuf) => res?,
                _ = stop.changed() => return Ok(()),
            };
            if n == 0 {
                bail!("connection closed by the server");
            }
        }
        let now_us = sh.now_us();
        let mut consumed = 0;
        while let Some((f, len)) = ws::parse_frame(&c.rbuf[consumed..])? {
            consumed += len;
            match f.opcode {
                OP_TEXT if f.payload.starts_with(b"w") && !warmed => {
                    warmed = true;
                    sh.warmed.fetch_add(1, Ordering::Relaxed);
                }
                OP_TEXT if f.payload.starts_with(b"w") => {}
                OP_TEXT => {
                    if let Some((t, round)) = parse_ts(f.payload)
                        && round < MAX_ROUNDS
                    {
                        r.lat[round].push_us(now_us.saturating_sub(t));
                        r.got[round] += 1;
                        sh.delivered[round].fetch_add(1, Ordering::Relaxed);
                        sh.last_us[round].fetch_max(now_us, Ordering::Relaxed);
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_from_payloads() {
        assert_eq!(parse_ts(b"t=123 r=1 s=4 xxx"), Some((123, 1)));
        assert_eq!(parse_ts(b"t=99 r=0"), Some((99, 0)));
        assert_eq!(parse_ts(b"t=99"), None);
        assert_eq!(parse_ts(b"w"), None);
        assert_eq!(parse_ts(b"t=x1 r=0"), None);
    }

    #[test]
    fn publish_body_uses_the_formats_shape() {
        let b = publish_body("room", "hi");
        assert_eq!(
            &b[..],
            br#"{"items":[{"channel":"room","formats":{"ws-message":{"content":"hi"}}}]}"#
        );
    }
}
