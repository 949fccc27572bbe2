//! Timestamps for people: both CLIs print Unix milliseconds as UTC dates.

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS` in UTC (proleptic Gregorian, no leap
/// seconds), without pulling a date crate into either binary.
pub fn utc_datetime(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc_datetime(1_795_795_074_459), "2026-11-27 15:57:54");
        assert_eq!(utc_datetime(-1), "1969-12-31 23:59:59");
    }
}
