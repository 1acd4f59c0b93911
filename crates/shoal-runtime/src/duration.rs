//! Durations people type (time limits, lifetimes, intervals): one parser
//! for the CLI and for Python (`_core.parse_duration`), so both take the
//! same spellings and refuse the same things.

use std::time::Duration;

/// The longest duration taken: a century. Past it no time limit or
/// lifetime means anything, and `Duration` arithmetic could overflow.
pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a number of seconds, nor numbers with units.
    #[error(
        "{0:?} is not a duration: use seconds (90, 2.5) or units such as 500ms, 90s, 10m, \
         1h30m, 2d"
    )]
    Syntax(String),
    /// Zero (or less).
    #[error("{0:?}: a duration must be above zero")]
    NotPositive(String),
    /// Past [`MAX`].
    #[error("{0:?} is longer than the longest duration taken (100 years)")]
    TooLong(String),
}

/// Seconds alone (`"90"`, `"2.5"`), or units as `humantime` reads them
/// (`"500ms"`, `"10m"`, `"1h30m"`, `"1h 30m"`, `"2d"`).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let bare = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let d = if bare {
        let secs: f64 = t.parse().map_err(|_| DurationError::Syntax(text.into()))?;
        if secs > MAX.as_secs_f64() {
            return Err(DurationError::TooLong(text.into()));
        }
        Duration::try_from_secs_f64(secs).map_err(|_| DurationError::Syntax(text.into()))?
    } else {
        humantime::parse_duration(t).map_err(|e| match e {
            humantime::DurationError::NumberOverflow => DurationError::TooLong(text.into()),
            _ => DurationError::Syntax(text.into()),
        })?
    };
    check(d, text)
}

/// A wait of `secs` seconds asked by a caller (a timeout): none for NaN or
/// less than zero, at most [`MAX`] (a longer one is as good as for ever).
/// Never panics, unlike `Duration::from_secs_f64`.
pub fn wait(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(secs).map_or(MAX, |d| d.min(MAX))
    }
}

/// As [`parse`], and "0" (or "0s") too: a grace period may be none.
pub fn parse_or_zero(text: &str) -> Result<Duration, DurationError> {
    match parse(text) {
        Err(DurationError::NotPositive(_)) => Ok(Duration::ZERO),
        other => other,
    }
}

/// A number of seconds from elsewhere (Python, a setting), checked as
/// [`parse`] checks a text.
pub fn from_secs(secs: f64) -> Result<Duration, DurationError> {
    let text = || secs.to_string();
    if !secs.is_finite() || secs > MAX.as_secs_f64() {
        return Err(if secs.is_nan() {
            DurationError::Syntax(text())
        } else if secs > 0.0 {
            DurationError::TooLong(text())
        } else {
            DurationError::NotPositive(text())
        });
    }
    if secs <= 0.0 {
        return Err(DurationError::NotPositive(text()));
    }
    check(Duration::from_secs_f64(secs), &text())
}

fn check(d: Duration, text: &str) -> Result<Duration, DurationError> {
    if d.is_zero() {
        Err(DurationError::NotPositive(text.into()))
    } else if d > MAX {
        Err(DurationError::TooLong(text.into()))
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(parse("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse(" 500ms ").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2.5s").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse("2d").unwrap(), Duration::from_secs(172_800));
    }

    #[test]
    fn waits_are_clamped_not_refused() {
        assert_eq!(wait(f64::NAN), Duration::ZERO);
        assert_eq!(wait(-1.0), Duration::ZERO);
        assert_eq!(wait(f64::NEG_INFINITY), Duration::ZERO);
        assert_eq!(wait(1.5), Duration::from_millis(1500));
        assert_eq!(wait(1e300), MAX);
        assert_eq!(wait(f64::INFINITY), MAX);
        assert_eq!(parse_or_zero("0").unwrap(), Duration::ZERO);
        assert!(parse_or_zero("-1").is_err());
    }

    #[test]
    fn refusals_never_panic() {
        for bad in [
            "", " ", "abc", "1x", "-5", "-5s", "1e400", "nan", "inf", "1.2.3", "ß", "1h30",
        ] {
            assert!(matches!(parse(bad), Err(DurationError::Syntax(_))), "{bad}");
        }
        for zero in ["0", "0s", "0.0"] {
            assert!(
                matches!(parse(zero), Err(DurationError::NotPositive(_))),
                "{zero}"
            );
        }
        for long in [
            "99999999999999999999d",
            "101y",
            "18446744073709551616",
            "1e30",
        ] {
            assert!(parse(long).is_err(), "{long}");
        }
        assert!(matches!(
            parse("99999999999999999999d"),
            Err(DurationError::TooLong(_))
        ));
        assert!(matches!(
            parse("18446744073709551616"),
            Err(DurationError::TooLong(_))
        ));
        for secs in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.0,
            1e300,
            1e30,
        ] {
            assert!(from_secs(secs).is_err(), "{secs}");
        }
        assert_eq!(from_secs(1.5).unwrap(), Duration::from_millis(1500));
        assert!(parse("abc").unwrap_err().to_string().contains("1h30m"));
    }
}
