//! The arbiter's policy as a pure state machine: [`step`] takes the state, an event and the
//! time, and returns what to do. No clocks, threads or tokio: the shell around it supplies
//! time in microseconds and carries out the actions.
//!
//! Three classes of work share the device. Interactive requests always win; deferred work
//! (flex requests, batch lines) runs in their gaps, and the engine itself keeps the two apart;
//! mining runs only while neither is queued or running, after the engine has been idle for the
//! grace period, while the pool has work, under the duty cap.

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An HTTP request was accepted (the fast path has already raised the miner's flag).
    RequestAdmitted,
    /// The engine has interactive work (queued or running).
    EngineBusy,
    /// The engine has no interactive work.
    EngineIdle,
    /// The engine has deferred work (flex requests, batch lines), queued or running.
    DeferredBusy,
    /// The engine has no deferred work.
    DeferredIdle,
    /// The miner acknowledged a pre-emption: every worker has stopped.
    MinerStopped,
    /// The miner failed; retry after a pause.
    MinerError,
    /// The pool has no valid job for us (disconnected, or not yet subscribed).
    PoolNoWork,
    PoolHasWork,
    /// Time passed.
    Tick,
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    StartMining,
    PreemptMining,
}

/// The knobs, in microseconds and fractions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    pub mining_enabled: bool,
    /// How long the engine must be idle before mining resumes.
    pub idle_grace_us: u64,
    /// Largest fraction of wall time spent mining, over `duty_window_us`.
    pub max_duty: f64,
    pub duty_window_us: u64,
    /// Pause after a miner error before trying again.
    pub error_backoff_us: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mining_enabled: true,
            idle_grace_us: 100_000,
            max_duty: 1.0,
            duty_window_us: 10_000_000,
            error_backoff_us: 5_000_000,
        }
    }
}

/// Who has the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    NotMining,
    Mining,
    /// Asked to stop; waiting for the miner's acknowledgement.
    Preempting,
}

/// Seconds of wall time by what the device was doing, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeSplit {
    pub serving_us: u64,
    /// Deferred work (flex, batch) with no interactive work.
    pub deferred_us: u64,
    pub mining_us: u64,
    pub idle_us: u64,
    pub preempting_us: u64,
}

#[derive(Debug, Clone)]
pub struct PolicyState {
    pub cfg: PolicyConfig,
    pub phase: Phase,
    engine_busy: bool,
    deferred_busy: bool,
    pool_has_work: bool,
    /// When the engine last became idle (no work of either class).
    idle_since_us: Option<u64>,
    retry_after_us: u64,
    window_start_us: u64,
    mined_in_window_us: u64,
    last_us: u64,
    pub time: TimeSplit,
    pub preemptions: u64,
}

impl PolicyState {
    pub fn new(cfg: PolicyConfig, now_us: u64) -> Self {
        Self {
            cfg,
            phase: Phase::NotMining,
            engine_busy: false,
            deferred_busy: false,
            pool_has_work: false,
            idle_since_us: Some(now_us),
            retry_after_us: 0,
            window_start_us: now_us,
            mined_in_window_us: 0,
            last_us: now_us,
            time: TimeSplit::default(),
            preemptions: 0,
        }
    }

    pub fn engine_busy(&self) -> bool {
        self.engine_busy
    }

    pub fn deferred_busy(&self) -> bool {
        self.deferred_busy
    }

    /// Marks the end of some work: the grace period starts once neither class has any.
    fn work_ended(&mut self, now: u64) {
        if !self.engine_busy && !self.deferred_busy && self.idle_since_us.is_none() {
            self.idle_since_us = Some(now);
        }
    }

    fn duty_exhausted(&self) -> bool {
        self.cfg.max_duty < 1.0
            && self.mined_in_window_us as f64 >= self.cfg.max_duty * self.cfg.duty_window_us as f64
    }

    fn may_mine(&self, now: u64) -> bool {
        self.cfg.mining_enabled
            && !self.engine_busy
            && !self.deferred_busy
            && self.pool_has_work
            && now >= self.retry_after_us
            && self
                .idle_since_us
                .is_some_and(|t| now.saturating_sub(t) >= self.cfg.idle_grace_us)
            && !self.duty_exhausted()
    }

