//! Telemetry owns the server's figures over time: the request-level Prometheus histograms,
//! the dashboard's last hour, the one-minute window of live rates, the earnings estimate and
//! the profit switch. One task owns them; the API and the engine send it what happened (a
//! finished request's timings, a request's time in the queue) over a channel that never
//! blocks them, and it publishes a [`TelemetrySnapshot`] for `/v1/status` and the dashboard.

pub mod earnings;
pub mod history;
pub mod prometheus;

pub use earnings::{DeferredValue, Earnings, EarningsInputs, MineWhen};
pub use history::{HistoryPoint, WindowFigures};
pub use prometheus::{LiveSources, Metrics, RequestMetrics};

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::arbiter::ArbiterStatus;
use crate::engine::EngineStats;
use history::{Cumulative, History};

/// How a request ended, as vLLM's `finished_reason` label (plus `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stop,
    Length,
    /// The client went away, or the request ran past its timeout or the shutdown grace.
    Abort,
    Error,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Abort => "abort",
            Outcome::Error => "error",
        }
    }
}

/// One finished request, as the API saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub outcome: Outcome,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From admission to the first token; `None` when none came.
    pub ttft_s: Option<f64>,
    /// Gaps between consecutive tokens.
    pub inter_token_s: Vec<f32>,
    pub e2e_s: f64,
}

/// A record of a request that ended before anything was known about it: an abort.
impl Default for RequestRecord {
    fn default() -> Self {
        Self {
            outcome: Outcome::Abort,
            prompt_tokens: 0,
            completion_tokens: 0,
            ttft_s: None,
            inter_token_s: Vec::new(),
            e2e_s: 0.0,
        }
    }
}

#[derive(Debug)]
enum Message {
    Finished(RequestRecord),
    Queued(f64),
}

/// A handle to the telemetry task; cheap to clone. Sending never blocks and never fails the
/// sender (figures sent after the task has stopped are dropped).
#[derive(Debug, Clone)]
pub struct Telemetry {
    tx: mpsc::UnboundedSender<Message>,
}

impl Telemetry {
    pub fn finished(&self, record: RequestRecord) {
        let _ = self.tx.send(Message::Finished(record));
    }

    /// A request waited `seconds` between submission and the engine taking it.
    pub fn queued(&self, seconds: f64) {
        let _ = self.tx.send(Message::Queued(seconds));
    }
}

/// What `/v1/status` and the dashboard show beside the arbiter's own figures.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetrySnapshot {
    pub window: WindowFigures,
    pub requests_total: u64,
    pub history_interval_s: f64,
    #[serde(serialize_with = "serialize_shared")]
    pub history: Arc<Vec<HistoryPoint>>,
    pub earnings: Earnings,
    pub earnings_inputs: Option<EarningsInputs>,
    pub mine_when: Option<&'static str>,
    /// False once the profit switch has stopped mining because it does not pay.
    pub profit_switch_on: bool,
    /// What the deferred work (flex, batch) is worth, beside the mining figures.
    pub deferred: DeferredValue,
}

impl Default for TelemetrySnapshot {
    fn default() -> Self {
        Self {
            window: WindowFigures::default(),
            requests_total: 0,
            history_interval_s: 0.0,
            history: Arc::default(),
            earnings: Earnings::default(),
            earnings_inputs: None,
            mine_when: None,
            profit_switch_on: true,
            deferred: DeferredValue::default(),
        }
    }
}

fn serialize_shared<S: serde::Serializer>(
    v: &Arc<Vec<HistoryPoint>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    v.as_slice().serialize(s)
}

/// Mining seconds measured before the profit switch decides.
pub const PROFIT_PROBE_S: f64 = 10.0;

