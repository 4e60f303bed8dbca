//! Integers as JSON Schema counts them: `3` and `3.0` alike. Clients that build bodies from a
//! schema (and some JSON encoders) send integral floats; serde's integer types would refuse
//! them while the published schema accepts them.

use serde::{Deserialize, Deserializer, de::Error};
use serde_json::Number;

/// The integer a JSON number stands for, if it is one (`3.0` is; `3.5` and `-1` are not).
pub fn integer(n: &Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn opt_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => integer(&n)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a non-negative integer, got {n}"))),
    }
}

/// An optional `u32`, integral floats included.
pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_integer(d)?
        .map(|v| u32::try_from(v).map_err(|_| D::Error::custom(format!("{v} is too large"))))
        .transpose()
}

/// An optional `u64`, integral floats included.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    opt_integer(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "opt_u32")]
        n: Option<u32>,
    }

    #[test]
    fn integral_floats_are_integers_and_others_are_not() {
        let n = |s: &str| serde_json::from_str::<T>(s).map(|t| t.n);
        assert_eq!(n(r#"{"n": 3}"#).unwrap(), Some(3));
        assert_eq!(n(r#"{"n": 3.0}"#).unwrap(), Some(3));
        assert_eq!(n(r#"{"n": null}"#).unwrap(), None);
        assert_eq!(n(r#"{}"#).unwrap(), None);
        assert!(n(r#"{"n": 3.5}"#).is_err());
        assert!(n(r#"{"n": -1}"#).is_err());
        assert!(n(r#"{"n": 4294967296}"#).is_err());
    }
}
