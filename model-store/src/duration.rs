//! Duration text as written in configuration (`2ms`, `0.5s`), shared by policy files and the
//! server's command line so that both accept the same spellings and report the same errors.

use std::time::Duration;

/// Parses a non-negative decimal number followed by a unit, with surrounding whitespace
/// ignored: `us` (microseconds), `ms` (milliseconds), `s` (seconds) or `m` (minutes), e.g.
/// `500us`, `2ms`, `0.01s`, `2m`; a bare number is seconds (`1.5`), as command-line users
/// write it. Values outside `0..=max_seconds` are rejected, which lets each caller bound a
/// setting where it is read instead of after conversion.
///
/// The error is a message without location, for the caller to place (file and key, flag name).
///
/// # Panics
///
/// When `max_seconds` exceeds what a [`Duration`] can hold (such as `f64::INFINITY`) and the
/// text is that large; every finite bound below about 1.8e19 seconds is safe.
pub fn parse_duration(text: &str, max_seconds: f64) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("expected a duration like 500us, 2ms or 0.5s, got '{text}'"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" | "" => value,
        "m" => value * 60.0,
        _ => return Err(format!("expected a duration like 500us, 2ms or 0.5s, got '{text}'")),
    };
    if !(0.0..=max_seconds).contains(&seconds) {
        return Err(format!("expected a duration between 0 and {max_seconds}s, got '{text}'"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn every_unit_converts() {
        assert_eq!(parse_duration("500us", 1.0), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2ms", 1.0), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration(" 0.5s ", 1.0), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m", 3600.0), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn a_bare_number_is_seconds() {
        assert_eq!(parse_duration("2", 3600.0), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5", 3600.0), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn unknown_units_and_malformed_numbers_are_rejected() {
        for text in ["5h", "1e3s", "-1s", "ms", ""] {
            let err = parse_duration(text, 3600.0).unwrap_err();
            assert!(err.starts_with("expected a duration like 500us, 2ms or 0.5s"), "{text}: {err}");
        }
    }

    #[test]
    fn bound_is_inclusive() {
        assert_eq!(parse_duration("1s", 1.0), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s", 1.0), Err("expected a duration between 0 and 1s, got '1.5s'".to_owned()));
    }
}
