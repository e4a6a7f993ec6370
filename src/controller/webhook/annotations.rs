//! The pod annotations and labels that steer injection, parsed and checked once.
//!
//! Every `wsgate.io/*` annotation is optional; an absent one takes the webhook's default
//! ([`InjectDefaults`]). All problems are collected, so one denial names every bad annotation.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Label (namespace or pod) that opts in: `wsgate.io/inject=enabled`; on a pod, `disabled`
/// opts out even in an enabled namespace.
pub const LABEL_INJECT: &str = "wsgate.io/inject";
/// Value of [`LABEL_INJECT`] that opts in.
pub const INJECT_ENABLED: &str = "enabled";
/// Value of [`LABEL_INJECT`] that opts out.
pub const INJECT_DISABLED: &str = "disabled";

/// Port the gateway listens on for clients (the port a Service should target).
pub const ANNOTATION_PORT: &str = "wsgate.io/port";
/// The application's port: the sidecar serves one catch-all route to `http://127.0.0.1:PORT`
/// instead of fetching `WebSocketRoute`s from the control API.
pub const ANNOTATION_TARGET_PORT: &str = "wsgate.io/target-port";
/// Port of the gateway's admin listener (health, readiness, publish API).
pub const ANNOTATION_ADMIN_PORT: &str = "wsgate.io/admin-port";
/// CPU request of the sidecar (a Kubernetes quantity such as `100m`).
pub const ANNOTATION_CPU: &str = "wsgate.io/cpu";
/// CPU limit of the sidecar (none by default: CPU limits throttle latency-sensitive proxies).
pub const ANNOTATION_CPU_LIMIT: &str = "wsgate.io/cpu-limit";
/// Memory request of the sidecar; also its limit unless [`ANNOTATION_MEMORY_LIMIT`] is set.
pub const ANNOTATION_MEMORY: &str = "wsgate.io/memory";
/// Memory limit of the sidecar.
pub const ANNOTATION_MEMORY_LIMIT: &str = "wsgate.io/memory-limit";
/// Data-plane worker threads of the sidecar (its `--workers`): `1`…`1024`, or `auto` (or `0`)
/// for one per CPU the sidecar may use (its CPU limit, else every CPU of the node).
pub const ANNOTATION_WORKERS: &str = "wsgate.io/workers";
/// Log filter of the sidecar (tracing `EnvFilter` syntax: `info`, `wsgate=debug`).
pub const ANNOTATION_LOG_LEVEL: &str = "wsgate.io/log-level";
/// `native` (init container with `restartPolicy: Always`) or `container`.
pub const ANNOTATION_SIDECAR_MODE: &str = "wsgate.io/sidecar-mode";
/// Secret (key `token`) in the pod's namespace holding the admin API bearer token.
pub const ANNOTATION_ADMIN_TOKEN_SECRET: &str = "wsgate.io/admin-token-secret";
/// Set by the webhook on pods it injected: the sidecar mode used.
pub const ANNOTATION_INJECTED: &str = "wsgate.io/injected";

/// The annotations the webhook reads; any other `wsgate.io/` annotation draws a warning.
pub const KNOWN_ANNOTATIONS: &[&str] = &[
    ANNOTATION_PORT,
    ANNOTATION_TARGET_PORT,
    ANNOTATION_ADMIN_PORT,
    ANNOTATION_CPU,
    ANNOTATION_CPU_LIMIT,
    ANNOTATION_MEMORY,
    ANNOTATION_MEMORY_LIMIT,
    ANNOTATION_WORKERS,
    ANNOTATION_LOG_LEVEL,
    ANNOTATION_SIDECAR_MODE,
    ANNOTATION_ADMIN_TOKEN_SECRET,
    ANNOTATION_INJECTED,
];

/// How the gateway is added to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes ≥ 1.29; beta in 1.28): starts
    /// before the app containers, stops after them, doesn't keep Jobs running.
    Native,
    /// A regular container (any Kubernetes version): starts alongside the app.
    Container,
}

impl SidecarMode {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Container => "container",
        }
    }
}

impl fmt::Display for SidecarMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SidecarMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "container" => Ok(Self::Container),
            _ => Err("must be `native` or `container`".to_owned()),
        }
    }
}

/// A positive Kubernetes resource quantity (`100m`, `64Mi`, `1.5`, `1e3`), kept as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    text: String,
    value: f64,
}

