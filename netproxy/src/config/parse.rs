//! Small value parsers shared by flags and the file: durations (`250ms`,
//! `5s`, `2m`, `1h`), byte sizes (`65536`, `256KiB`, `4MiB`), packet marks
//! (`0x539` or decimal) and gRPC addresses.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Parses `<n>ms`, `<n>s`, `<n>m`, `<n>h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number with unit ms, s, m or h (e.g. 5s)".to_string())?;
    let secs = |mul: u64| {
        n.checked_mul(mul)
            .map(Duration::from_secs)
            .ok_or_else(|| "duration too large".to_string())
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        other => Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    }
}

/// Parses a byte size: a bare number of bytes or `<n>KiB` / `<n>MiB` /
/// `<n>GiB` (binary units; HTTP/2 windows are powers of two in practice).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        "expected bytes or a number with unit KiB, MiB or GiB (e.g. 4MiB)".to_string()
    })?;
    let mul: u64 = match unit.trim() {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses a packet mark: `0x`-prefixed hex or decimal, non-zero.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("expected hex (0x539) or decimal: {e}"))?;
    if v == 0 {
        return Err("mark 0 would match unmarked traffic".into());
    }
    Ok(v)
}

pub(super) fn duration_or(
    flag: &'static str,
    v: Option<String>,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    match v {
        Some(s) => parse_duration(&s).map_err(|e| ConfigError::invalid(flag, &s, e)),
        None => Ok(Duration::from_secs(default_secs)),
    }
}

/// Normalises `host:port` or `https://host:port` to `https://host:port`
/// and returns it with the host (the default TLS server name).
pub(super) fn grpc_address(flag: &'static str, s: &str) -> Result<(String, String), ConfigError> {
    let rest = if let Some(r) = s.strip_prefix("https://") {
        r
    } else if s.starts_with("http://") {
        return Err(ConfigError::invalid(
            flag,
            s,
            "plaintext http:// is not allowed; use https://",
        ));
    } else {
        s
    };
    let rest = rest.trim_end_matches('/');
    let uri: http::Uri = format!("https://{rest}")
        .parse()
        .map_err(|e| ConfigError::invalid(flag, s, e))?;
    let (Some(host), Some(_port)) = (uri.host(), uri.port_u16()) else {
        return Err(ConfigError::invalid(flag, s, "expected host:port"));
    };
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(ConfigError::invalid(
            flag,
            s,
            "expected host:port without a path",
        ));
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((format!("https://{rest}"), host))
}

/// Accepts `"0x539"` or `1337` in the file.
pub(super) fn string_or_int<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        I(u64),
    }
    Ok(Option::<V>::deserialize(d)?.map(|v| match v {
        V::S(s) => s,
        V::I(i) => i.to_string(),
    }))
}

/// Serialises durations as `"<secs>s"`/`"<ms>ms"` in JSON dumps.
pub(super) mod duration_serde {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_millis() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        }
    }
}
