//! Value formats of admin result sets, as pgpool prints them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Local time as `YYYY-MM-DD HH:MM:SS` (pgpool's `%F %T`, in the server's time
/// zone). Falls back to UTC if the local time cannot be computed.
pub fn local_time(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as libc::time_t,
        // Before 1970 (a clock set wrong): shown as the epoch.
        Err(_) => 0,
    };
    // SAFETY: localtime_r only writes the `tm` we own; `secs` is a plain value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if ok {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    } else {
        // time_t is i64 on 64-bit Linux, i32 elsewhere.
        #[allow(clippy::useless_conversion)]
        utc_time(secs.into())
    }
}

/// [`local_time`], or an empty string for "never".
pub fn opt_local_time(t: Option<SystemTime>) -> String {
    t.map(local_time).unwrap_or_default()
}

/// UTC `YYYY-MM-DD HH:MM:SS` for seconds since the epoch (civil-from-days).
fn utc_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Milliseconds, as an integer (pgpool's `max_duration`, `min_duration`).
pub fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// pgpool's `%f`: six decimals.
pub fn f6(x: f64) -> String {
    format!("{x:.6}")
}

/// `replication_delay` in time: `%.6f second` below 2 s, `seconds` from 2 s,
/// as pgpool prints it.
pub fn delay_seconds(secs: f64) -> String {
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
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(1_614_438_619), "2021-02-27 15:10:19");
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
