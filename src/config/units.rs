//! Units in the configuration file: durations (`"500ms"`, `"5s"`, `"2m"`,
//! `"1h"`, or a number of seconds) and byte sizes (`"16MB"`), with the serde
//! deserializers that give errors naming what is wrong.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parse `"250ms"`, `"5s"`, `"2m"`, `"1h"` or a number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Parse a byte size: `"16MB"`, `"512kB"`, `"1GiB"`, `"100"` (bytes). Units
/// are binary as in postgresql.conf (`kB` = 1024 bytes).
pub fn parse_byte_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "KiB" => 1 << 10,
        "MB" | "MiB" => 1 << 20,
        "GB" | "GiB" => 1 << 30,
        "TB" | "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(super) fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Str(s) => parse_byte_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {s:?}: use e.g. \"16MB\", \"512kB\" or a number of bytes"
            ))
        }),
    }
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
        Str(String),
    }
    let err = |what: &str| {
        serde::de::Error::custom(format!(
            "invalid duration {what}: use e.g. \"500ms\", \"5s\", \"2m\" or a number of seconds"
        ))
    };
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(Duration::from_secs(n)),
        Raw::Float(f) if f.is_finite() && f >= 0.0 => Ok(Duration::from_secs_f64(f)),
        Raw::Float(f) => Err(err(&f.to_string())),
        Raw::Str(s) => parse_duration(&s).ok_or_else(|| err(&format!("{s:?}"))),
    }
}
