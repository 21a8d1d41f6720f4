//! Serde helpers for the Go stolon encoding: `omitempty` fields, `null` slices, ports written
//! as strings, Go `time.Duration` strings ("5s", "1m30s") and RFC 3339 timestamps.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `skip_serializing_if` for Go's `omitempty`: zero values are left out.
pub fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Go writes a nil slice or map as `null`; read it as the empty value.
pub fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A TCP port that Go stolon writes as a JSON string (`"5432"`); numbers are accepted too.
pub mod port {
    use super::*;

    pub fn serialize<S: Serializer>(p: &Option<u16>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_str(&p.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Num(n)) => u16::try_from(n)
                .map(Some)
                .map_err(|_| de::Error::custom(format!("port {n} out of range"))),
            Some(Raw::Str(s)) if s.is_empty() => Ok(None),
            Some(Raw::Str(s)) => s
                .parse::<u16>()
                .map(Some)
                .map_err(|_| de::Error::custom(format!("invalid port {s:?}"))),
        }
    }
}

/// A Go `time.Duration` as stolon writes it in the spec: a string such as "5s" or "1m30s".
/// Kept in signed nanoseconds because Go accepts negative durations (validation rejects them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub i64);

impl GoDuration {
    pub const fn from_secs(s: i64) -> Self {
        GoDuration(s * 1_000_000_000)
    }
    pub const fn from_millis(ms: i64) -> Self {
        GoDuration(ms * 1_000_000)
    }
    pub fn from_std(d: std::time::Duration) -> Self {
        GoDuration(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
    /// The duration as a std one; negative values clamp to zero.
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_nanos(u64::try_from(self.0).unwrap_or(0))
    }
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses Go's `time.ParseDuration` syntax: a sequence of decimal numbers with units
    /// ns, us (µs), ms, s, m, h, an optional sign; "0" alone is allowed.
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = || format!("invalid duration {s:?} (expected e.g. \"5s\", \"1m30s\", \"48h\")");
        let (neg, mut rest) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        if rest == "0" {
            return Ok(GoDuration(0));
        }
        if rest.is_empty() {
            return Err(err());
        }
        let mut total: f64 = 0.0;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(err)?;
            if num_end == 0 {
                return Err(err());
            }
            let value: f64 = rest[..num_end].parse().map_err(|_| err())?;
            rest = &rest[num_end..];
            let unit_end = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_end] {
                "ns" => 1.0,
                "us" | "µs" | "μs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => return Err(err()),
            };
            total += value * scale;
            rest = &rest[unit_end..];
        }
        if total > i64::MAX as f64 {
            return Err(err());
        }
        let n = total.round() as i64;
        Ok(GoDuration(if neg { -n } else { n }))
    }
}

impl fmt::Display for GoDuration {
    /// Formats like Go's `Duration.String()`: "0s", "1.5s", "100ms", "1m0s", "48h0m0s".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let mut u = self.0.unsigned_abs();
        let sign = if neg { "-" } else { "" };
        if u == 0 {
            return f.write_str("0s");
        }
        if u < 1_000_000_000 {
            let (unit, div) = match u {
                0..=999 => ("ns", 1),
                1_000..=999_999 => ("µs", 1_000),
                _ => ("ms", 1_000_000),
            };
            return write!(f, "{sign}{}{unit}", frac(u, div));
        }
        let h = u / 3_600_000_000_000;
        u -= h * 3_600_000_000_000;
        let m = u / 60_000_000_000;
        u -= m * 60_000_000_000;
        let s = frac(u, 1_000_000_000);
        match (h, m) {
            (0, 0) => write!(f, "{sign}{s}s"),
            (0, m) => write!(f, "{sign}{m}m{s}s"),
            (h, m) => write!(f, "{sign}{h}h{m}m{s}s"),
        }
    }
}

