//! Parsing of the sizes and durations of settings (flags, environment, config file), with the
//! bounds every one of them must respect.

use std::time::Duration;

/// The longest duration any setting may have (a year): longer ones would overflow the clock
/// arithmetic of connections.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A duration of at most [`MAX_DURATION`] (longer ones would overflow the
/// clock arithmetic of every connection).
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}`: {e} (e.g. 500ms, 5s, 1m)"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "`{s}` is too long: at most {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// A [`duration`] that is not zero.
pub fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err(format!("`{s}`: must be longer than zero")),
        d => Ok(d),
    }
}

/// A size or count of at least 1.
pub fn size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(format!("`{s}`: must be at least 1")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}`: {e} (a whole number of at least 1)")),
    }
}

/// As [`size`], as a `u64`.
pub fn size_u64(s: &str) -> Result<u64, String> {
    size(s).map(|n| n as u64)
}

/// A number of bytes of at least 1, with an optional unit: `256MiB`, `64KiB`, `1GiB`, `512kB`,
/// `10MB`, `1GB` (the SI ones are powers of ten), or none (bytes).
pub fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (B, KiB, MiB, GiB, kB, MB or GB)"
            ))
        }
    };
    match num.parse::<u64>() {
        Ok(0) => Err(format!("`{s}`: must be at least 1")),
        Ok(n) => n
            .checked_mul(mult)
            .ok_or_else(|| format!("`{s}`: too large")),
        Err(e) => Err(format!("`{s}`: {e} (a whole number with an optional unit)")),
    }
}

#[cfg(test)]
mod bytes_tests {
    #[test]
    fn sizes_with_units() {
        assert_eq!(super::bytes("256MiB"), Ok(256 << 20));
        assert_eq!(super::bytes("10 MB"), Ok(10_000_000));
        assert_eq!(super::bytes("4096"), Ok(4096));
        assert!(super::bytes("0MiB").is_err());
        assert!(super::bytes("5 parsecs").is_err());
    }
}

/// `d` in milliseconds, rounded to a tenth, as log lines show durations (`24.1`, not
/// `24.067974999999997`).
pub fn log_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

#[cfg(test)]
mod log_ms_tests {
    use super::*;

    #[test]
    fn milliseconds_are_rounded_to_a_tenth() {
        assert_eq!(log_ms(Duration::from_nanos(24_067_974)).to_string(), "24.1");
        assert_eq!(log_ms(Duration::from_micros(2_000_040)).to_string(), "2000");
        assert_eq!(log_ms(Duration::ZERO).to_string(), "0");
    }
}
