//! `loadgen`: the load generator and baselines of the wsgate benchmark (see `benches/run` and
//! `docs/PERFORMANCE.md`). Every scenario prints one JSON line on stdout.

mod args;
mod echo;
mod fanout;
mod http;
mod httpc;
mod idle;
mod otlp;
mod servers;
mod stats;
mod ws;

use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::args::Args;

const HELP: &str = "\
loadgen SUBCOMMAND [--threads N] [--name value ...]

Load:
  echo        --url ws://H:P/path [--conns 100] [--inflight 1] [--size 64] [--duration 5]
              [--concurrency 64] [--sources 50] [--watch-pid PID ...] [--env-pid PID ...]
              [--label L]
  idle        --url ws://H:P/path --steps 1000,5000,19000 [--procs 4] [--concurrency 64]
              [--sources 100] [--settle 1] [--hold 0] [--watch-pid PID ...] [--label L]
  fanout      --url ws://H:P/fanout/CHANNEL --publish-url http://H:P/publish/ [--channel bench]
              [--subs 1000] [--publishes 100] [--rounds 0,0.05] [--size 64] [--timeout 60]
              [--concurrency 128] [--sources 100] [--watch-pid PID ...] [--label L]
  http        --url http://H:P/path [--conns 50] [--duration 5] [--method GET] [--body-size 0]
              [--sources 50] [--watch-pid PID ...] [--env-pid PID ...] [--label L]
Servers (print `ready ADDR`, exit after --max-time seconds):
  echo-server [--listen 127.0.0.1:0] [--max-time 1200]   tokio-tungstenite echo (baseline)
  backend     [--listen 127.0.0.1:0] [--max-time 1200]   WebSocket-over-HTTP backend
  otlp-sink   [--listen 127.0.0.1:0] [--max-time 1200]   OTLP/HTTP protobuf receiver: answers
              POST /v1/traces with 200, counts requests, bytes and spans (GET /stats, and
              printed as JSON on exit)
Tools:
  free-ports  [--count 1]       print free 127.0.0.1 ports
  usage       --pid PID ...     CPU (µs) and RSS (KiB) of process trees, as JSON
";

fn main() -> ExitCode {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.is_empty() || matches!(raw[0].as_str(), "help" | "-h" | "--help") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let cmd = raw.remove(0);
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    if let Some(i) = raw.iter().position(|a| a == "--threads") {
        match raw.get(i + 1).and_then(|v| v.parse().ok()) {
            Some(n) if n > 0 => threads = n,
            _ => {
                eprintln!("loadgen: --threads needs a positive number");
                return ExitCode::from(2);
            }
        }
        raw.drain(i..i + 2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(&cmd, &raw)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen {cmd}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: &str, raw: &[String]) -> Result<()> {
    let a = Args::parse(raw)?;
    match cmd {
        "echo" => echo::run(&a).await,
        "idle" => idle::run(&a).await,
        "idle-worker" => idle::worker(&a).await,
        "fanout" => fanout::run(&a).await,
        "http" => http::run(&a).await,
        "echo-server" => servers::echo_server(&a).await,
        "backend" => servers::backend(&a).await,
        "otlp-sink" => otlp::sink(&a).await,
        "free-ports" => {
            let count: usize = a.get("count", 1)?;
            a.finish()?;
            // Hold every listener until all are chosen so the ports differ.
            let mut held = Vec::new();
            for _ in 0..count.min(64) {
                held.push(std::net::TcpListener::bind("127.0.0.1:0")?);
            }
            let ports: Vec<String> = held
                .iter()
                .map(|l| l.local_addr().map(|a| a.port().to_string()))
                .collect::<std::io::Result<_>>()?;
            println!("{}", ports.join(" "));
            Ok(())
        }
        "usage" => {
            let pids: Vec<u32> = a.list("pid")?;
            a.finish()?;
            let u = stats::sample(&pids);
            println!(
                "{}",
                stats::Json::new()
                    .num("cpu_us", u.cpu_us)
                    .num("rss_kib", u.rss_kib as f64)
                    .num("procs", u.procs as f64)
                    .end()
            );
            Ok(())
        }
        other => bail!("unknown subcommand {other:?} (see `loadgen help`)"),
    }
}
