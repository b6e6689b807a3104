//! The dashboard's memory: the last hour as points, each the change over one sampling
//! interval of the cumulative counters (device seconds by use, requests, tokens, hashes), and
//! a one-minute window of finished requests for the live rates and latency quantiles. Pure
//! data: the telemetry task feeds it times and figures.

use std::collections::VecDeque;

use serde::Serialize;

/// Counters as they stand at one instant; the history stores their differences.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cumulative {
    /// Seconds since the Unix epoch.
    pub t: f64,
    pub serving_s: f64,
    pub deferred_s: f64,
    pub mining_s: f64,
    pub idle_s: f64,
    pub preempting_s: f64,
    pub hashes: u64,
    pub requests: u64,
    pub generated_tokens: u64,
    pub shares_accepted: u64,
}

/// One interval of the last hour.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// End of the interval, seconds since the Unix epoch.
    pub t: f64,
    /// Fractions of the interval the device spent serving, on deferred work (flex, batch),
    /// mining, idle (pre-empting counts as serving: a request is waiting for the device).
    pub serving: f64,
    pub deferred: f64,
    pub mining: f64,
    pub idle: f64,
    pub hashrate_hs: f64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub shares: u64,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p99: Option<f64>,
}

#[derive(Debug)]
pub struct History {
    capacity: usize,
    points: VecDeque<HistoryPoint>,
    last: Option<Cumulative>,
    /// (finish time, TTFT in seconds when the request produced a token).
    window: VecDeque<(f64, Option<f64>)>,
    window_s: f64,
}

/// Live figures over the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WindowFigures {
    pub requests_per_s: f64,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p99: Option<f64>,
    pub requests: usize,
}

impl History {
    /// Keeps `span_s` seconds of points taken every `interval_s`.
    pub fn new(interval_s: f64, span_s: f64) -> Self {
        Self {
            capacity: (span_s / interval_s.max(1e-3)).ceil().max(1.0) as usize,
            points: VecDeque::new(),
            last: None,
            window: VecDeque::new(),
            window_s: 60.0,
        }
    }

    /// A request finished at `t` (Unix seconds).
    pub fn record_request(&mut self, t: f64, ttft_s: Option<f64>) {
        self.window.push_back((t, ttft_s));
    }

    /// The one-minute window as of `now`.
    pub fn window(&mut self, now: f64) -> WindowFigures {
        while self
            .window
            .front()
            .is_some_and(|(t, _)| *t < now - self.window_s)
        {
            self.window.pop_front();
        }
        let ttfts: Vec<f64> = self.window.iter().filter_map(|(_, t)| *t).collect();
        let q = |p: f64| (!ttfts.is_empty()).then(|| crate::stats::quantile(&ttfts, p) * 1e3);
        WindowFigures {
            requests_per_s: self.window.len() as f64 / self.window_s,
            ttft_ms_p50: q(0.5),
            ttft_ms_p99: q(0.99),
            requests: self.window.len(),
        }
    }

    /// Adds the point for the interval that ends at `now`.
    pub fn sample(&mut self, now: Cumulative) {
        let window = self.window(now.t);
        let Some(last) = self.last.replace(now) else {
            return;
        };
        let dt = now.t - last.t;
        if dt <= 0.0 {
            return;
        }
        let serving = (now.serving_s - last.serving_s) + (now.preempting_s - last.preempting_s);
        let deferred = now.deferred_s - last.deferred_s;
        let mining = now.mining_s - last.mining_s;
        let idle = now.idle_s - last.idle_s;
        // Fractions of the time the arbiter accounted for (it may lag the wall clock by a tick).
        let total = serving + deferred + mining + idle;
        let share = |x: f64| if total > 0.0 { x / total } else { 0.0 };
        let (serving, deferred, mining, idle) =
            (share(serving), share(deferred), share(mining), share(idle));
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(HistoryPoint {
            t: now.t,
            serving,
            deferred,
            mining,
            idle,
            hashrate_hs: now.hashes.saturating_sub(last.hashes) as f64 / dt,
            requests_per_s: now.requests.saturating_sub(last.requests) as f64 / dt,
            tokens_per_s: now.generated_tokens.saturating_sub(last.generated_tokens) as f64 / dt,
            shares: now.shares_accepted.saturating_sub(last.shares_accepted),
            ttft_ms_p50: window.ttft_ms_p50,
            ttft_ms_p99: window.ttft_ms_p99,
        });
    }

    pub fn points(&self) -> Vec<HistoryPoint> {
        self.points.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: f64, serving: f64, mining: f64, idle: f64, hashes: u64, requests: u64) -> Cumulative {
        Cumulative {
            t,
            serving_s: serving,
            mining_s: mining,
            idle_s: idle,
            hashes,
            requests,
            ..Cumulative::default()
        }
    }

    #[test]
    fn points_are_the_differences_over_each_interval() {
        let mut h = History::new(5.0, 3600.0);
        h.sample(at(100.0, 0.0, 0.0, 0.0, 0, 0));
        assert!(h.points().is_empty(), "the first sample only sets the base");
        h.sample(at(105.0, 1.0, 3.0, 1.0, 3_000, 2));
        h.sample(at(110.0, 1.0, 8.0, 1.0, 8_000, 2));
        let p = h.points();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].serving, p[0].mining, p[0].idle), (0.2, 0.6, 0.2));
        assert_eq!(p[0].hashrate_hs, 600.0);
        assert_eq!(p[0].requests_per_s, 0.4);
        assert_eq!((p[1].serving, p[1].mining, p[1].idle), (0.0, 1.0, 0.0));
        assert_eq!(p[1].hashrate_hs, 1000.0);
    }

    #[test]
    fn an_hour_is_kept_and_older_points_drop_off() {
        let mut h = History::new(10.0, 60.0);
        for i in 0..20 {
            h.sample(at(i as f64 * 10.0, 0.0, i as f64 * 10.0, 0.0, 0, 0));
        }
        let p = h.points();
        assert_eq!(p.len(), 6);
        assert_eq!(p[0].t, 140.0);
        assert_eq!(p[5].t, 190.0);
    }

    #[test]
    fn the_window_gives_rates_and_ttft_quantiles_of_the_last_minute() {
        let mut h = History::new(5.0, 3600.0);
        h.record_request(0.0, Some(9.0)); // falls out of the window
        for i in 0..100 {
            h.record_request(100.0 + i as f64 * 0.1, Some((i + 1) as f64 / 1000.0));
        }
        h.record_request(111.0, None); // failed before its first token
        let w = h.window(120.0);
        assert_eq!(w.requests, 101);
        assert!((w.requests_per_s - 101.0 / 60.0).abs() < 1e-12);
        let p50 = w.ttft_ms_p50.unwrap();
        assert!((50.0..=51.0).contains(&p50), "{p50}");
        assert!(w.ttft_ms_p99.unwrap() >= 99.0);
        assert_eq!(h.window(500.0).ttft_ms_p50, None);
    }
}
