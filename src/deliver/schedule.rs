//! The retry schedule: when the next attempt goes out, as one pure function.

use crate::plan::DeliverySettings;
use crate::store::Next;
use std::time::Duration;

/// After a 429 or a `Retry-After`, wait at least this long.
const MIN_BACKOFF_AFTER_THROTTLE: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is clamped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// Decides what follows failed attempt number `attempt` (1-based) of a delivery created at
/// `created_at`, failing at `now` (unix ms). `schedule[i]` is the wait before retry `i + 1`.
/// Jitter of ±20 % spreads retries so a recovering destination is not hit all at once.
pub fn next(
    schedule: &[Duration],
    attempt: u32,
    created_at: i64,
    now: i64,
    settings: &DeliverySettings,
    retry_after: Option<Duration>,
    retryable: bool,
) -> Next {
    if !retryable {
        return Next::Dead;
    }
    let Some(base) = schedule.get(attempt as usize - 1).copied() else {
        return Next::Dead;
    };
    let jitter = 0.8 + 0.4 * rand_unit();
    let mut wait = base.mul_f64(jitter);
    if let Some(ra) = retry_after {
        wait = wait
            .max(ra.min(MAX_RETRY_AFTER))
            .max(MIN_BACKOFF_AFTER_THROTTLE.min(ra));
    }
    let due_at = now + wait.as_millis() as i64;
    if due_at - created_at > settings.max_age.as_millis() as i64 {
        return Next::Dead;
    }
    Next::Retry { due_at }
}

/// Parses `Retry-After` as seconds (HTTP dates are rare from trackers and read as absent).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn rand_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() & 0xffff_ffff) as f64 / f64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DeliverySettings {
        DeliverySettings::default()
    }

    fn due(n: Next) -> i64 {
        match n {
            Next::Retry { due_at } => due_at,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn follows_the_schedule_with_jitter() {
        let s = settings();
        for attempt in 1..=s.retry.len() as u32 {
            let base = s.retry[attempt as usize - 1].as_millis() as i64;
            let d = due(next(&s.retry, attempt, 0, 0, &s, None, true));
            assert!(
                d >= base * 8 / 10 && d <= base * 12 / 10,
                "attempt {attempt}: {d} vs {base}"
            );
        }
        assert_eq!(
            next(&s.retry, s.retry.len() as u32 + 1, 0, 0, &s, None, true),
            Next::Dead
        );
    }

    #[test]
    fn refusals_are_not_retried() {
        let s = settings();
        assert_eq!(next(&s.retry, 1, 0, 0, &s, None, false), Next::Dead);
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let s = settings();
        let d = due(next(
            &s.retry,
            1,
            0,
            0,
            &s,
            Some(Duration::from_secs(120)),
            true,
        ));
        assert!(d >= 120_000);
        let d = due(next(
            &s.retry,
            1,
            0,
            0,
            &s,
            Some(Duration::from_secs(999_999)),
            true,
        ));
        assert!(d <= MAX_RETRY_AFTER.as_millis() as i64);
    }

    #[test]
    fn max_age_ends_retries() {
        let mut s = settings();
        s.max_age = Duration::from_secs(60);
        assert_eq!(next(&s.retry, 3, 0, 0, &s, None, true), Next::Dead);
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
