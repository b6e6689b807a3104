//! `GET /metrics` in the Prometheus text format, with prometheus-client. Request-level
//! figures use vLLM's names and buckets (labelled `model_name`), so dashboards built for vLLM
//! work; mining figures are idlerig's own. Histograms are observed by the telemetry task and
//! the arbiter; gauges and counters that other owners keep (the engine's, the arbiter's, the
//! Stratum client's) are read at scrape time by a collector, never copied.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::arbiter::ArbiterStatus;
use crate::engine::EngineStats;

use super::TelemetrySnapshot;

/// The content type of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

// vLLM's buckets (vllm/v1/metrics/loggers.py).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Pre-emption latency: microseconds on the CPU, the target on a GPU is 50 µs.
const PREEMPT_BUCKETS: &[f64] = &[
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1,
];

type Labels = Vec<(&'static str, String)>;

/// The histogram of pre-emption latencies, in seconds.
pub fn preempt_latency_histogram() -> Histogram {
    Histogram::new(PREEMPT_BUCKETS.iter().copied())
}

/// vLLM's 1-2-5 buckets up to the context length, for token counts.
fn token_buckets(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    'outer: loop {
        for m in [1, 2, 5] {
            let b = m * scale;
            if b > max.max(1) {
                break 'outer;
            }
            out.push(b as f64);
        }
        scale *= 10;
    }
    out
}

/// Request-level histograms, observed by the telemetry task.
#[derive(Clone)]
pub struct RequestMetrics {
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub prompt_tokens: Histogram,
    pub generation_tokens: Histogram,
    /// By `finished_reason`: stop, length, abort, error.
    pub success: Family<Labels, Counter>,
}

/// The registry and the handles of the metrics idlerig observes itself.
pub struct Metrics {
    registry: Registry,
    pub requests: RequestMetrics,
    /// HTTP responses by status code, counted by the API's middleware.
    pub http_responses: Family<Labels, Counter>,
    /// Observed by the arbiter for each pre-emption.
    pub preempt_latency: Histogram,
    /// Requests and tokens by API key name (never the key), counted by the usage handle.
    pub keys: crate::usage::KeyCounters,
}

/// What the collector reads at scrape time.
pub struct LiveSources {
    pub engine: watch::Receiver<Option<Arc<EngineStats>>>,
    pub arbiter: Option<watch::Receiver<ArbiterStatus>>,
    pub snapshot: watch::Receiver<TelemetrySnapshot>,
    /// KV tokens the engine may hold at most (running sequences × context window).
    pub kv_capacity_tokens: usize,
}

