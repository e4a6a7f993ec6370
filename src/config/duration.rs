//! [`DurationSpec`]: a duration written as a string such as `"30s"` in routes files and CRDs.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The JSON Schema `pattern` of a duration string.
pub const DURATION_PATTERN: &str = "^[0-9]+(ms|s|m|h)$";

/// The longest duration a [`DurationSpec`] may hold (one year), so that adding it to an
/// instant can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration in configuration: digits followed by `ms`, `s`, `m` or `h` (`"250ms"`, `"30s"`,
/// `"5m"`, `"1h"`, `"0s"`). No spaces, signs, fractions or unit combinations.
///
/// Serializes back to the largest unit that represents it exactly (`"90s"` → `"90s"`,
/// `"120s"` → `"2m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationSpec(Duration);

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not digits followed by one of the units.
    #[error("invalid duration {0:?}: expected digits followed by ms, s, m or h (e.g. \"30s\")")]
    Syntax(String),
    /// Longer than [`MAX_DURATION`].
    #[error("duration {0:?} is too long (at most 8760h)")]
    TooLong(String),
}

impl DurationSpec {
    /// Wraps a duration. Sub-millisecond parts are kept but cannot be written back exactly.
    pub const fn new(duration: Duration) -> Self {
        Self(duration)
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// `true` for `"0s"` (used as "off" by some settings).
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<DurationSpec> for Duration {
    fn from(d: DurationSpec) -> Duration {
        d.0
    }
}

impl FromStr for DurationSpec {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() {
            return Err(DurationError::Syntax(s.to_owned()));
        }
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(DurationError::Syntax(s.to_owned())),
        };
        // All digits, so the only possible parse failure is overflow.
        let value: u64 = digits.parse().map_err(|_| DurationError::TooLong(s.to_owned()))?;
        let millis = value
            .checked_mul(millis_per_unit)
            .ok_or_else(|| DurationError::TooLong(s.to_owned()))?;
        let duration = Duration::from_millis(millis);
        if duration > MAX_DURATION {
            return Err(DurationError::TooLong(s.to_owned()));
        }
        Ok(Self(duration))
    }
}

impl fmt::Display for DurationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            f.write_str("0s")
        } else if millis.is_multiple_of(3_600_000) {
            write!(f, "{}h", millis / 3_600_000)
        } else if millis.is_multiple_of(60_000) {
            write!(f, "{}m", millis / 60_000)
        } else if millis.is_multiple_of(1_000) {
            write!(f, "{}s", millis / 1_000)
        } else {
            write!(f, "{millis}ms")
        }
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationSpec, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl JsonSchema for DurationSpec {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        let mut map = serde_json::Map::new();
        map.insert("type".into(), "string".into());
        map.insert("pattern".into(), DURATION_PATTERN.into());
        map.insert(
            "description".into(),
            "A duration: digits followed by ms, s, m or h, e.g. \"30s\".".into(),
        );
        Schema::from(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("007s", Duration::from_secs(7)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<DurationSpec>().map(DurationSpec::get), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_strings() {
        for text in [
            "", "s", "10", "1.5s", "-1s", "1 s", " 1s", "1S", "1d", "1m30s", "1sec", "１s",
        ] {
            assert_eq!(
                text.parse::<DurationSpec>(),
                Err(DurationError::Syntax(text.to_owned())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn rejects_overflow_and_too_long() {
        for text in ["99999999999999999999999s", "18446744073709551615h", "8761h"] {
            assert_eq!(
                text.parse::<DurationSpec>(),
                Err(DurationError::TooLong(text.to_owned())),
                "{text}"
            );
        }
        assert_eq!("8760h".parse::<DurationSpec>().map(DurationSpec::get), Ok(MAX_DURATION));
    }

    #[test]
    fn displays_in_largest_exact_unit_and_round_trips() {
        for (text, shown) in [
            ("0ms", "0s"),
            ("1500ms", "1500ms"),
            ("120s", "2m"),
            ("90s", "90s"),
            ("60m", "1h"),
        ] {
            let d: DurationSpec = text.parse().unwrap();
            assert_eq!(d.to_string(), shown);
            assert_eq!(shown.parse::<DurationSpec>(), Ok(d));
        }
    }

    #[test]
    fn serde_uses_strings() {
        let d: DurationSpec = serde_yaml::from_str("\"45s\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(45));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"45s\"");
        let err = serde_yaml::from_str::<DurationSpec>("45").unwrap_err().to_string();
        assert!(err.contains("duration"), "{err}");
        let err = serde_yaml::from_str::<DurationSpec>("4x").unwrap_err().to_string();
        assert!(err.contains("invalid duration \"4x\""), "{err}");
    }

    #[test]
    fn schema_is_a_patterned_string() {
        let schema = schemars::SchemaGenerator::default().into_root_schema_for::<DurationSpec>();
        let value = schema.as_value();
        assert_eq!(value["type"], "string");
        assert_eq!(value["pattern"], DURATION_PATTERN);
    }
}
