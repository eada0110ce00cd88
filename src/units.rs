//! The small parsers every input shares: human-friendly durations
//! (`1h30m`, `250ms`) and byte sizes (`64KiB`) and their display,
//! keywords (`strict`, `allow-all`), comma-separated lists and ports.
//!
//! Flags, environment variables, the config file and the injector's
//! annotations all go through these, so a value one of them accepts is a
//! value the others accept too.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a {what}: {reason}")]
pub struct UnitError {
    pub input: String,
    pub what: &'static str,
    pub reason: &'static str,
}

/// Parses `500ms`, `30s`, `5m`, `24h`, `7d` and sums like `1h30m`.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let fail = |reason| UnitError {
        input: input.to_string(),
        what: "duration",
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(fail("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(fail("expected a number"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| fail("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(|| fail("too large"))?),
            "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(|| fail("too large"))?),
            "d" => Duration::from_secs(value.checked_mul(86400).ok_or_else(|| fail("too large"))?),
            "" => return Err(fail("missing unit (ms, s, m, h or d)")),
            _ => return Err(fail("unknown unit (use ms, s, m, h or d)")),
        };
        total = total.checked_add(part).ok_or_else(|| fail("too large"))?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it, coarsest units
/// first (`23h59m12s`).
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.subsec_millis());
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// Parses `8192`, `64KiB`, `1MiB`.
pub fn parse_bytes(input: &str) -> Result<usize, UnitError> {
    let fail = |reason| UnitError {
        input: input.to_string(),
        what: "byte size",
        reason,
    };
    let s = input.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let value: usize = s[..digits].parse().map_err(|_| fail("expected a number"))?;
    let factor = match &s[digits..] {
        "" | "B" => 1,
        "KiB" | "Ki" => 1024,
        "MiB" | "Mi" => 1024 * 1024,
        "GiB" | "Gi" => 1024 * 1024 * 1024,
        _ => return Err(fail("unknown unit (use B, KiB, MiB or GiB)")),
    };
    value.checked_mul(factor).ok_or_else(|| fail("too large"))
}

/// A keyword of a serde enum (`strict`, `allow-all`, `json`), spelled as
/// the config file spells it, aliases included.
pub fn keyword<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        text.into_deserializer();
    T::deserialize(de).map_err(|e| format!("{text:?}: {e}"))
}

/// Each item of a comma-separated list, trimmed; empty items (and an
/// empty list) are skipped.
pub fn list<T, E>(text: &str, item: impl Fn(&str) -> Result<T, E>) -> Result<Vec<T>, E> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(item)
        .collect()
}

/// A TCP port, 1-65535.
pub fn port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port (1-65535)")),
    }
}

/// `2026-11-29T02:19:31Z` for a unix timestamp.
pub fn format_utc(unix_seconds: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_seconds) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => unix_seconds.to_string(),
    }
}

/// Serde adapters so config fields are typed `Duration`/`usize` while the
/// YAML says `30s` or `64KiB`.
pub mod serde_duration {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
}

pub mod serde_bytes {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(usize),
            Text(String),
        }
        match <Raw as serde::Deserialize>::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(s) => super::parse_bytes(&s).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: serde::Serializer>(n: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n as u64)
    }
}

/// [`serde_bytes`] for a key that may be unset.
pub mod serde_opt_bytes {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        super::serde_bytes::deserialize(d).map(Some)
    }

    pub fn serialize<S: serde::Serializer>(n: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
        match n {
            Some(n) => s.serialize_u64(*n as u64),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn rejects_durations_without_a_known_unit() {
        for bad in ["", "10", "h", "10x", "1.5h", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn formatted_durations_parse_back_to_the_same_value() {
        for secs in [1, 59, 61, 3600, 90061, 86400 * 400] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(90061)), "1d1h1m1s");
    }

    #[test]
    fn parses_byte_sizes_with_binary_units() {
        assert_eq!(parse_bytes("8192").unwrap(), 8192);
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert!(parse_bytes("64kb").is_err());
        assert!(parse_bytes("KiB").is_err());
    }

    #[test]
    fn keywords_parse_as_the_config_file_spells_them() {
        use crate::policy::{DefaultPolicy, MtlsMode};
        assert_eq!(keyword::<MtlsMode>("strict"), Ok(MtlsMode::Strict));
        assert_eq!(keyword::<MtlsMode>("STRICT"), Ok(MtlsMode::Strict));
        assert_eq!(
            keyword::<DefaultPolicy>("allow-same-namespace"),
            Ok(DefaultPolicy::AllowSameNamespace)
        );
        let error = keyword::<MtlsMode>("maybe").unwrap_err();
        assert!(
            error.contains("strict") && error.contains("maybe"),
            "{error}"
        );
    }

    #[test]
    fn lists_skip_blanks_and_stop_at_the_first_bad_item() {
        assert_eq!(list(" 80, ,443,", port), Ok(vec![80, 443]));
        assert_eq!(list("", port), Ok(vec![]));
        assert!(list("80,http", port).unwrap_err().contains("http"));
        assert!(port("0").is_err());
        assert!(port("65536").is_err());
    }

    #[test]
    fn formats_unix_time_as_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
