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
