//! Durations as people write them on command lines and in config files.

use std::time::Duration;

/// Parses `250ms`, `10s`, `2m`, `1h` or a bare number of seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a duration (try 500ms, 10s or 2m)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

/// Writes `d` the way [`parse`] reads it back: whole seconds as `10s`,
/// anything finer in milliseconds (`250ms`). For command-line defaults.
pub fn format(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_durations_read_back() {
        for d in [Duration::from_secs(10), Duration::from_millis(250), Duration::from_millis(1500), Duration::ZERO] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn durations_take_common_units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert!(parse("soon").is_err());
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse("5d").is_err());
        assert!(parse("-1s").is_err());
    }
}
