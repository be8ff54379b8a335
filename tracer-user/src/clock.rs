//! Kernel timestamps (CLOCK_MONOTONIC, what bpf_ktime_get_ns returns) to wall-clock RFC 3339.
use std::time::{SystemTime, UNIX_EPOCH};

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Monotonic nanoseconds now, comparable with kernel event timestamps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, sampled at start.
    offset_ns: i128,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    /// Unix nanoseconds of a monotonic kernel timestamp.
    pub fn unix_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        rfc3339(self.unix_ns(mono_ns))
    }
}

pub fn now_rfc3339() -> String {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    rfc3339(ns)
}

/// `2026-11-25T12:00:00.123456Z` from Unix nanoseconds.
pub fn rfc3339(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let micros = (unix_ns.rem_euclid(1_000_000_000) / 1000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    // By hand into a fixed buffer: this runs once per event and `format!` (and even a
    // digit loop with `pow`) was a measurable part of encoding.
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], y.rem_euclid(10_000) as u32);
    put_digits(&mut out[5..7], m);
    put_digits(&mut out[8..10], d);
    put_digits(&mut out[11..13], sod / 3600);
    put_digits(&mut out[14..16], (sod / 60) % 60);
    put_digits(&mut out[17..19], sod % 60);
    put_digits(&mut out[20..26], micros);
    // Only ASCII digits and separators were written.
    String::from_utf8_lossy(&out).into_owned()
}

/// `v` as exactly `dst.len()` decimal digits, zero-padded (higher digits cut).
fn put_digits(dst: &mut [u8], mut v: u32) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59.5Z (leap day)
        assert_eq!(
            rfc3339(1_709_251_199_500_000_000),
            "2024-02-29T23:59:59.500000Z"
        );
        assert_eq!(
            rfc3339(1_795_597_200_000_001_000),
            "2026-11-25T09:00:00.000001Z"
        );
    }

    #[test]
    fn kernel_timestamps_land_near_now() {
        let c = Clock::new();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        assert!((c.unix_ns(monotonic_ns()) - now).abs() < 1_000_000_000);
    }
}