/// What the telemetry task reads and drives.
pub struct TelemetryParts {
    pub requests: RequestMetrics,
    pub engine: watch::Receiver<Option<Arc<EngineStats>>>,
    pub arbiter: Option<watch::Receiver<ArbiterStatus>>,
    /// With mining on: the estimate's inputs, the mode, and the switch that lets the
    /// arbiter mine (`true`) or not.
    pub mining: Option<(EarningsInputs, MineWhen, watch::Sender<bool>)>,
    pub history_interval: Duration,
    /// USD per million tokens of deferred work (`--deferred-price`).
    pub deferred_price_usd_per_mtok: f64,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Starts the telemetry task; it publishes on `snapshot` and runs until every [`Telemetry`]
/// handle is dropped or `shutdown` turns true.
pub fn spawn_telemetry(
    parts: TelemetryParts,
    snapshot: watch::Sender<TelemetrySnapshot>,
    mut shutdown: watch::Receiver<bool>,
) -> Telemetry {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let interval = parts.history_interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut history = History::new(interval.as_secs_f64(), 3600.0);
        let mut requests_total = 0u64;
        let mut profit_on = true;
        let mut tick = tokio::time::interval(interval.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sample = std::time::Instant::now() - interval;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Message::Finished(r)) => {
                        requests_total += 1;
                        observe(&parts.requests, &r);
                        history.record_request(unix_now(), r.ttft_s);
                        continue;
                    }
                    Some(Message::Queued(s)) => { parts.requests.queue.observe(s); continue; }
                    None => return,
                },
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let status = parts.arbiter.as_ref().map(|a| a.borrow().clone());
            let engine = parts.engine.borrow().clone();
            if last_sample.elapsed() >= interval {
                last_sample = std::time::Instant::now();
                let st = status.clone().unwrap_or_default();
                history.sample(Cumulative {
                    t: unix_now(),
                    serving_s: st.device_time_s.serving,
                    deferred_s: st.device_time_s.deferred,
                    mining_s: st.device_time_s.mining,
                    idle_s: st.device_time_s.idle,
                    preempting_s: st.device_time_s.preempting,
                    hashes: st.hashes,
                    requests: requests_total,
                    generated_tokens: engine.as_ref().map_or(0, |e| e.generated_tokens()),
                    shares_accepted: st.shares_accepted,
                });
            }
            let (mut earnings, mut inputs, mut mode) = (Earnings::default(), None, None);
            if let (Some((i, when, switch)), Some(st)) = (&parts.mining, &status) {
                let mining_s = st.device_time_s.mining;
                let avg = if mining_s > 0.0 {
                    st.hashes as f64 / mining_s
                } else {
                    0.0
                };
                earnings = i.estimate(avg);
                (inputs, mode) = (Some(*i), Some(mine_when_label(*when)));
                if *when == MineWhen::Profitable && mining_s >= PROFIT_PROBE_S {
                    let pays = earnings.net_usd_day >= 0.0;
                    if pays != profit_on {
                        profit_on = pays;
                        let _ = switch.send(pays);
                        log_profit_switch(pays, &earnings, i);
                    }
                }
            }
            let deferred = DeferredValue::estimate(
                parts.deferred_price_usd_per_mtok,
                engine.as_ref().map_or(0, |e| {
                    e.deferred_tokens.load(std::sync::atomic::Ordering::Relaxed)
                }),
                status.as_ref().map(|s| s.device_time_s.deferred),
                parts
                    .mining
                    .as_ref()
                    .map(|(i, _, _)| (i.mining_watts, i.power_price_usd_kwh)),
            );
            let now = unix_now();
            snapshot.send_replace(TelemetrySnapshot {
                deferred,
                window: history.window(now),
                requests_total,
                history_interval_s: interval.as_secs_f64(),
                history: Arc::new(history.points()),
                earnings,
                earnings_inputs: inputs,
                mine_when: mode,
                profit_switch_on: profit_on,
            });
        }
    });
    Telemetry { tx }
}

fn mine_when_label(w: MineWhen) -> &'static str {
    match w {
        MineWhen::Always => "always",
        MineWhen::Profitable => "profitable",
    }
}

fn observe(m: &RequestMetrics, r: &RequestRecord) {
    m.e2e.observe(r.e2e_s);
    if let Some(t) = r.ttft_s {
        m.ttft.observe(t);
    }
    for &g in &r.inter_token_s {
        m.inter_token.observe(f64::from(g));
    }
    if !r.inter_token_s.is_empty() {
        let decode: f64 = r.inter_token_s.iter().map(|&g| f64::from(g)).sum();
        m.time_per_output_token
            .observe(decode / r.inter_token_s.len() as f64);
    }
    m.prompt_tokens.observe(r.prompt_tokens as f64);
    m.generation_tokens.observe(r.completion_tokens as f64);
    m.success
        .get_or_create(&vec![("finished_reason", r.outcome.label().to_string())])
        .inc();
}

fn log_profit_switch(pays: bool, e: &Earnings, i: &EarningsInputs) {
    if pays {
        tracing::info!(
            net_usd_day = e.net_usd_day,
            "profit switch: mining pays at these figures; mining resumes"
        );
    } else {
        tracing::warn!(
            hashrate_hs = e.hashrate_hs.round(),
            revenue_usd_day = format!("{:.8}", e.revenue_usd_day),
            payout_usd_day = format!("{:.8}", e.payout_usd_day),
            power_cost_usd_day = format!("{:.4}", e.power_cost_usd_day),
            break_even_usd_kwh = format!("{:.8}", e.break_even_usd_kwh),
            watts = i.mining_watts,
            "profit switch: mining costs more in power than it earns; mining stops (use --mine-when always to mine anyway)"
        );
    }
}