impl Metrics {
    /// `preempt_latency` comes from [`preempt_latency_histogram`], made before the arbiter
    /// that observes it. `per_key`: publish the requests and tokens of each API key name
    /// (counted either way, for the quotas; shown only when the operator said so).
    pub fn new(
        model_name: &str,
        context_length: usize,
        live: LiveSources,
        preempt_latency: Histogram,
        preempt_figure: crate::arbiter::PreemptFigure,
        per_key: bool,
    ) -> Self {
        let mut registry = Registry::default();
        let requests = RequestMetrics {
            ttft: Histogram::new(TTFT_BUCKETS.iter().copied()),
            inter_token: Histogram::new(ITL_BUCKETS.iter().copied()),
            time_per_output_token: Histogram::new(ITL_BUCKETS.iter().copied()),
            e2e: Histogram::new(REQUEST_LATENCY_BUCKETS.iter().copied()),
            queue: Histogram::new(REQUEST_LATENCY_BUCKETS.iter().copied()),
            prompt_tokens: Histogram::new(token_buckets(context_length)),
            generation_tokens: Histogram::new(token_buckets(context_length)),
            success: Family::default(),
        };
        let vllm =
            registry.sub_registry_with_label(("model_name".into(), model_name.to_string().into()));
        let r = &requests;
        let histograms = [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds",
                &r.ttft,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds",
                &r.inter_token,
            ),
            (
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (per request mean)",
                &r.time_per_output_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds",
                &r.e2e,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request",
                &r.queue,
            ),
            (
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed",
                &r.prompt_tokens,
            ),
            (
                "vllm:request_generation_tokens",
                "Number of generation tokens processed",
                &r.generation_tokens,
            ),
        ];
        for (name, help, h) in histograms {
            vllm.register(name, help, h.clone());
        }
        vllm.register(
            "vllm:request_success",
            "Count of finished requests by finished_reason",
            r.success.clone(),
        );
        vllm.register_collector(Box::new(EngineCollector {
            engine: live.engine,
            kv_capacity_tokens: live.kv_capacity_tokens.max(1),
        }));
        let http_responses = Family::<Labels, Counter>::default();
        registry.register(
            "idlerig_http_responses",
            "HTTP responses by status code",
            http_responses.clone(),
        );
        // Named for what it measures: a GPU's pre-emption latency, or on the CPU the miner
        // threads' stop, which inference does not wait for.
        let (name, help) = preempt_figure.metric();
        registry.register(name, help, preempt_latency.clone());
        registry.register_collector(Box::new(MiningCollector {
            arbiter: live.arbiter,
            snapshot: live.snapshot,
        }));
        let keys = crate::usage::KeyCounters::default();
        if per_key {
            registry.register(
                "idlerig_api_key_requests",
                "Requests answered, by API key name",
                keys.requests.clone(),
            );
            registry.register(
                "idlerig_api_key_prompt_tokens",
                "Prompt tokens, by API key name",
                keys.prompt_tokens.clone(),
            );
            registry.register(
                "idlerig_api_key_completion_tokens",
                "Completion tokens, by API key name",
                keys.completion_tokens.clone(),
            );
        }
        Self {
            registry,
            requests,
            http_responses,
            preempt_latency,
            keys,
        }
    }

    /// Counts one HTTP response.
    pub fn count_response(&self, status: u16) {
        self.http_responses
            .get_or_create(&vec![("code", status.to_string())])
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// `(label value, value)` pairs of one family with one label, counters or gauges.
fn family(
    enc: &mut DescriptorEncoder,
    kind: MetricType,
    (name, help): (&str, &str),
    label: &'static str,
    items: &[(&str, f64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (value, v) in items {
        let labels: Vec<(&str, &str)> = vec![(label, value)];
        let e = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*v).encode(e)?,
            _ => ConstGauge::new(*v).encode(e)?,
        }
    }
    Ok(())
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    items: &[(&str, f64)],
) -> std::fmt::Result {
    family(enc, MetricType::Counter, (name, help), label, items)
}

fn gauge_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    items: &[(&str, f64)],
) -> std::fmt::Result {
    family(enc, MetricType::Gauge, (name, help), label, items)
}

struct EngineCollector {
    engine: watch::Receiver<Option<Arc<EngineStats>>>,
    kv_capacity_tokens: usize,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self.engine.borrow().clone() else {
            return Ok(()); // still loading: nothing to report yet
        };
        let by_tier = |f: &dyn Fn(usize) -> f64| -> Vec<(&str, f64)> {
            crate::engine::ServiceTier::ALL
                .iter()
                .map(|&t| (t.as_str(), f(t as usize)))
                .collect()
        };
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
        let waiting: usize = s
            .in_channel
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>()
            + s.waiting.load(Ordering::Relaxed);
        gauge_family(
            &mut enc,
            "idlerig_requests_running",
            "Sequences in the running set by service tier (default: interactive; flex: deferred work, flex requests and batch lines)",
            "tier",
            &by_tier(&|t| load(&s.running_by_tier[t])),
        )?;
        gauge_family(
            &mut enc,
            "idlerig_requests_waiting",
            "Requests waiting for the engine by service tier",
            "tier",
            &by_tier(&|t| load(&s.waiting_by_tier[t]) + load(&s.in_channel[t])),
        )?;
        counter(
            &mut enc,
            "idlerig_deferred_tokens",
            "Prompt and generated tokens of finished deferred work (flex requests, batch lines)",
            s.deferred_tokens.load(Ordering::Relaxed) as f64,
        )?;
        counter(
            &mut enc,
            "idlerig_deferred_interruptions",
            "Deferred engine steps paused between two layers for an arriving interactive request (each resumes where it stopped)",
            s.deferred_interruptions.load(Ordering::Relaxed) as f64,
        )?;
        counter(
            &mut enc,
            "idlerig_deferred_owed_steps",
            "Deferred engine steps run beside interactive work as deferred work's guaranteed share (--deferred-min-share)",
            s.deferred_owed_steps.load(Ordering::Relaxed) as f64,
        )?;
        gauge(
            &mut enc,
            "vllm:num_requests_running",
            "Number of sequences in the running batch",
            s.running() as f64,
        )?;
        gauge(
            &mut enc,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed",
            waiting as f64,
        )?;
        let blocks = s.kv_blocks_total.load(Ordering::Relaxed);
        let kv = if blocks > 0 {
            s.kv_blocks_used.load(Ordering::Relaxed) as f64 / blocks as f64
        } else {
            s.kv_tokens.load(Ordering::Relaxed) as f64 / self.kv_capacity_tokens as f64
        };
        gauge(&mut enc, "vllm:kv_cache_usage_perc", "KV-cache usage: fraction of the paged pool's blocks in use (without a pool: tokens held over max running sequences x context). 1 means 100 percent usage", kv)?;
        counter(
            &mut enc,
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine (KV cache full)",
            s.preemptions.load(Ordering::Relaxed) as f64,
        )?;
        counter(
            &mut enc,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed",
            s.prefilled_tokens.load(Ordering::Relaxed) as f64,
        )?;
        counter(
            &mut enc,
            "vllm:generation_tokens",
            "Number of generation tokens processed",
            s.generated_tokens() as f64,
        )
    }
}

