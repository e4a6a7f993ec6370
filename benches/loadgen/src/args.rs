//! A tiny `--name value` flag parser (keeps the generator's build small: no clap).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// Flags of one subcommand. Every flag must be read by the subcommand
/// ([`Args::finish`] rejects the ones nobody asked for, so typos fail loudly).
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, Vec<String>>,
    used: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl Args {
    /// Parses `--name value` pairs (`--name=value` works too).
    pub fn parse(raw: &[String]) -> Result<Self> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = raw.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?} (flags are --name value)");
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let v = it.next().ok_or_else(|| anyhow!("--{name} needs a value"))?;
                    (name.to_owned(), v.clone())
                }
            };
            values.entry(name).or_default().push(value);
        }
        Ok(Self {
            values,
            used: Default::default(),
        })
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.used.borrow_mut().insert(name.to_owned());
        self.values.get(name).and_then(|v| v.last()).map(String::as_str)
    }

    /// A required flag.
    pub fn req<T: FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.raw(name).ok_or_else(|| anyhow!("--{name} is required"))?;
        v.parse().map_err(|e| anyhow!("--{name} {v:?}: {e}"))
    }

    /// An optional flag with a default.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| anyhow!("--{name} {v:?}: {e}")),
        }
    }

    /// An optional string flag.
    pub fn opt(&self, name: &str) -> Option<String> {
        self.raw(name).map(str::to_owned)
    }

    /// A duration in seconds (fractions allowed).
    pub fn secs(&self, name: &str, default: f64) -> Result<Duration> {
        let s: f64 = self.get(name, default)?;
        if !(0.0..=86_400.0).contains(&s) {
            bail!("--{name} must be between 0 and 86400 seconds");
        }
        Ok(Duration::from_secs_f64(s))
    }

    /// All values of a repeatable flag, each possibly a comma-separated list.
    pub fn list<T: FromStr>(&self, name: &str) -> Result<Vec<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.used.borrow_mut().insert(name.to_owned());
        let mut out = Vec::new();
        for v in self.values.get(name).into_iter().flatten() {
            for part in v.split(',').filter(|p| !p.is_empty()) {
                out.push(part.parse().map_err(|e| anyhow!("--{name} {part:?}: {e}"))?);
            }
        }
        Ok(out)
    }

    /// Fails on flags that no getter asked for.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let mut unknown: Vec<&String> = self.values.keys().filter(|k| !used.contains(*k)).collect();
        unknown.sort();
        if let Some(first) = unknown.first() {
            return Err(anyhow!("unknown flag --{first}")).context("see `loadgen help`");
        }
        Ok(())
    }
}
