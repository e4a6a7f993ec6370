//! `http`: C keep-alive connections, each sending requests back to back for D seconds.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;

use crate::args::Args;
use crate::httpc;
use crate::stats::{self, Json, Latencies};
use crate::ws::{self, Target};

struct ConnResult {
    ok: u64,
    bad: u64,
    lat: Latencies,
    error: Option<String>,
}

/// Runs the scenario and prints one JSON line.
pub async fn run(a: &Args) -> Result<()> {
    let target = Target::parse(&a.req::<String>("url")?)?;
    let conns: usize = a.get("conns", 50)?;
    let duration = a.secs("duration", 5.0)?;
    let method: String = a.get("method", "GET".to_owned())?;
    let body_size: usize = a.get("body-size", 0)?;
    let sources: usize = a.get("sources", 50)?;
    let watch: Vec<u32> = a.list("watch-pid")?;
    // The rest of the chain under test (the backend behind a gateway): its CPU is reported
    // apart from the target's.
    let env: Vec<u32> = a.list("env-pid")?;
    let label = a.opt("label").unwrap_or_default();
    a.finish()?;
    if conns == 0 || conns > 10_000 {
        bail!("--conns must be 1..=10000");
    }
    let method = hyper::Method::from_bytes(method.as_bytes())?;
    let body = Bytes::from(vec![b'x'; body_size]);

    let mut opened = Vec::with_capacity(conns);
    for i in 0..conns {
        opened.push(httpc::Conn::open(&target, Some(ws::source_ip(i, sources))).await?);
    }
    let before = stats::sample(&watch);
    let env_before = stats::sample(&env);
    let self_before = stats::self_cpu_us();
    let load_before = stats::loadavg();
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|mut c| {
            let (method, body) = (method.clone(), body.clone());
            tokio::spawn(async move {
                let mut r = ConnResult {
                    ok: 0,
                    bad: 0,
                    lat: Latencies::default(),
                    error: None,
                };
                // Bounded by the deadline (and each request by its timeout).
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match c.request(&method, body.clone(), Duration::from_secs(10)).await {
                        Ok((200, _)) => {
                            r.ok += 1;
                            r.lat.push_us(t0.elapsed().as_micros() as u64);
                        }
                        Ok(_) => r.bad += 1,
                        Err(e) => {
                            r.error = Some(format!("{e:#}"));
                            break;
                        }
                    }
                }
                r
            })
        })
        .collect();
    tokio::time::sleep_until(deadline.into()).await;
    let after = stats::sample(&watch);
    let env_after = stats::sample(&env);
    let self_after = stats::self_cpu_us();
    let elapsed = start.elapsed().as_secs_f64();
    let (mut ok, mut bad, mut errors) = (0u64, 0u64, 0u64);
    let mut lat = Latencies::default();
    let mut first_error = String::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(15), t).await {
            Ok(Ok(r)) => {
                ok += r.ok;
                bad += r.bad;
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
    let n = ok.max(1) as f64;
    let json = Json::new()
        .str("scenario", "http")
        .str("label", &label)
        .num("conns", conns as f64)
        .num("duration_s", elapsed)
        .num("requests", ok as f64)
        .num("non_200", bad as f64)
        .num("reqs_per_s", ok as f64 / elapsed)
        .opt("p50_ms", lat.percentile_ms(50.0))
        .opt("p99_ms", lat.percentile_ms(99.0))
        .num("cpu_us_per_req", (after.cpu_us - before.cpu_us) / n)
        .num("cpu_util", (after.cpu_us - before.cpu_us) / 1e6 / elapsed)
        .num("procs", after.procs as f64)
        .num("gen_cpu_us_per_req", (self_after - self_before) / n)
        .num("env_cpu_us_per_req", (env_after.cpu_us - env_before.cpu_us) / n)
        .num("loadavg_before", load_before)
        .num("loadavg_after", stats::loadavg())
        .num("errors", errors as f64)
        .str("first_error", &first_error)
        .end();
    println!("{json}");
    Ok(())
}
