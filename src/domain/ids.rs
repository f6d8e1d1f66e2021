//! Identifier newtypes. Numeric ids are those of the platform's tables (`DeviceBulkChange`,
//! `M2M_DeviceChange`, tenants, service providers); ICCID and MSISDN are validated on parse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{kind} must be a positive integer, got {value}")]
    NotPositive { kind: &'static str, value: i64 },
    #[error("ICCID {0:?} is invalid: it must be 18 to 22 digits")]
    BadIccid(String),
    #[error("MSISDN {0:?} is invalid: it must be 6 to 15 digits, optionally with a leading '+'")]
    BadMsisdn(String),
}

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub struct $name(i64);

        impl $name {
            /// Accepts positive values only.
            pub fn new(value: i64) -> Result<Self, Error> {
                if value > 0 {
                    Ok(Self(value))
                } else {
                    Err(Error::NotPositive { kind: $kind, value })
                }
            }

            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = Error;
            fn try_from(value: i64) -> Result<Self, Error> {
                Self::new(value)
            }
        }

        impl From<$name> for i64 {
            fn from(id: $name) -> i64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                let value = s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| Error::NotPositive { kind: $kind, value: 0 })?;
                Self::new(value)
            }
        }
    };
}

numeric_id!(
    /// `DeviceBulkChange.id`: one bulk change, one event stream.
    BulkChangeId,
    "bulk_change_id"
);
numeric_id!(
    /// `M2M_DeviceChange.id`: identifies a device inside a bulk change.
    DeviceChangeId,
    "device_change_id"
);
numeric_id!(
    /// The platform tenant that owns the bulk change.
    TenantId,
    "tenant_id"
);
numeric_id!(
    /// The service provider whose carrier credentials are used.
    ServiceProviderId,
    "service_provider_id"
);

/// Up to `N` ASCII digits kept inline (no heap allocation): a million ICCIDs cost their
/// bytes, not a `String` each. Compared, ordered and hashed as the text.
#[derive(Clone, Copy)]
struct Digits<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> Digits<N> {
    /// `text` must be ASCII of at most `N` bytes (checked by the callers' parse).
    fn new(text: &str) -> Self {
        let mut bytes = [0; N];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Self {
            len: text.len() as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored (see `new`'s callers).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl<const N: usize> PartialEq for Digits<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl<const N: usize> Eq for Digits<N> {}

impl<const N: usize> PartialOrd for Digits<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Ord for Digits<N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl<const N: usize> std::hash::Hash for Digits<N> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl<const N: usize> fmt::Debug for Digits<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A SIM's ICCID: 18 to 22 decimal digits (kept inline: 23 bytes, no allocation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Iccid(Digits<22>);

impl Iccid {
    pub fn parse(value: &str) -> Result<Self, Error> {
        let ok = (18..=22).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
        if ok {
            Ok(Self(Digits::new(value)))
        } else {
            Err(Error::BadIccid(truncate(value)))
        }
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for Iccid {
    type Error = Error;
    fn try_from(value: String) -> Result<Self, Error> {
        Self::parse(&value)
    }
}

impl From<Iccid> for String {
    fn from(id: Iccid) -> String {
        id.as_str().to_string()
    }
}

impl fmt::Display for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subscriber number: 6 to 15 digits (E.164), an optional leading `+` is dropped (kept
/// inline: 16 bytes, no allocation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Msisdn(Digits<15>);

impl Msisdn {
    pub fn parse(value: &str) -> Result<Self, Error> {
        let digits = value.strip_prefix('+').unwrap_or(value);
        let ok = (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
        if ok {
            Ok(Self(Digits::new(digits)))
        } else {
            Err(Error::BadMsisdn(truncate(value)))
        }
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for Msisdn {
    type Error = Error;
    fn try_from(value: String) -> Result<Self, Error> {
        Self::parse(&value)
    }
}

impl From<Msisdn> for String {
    fn from(id: Msisdn) -> String {
        id.as_str().to_string()
    }
}

impl fmt::Display for Msisdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error messages quote the offending value; keep hostile input from flooding them.
fn truncate(value: &str) -> String {
    const MAX: usize = 40;
    if value.chars().count() <= MAX {
        value.to_string()
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iccids_and_msisdns_are_kept_inline_and_behave_as_their_text() {
        assert_eq!(std::mem::size_of::<Iccid>(), 23);
        assert_eq!(std::mem::size_of::<Msisdn>(), 16);
        let a = Iccid::parse("8901260882310000002").unwrap();
        let b = Iccid::parse("89012608823100000010").unwrap();
        // Ordered as text (a shorter one is not smaller for being shorter).
        assert_eq!(a.cmp(&b), a.as_str().cmp(b.as_str()));
        assert!(b < a);
        assert_eq!(format!("{a:?}"), r#"Iccid("8901260882310000002")"#);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, r#""89012608823100000010""#);
        assert_eq!(serde_json::from_str::<Iccid>(&json).unwrap(), b);
        let longest = "9".repeat(22);
        assert_eq!(Iccid::parse(&longest).unwrap().as_str(), longest);
        let m = Msisdn::parse("+123456789012345").unwrap();
        assert_eq!(m.as_str(), "123456789012345");
        assert_eq!(String::from(m.clone()), "123456789012345");
        assert_ne!(m, Msisdn::parse("12345678901234").unwrap());
        let mut set = std::collections::HashSet::new();
        assert!(set.insert(a.clone()));
        assert!(!set.insert(Iccid::parse("8901260882310000002").unwrap()));
    }

    #[test]
    fn iccid_accepts_digits_of_valid_length_only() {
        assert!(Iccid::parse("8901260882310000001").is_ok());
        assert_eq!(
            Iccid::parse("89012608823100000x1"),
            Err(Error::BadIccid("89012608823100000x1".into()))
        );
        assert!(Iccid::parse("123").is_err());
        assert!(Iccid::parse(&"8".repeat(23)).is_err());
    }

    #[test]
    fn msisdn_drops_plus_and_rejects_letters() {
        assert_eq!(Msisdn::parse("+15550001").unwrap().as_str(), "15550001");
        assert!(Msisdn::parse("555-0001").is_err());
    }

    #[test]
    fn numeric_ids_reject_zero_and_negatives() {
        assert_eq!(
            BulkChangeId::new(0),
            Err(Error::NotPositive {
                kind: "bulk_change_id",
                value: 0
            })
        );
        assert!(serde_json::from_str::<DeviceChangeId>("-4").is_err());
        assert_eq!(serde_json::from_str::<TenantId>("7").unwrap().get(), 7);
    }

    #[test]
    fn long_bad_values_are_truncated_in_errors() {
        let err = Iccid::parse(&"x".repeat(10_000)).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }
}
