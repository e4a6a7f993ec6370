//! The `wsgate` binary: parse the command line, load configuration, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use wsgate::admin::{self, AdminState};
use wsgate::config::{self, DurationSpec, ReloadStatus, Route, RouteTable};
use wsgate::server::{self, Gateway, GatewaySettings};
use wsgate::telemetry;

/// Exit code for bad configuration (EX_CONFIG-like, as linkerd uses 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "wsgate", version, about = "WebSocket-over-HTTP gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text", env = "WSGATE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `wsgate=debug`.
    #[arg(long, global = true, default_value = "info", env = "WSGATE_LOG")]
    log_level: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the data plane.
    Gateway(Box<GatewayArgs>),
    /// Publish a message to a channel through a gateway's publish API.
    Publish(PublishArgs),
    /// Print the WebSocketRoute CustomResourceDefinition (YAML).
    Crd,
    /// Kubernetes control plane: WebSocketRoute status, the control API for gateways and the
    /// sidecar-injection webhook.
    Controller(Box<wsgate::controller::ControllerArgs>),
    /// Try wsgate: a gateway in front of a built-in demo backend (echo and a GRIP chat room)
    /// with a web page at http://127.0.0.1:8080/.
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct PublishArgs {
    /// Channel to publish to.
    #[arg(long)]
    channel: String,
    /// Send MESSAGE as a binary message (its UTF-8 bytes).
    #[arg(long)]
    binary: bool,
    /// Close the subscribers' connections with this code instead of sending a message.
    #[arg(long)]
    close: Option<u16>,
    /// Close reason (with --close).
    #[arg(long)]
    reason: Option<String>,
    /// The gateway's admin URL.
    #[arg(long, default_value = "http://127.0.0.1:9090", env = "WSGATE_ADMIN_URL")]
    url: String,
    /// Bearer token (a static token or a JWT) for a publish API that requires one.
    #[arg(long, env = "WSGATE_PUBLISH_TOKEN")]
    token: Option<String>,
    /// The message.
    message: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
struct DemoArgs {
    /// Address for browsers and WebSocket clients.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin listener (publish API, /healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
}

#[derive(clap::Args, Debug, Clone)]
struct GatewayArgs {
    /// Address for WebSocket and plain HTTP clients.
    #[arg(long, default_value = "0.0.0.0:8080", env = "WSGATE_LISTEN")]
    listen: SocketAddr,
    /// One catch-all route to this backend URL (http, https, ws or wss).
    #[arg(long, env = "WSGATE_BACKEND", conflicts_with = "config")]
    backend: Option<String>,
    /// Routes file (YAML), reloaded on change.
    #[arg(long, env = "WSGATE_CONFIG")]
    config: Option<PathBuf>,
    /// How often the routes file is checked for changes.
    #[arg(long, default_value = "1s")]
    reload_interval: DurationSpec,
    /// Address of the admin listener (/healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:9090", env = "WSGATE_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    /// Most concurrent WebSocket connections (the next handshake gets 503).
    #[arg(long, default_value_t = 50_000)]
    max_connections: usize,
    /// Time a client has to send its handshake request headers.
    #[arg(long, default_value = "10s")]
    handshake_timeout: DurationSpec,
    /// After SIGTERM, keep serving open connections this long before closing them.
    #[arg(long, default_value = "5s")]
    drain_period: DurationSpec,
    /// Spread the 1001 closes over this window.
    #[arg(long, default_value = "1s")]
    close_pacing: DurationSpec,
    /// Hard limit for the whole shutdown.
    #[arg(long, default_value = "25s")]
    shutdown_timeout: DurationSpec,
    /// Most request headers accepted from a client.
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Largest request head (request line and headers) accepted from a client, in bytes; a
    /// larger one gets 431.
    #[arg(
        long,
        default_value_t = server::DEFAULT_MAX_HEADER_BYTES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=1024 * 1024)
    )]
    max_header_bytes: usize,
    /// Idle connections to a backend are kept this long for reuse.
    #[arg(long, default_value = "90s")]
    backend_idle_timeout: DurationSpec,
    /// Idle connections kept per backend address and data-plane worker (0: none kept).
    #[arg(long, default_value_t = 1024)]
    backend_max_idle: usize,
    /// Most headers accepted in a backend's response (1 to 256); more fails the request.
    #[arg(
        long,
        default_value_t = 100,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256)
    )]
    backend_max_response_headers: usize,
    /// Largest backend response head (status line and headers) in bytes; larger fails the
    /// request.
    #[arg(
        long,
        default_value_t = 65536,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=1024 * 1024)
    )]
    backend_max_response_head_bytes: usize,
    /// Accept queue of the client listener (connections the kernel holds before accept).
    #[arg(long, default_value_t = 4096)]
    listen_backlog: u32,
    /// Data-plane worker threads, each with its own single-threaded runtime serving the
    /// connections it accepted (0: one per CPU this process may use, cgroup quota included).
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024))]
    workers: usize,
    /// Publish jobs queued for one data-plane worker before a publish delivers on its own
    /// thread (and the publisher goes at the pace of delivery).
    #[arg(long, default_value_t = wsgate::grip::DEFAULT_PUBLISH_BACKLOG, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_048_576))]
    publish_backlog: usize,
    /// Serve TLS (wss:// and https) on the client listener with this certificate chain (PEM,
    /// the server certificate first); needs --tls-key.
    #[arg(long, env = "WSGATE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "WSGATE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// How often the TLS certificate and key files are checked for changes (0s: never).
    #[arg(long, default_value = "10s")]
    tls_reload_interval: DurationSpec,
    /// Require `Authorization: Bearer TOKEN` on the publish and connection APIs.
    #[arg(long, env = "WSGATE_ADMIN_TOKEN", conflicts_with = "publish_jwt_key")]
    admin_token: Option<String>,
    /// Require a JWT (HS256, `exp` required) signed with this key on the publish and
    /// connection APIs, as GRIP publishers send it (`base64:` prefix for binary keys).
    #[arg(long, env = "WSGATE_PUBLISH_JWT_KEY")]
    publish_jwt_key: Option<String>,
    /// Allow an admin listener on a non-loopback address without a token or key.
    #[arg(long)]
    admin_allow_unauthenticated: bool,
    /// Largest publish or connection-API request body.
    #[arg(long, default_value_t = 1_000_000)]
    max_publish_body: usize,
    #[command(flatten)]
    control: wsgate::config::control::ControlClientArgs,
    /// NATS server URL(s), comma separated, for publishing across replicas; without it,
    /// publishing is local to this replica.
    #[arg(long, env = "WSGATE_NATS")]
    nats: Option<String>,
}

