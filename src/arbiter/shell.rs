//! The arbiter's thin async shell: every millisecond it turns what it observes (requests in
//! flight, the engine's busy flag, the pool connection, the miner's acknowledgement) into
//! policy events, carries out the policy's actions, and publishes a status snapshot.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::gate::DeviceGate;
use super::policy::{step, Action, Event, Phase, PolicyConfig, PolicyState};
use crate::engine::{EngineStats, ServiceTier};
use crate::mining::{monotonic_ns, Miner};
use crate::stratum::client::ClientStats;

/// What the arbiter watches and drives.
pub struct ArbiterParts {
    pub gate: Arc<DeviceGate>,
    /// Each chat model's engine counters, once it has loaded: any busy engine keeps the
    /// miner off.
    pub engines: Vec<watch::Receiver<Option<Arc<EngineStats>>>>,
    pub miner: Arc<dyn Miner>,
    pub pool: Arc<ClientStats>,
    /// Shown in the status: the pool's address (never its password) and whether it pays.
    pub pool_label: String,
    pub local_pool: bool,
    /// Operator's switch: mining allowed at all (benchmarks turn it off).
    pub enabled: watch::Receiver<bool>,
    /// The profit switch (`--mine-when profitable`): false while mining does not pay.
    pub profitable: watch::Receiver<bool>,
    /// Where each pre-emption's latency is observed for `/metrics`.
    pub preempt_latency: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// What a miner's pre-emption figure (flag raised → last worker stopped) measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptFigure {
    /// A GPU kernel's yield: inference waits for it, so it is the pre-emption latency.
    Preemption,
    /// The CPU miner's stop. Its threads run under `SCHED_IDLE`, so the kernel hands their
    /// cores to an engine thread the moment one is runnable: inference does not wait for it.
    /// The figure is how long a starved miner thread takes to notice, not harm to inference.
    CpuMinerStop,
}

impl PreemptFigure {
    /// By the miner's backend ("cpu", "cuda", "cpu-grid"). The CPU grid runs the CUDA
    /// kernel's logic on ordinary threads as the GPU's stand-in, and is reported as the GPU.
    pub fn of_backend(backend: &str) -> Self {
        match backend {
            "cpu" => PreemptFigure::CpuMinerStop,
            _ => PreemptFigure::Preemption,
        }
    }

    /// The name in `/v1/status` (`preempt_measures`) and the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            PreemptFigure::Preemption => "preemption_latency",
            PreemptFigure::CpuMinerStop => "cpu_miner_stop",
        }
    }

    /// The Prometheus histogram's name and help.
    pub fn metric(self) -> (&'static str, &'static str) {
        match self {
            PreemptFigure::Preemption => (
                "idlerig_preemption_latency_seconds",
                "Time from a request's arrival to the miner's acknowledged stop",
            ),
            PreemptFigure::CpuMinerStop => (
                "idlerig_cpu_miner_stop_seconds",
                "Time from the pre-emption flag to the last CPU miner thread stopped; the \
                 threads run under SCHED_IDLE and yield their cores to inference at once, so \
                 this is how long a starved miner takes to notice, not a delay to inference",
            ),
        }
    }
}

/// The arbiter's published figures (`GET /v1/status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArbiterStatus {
    pub mining_enabled: bool,
    /// The miner's device: "cpu", "cuda", or "cpu-grid" (the CUDA kernel on CPU threads).
    pub backend: &'static str,
    /// The code that hashes: on the CPU, the SHA-256d path a start-up measurement picked
    /// (with each path's measured rate, million nonces a second on one thread).
    pub kernel: crate::mining::KernelChoice,
    pub phase: &'static str,
    pub device_time_s: DeviceTime,
    pub preemptions: u64,
    /// What the `preempt_us_*` figures measure (see [`PreemptFigure`]).
    pub preempt_measures: &'static str,
    pub preempt_us_p50: f64,
    pub preempt_us_p99: f64,
    pub preempt_us_max: f64,
    pub hashrate_hs: f64,
    pub hashes: u64,
    pub shares_accepted: u64,
    pub shares_rejected: u64,
    pub shares_stale: u64,
    /// Found and never submitted because a bound was reached (see the log for why).
    pub shares_dropped: u64,
    pub pool: String,
    pub pool_connected: bool,
    pub pool_pays: bool,
    pub pool_difficulty: f64,
    pub requests_admitted: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceTime {
    pub serving: f64,
    /// Deferred work (flex requests, batch lines) while no interactive work waited.
    pub deferred: f64,
    pub mining: f64,
    pub idle: f64,
    pub preempting: f64,
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::NotMining => "not_mining",
        Phase::Mining => "mining",
        Phase::Preempting => "preempting",
    }
}