struct MiningCollector {
    arbiter: Option<watch::Receiver<ArbiterStatus>>,
    snapshot: watch::Receiver<TelemetrySnapshot>,
}

impl std::fmt::Debug for MiningCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MiningCollector")
    }
}

impl Collector for MiningCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = self.snapshot.borrow().clone();
        let Some(rx) = &self.arbiter else {
            return gauge(
                &mut enc,
                "idlerig_mining_enabled",
                "1 while mining is allowed",
                0.0,
            );
        };
        let st = rx.borrow().clone();
        let allowed = st.mining_enabled && snapshot.profit_switch_on;
        gauge(
            &mut enc,
            "idlerig_mining_enabled",
            "1 while mining is allowed (operator switch and profit switch)",
            f64::from(u8::from(allowed)),
        )?;
        gauge(
            &mut enc,
            "idlerig_mining_hashrate_hashes_per_second",
            "Hashrate over the last second",
            st.hashrate_hs,
        )?;
        counter(
            &mut enc,
            "idlerig_mining_hashes",
            "Hashes computed since start",
            st.hashes as f64,
        )?;
        counter_family(
            &mut enc,
            "idlerig_mining_shares",
            "Shares by the pool's verdict",
            "result",
            &[
                ("accepted", st.shares_accepted as f64),
                ("rejected", st.shares_rejected as f64),
                ("stale", st.shares_stale as f64),
                ("dropped", st.shares_dropped as f64),
            ],
        )?;
        gauge(
            &mut enc,
            "idlerig_pool_connected",
            "1 while connected to the Stratum pool",
            f64::from(u8::from(st.pool_connected)),
        )?;
        gauge(
            &mut enc,
            "idlerig_pool_difficulty",
            "Share difficulty set by the pool",
            st.pool_difficulty,
        )?;
        counter(
            &mut enc,
            "idlerig_preemptions",
            "Times the miner was pre-empted for inference",
            st.preemptions as f64,
        )?;
        let t = &st.device_time_s;
        counter_family(
            &mut enc,
            "idlerig_device_seconds",
            "Seconds of device time by use",
            "state",
            &[
                ("serving", t.serving),
                ("deferred", t.deferred),
                ("mining", t.mining),
                ("idle", t.idle),
                ("preempting", t.preempting),
            ],
        )?;
        let e = snapshot.earnings;
        gauge(
            &mut enc,
            "idlerig_earnings_revenue_usd_per_day",
            "Expected revenue per day of mining at the average hashrate, on a paying pool",
            e.revenue_usd_day,
        )?;
        gauge(
            &mut enc,
            "idlerig_earnings_payout_usd_per_day",
            "Expected payout per day from the pool in use (0 on the embedded pool)",
            e.payout_usd_day,
        )?;
        gauge(
            &mut enc,
            "idlerig_earnings_power_cost_usd_per_day",
            "Power cost per day of mining",
            e.power_cost_usd_day,
        )?;
        gauge(
            &mut enc,
            "idlerig_earnings_net_usd_per_day",
            "Payout minus power cost per day of mining",
            e.net_usd_day,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_are_vllms_1_2_5_series() {
        assert_eq!(
            token_buckets(2048),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]
        );
    }
}
