//! A log line that can fire thousands of times a second (a rejected share, a dropped share)
//! goes through a [`RateLimitedLog`]: the operator sees that it happens and how often, and the
//! log cannot be flooded by a peer.

use std::time::{Duration, Instant};

/// Lets one line through per second and counts the rest.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// `Some(lines suppressed since the last one)` when this one may be logged.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_rest_counted() {
        let mut log = RateLimitedLog::default();
        let t = Instant::now();
        assert_eq!(log.admit(t), Some(0));
        assert_eq!(log.admit(t + Duration::from_millis(10)), None);
        assert_eq!(log.admit(t + Duration::from_millis(999)), None);
        assert_eq!(log.admit(t + Duration::from_millis(1000)), Some(2));
        assert_eq!(log.admit(t + Duration::from_millis(2500)), Some(0));
    }
}