/// `v / div` with the fractional digits Go prints (trailing zeros trimmed).
fn frac(v: u64, div: u64) -> String {
    let whole = v / div;
    let rem = v % div;
    if rem == 0 {
        return whole.to_string();
    }
    let width = div.ilog10() as usize;
    let digits = format!("{rem:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GoDuration::parse(&s).map_err(de::Error::custom)
    }
}

/// Serde for a Go `time.Duration` written as an integer number of nanoseconds (ProxyInfo).
pub mod nanos {
    use super::*;
    pub fn serialize<S: Serializer>(d: &GoDuration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(d.0)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GoDuration, D::Error> {
        Ok(GoDuration(Option::<i64>::deserialize(d)?.unwrap_or(0)))
    }
}

/// An RFC 3339 timestamp, as Go's `time.Time` marshals (nanosecond precision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub OffsetDateTime);

impl Timestamp {
    pub fn now() -> Self {
        // The daemons' clock. The rules never call it: `decide` takes `now` as an argument.
        #[allow(clippy::disallowed_methods)]
        Timestamp(OffsetDateTime::now_utc())
    }

    /// `self + d`, saturating at the ends of the representable range.
    pub fn plus(self, d: GoDuration) -> Self {
        Timestamp(self.0.saturating_add(time::Duration::nanoseconds(d.0)))
    }

    /// How long after `earlier` this is (negative if before), in Go duration units.
    pub fn since(self, earlier: Timestamp) -> GoDuration {
        let nanos = (self.0 - earlier.0).whole_nanoseconds();
        GoDuration(nanos.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }

    /// Nanoseconds since the Unix epoch (for deterministic identifiers).
    pub fn unix_nanos(self) -> i128 {
        self.0.unix_timestamp_nanos()
    }
}

/// RFC 3339, as in the documents (for messages and `stolonctl status`).
impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(t) => f.write_str(&t),
            Err(_) => write!(f, "{:?}", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.0.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        OffsetDateTime::parse(&s, &Rfc3339)
            .map(Timestamp)
            .map_err(|e| de::Error::custom(format!("invalid timestamp {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_duration_parse_table() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("0s", 0),
            ("5s", 5_000_000_000),
            ("1m30s", 90_000_000_000),
            ("48h", 172_800_000_000_000),
            ("100ms", 100_000_000),
            ("1.5s", 1_500_000_000),
            ("2h45m", 9_900_000_000_000),
            ("-1s", -1_000_000_000),
            ("10us", 10_000),
            ("10µs", 10_000),
            ("7ns", 7),
        ];
        for (text, nanos) in cases {
            assert_eq!(GoDuration::parse(text), Ok(GoDuration(*nanos)), "{text}");
        }
        for bad in ["", "5", "s", "5x", "1..5s", "-", "5s3"] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} must fail");
        }
    }

    #[test]
    fn go_duration_formats_like_go() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (5_000_000_000, "5s"),
            (90_000_000_000, "1m30s"),
            (60_000_000_000, "1m0s"),
            (172_800_000_000_000, "48h0m0s"),
            (100_000_000, "100ms"),
            (1_500_000_000, "1.5s"),
            (-1_000_000_000, "-1s"),
            (1_500, "1.5µs"),
        ];
        for (nanos, text) in cases {
            assert_eq!(GoDuration(*nanos).to_string(), *text);
            assert_eq!(GoDuration::parse(text), Ok(GoDuration(*nanos)));
        }
    }

    #[test]
    fn timestamp_roundtrip_including_go_zero_time() {
        for s in [
            "0001-01-01T00:00:00Z",
            "2024-03-01T10:11:12.123456789Z",
            "2024-03-01T10:11:12+02:00",
        ] {
            let t: Timestamp = serde_json::from_str(&format!("\"{s}\"")).expect(s);
            let back = serde_json::to_string(&t).expect("serialize");
            let again: Timestamp = serde_json::from_str(&back).expect("reparse");
            assert_eq!(t, again);
        }
    }
}
