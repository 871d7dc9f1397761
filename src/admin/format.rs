//! Value formats of admin result sets, as pgpool prints them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Local time as `YYYY-MM-DD HH:MM:SS` (pgpool's `%F %T`, in the server's time
/// zone: `TZ`, else `/etc/localtime`, as `localtime(3)` finds it). UTC if the
/// time zone cannot be found.
pub(crate) fn local_time(t: SystemTime) -> String {
    time_in(t, &TimeZone::system())
}

/// [`local_time`], or an empty string for "never".
pub(crate) fn opt_local_time(t: Option<SystemTime>) -> String {
    t.map(local_time).unwrap_or_default()
}

/// `t` in whole seconds (a time before the epoch shows the epoch) in `tz`.
fn time_in(t: SystemTime, tz: &TimeZone) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let ts = i64::try_from(secs)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH);
    tz.to_datetime(ts).strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// Milliseconds, as an integer (pgpool's `max_duration`, `min_duration`).
pub(crate) fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// pgpool's `%f`: six decimals.
pub(crate) fn f6(x: f64) -> String {
    format!("{x:.6}")
}

/// `replication_delay` in time: `%.6f second` below 2 s, `seconds` from 2 s,
/// as pgpool prints it.
pub(crate) fn delay_seconds(secs: f64) -> String {
    let unit = if secs >= 2.0 { "seconds" } else { "second" };
    format!("{secs:.6} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_have_pgpool_shape() {
        let s = local_time(SystemTime::now());
        assert_eq!(s.len(), 19, "{s}");
        assert_eq!(&s[4..5], "-");
        assert_eq!(&s[10..11], " ");
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let utc = TimeZone::UTC;
        assert_eq!(time_in(UNIX_EPOCH, &utc), "1970-01-01 00:00:00");
        assert_eq!(time_in(at(1_614_438_619), &utc), "2021-02-27 15:10:19");
        // Sub-second parts are cut, not rounded; before the epoch is the epoch.
        let late = at(59) + Duration::from_millis(999);
        assert_eq!(time_in(late, &utc), "1970-01-01 00:00:59");
        let early = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(time_in(early, &utc), "1970-01-01 00:00:00");
        // A zone with daylight saving time, as a POSIX TZ rule (no tz database).
        let ny = TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap();
        assert_eq!(time_in(at(1_614_438_619), &ny), "2021-02-27 10:10:19");
        assert_eq!(time_in(at(1_625_000_000), &ny), "2021-06-29 16:53:20");
        assert_eq!(opt_local_time(None), "");
    }

    #[test]
    fn numbers_have_pgpool_shape() {
        assert_eq!(f6(0.5), "0.500000");
        assert_eq!(millis(Duration::from_micros(2500)), "2");
        assert_eq!(delay_seconds(0.25), "0.250000 second");
        assert_eq!(delay_seconds(3.0), "3.000000 seconds");
    }
}
