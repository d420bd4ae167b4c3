//! How the config file's values are read and printed: sizes (`65536` or `"64KiB"`), durations
//! (`"30s"`), counts, and values written as text (addresses, the bus), with the same bounds as
//! the command line's parsers.

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// A number, or text with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(i64),
    Text(String),
}

fn number_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<NumberOrText, D::Error> {
    NumberOrText::deserialize(d).map_err(|_| {
        serde::de::Error::custom("must be a number, or text like \"64KiB\" or \"30s\"")
    })
}

/// Bytes: a positive number, or text with a unit (`"256MiB"`).
pub mod bytes {
    use super::*;

    /// Reads one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match number_or_text(d)? {
            NumberOrText::Number(n) if n > 0 => Ok(Some(n as u64)),
            NumberOrText::Number(n) => Err(serde::de::Error::custom(format!(
                "`{n}`: must be at least 1 byte"
            ))),
            NumberOrText::Text(t) => wshost::units::bytes(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }

    /// Writes one as a number.
    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }
}

/// A count of at least 1.
pub mod count {
    use super::*;

    /// Reads one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        match number_or_text(d)? {
            NumberOrText::Number(n) if n > 0 => Ok(Some(n as usize)),
            NumberOrText::Number(n) => Err(serde::de::Error::custom(format!(
                "`{n}`: must be at least 1"
            ))),
            NumberOrText::Text(t) => wshost::units::size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }

    /// Writes one as a number.
    pub fn serialize<S: Serializer>(v: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n as u64),
            None => s.serialize_none(),
        }
    }
}

fn read_duration<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<Duration, String>,
) -> Result<Option<Duration>, D::Error> {
    match number_or_text(d)? {
        NumberOrText::Text(t) => parse(&t).map(Some).map_err(serde::de::Error::custom),
        NumberOrText::Number(n) => Err(serde::de::Error::custom(format!(
            "`{n}`: a duration needs a unit, like \"{n}s\" or \"{n}ms\""
        ))),
    }
}

fn write_duration<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// A duration (`"500ms"`, `"30s"`, `"0s"`).
pub mod duration {
    use super::*;

    /// Reads one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        read_duration(d, wshost::units::duration)
    }

    /// Writes one (`"30s"`).
    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        write_duration(v, s)
    }
}

/// A duration longer than zero.
pub mod nonzero_duration {
    use super::*;

    /// Reads one.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        read_duration(d, wshost::units::nonzero_duration)
    }

    /// Writes one (`"30s"`).
    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        write_duration(v, s)
    }
}

/// A value written as text and parsed with its `FromStr`.
pub mod from_str {
    use super::*;

    /// Reads one.
    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let text = String::deserialize(d)?;
        text.parse().map(Some).map_err(serde::de::Error::custom)
    }

    /// Writes one with its `Display`.
    pub fn serialize<S: Serializer, T: Display>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }
}

/// A list of [`from_str`] values.
pub mod from_str_list {
    use super::*;

    /// Reads one.
    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let items = Vec::<String>::deserialize(d)?;
        items
            .iter()
            .map(|t| {
                t.parse()
                    .map_err(|e| serde::de::Error::custom(format!("`{t}`: {e}")))
            })
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    /// Writes one with each item's `Display`.
    pub fn serialize<S: Serializer, T: Display>(
        v: &Option<Vec<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        match v {
            Some(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&item.to_string())?;
                }
                seq.end()
            }
            None => s.serialize_none(),
        }
    }
}