impl Quantity {
    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its value in base units (cores, bytes); approximate, for comparisons only.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Whether the suffix is `m` (milli): fine for CPU, almost always a typo for memory.
    fn is_milli(&self) -> bool {
        self.text.ends_with('m')
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Quantity {
    type Err = String;

    /// Parses `<number><suffix>` as Kubernetes does: a decimal number (no sign: only positive
    /// quantities make sense here) then a binary (`Ki`…`Ei`), decimal (`n u m k M G T P E`) or
    /// exponent (`e3`, `E-2`) suffix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const BAD: &str = "is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)";
        if s.is_empty() || s.len() > 32 {
            return Err(BAD.to_owned());
        }
        let number_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, suffix) = s.split_at(number_end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(BAD.to_owned());
        }
        let base: f64 = number.parse().map_err(|_| BAD.to_owned())?;
        let multiplier = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024.0,
            "Mi" => 1024.0 * 1024.0,
            "Gi" => 1024.0 * 1024.0 * 1024.0,
            "Ti" => 1024.0_f64.powi(4),
            "Pi" => 1024.0_f64.powi(5),
            "Ei" => 1024.0_f64.powi(6),
            exp if exp.starts_with(['e', 'E']) => {
                let digits = &exp[1..];
                let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
                if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(BAD.to_owned());
                }
                let e: i32 = digits.parse().map_err(|_| BAD.to_owned())?;
                10f64.powi(e)
            }
            _ => return Err(BAD.to_owned()),
        };
        let value = base * multiplier;
        if !value.is_finite() || value <= 0.0 {
            return Err("must be greater than zero".to_owned());
        }
        Ok(Self {
            text: s.to_owned(),
            value,
        })
    }
}

/// The data-plane worker count of a sidecar: the gateway's `--workers`.
///
/// Either a fixed count (1 to [`Workers::MAX`]) or [`Workers::AUTO`]: the gateway's own
/// default, one worker per CPU the process may use. That honours a CPU limit (the cgroup quota)
/// but, without one, means every CPU of the node: 64 workers for a sidecar with a `50m` request
/// on a large node. Hence the webhook's default of [`Workers::SIDECAR_DEFAULT`], as Istio gives
/// Envoy sidecars a `concurrency` of 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers(u16);

impl Workers {
    /// As many workers as the gateway finds CPUs for (`--workers 0`).
    pub const AUTO: Self = Self(0);
    /// The webhook's default for sidecars.
    pub const SIDECAR_DEFAULT: Self = Self(2);
    /// The largest count the gateway accepts.
    pub const MAX: u16 = 1024;

    /// `count` workers, `0` meaning [`Workers::AUTO`]; `None` above [`Workers::MAX`].
    pub const fn new(count: u16) -> Option<Self> {
        if count <= Self::MAX { Some(Self(count)) } else { None }
    }

    /// The fixed count, `None` for [`Workers::AUTO`].
    pub const fn count(self) -> Option<u16> {
        if self.0 == 0 { None } else { Some(self.0) }
    }

