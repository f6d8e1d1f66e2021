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

/// A SIM's ICCID: 18 to 22 decimal digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Iccid(String);

impl Iccid {
    pub fn parse(value: &str) -> Result<Self, Error> {
        let ok = (18..=22).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
        if ok {
            Ok(Self(value.to_string()))
        } else {
            Err(Error::BadIccid(truncate(value)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
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
        id.0
    }
}

impl fmt::Display for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subscriber number: 6 to 15 digits (E.164), an optional leading `+` is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Msisdn(String);

impl Msisdn {
    pub fn parse(value: &str) -> Result<Self, Error> {
        let digits = value.strip_prefix('+').unwrap_or(value);
        let ok = (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
        if ok {
            Ok(Self(digits.to_string()))
        } else {
            Err(Error::BadMsisdn(truncate(value)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
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
        id.0
    }
}

impl fmt::Display for Msisdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
