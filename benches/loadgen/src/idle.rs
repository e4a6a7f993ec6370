//! `idle`: open many idle WebSocket connections in steps (e.g. 1k, 5k, 19k in total), spread
//! over several worker processes (each process may hold at most 20,000 open files here) and
//! over 127.0.0.x source addresses, and after each step measure the watched processes' RSS
//! above their baseline and the connection setup rate.
//!
//! The coordinator (`idle`) drives its workers (`idle-worker`, the same binary) over their
//! stdin/stdout: `open N` → `ok OPENED FAILED START_US END_US ERROR`, and `quit` (or EOF).

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::args::Args;
use crate::stats::{self, Json};
use crate::ws::{self, Target};

/// Most connections one worker is given (stays under the 20,000 open-file limit).
const MAX_PER_WORKER: usize = 19_500;

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

/// The coordinator: prints one JSON line with one entry per step.
pub async fn run(a: &Args) -> Result<()> {
    let url: String = a.req("url")?;
    let steps: Vec<usize> = a.list("steps")?;
    let procs: usize = a.get("procs", 4)?;
    let concurrency: usize = a.get("concurrency", 64)?;
    let sources: usize = a.get("sources", 100)?;
    let settle = a.secs("settle", 1.0)?;
    let hold = a.secs("hold", 0.0)?;
    let watch: Vec<u32> = a.list("watch-pid")?;
    let label = a.opt("label").unwrap_or_default();
    a.finish()?;
    Target::parse(&url)?;
    if steps.is_empty() || steps.windows(2).any(|w| w[1] < w[0]) {
        bail!("--steps must be a non-empty increasing list");
    }
    let procs = procs.clamp(1, 32);
    let last = steps.last().copied().unwrap_or(0);
    if last.div_ceil(procs) > MAX_PER_WORKER {
        bail!("{last} connections need more than {procs} workers");
    }

    let exe = std::env::current_exe().context("current_exe")?;
    let mut workers = Vec::with_capacity(procs);
    for w in 0..procs {
        let mut child = Command::new(&exe)
            .args(["idle-worker", "--url", &url, "--worker", &w.to_string(), "--workers"])
            .arg(procs.to_string())
            .args([
                "--concurrency",
                &concurrency.to_string(),
                "--sources",
                &sources.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawn idle-worker")?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("worker stdout"))?;
        workers.push(Worker {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        });
    }

    tokio::time::sleep(settle).await;
    let base = stats::sample(&watch);
    let mut steps_json = Vec::new();
    let mut total_open = 0usize;
    for &step in &steps {
        let delta = step - total_open.min(step);
        let cpu0 = stats::sample(&watch).cpu_us;
        for (i, w) in workers.iter_mut().enumerate() {
            let share = delta / procs + usize::from(i < delta % procs);
            w.stdin.write_all(format!("open {share}\n").as_bytes()).await?;
            w.stdin.flush().await?;
        }
        let (mut opened, mut failed, mut t0, mut t1) = (0usize, 0usize, u64::MAX, 0u64);
        let mut first_error = String::new();
        for w in &mut workers {
            let line = tokio::time::timeout(Duration::from_secs(180), w.stdout.next_line())
                .await
                .map_err(|_| anyhow!("idle worker did not answer within 180 s"))??
                .ok_or_else(|| anyhow!("idle worker exited"))?;
            let mut f = line.splitn(6, ' ');
            if f.next() != Some("ok") {
                bail!("idle worker said {line:?}");
            }
            let mut num = || -> Result<u64> {
                f.next()
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| anyhow!("bad worker line {line:?}"))
            };
            let (o, fl, s, e) = (num()?, num()?, num()?, num()?);
            opened += o as usize;
            failed += fl as usize;
            if o + fl > 0 {
                t0 = t0.min(s);
                t1 = t1.max(e);
            }
            if let Some(err) = f.next().filter(|e| !e.is_empty())
                && first_error.is_empty()
            {
                first_error = err.to_owned();
            }
        }
        let cpu1 = stats::sample(&watch).cpu_us;
        tokio::time::sleep(settle).await;
        let u = stats::sample(&watch);
        total_open += opened;
        let secs = (t1.saturating_sub(t0)) as f64 / 1e6;
        let rss_delta = u.rss_kib as f64 - base.rss_kib as f64;
        steps_json.push(
            Json::new()
                .num("target", step as f64)
                .num("open", total_open as f64)
                .num("opened", opened as f64)
                .num("failed", failed as f64)
                .num("setup_s", secs)
                .num("setup_per_s", if secs > 0.0 { opened as f64 / secs } else { f64::NAN })
                .num("setup_cpu_us_per_conn", (cpu1 - cpu0) / opened.max(1) as f64)
                .num("rss_kib", u.rss_kib as f64)
                .num("rss_base_kib", base.rss_kib as f64)
                .num("rss_kib_per_conn", rss_delta / total_open.max(1) as f64)
                .num("procs", u.procs as f64)
                .str("first_error", &first_error)
                .end(),
        );
    }
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    for w in &mut workers {
        let _ = w.stdin.write_all(b"quit\n").await;
        let _ = w.stdin.flush().await;
    }
    for mut w in workers {
        drop(w.stdin);
        if tokio::time::timeout(Duration::from_secs(10), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.kill().await;
        }
    }
    let json = Json::new()
        .str("scenario", "idle")
        .str("label", &label)
        .num("workers", procs as f64)
        .num("loadavg", stats::loadavg())
        .raw("steps", &format!("[{}]", steps_json.join(",")))
        .end();
    println!("{json}");
    Ok(())
}

/// A worker: opens connections when told and holds them until `quit` or EOF on stdin.
pub async fn worker(a: &Args) -> Result<()> {
    let target = Target::parse(&a.req::<String>("url")?)?;
    let me: usize = a.req("worker")?;
    let workers: usize = a.req("workers")?;
    let concurrency: usize = a.get("concurrency", 64)?;
    let sources: usize = a.get("sources", 100)?;
    a.finish()?;
    let mut held: Vec<TcpStream> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    // Bounded: one command per line from the coordinator, which sends a handful.
    while let Some(line) = lines.next_line().await? {
        let Some(n) = line.strip_prefix("open ").and_then(|n| n.parse::<usize>().ok()) else {
            break;
        };
        if held.len() + n > MAX_PER_WORKER {
            bail!("worker asked to hold more than {MAX_PER_WORKER} connections");
        }
        let start = unix_us();
        let base = held.len();
        let results: Vec<Result<TcpStream>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let t = target.clone();
                let src = ws::source_ip((base + i) * workers + me, sources);
                async move {
                    ws::connect(&t, Some(src), Duration::from_secs(30))
                        .await
                        .map(|c| c.stream)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let end = unix_us();
        let mut failed = 0;
        let mut first_error = String::new();
        for r in results {
            match r {
                Ok(s) => held.push(s),
                Err(e) => {
                    failed += 1;
                    if first_error.is_empty() {
                        first_error = format!("{e:#}").replace('\n', " ");
                    }
                }
            }
        }
        let opened = held.len() - base;
        out.write_all(format!("ok {opened} {failed} {start} {end} {first_error}\n").as_bytes())
            .await?;
        out.flush().await?;
    }
    Ok(())
}