    /// The value of the gateway's `--workers` (`0` for [`Workers::AUTO`]).
    pub const fn as_arg(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Workers {
    /// `auto` or the count, as the annotation is written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.count() {
            None => f.write_str("auto"),
            Some(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Workers {
    type Err = String;

    /// `auto` or `0` (as many as the CPU limit allows), or a count from 1 to [`Workers::MAX`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Self::AUTO);
        }
        let bad = || format!("is not a worker count (1-{}, or auto)", Self::MAX);
        // At most four digits: no sign, no spaces, and no overflow before the range check.
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse::<u16>().ok().and_then(Self::new).ok_or_else(bad)
    }
}

/// Whether `s` is a DNS-1123 subdomain (the rule for Secret names).
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Checks a log filter the way the gateway will parse it.
pub(crate) fn check_log_level(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 512 {
        return Err("must be a tracing filter such as `info` or `info,wsgate=debug`".to_owned());
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| ())
        .map_err(|e| format!("is not a valid log filter: {e}"))
}

/// The webhook-wide defaults that annotations override.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectDefaults {
    /// Gateway client port.
    pub port: u16,
    /// Admin listener port.
    pub admin_port: u16,
    /// CPU request.
    pub cpu: Quantity,
    /// CPU limit (none by default).
    pub cpu_limit: Option<Quantity>,
    /// Memory request.
    pub memory: Quantity,
    /// Memory limit (`None`: equal to the request).
    pub memory_limit: Option<Quantity>,
    /// Data-plane worker threads.
    pub workers: Workers,
    /// Log filter.
    pub log_level: String,
    /// Sidecar mode when the pod doesn't choose.
    pub sidecar_mode: SidecarMode,
    /// Secret with the admin token (key `token`); `None`: the admin API is unauthenticated.
    pub admin_token_secret: Option<String>,
}

/// What one pod asks for: defaults overridden by its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct PodOptions {
    /// Gateway client port.
    pub port: u16,
    /// App port behind the gateway (`--backend http://127.0.0.1:PORT`), if annotated.
    pub target_port: Option<u16>,
    /// Admin listener port (probes).
    pub admin_port: u16,
    /// CPU request.
    pub cpu: Quantity,
    /// CPU limit.
    pub cpu_limit: Option<Quantity>,
    /// Memory request.
    pub memory: Quantity,
    /// Memory limit.
    pub memory_limit: Quantity,
    /// Data-plane worker threads (the gateway's `--workers`).
    pub workers: Workers,
    /// Log filter.
    pub log_level: String,
    /// Sidecar mode.
    pub sidecar_mode: SidecarMode,
    /// Whether the pod chose the mode itself.
    pub sidecar_mode_explicit: bool,
    /// Secret with the admin token.
    pub admin_token_secret: Option<String>,
}

/// One bad annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{annotation}: {value:?} {reason}")]
pub struct AnnotationError {
    /// The annotation (or the pair of annotations) at fault.
    pub annotation: String,
    /// Its value.
    pub value: String,
    /// What is wrong, phrased to follow the value.
    pub reason: String,
}

fn port(s: &str) -> Result<u16, String> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not a port number (1-65535)".to_owned());
    }
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("is not a port number (1-65535)".to_owned()),
    }
}