    /// Charges the time since the last step to whatever the device was doing.
    fn account(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last_us);
        self.last_us = now.max(self.last_us);
        let slot = match (self.phase, self.engine_busy, self.deferred_busy) {
            (Phase::Preempting, _, _) => &mut self.time.preempting_us,
            (_, true, _) => &mut self.time.serving_us,
            (_, false, true) => &mut self.time.deferred_us,
            (Phase::Mining, false, false) => &mut self.time.mining_us,
            (Phase::NotMining, false, false) => &mut self.time.idle_us,
        };
        *slot += dt;
        if self.phase == Phase::Mining {
            self.mined_in_window_us += dt;
        }
        if now.saturating_sub(self.window_start_us) >= self.cfg.duty_window_us {
            self.window_start_us = now;
            self.mined_in_window_us = 0;
        }
    }

    fn preempt(&mut self) -> Vec<Action> {
        if self.phase == Phase::Mining {
            self.phase = Phase::Preempting;
            self.preemptions += 1;
            vec![Action::PreemptMining]
        } else {
            vec![]
        }
    }
}

/// Applies `event` at time `now_us` and returns the actions to take.
pub fn step(s: &mut PolicyState, event: Event, now_us: u64) -> Vec<Action> {
    s.account(now_us);
    let mut out = match event {
        Event::RequestAdmitted | Event::EngineBusy => {
            s.engine_busy = true;
            s.idle_since_us = None;
            s.preempt()
        }
        Event::EngineIdle => {
            s.engine_busy = false;
            s.work_ended(now_us);
            vec![]
        }
        Event::DeferredBusy => {
            s.deferred_busy = true;
            s.idle_since_us = None;
            s.preempt()
        }
        Event::DeferredIdle => {
            s.deferred_busy = false;
            s.work_ended(now_us);
            vec![]
        }
        Event::MinerStopped => {
            if s.phase == Phase::Preempting {
                s.phase = Phase::NotMining;
            }
            vec![]
        }
        Event::MinerError => {
            s.retry_after_us = now_us + s.cfg.error_backoff_us;
            s.phase = Phase::NotMining;
            vec![]
        }
        Event::PoolNoWork => {
            s.pool_has_work = false;
            s.preempt()
        }
        Event::PoolHasWork => {
            s.pool_has_work = true;
            vec![]
        }
        Event::Tick => {
            if s.phase == Phase::Mining && (s.duty_exhausted() || !s.cfg.mining_enabled) {
                s.preempt()
            } else {
                vec![]
            }
        }
    };
    if out.is_empty() && s.phase == Phase::NotMining && s.may_mine(now_us) {
        s.phase = Phase::Mining;
        out.push(Action::StartMining);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn ready(cfg: PolicyConfig) -> PolicyState {
        let mut s = PolicyState::new(cfg, 0);
        step(&mut s, Event::PoolHasWork, 0);
        s
    }

    #[test]
    fn mines_after_the_grace_period_and_not_before() {
        let mut s = ready(PolicyConfig::default());
        assert_eq!(step(&mut s, Event::Tick, 50 * MS), vec![]);
        assert_eq!(
            step(&mut s, Event::Tick, 100 * MS),
            vec![Action::StartMining]
        );
        assert_eq!(s.phase, Phase::Mining);
        assert_eq!(
            step(&mut s, Event::Tick, 101 * MS),
            vec![],
            "no second start"
        );
    }

    #[test]
    fn a_burst_of_requests_pre_empts_once_and_mining_waits_for_the_last() {
        let mut s = ready(PolicyConfig::default());
        step(&mut s, Event::Tick, 200 * MS);
        assert_eq!(
            step(&mut s, Event::RequestAdmitted, 300 * MS),
            vec![Action::PreemptMining]
        );
        for t in [301, 302, 303] {
            assert_eq!(
                step(&mut s, Event::RequestAdmitted, t * MS),
                vec![],
                "already pre-empting"
            );
        }
        assert_eq!(step(&mut s, Event::MinerStopped, 300 * MS + 40), vec![]);
        assert_eq!(s.phase, Phase::NotMining);
        assert_eq!(step(&mut s, Event::EngineBusy, 304 * MS), vec![]);
        assert_eq!(
            step(&mut s, Event::Tick, 900 * MS),
            vec![],
            "busy engine: no mining"
        );
        step(&mut s, Event::EngineIdle, 1000 * MS);
        assert_eq!(step(&mut s, Event::Tick, 1050 * MS), vec![]);
        assert_eq!(
            step(&mut s, Event::Tick, 1100 * MS),
            vec![Action::StartMining]
        );
        assert_eq!(s.preemptions, 1);
    }

    #[test]
    fn a_request_during_the_grace_period_restarts_it() {
        let mut s = ready(PolicyConfig::default());
        step(&mut s, Event::EngineBusy, 10 * MS);
        step(&mut s, Event::EngineIdle, 20 * MS);
        step(&mut s, Event::RequestAdmitted, 90 * MS);
        step(&mut s, Event::EngineIdle, 100 * MS);
        assert_eq!(
            step(&mut s, Event::Tick, 150 * MS),
            vec![],
            "grace counts from the last idle"
        );
        assert_eq!(
            step(&mut s, Event::Tick, 200 * MS),
            vec![Action::StartMining]
        );
    }

    #[test]
    fn a_miner_error_pauses_mining_then_retries() {
        let mut s = ready(PolicyConfig::default());
        step(&mut s, Event::Tick, 100 * MS);
        assert_eq!(step(&mut s, Event::MinerError, 200 * MS), vec![]);
        assert_eq!(s.phase, Phase::NotMining);
        assert_eq!(step(&mut s, Event::Tick, 1000 * MS), vec![]);
        assert_eq!(
            step(&mut s, Event::Tick, 5200 * MS),
            vec![Action::StartMining]
        );
    }

    #[test]
    fn no_work_from_the_pool_means_no_mining() {
        let mut s = PolicyState::new(PolicyConfig::default(), 0);
        assert_eq!(step(&mut s, Event::Tick, 500 * MS), vec![], "no job yet");
        assert_eq!(
            step(&mut s, Event::PoolHasWork, 600 * MS),
            vec![Action::StartMining]
        );
        assert_eq!(
            step(&mut s, Event::PoolNoWork, 700 * MS),
            vec![Action::PreemptMining]
        );
        step(&mut s, Event::MinerStopped, 701 * MS);
        assert_eq!(step(&mut s, Event::Tick, 900 * MS), vec![]);
    }

    #[test]
    fn the_duty_cap_limits_mining_time_per_window() {
        let cfg = PolicyConfig {
            max_duty: 0.25,
            duty_window_us: 1000 * MS,
            idle_grace_us: 0,
            ..PolicyConfig::default()
        };
        let mut s = PolicyState::new(cfg, 0);
        assert_eq!(
            step(&mut s, Event::PoolHasWork, 0),
            vec![Action::StartMining],
            "no grace: at once"
        );
        assert_eq!(step(&mut s, Event::Tick, 200 * MS), vec![]);
        assert_eq!(
            step(&mut s, Event::Tick, 250 * MS),
            vec![Action::PreemptMining]
        );
        step(&mut s, Event::MinerStopped, 251 * MS);
        assert_eq!(
            step(&mut s, Event::Tick, 600 * MS),
            vec![],
            "cap reached for this window"
        );
        assert_eq!(
            step(&mut s, Event::Tick, 1000 * MS),
            vec![Action::StartMining],
            "new window"
        );
        assert_eq!(s.time.mining_us, 250 * MS);
    }

    #[test]
    fn disabled_mining_never_starts_and_time_is_split() {
        let mut s = ready(PolicyConfig {
            mining_enabled: false,
            ..PolicyConfig::default()
        });
        assert_eq!(step(&mut s, Event::Tick, 1000 * MS), vec![]);
        step(&mut s, Event::EngineBusy, 1000 * MS);
        step(&mut s, Event::EngineIdle, 3000 * MS);
        step(&mut s, Event::Tick, 3500 * MS);
        assert_eq!(
            s.time,
            TimeSplit {
                serving_us: 2000 * MS,
                deferred_us: 0,
                mining_us: 0,
                idle_us: 1500 * MS,
                preempting_us: 0
            }
        );
    }

    #[test]
    fn deferred_work_pre_empts_mining_and_mining_waits_for_both_classes() {
        let mut s = ready(PolicyConfig::default());
        assert_eq!(
            step(&mut s, Event::Tick, 100 * MS),
            vec![Action::StartMining]
        );
        assert_eq!(
            step(&mut s, Event::DeferredBusy, 200 * MS),
            vec![Action::PreemptMining],
            "a batch line beats the miner"
        );
        step(&mut s, Event::MinerStopped, 201 * MS);
        step(&mut s, Event::EngineBusy, 300 * MS);
        step(&mut s, Event::EngineIdle, 400 * MS);
        assert_eq!(
            step(&mut s, Event::Tick, 900 * MS),
            vec![],
            "interactive done, deferred still busy: no mining"
        );
        step(&mut s, Event::DeferredIdle, 1000 * MS);
        assert_eq!(
            step(&mut s, Event::Tick, 1050 * MS),
            vec![],
            "grace counts from the end of the deferred work"
        );
        assert_eq!(
            step(&mut s, Event::Tick, 1100 * MS),
            vec![Action::StartMining]
        );
    }

    #[test]
    fn deferred_idle_while_interactive_runs_keeps_the_miner_off() {
        let mut s = ready(PolicyConfig::default());
        step(&mut s, Event::DeferredBusy, 0);
        step(&mut s, Event::EngineBusy, 10 * MS);
        step(&mut s, Event::DeferredIdle, 20 * MS);
        assert_eq!(step(&mut s, Event::Tick, 500 * MS), vec![]);
        step(&mut s, Event::EngineIdle, 600 * MS);
        assert_eq!(step(&mut s, Event::Tick, 650 * MS), vec![]);
        assert_eq!(
            step(&mut s, Event::Tick, 700 * MS),
            vec![Action::StartMining]
        );
    }

    #[test]
    fn device_time_splits_into_serving_deferred_mining_and_idle() {
        let mut s = ready(PolicyConfig::default());
        step(&mut s, Event::Tick, 100 * MS); // idle 100 ms, then mining starts
        step(&mut s, Event::DeferredBusy, 300 * MS); // mining 200 ms
        step(&mut s, Event::MinerStopped, 310 * MS); // pre-empting 10 ms
        step(&mut s, Event::EngineBusy, 500 * MS); // deferred 190 ms
        step(&mut s, Event::EngineIdle, 800 * MS); // serving 300 ms (deferred waits)
        step(&mut s, Event::DeferredIdle, 1000 * MS); // deferred 200 ms
        step(&mut s, Event::Tick, 1050 * MS); // idle 50 ms
        assert_eq!(
            s.time,
            TimeSplit {
                serving_us: 300 * MS,
                deferred_us: 390 * MS,
                mining_us: 200 * MS,
                idle_us: 150 * MS,
                preempting_us: 10 * MS,
            }
        );
    }

    #[test]
    fn the_pool_losing_work_while_deferred_runs_changes_nothing_for_the_engine() {
        let mut s = ready(PolicyConfig::default());
        step(&mut s, Event::DeferredBusy, 0);
        assert_eq!(
            step(&mut s, Event::PoolNoWork, 10 * MS),
            vec![],
            "not mining"
        );
        step(&mut s, Event::DeferredIdle, 20 * MS);
        assert_eq!(
            step(&mut s, Event::Tick, 500 * MS),
            vec![],
            "no work from the pool"
        );
        assert_eq!(
            step(&mut s, Event::PoolHasWork, 600 * MS),
            vec![Action::StartMining]
        );
    }
}