/// Logs, and traces when the standard `OTEL_*` variables name an OTLP endpoint. Must run
/// inside the runtime (span export runs on it).
fn init_telemetry(format: LogFormat, filter: &str) -> anyhow::Result<Option<telemetry::Tracing>> {
    let tracing = match telemetry::TraceConfig::from_env()? {
        Some(cfg) => Some(telemetry::Tracing::start(&cfg)?),
        None => None,
    };
    let format = match format {
        LogFormat::Text => telemetry::LogFormat::Text,
        LogFormat::Json => telemetry::LogFormat::Json,
    };
    telemetry::init(format, filter, tracing.as_ref()).context("--log-level")?;
    Ok(tracing)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tracing = match rt.block_on(async { init_telemetry(cli.log_format, &cli.log_level) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsgate: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = match cli.command {
        Command::Gateway(args) => rt.block_on(gateway(*args)),
        Command::Demo(args) => rt.block_on(demo(args)),
        Command::Publish(args) => rt.block_on(publish(args)),
        Command::Crd => {
            print!("{}", wsgate::controller::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Controller(args) => rt.block_on(wsgate::controller::run(*args)),
    };
    // Outside the runtime's own threads: the final export runs on its workers.
    if let Some(t) = tracing
        && let Err(e) = t.shutdown()
    {
        eprintln!("wsgate: {e}");
    }
    code
}

fn load_table(args: &GatewayArgs) -> Result<RouteTable, String> {
    if let Some(path) = &args.config {
        return config::load_routes_file(path).map_err(|e| format!("{}:\n{e}", path.display()));
    }
    let Some(url) = &args.backend else {
        return Err("one of --backend URL or --config FILE is required".into());
    };
    let route = Route::catch_all(url).map_err(|e| format!("--backend: {e}"))?;
    RouteTable::new(vec![route], 1).map_err(|e| e.to_string())
}

/// TLS for the client listener from `--tls-cert` and `--tls-key` (both or neither).
fn load_tls(args: &GatewayArgs) -> Result<Option<server::tls::ServerTls>, String> {
    match (&args.tls_cert, &args.tls_key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => server::tls::ServerTls::load(cert, key, args.tls_reload_interval.get())
            .map(Some)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}")),
        (Some(_), None) => Err("--tls-cert needs --tls-key (WSGATE_TLS_KEY)".into()),
        (None, Some(_)) => Err("--tls-key needs --tls-cert (WSGATE_TLS_CERT)".into()),
    }
}

async fn gateway(args: GatewayArgs) -> ExitCode {
    let auth = match admin::auth::Auth::from_flags(args.admin_token.clone(), args.publish_jwt_key.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wsgate: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if auth.is_none() && !admin::auth::is_loopback(&args.admin_listen) && !args.admin_allow_unauthenticated {
        eprintln!(
            "wsgate: bad configuration: --admin-listen {} is not a loopback address; set --admin-token or \
             --publish-jwt-key (or --admin-allow-unauthenticated)",
            args.admin_listen
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let control = match args.control.to_config(&|n| std::env::var(n).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if control.is_some() && (args.backend.is_some() || args.config.is_some()) {
        eprintln!("wsgate: bad configuration: --control-url excludes --backend and --config");
        return ExitCode::from(EXIT_CONFIG);
    }
    let table = if control.is_some() {
        Ok(RouteTable::default())
    } else {
        load_table(&args)
    };
    let table = match table {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsgate: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tls = match load_tls(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsgate: bad configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = GatewaySettings {
        max_connections: args.max_connections,
        handshake_timeout: args.handshake_timeout.get(),
        drain_period: args.drain_period.get(),
        close_pacing: args.close_pacing.get(),
        shutdown_timeout: args.shutdown_timeout.get(),
        max_headers: args.max_headers,
        max_header_bytes: args.max_header_bytes,
        backend_idle_timeout: args.backend_idle_timeout.get(),
        backend_max_idle_per_host: args.backend_max_idle,
        workers: if args.workers == 0 {
            server::workers::default_count()
        } else {
            args.workers
        },
        publish_backlog: args.publish_backlog,
        backend_response_head: wsgate::transport::h1::HeadLimits {
            max_bytes: args.backend_max_response_head_bytes,
            max_headers: args.backend_max_response_headers,
        },
        tls,
    };
    let table = Arc::new(ArcSwap::from_pointee(table));
    let mut gw = Gateway::new(table.clone(), settings);
    let nats = match &args.nats {
        Some(url) => {
            let config = wsgate::grip::nats::NatsConfig::new(url);
            match wsgate::grip::nats::NatsBridge::connect(config, gw.registry.clone()).await {
                Ok(bridge) => {
                    gw.on_channel = Some(bridge.channel_hook());
                    let state = bridge.clone();
                    // 1 connected, 0 not (disconnected, or still connecting).
                    gw.metrics.set_nats_state_fn(move || {
                        i64::from(state.state() == wsgate::grip::nats::NatsState::Connected)
                    });
                    Some(bridge)
                }
                Err(e) => {
                    eprintln!("wsgate: bad configuration: --nats: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        None => None,
    };
    let hub = match &nats {
        Some(bridge) => wsgate::grip::Hub::with_nats(gw.registry.clone(), bridge.clone()),
        None => wsgate::grip::Hub::new(gw.registry.clone()),
    };
    let gw = Arc::new(gw);
    let stop = CancellationToken::new();
    let listener = match server::bind_listener(args.listen, args.listen_backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsgate: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let admin_listener = match tokio::net::TcpListener::bind(args.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsgate: cannot listen on {}: {e}", args.admin_listen);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let reload = args.config.as_ref().map(|path| {
        let status = Arc::new(ReloadStatus::default());
        tokio::spawn(config::watch_routes_file(
            path.clone(),
            args.reload_interval.get(),
            table.clone(),
            status.clone(),
            stop.clone(),
        ));
        status
    });
    let control_status = control.map(|config| {
        let status = Arc::new(wsgate::config::control::ControlStatus::new());
        tokio::spawn(wsgate::config::control::run_control_client(
            config,
            table.clone(),
            status.clone(),
            stop.clone(),
        ));
        status
    });
    let admin_state = Arc::new(AdminState {
        reload,
        auth,
        max_publish_body: args.max_publish_body,
        control: control_status,
        hub,
        ..AdminState::new(gw.clone())
    });
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::run(admin_listener, admin_state.clone(), admin_stop.clone()));
    tracing::info!(
        listen = %listener.local_addr().map_or(args.listen, |a| a),
        admin = %args.admin_listen,
        routes = table.load().routes().len(),
        tls = gw.settings.tls.is_some(),
        workers = gw.settings.workers,
        "wsgate gateway started"
    );
    // One certificate watcher for every worker's acceptor.
    let tls_watcher = gw.settings.tls.clone().map(|t| tokio::spawn(t.watch(stop.clone())));
    let workers = match server::workers::start(gw.settings.workers, listener, &gw, &stop) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("wsgate: cannot start the data-plane workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    admin_state.listening.store(true, std::sync::atomic::Ordering::SeqCst);
    wsgate::signal::terminated().await;
    tracing::info!("shutdown: readiness off, draining");
    gw.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    stop.cancel();
    gw.drain().await;
    if let Some(bridge) = &nats {
        bridge.shutdown().await;
    }
    workers.finish(Duration::from_secs(1)).await;
    if let Some(w) = tls_watcher {
        let _ = w.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("shutdown complete");
    ExitCode::SUCCESS
}

async fn demo(args: DemoArgs) -> ExitCode {
    let backend_listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsgate: cannot start the demo backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let backend_addr = match backend_listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wsgate: cannot start the demo backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop_backend = CancellationToken::new();
    tokio::spawn(wsgate::demo::serve_backend(
        backend_listener,
        format!("http://{}/publish/", args.admin_listen),
        stop_backend.clone(),
    ));
    println!(
        "wsgate demo: open http://{}/ in a browser (two tabs to chat); Ctrl-C stops",
        args.listen
    );
    let gateway_args = GatewayArgs {
        listen: args.listen,
        backend: Some(format!("http://{backend_addr}")),
        config: None,
        reload_interval: DurationSpec::from_secs(1),
        admin_listen: args.admin_listen,
        max_connections: 50_000,
        handshake_timeout: DurationSpec::from_secs(10),
        drain_period: DurationSpec::from_secs(0),
        close_pacing: DurationSpec::from_millis(100),
        shutdown_timeout: DurationSpec::from_secs(5),
        max_headers: 100,
        max_header_bytes: server::DEFAULT_MAX_HEADER_BYTES,
        backend_idle_timeout: DurationSpec::from_secs(90),
        backend_max_idle: 1024,
        backend_max_response_headers: 100,
        backend_max_response_head_bytes: 65536,
        listen_backlog: 4096,
        workers: 0,
        publish_backlog: wsgate::grip::DEFAULT_PUBLISH_BACKLOG,
        tls_cert: None,
        tls_key: None,
        tls_reload_interval: DurationSpec::from_secs(10),
        admin_token: None,
        publish_jwt_key: None,
        admin_allow_unauthenticated: false,
        max_publish_body: 1_000_000,
        control: wsgate::config::control::ControlClientArgs {
            control_url: None,
            control_token_file: std::path::PathBuf::new(),
            control_no_token: true,
        },
        nats: None,
    };
    let code = gateway(gateway_args).await;
    stop_backend.cancel();
    code
}

async fn publish(args: PublishArgs) -> ExitCode {
    let action = match admin::client::action_from_cli(
        args.message.as_deref(),
        args.binary,
        args.close,
        args.reason.as_deref(),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wsgate publish: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match admin::client::publish(&args.url, args.token.as_deref(), &args.channel, &action).await {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsgate publish: {e}");
            ExitCode::FAILURE
        }
    }
}