impl PodOptions {
    /// Reads the pod's annotations over `defaults`.
    ///
    /// Returns the options and warnings (unknown `wsgate.io/` annotations).
    ///
    /// # Errors
    ///
    /// Every annotation that doesn't parse, and inconsistent pairs (equal ports, a memory limit
    /// below the request).
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        defaults: &InjectDefaults,
    ) -> Result<(Self, Vec<String>), Vec<AnnotationError>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut get = |key: &'static str, parse: &dyn Fn(&str) -> Result<(), String>| -> Option<String> {
            let value = annotations.get(key)?;
            match parse(value) {
                Ok(()) => Some(value.clone()),
                Err(reason) => {
                    errors.push(AnnotationError {
                        annotation: key.to_owned(),
                        value: value.clone(),
                        reason,
                    });
                    None
                }
            }
        };
        let port_ok = |s: &str| port(s).map(|_| ());
        let quantity_ok = |s: &str| s.parse::<Quantity>().map(|_| ());
        let memory_ok = |s: &str| {
            let q: Quantity = s.parse()?;
            if q.is_milli() {
                return Err(format!(
                    "means {}/1000 bytes (suffix m is milli); write {}Mi for mebibytes",
                    &s[..s.len() - 1],
                    &s[..s.len() - 1]
                ));
            }
            Ok(())
        };
        let port_value = get(ANNOTATION_PORT, &port_ok);
        let target_port = get(ANNOTATION_TARGET_PORT, &port_ok);
        let admin_port = get(ANNOTATION_ADMIN_PORT, &port_ok);
        let cpu = get(ANNOTATION_CPU, &quantity_ok);
        let cpu_limit = get(ANNOTATION_CPU_LIMIT, &quantity_ok);
        let memory = get(ANNOTATION_MEMORY, &memory_ok);
        let memory_limit = get(ANNOTATION_MEMORY_LIMIT, &memory_ok);
        let workers = get(ANNOTATION_WORKERS, &|s| s.parse::<Workers>().map(|_| ()));
        let log_level = get(ANNOTATION_LOG_LEVEL, &check_log_level);
        let mode = get(ANNOTATION_SIDECAR_MODE, &|s| s.parse::<SidecarMode>().map(|_| ()));
        let secret = get(ANNOTATION_ADMIN_TOKEN_SECRET, &|s| {
            if is_dns1123_subdomain(s) {
                Ok(())
            } else {
                Err("is not a Secret name (lowercase letters, digits, '-' and '.')".to_owned())
            }
        });

        for key in annotations.keys() {
            if key.starts_with("wsgate.io/") && !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
                warnings.push(format!("wsgate: unknown annotation {key} is ignored"));
            }
        }

        // The parses below repeat checks that already passed; fall back to defaults otherwise.
        let memory: Quantity = memory
            .and_then(|q| q.parse().ok())
            .unwrap_or_else(|| defaults.memory.clone());
        let memory_limit = memory_limit
            .and_then(|q| q.parse().ok())
            .or_else(|| {
                // An annotated request without an annotated limit: the limit follows the request.
                if annotations.contains_key(ANNOTATION_MEMORY) {
                    None
                } else {
                    defaults.memory_limit.clone()
                }
            })
            .unwrap_or_else(|| memory.clone());
        let options = Self {
            port: port_value.and_then(|p| port(&p).ok()).unwrap_or(defaults.port),
            target_port: target_port.and_then(|p| port(&p).ok()),
            admin_port: admin_port.and_then(|p| port(&p).ok()).unwrap_or(defaults.admin_port),
            cpu: cpu.and_then(|q| q.parse().ok()).unwrap_or_else(|| defaults.cpu.clone()),
            cpu_limit: cpu_limit
                .and_then(|q| q.parse().ok())
                .or_else(|| defaults.cpu_limit.clone()),
            memory,
            memory_limit,
            workers: workers.and_then(|w| w.parse().ok()).unwrap_or(defaults.workers),
            log_level: log_level.unwrap_or_else(|| defaults.log_level.clone()),
            sidecar_mode: mode
                .as_deref()
                .and_then(|m| m.parse().ok())
                .unwrap_or(defaults.sidecar_mode),
            sidecar_mode_explicit: annotations.contains_key(ANNOTATION_SIDECAR_MODE),
            admin_token_secret: secret.or_else(|| defaults.admin_token_secret.clone()),
        };

        if errors.is_empty() {
            options.check_consistency(&mut errors);
        }
        if errors.is_empty() {
            Ok((options, warnings))
        } else {
            Err(errors)
        }
    }

    fn check_consistency(&self, errors: &mut Vec<AnnotationError>) {
        if self.port == self.admin_port {
            errors.push(AnnotationError {
                annotation: format!("{ANNOTATION_PORT} and {ANNOTATION_ADMIN_PORT}"),
                value: self.port.to_string(),
                reason: "is used for both the gateway and its admin listener".to_owned(),
            });
        }
        if let Some(target) = self.target_port
            && (target == self.port || target == self.admin_port)
        {
            errors.push(AnnotationError {
                annotation: ANNOTATION_TARGET_PORT.to_owned(),
                value: target.to_string(),
                reason: format!(
                    "is the gateway's own port ({} {}, {} {}); the app must listen on another one",
                    ANNOTATION_PORT, self.port, ANNOTATION_ADMIN_PORT, self.admin_port
                ),
            });
        }
        if self.memory_limit.value() < self.memory.value() {
            errors.push(AnnotationError {
                annotation: ANNOTATION_MEMORY_LIMIT.to_owned(),
                value: self.memory_limit.to_string(),
                reason: format!("is below the memory request {}", self.memory),
            });
        }
        if let Some(limit) = &self.cpu_limit
            && limit.value() < self.cpu.value()
        {
            errors.push(AnnotationError {
                annotation: ANNOTATION_CPU_LIMIT.to_owned(),
                value: limit.to_string(),
                reason: format!("is below the CPU request {}", self.cpu),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> InjectDefaults {
        InjectDefaults {
            port: 8880,
            admin_port: 9090,
            cpu: "50m".parse().expect("q"),
            cpu_limit: None,
            memory: "64Mi".parse().expect("q"),
            memory_limit: Some("128Mi".parse().expect("q")),
            workers: Workers::SIDECAR_DEFAULT,
            log_level: "info".into(),
            sidecar_mode: SidecarMode::Native,
            admin_token_secret: None,
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        for (text, value) in [
            ("100m", 0.1),
            ("1", 1.0),
            ("0.5", 0.5),
            (".5", 0.5),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1Gi", 1024.0 * 1024.0 * 1024.0),
            ("2k", 2000.0),
            ("1e3", 1000.0),
            ("5E-1", 0.5),
        ] {
            let q: Quantity = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!((q.value() - value).abs() < 1e-9 * value.max(1.0), "{text}");
            assert_eq!(q.as_str(), text);
        }
        for bad in [
            "", "-1", "+1", "0", "0Mi", "abc", "1.2.3", ".", "1MB", "1mi", "1e", "1e+", "Mi", "1 Mi", "1e400",
        ] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn defaults_apply_without_annotations() {
        let (o, warnings) = PodOptions::from_annotations(&BTreeMap::new(), &defaults()).expect("ok");
        assert!(warnings.is_empty());
        assert_eq!((o.port, o.admin_port, o.target_port), (8880, 9090, None));
        assert_eq!(o.memory_limit.as_str(), "128Mi");
        assert_eq!(o.sidecar_mode, SidecarMode::Native);
        assert!(!o.sidecar_mode_explicit);
    }

    #[test]
    fn annotations_override_defaults() {
        let a = annotations(&[
            (ANNOTATION_PORT, "7000"),
            (ANNOTATION_TARGET_PORT, "3000"),
            (ANNOTATION_CPU, "250m"),
            (ANNOTATION_CPU_LIMIT, "1"),
            (ANNOTATION_MEMORY, "256Mi"),
            (ANNOTATION_LOG_LEVEL, "info,wsgate=debug"),
            (ANNOTATION_SIDECAR_MODE, "container"),
            (ANNOTATION_ADMIN_TOKEN_SECRET, "gw-admin"),
        ]);
        let (o, _) = PodOptions::from_annotations(&a, &defaults()).expect("ok");
        assert_eq!((o.port, o.target_port), (7000, Some(3000)));
        assert_eq!(o.cpu.as_str(), "250m");
        assert_eq!(o.cpu_limit.as_ref().map(Quantity::as_str), Some("1"));
        // An annotated request without an annotated limit: the limit follows the request.
        assert_eq!(o.memory_limit.as_str(), "256Mi");
        assert_eq!(o.log_level, "info,wsgate=debug");
        assert_eq!(o.sidecar_mode, SidecarMode::Container);
        assert!(o.sidecar_mode_explicit);
        assert_eq!(o.admin_token_secret.as_deref(), Some("gw-admin"));
    }

    #[test]
    fn every_bad_annotation_is_reported_at_once() {
        let a = annotations(&[
            (ANNOTATION_PORT, "http"),
            (ANNOTATION_TARGET_PORT, "70000"),
            (ANNOTATION_MEMORY, "128m"),
            (ANNOTATION_LOG_LEVEL, "wsgate=loud"),
            (ANNOTATION_SIDECAR_MODE, "sidecar"),
            (ANNOTATION_ADMIN_TOKEN_SECRET, "Bad_Name"),
        ]);
        let errors = PodOptions::from_annotations(&a, &defaults()).expect_err("bad");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 6, "{text:#?}");
        assert_eq!(text[0], r#"wsgate.io/port: "http" is not a port number (1-65535)"#);
        assert_eq!(
            text[1],
            r#"wsgate.io/target-port: "70000" is not a port number (1-65535)"#
        );
        assert_eq!(
            text[2],
            r#"wsgate.io/memory: "128m" means 128/1000 bytes (suffix m is milli); write 128Mi for mebibytes"#
        );
        assert!(text[3].starts_with(r#"wsgate.io/log-level: "wsgate=loud" is not a valid log filter"#));
        assert_eq!(
            text[4],
            r#"wsgate.io/sidecar-mode: "sidecar" must be `native` or `container`"#
        );
        assert!(text[5].contains("is not a Secret name"));
    }

    #[test]
    fn inconsistent_pairs_are_refused() {
        let a = annotations(&[(ANNOTATION_PORT, "9090")]);
        let e = PodOptions::from_annotations(&a, &defaults()).expect_err("same ports");
        assert_eq!(
            e[0].to_string(),
            r#"wsgate.io/port and wsgate.io/admin-port: "9090" is used for both the gateway and its admin listener"#
        );
        let a = annotations(&[(ANNOTATION_TARGET_PORT, "8880")]);
        let e = PodOptions::from_annotations(&a, &defaults()).expect_err("target = port");
        assert!(e[0].reason.contains("the gateway's own port"));
        let a = annotations(&[(ANNOTATION_MEMORY, "1Gi"), (ANNOTATION_MEMORY_LIMIT, "512Mi")]);
        let e = PodOptions::from_annotations(&a, &defaults()).expect_err("limit < request");
        assert_eq!(
            e[0].to_string(),
            r#"wsgate.io/memory-limit: "512Mi" is below the memory request 1Gi"#
        );
        let a = annotations(&[(ANNOTATION_CPU, "2"), (ANNOTATION_CPU_LIMIT, "500m")]);
        assert!(PodOptions::from_annotations(&a, &defaults()).is_err());
    }

    #[test]
    fn unknown_wsgate_annotations_warn() {
        let a = annotations(&[("wsgate.io/targetport", "3000"), ("other.io/x", "y")]);
        let (_, warnings) = PodOptions::from_annotations(&a, &defaults()).expect("ok");
        assert_eq!(warnings.len(), 1);
        assert_eq!(
            warnings[0],
            "wsgate: unknown annotation wsgate.io/targetport is ignored"
        );
    }

    #[test]
    fn worker_counts_parse_with_auto_and_zero_alike() {
        for (text, arg) in [("1", 1), ("2", 2), ("16", 16), ("1024", 1024), ("auto", 0), ("0", 0)] {
            let w: Workers = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(w.as_arg(), arg, "{text}");
        }
        assert_eq!("0".parse::<Workers>(), Ok(Workers::AUTO));
        assert_eq!(Workers::AUTO.count(), None);
        assert_eq!(Workers::SIDECAR_DEFAULT.count(), Some(2));
        assert_eq!(Workers::new(1024).map(Workers::as_arg), Some(1024));
        assert_eq!(Workers::new(1025), None);
        // Display round-trips through parsing.
        for w in [
            Workers::AUTO,
            Workers::SIDECAR_DEFAULT,
            Workers::new(1024).expect("in range"),
        ] {
            assert_eq!(w.to_string().parse::<Workers>(), Ok(w));
        }
        assert_eq!(Workers::AUTO.to_string(), "auto");
        for bad in [
            "",
            "lots",
            "1025",
            "9999",
            "65536",
            "99999999999",
            "-1",
            "+2",
            " 2",
            "2 ",
            "2.0",
            "0x10",
            "AUTO",
            "two",
        ] {
            assert_eq!(
                bad.parse::<Workers>(),
                Err("is not a worker count (1-1024, or auto)".to_owned()),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn workers_annotation_overrides_the_default() {
        let (o, _) = PodOptions::from_annotations(&BTreeMap::new(), &defaults()).expect("ok");
        assert_eq!(o.workers, Workers::SIDECAR_DEFAULT);
        for (text, arg) in [("8", 8), ("1", 1), ("auto", 0), ("0", 0)] {
            let a = annotations(&[(ANNOTATION_WORKERS, text)]);
            let (o, warnings) = PodOptions::from_annotations(&a, &defaults()).expect("ok");
            assert_eq!(o.workers.as_arg(), arg, "{text}");
            assert!(warnings.is_empty(), "{ANNOTATION_WORKERS} is a known annotation");
        }
        // A webhook default of auto is kept when the pod says nothing.
        let mut d = defaults();
        d.workers = Workers::AUTO;
        let (o, _) = PodOptions::from_annotations(&BTreeMap::new(), &d).expect("ok");
        assert_eq!(o.workers, Workers::AUTO);
    }

    #[test]
    fn bad_worker_counts_are_refused_with_the_others() {
        let a = annotations(&[(ANNOTATION_WORKERS, "lots"), (ANNOTATION_CPU, "fast")]);
        let errors = PodOptions::from_annotations(&a, &defaults()).expect_err("bad");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:#?}");
        assert!(text[0].starts_with(r#"wsgate.io/cpu: "fast""#), "{text:#?}");
        assert_eq!(
            text[1],
            r#"wsgate.io/workers: "lots" is not a worker count (1-1024, or auto)"#
        );
        for bad in ["1025", "-2", "2.5", ""] {
            let a = annotations(&[(ANNOTATION_WORKERS, bad)]);
            let errors = PodOptions::from_annotations(&a, &defaults()).expect_err(bad);
            assert_eq!(
                errors,
                [AnnotationError {
                    annotation: ANNOTATION_WORKERS.to_owned(),
                    value: bad.to_owned(),
                    reason: "is not a worker count (1-1024, or auto)".to_owned(),
                }]
            );
        }
    }

    #[test]
    fn secret_names_follow_dns1123() {
        assert!(is_dns1123_subdomain("gw-admin.v1"));
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }
}