/// Runs the arbiter until `shutdown` turns true; the status is published on the returned
/// receiver's channel.
pub fn spawn_arbiter(
    parts: ArbiterParts,
    cfg: PolicyConfig,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<ArbiterStatus> {
    let (status_tx, status_rx) = watch::channel(ArbiterStatus::default());
    tokio::spawn(async move {
        let now = || monotonic_ns() / 1000;
        let mut state = PolicyState::new(cfg, now());
        let mut latencies: Vec<f64> = Vec::new();
        // (p50, p99, max), recomputed only when new samples arrive, not at every publish.
        let mut latency_summary = (0.0, 0.0, 0.0);
        let (mut pool_up, mut admitted) = (false, parts.gate.admitted());
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (mut rate_hashes, mut rate_t, mut hashrate) = (parts.miner.hashes(), now(), 0.0);
        let mut last_publish = 0u64;
        let kernel = parts.miner.kernel();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    parts.miner.preempt_flag().raise();
                    return;
                }
            }
            let mut events = Vec::new();
            state.cfg.mining_enabled = *parts.enabled.borrow() && *parts.profitable.borrow();
            let seen = parts.gate.admitted();
            let arrived = seen != admitted;
            if arrived {
                admitted = seen;
                events.push(Event::RequestAdmitted);
            }
            let busy_with = |tier: ServiceTier| {
                parts.gate.in_flight_of(tier) > 0
                    || parts
                        .engines
                        .iter()
                        .any(|e| e.borrow().as_ref().is_some_and(|e| e.is_busy_with(tier)))
            };
            // What the policy will believe after this tick's arrival, corrected by what the
            // engine and the gate show: an arrival that turned out to be deferred work (a
            // batch line) is not interactive work for long.
            let interactive = busy_with(ServiceTier::Interactive);
            if interactive != (state.engine_busy() || arrived) {
                events.push(if interactive {
                    Event::EngineBusy
                } else {
                    Event::EngineIdle
                });
            }
            let deferred = busy_with(ServiceTier::Deferred);
            if deferred != state.deferred_busy() {
                events.push(if deferred {
                    Event::DeferredBusy
                } else {
                    Event::DeferredIdle
                });
            }
            let up = parts.pool.connected.load(Ordering::Relaxed);
            if up != pool_up {
                pool_up = up;
                events.push(if up {
                    Event::PoolHasWork
                } else {
                    Event::PoolNoWork
                });
            }
            if state.phase == Phase::Preempting && parts.miner.active_workers() == 0 {
                events.push(Event::MinerStopped);
            }
            events.push(Event::Tick);
            let t = now();
            for ev in events {
                for action in step(&mut state, ev, t) {
                    match action {
                        Action::PreemptMining => parts.miner.preempt_flag().raise(),
                        Action::StartMining => {
                            parts.miner.resume();
                            // A request admitted between our look and the resume must not
                            // find the miner running: raise the flag again at once.
                            if parts.gate.in_flight() > 0 {
                                parts.miner.preempt_flag().raise();
                            }
                        }
                    }
                }
            }
            let fresh = parts.miner.take_preempt_latencies();
            if !fresh.is_empty() {
                if let Some(h) = &parts.preempt_latency {
                    fresh.iter().for_each(|&ns| h.observe(ns as f64 * 1e-9));
                }
                latencies.extend(fresh.into_iter().map(|ns| ns as f64 / 1000.0));
                if latencies.len() > 20_000 {
                    latencies.drain(..latencies.len() - 10_000);
                }
                let q = |p| crate::stats::quantile(&latencies, p);
                latency_summary = (
                    q(0.5),
                    q(0.99),
                    latencies.iter().copied().fold(0.0, f64::max),
                );
            }
            if t - last_publish >= 100_000 {
                last_publish = t;
                let h = parts.miner.hashes();
                if t - rate_t >= 1_000_000 {
                    hashrate = (h - rate_hashes) as f64 / ((t - rate_t) as f64 / 1e6);
                    (rate_hashes, rate_t) = (h, t);
                }
                let secs = |us: u64| us as f64 / 1e6;
                let _ = status_tx.send(ArbiterStatus {
                    mining_enabled: state.cfg.mining_enabled,
                    backend: parts.miner.backend(),
                    kernel: kernel.clone(),
                    phase: phase_name(state.phase),
                    device_time_s: DeviceTime {
                        serving: secs(state.time.serving_us),
                        deferred: secs(state.time.deferred_us),
                        mining: secs(state.time.mining_us),
                        idle: secs(state.time.idle_us),
                        preempting: secs(state.time.preempting_us),
                    },
                    preemptions: state.preemptions,
                    preempt_measures: PreemptFigure::of_backend(parts.miner.backend()).name(),
                    preempt_us_p50: latency_summary.0,
                    preempt_us_p99: latency_summary.1,
                    preempt_us_max: latency_summary.2,
                    hashrate_hs: hashrate.round(),
                    hashes: h,
                    shares_accepted: parts.pool.accepted(),
                    shares_rejected: parts.pool.rejected.load(Ordering::Relaxed),
                    shares_stale: parts.pool.stale.load(Ordering::Relaxed),
                    shares_dropped: parts.pool.dropped.load(Ordering::Relaxed),
                    pool: parts.pool_label.clone(),
                    pool_connected: up,
                    pool_pays: !parts.local_pool,
                    pool_difficulty: parts.pool.difficulty(),
                    requests_admitted: admitted,
                });
            }
        }
    });
    status_rx
}
