//! Choosing the next token from logits: logit bias, repetition / presence / frequency
//! penalties, temperature, top-k, top-p, min-p, seeded randomness, and log-probabilities.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one sequence, already validated by the API.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 means none (Hugging Face / CTRL convention).
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// How many alternatives to report per token; `None` reports no log-probabilities.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            top_logprobs: None,
        }
    }
}

/// The chosen token and, when asked, its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: the random stream and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    generated_counts: HashMap<u32, u32>,
    seen: Vec<bool>,
}

impl Sampler {
    /// `stream` separates the choices of one request (`n` > 1) that share a seed.
    pub fn new(params: SamplingParams, prompt: &[u32], vocab_size: usize, stream: u64) -> Self {
        let rng = match params.seed {
            Some(seed) => {
                StdRng::seed_from_u64(seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            }
            None => StdRng::from_os_rng(),
        };
        let mut seen = vec![false; vocab_size];
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
        }
        Self {
            params,
            rng,
            generated_counts: HashMap::new(),
            seen,
        }
    }

    /// Picks the next token from `logits` (one row, vocabulary-sized) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        self.adjust(logits);
        let (logprob_of, top) = match self.params.top_logprobs {
            Some(k) => {
                let lse = log_sum_exp(logits);
                (
                    Some(lse),
                    top_k_indices(logits, k)
                        .into_iter()
                        .map(|i| (i as u32, logits[i] - lse))
                        .collect(),
                )
            }
            None => (None, Vec::new()),
        };
        // Below 1e-5 a temperature only overflows the scaled logits (∞ − ∞ is NaN, which would
        // pick the least likely token): it means greedy.
        let id = if self.params.temperature < GREEDY_BELOW {
            argmax(logits)
        } else {
            self.draw(logits)
        } as u32;
        *self.generated_counts.entry(id).or_insert(0) += 1;
        if let Some(s) = self.seen.get_mut(id as usize) {
            *s = true;
        }
        SampledToken {
            id,
            logprob: logprob_of.map(|lse| logits[id as usize] - lse),
            top,
        }
    }

    /// Bias and penalties: they change what the model's distribution is taken to be, so
    /// log-probabilities are reported after them (and before temperature, as OpenAI does).
    fn adjust(&self, logits: &mut [f32]) {
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for (l, _) in logits.iter_mut().zip(&self.seen).filter(|(_, &s)| s) {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&id, &count) in &self.generated_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= pp + fp * count as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let (t, n) = (self.params.temperature, logits.len());
        let p = &self.params;
        if p.top_p >= 1.0 && p.min_p <= 0.0 && (p.top_k == 0 || p.top_k >= n) {
            // Nothing is cut: one pass over the vocabulary, no sort at all.
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
            let sum: f32 = logits.iter().map(|&l| (l / t - max).exp()).sum();
            let mut r = self.rng.random::<f32>() * sum;
            for (i, &l) in logits.iter().enumerate() {
                let w = (l / t - max).exp();
                if r < w {
                    return i;
                }
                r -= w;
            }
            return argmax(logits);
        }
        let (cand, mut probs) = self.candidates(logits);
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.params.min_p > 0.0 {
            let floor = self.params.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        probs.truncate(keep);
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return cand[i];
            }
            r -= p;
        }
        cand[keep - 1]
    }

    /// The candidates and their probabilities, most likely first, as many as top-p and min-p
    /// may keep. top-k cuts before the softmax, as llama.cpp does. Without top-k the
    /// probabilities are the whole vocabulary's, but only its head is sorted: 64 tokens,
    /// widened fourfold until they hold the top-p mass or reach below the min-p floor (a few
    /// tokens usually hold most of it), never a full sort per token.
    fn candidates(&self, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let (t, n, p) = (self.params.temperature, logits.len(), &self.params);
        if p.top_k > 0 && p.top_k < n {
            let cand = top_k_indices(logits, p.top_k);
            let max = logits[cand[0]] / t;
            let mut probs: Vec<f32> = cand.iter().map(|&i| (logits[i] / t - max).exp()).collect();
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= sum);
            return (cand, probs);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
        let sum: f32 = logits.iter().map(|&l| (l / t - max).exp()).sum();
        let mut m = 64.min(n);
        loop {
            let cand = top_k_indices(logits, m);
            let probs: Vec<f32> = cand
                .iter()
                .map(|&i| (logits[i] / t - max).exp() / sum)
                .collect();
            let mass: f32 = probs.iter().sum();
            let holds_p = p.top_p < 1.0 && mass >= p.top_p;
            let holds_min = p.min_p > 0.0 && probs[m - 1] < p.min_p * probs[0];
            if m == n || holds_p || holds_min {
                return (cand, probs);
            }
            m = (m * 4).min(n);
        }
    }
}

/// Temperatures below this are greedy.
pub const GREEDY_BELOW: f32 = 1e-5;

/// Index of the largest logit, the lowest index on ties (so greedy decoding is stable).
pub fn argmax(logits: &[f32]) -> usize {
    // Two passes the compiler vectorizes (16 running maxima, then a search for the first
    // position that holds the largest), where one pass that tracks an index does not:
    // greedy decoding scans the whole vocabulary for every token. NaNs never win.
    let (chunks, tail) = logits.as_chunks::<16>();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    logits.iter().position(|&l| l == max).unwrap_or(0)
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln()
}

/// The `k` largest entries' indices, largest first (ties by lower index).
fn top_k_indices(logits: &[f32], k: usize) -> Vec<usize> {
    top_k_by(logits.len(), k, |a, b| {
        logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
    })
}

/// The first `k` of `0..n` in the order `cmp`: a selection (linear), then a sort of those `k`
/// only. `logprobs` without `top_logprobs` asks for none, and costs nothing: no sort of a
/// 150,000-token vocabulary for every token.
fn top_k_by(n: usize, k: usize, cmp: impl Fn(usize, usize) -> std::cmp::Ordering) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let cmp = |a: &usize, b: &usize| cmp(*a, *b);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn a_vanishing_temperature_is_greedy_not_the_least_likely_token() {
        for t in [1e-40f32, 1e-6, f32::MIN_POSITIVE] {
            let mut s = Sampler::new(params(|p| p.temperature = t), &[], 4, 0);
            assert_eq!(
                s.sample(&mut [0.5, 3.0, -2.0, 1.0]).id,
                1,
                "temperature {t}"
            );
        }
    }

    /// The full sort per token the sampler used to do, kept here as the reference: the same
    /// candidates in the same order give the same token for the same random draw.
    fn reference_draw(p: &SamplingParams, logits: &[f32], r: f32) -> usize {
        let t = p.temperature;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
        let max = logits[idx[0]] / t;
        let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        probs.truncate(keep);
        let mut r = r * probs.iter().sum::<f32>();
        for (i, q) in probs.iter().enumerate() {
            if r < *q {
                return idx[i];
            }
            r -= q;
        }
        idx[keep - 1]
    }

    #[test]
    fn without_top_k_only_the_head_is_sorted_and_the_draws_are_unchanged() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for case in 0..60 {
            // Peaked and flat vocabularies, so the head widens from 64 in some cases.
            let spread = [0.5f32, 3.0, 12.0][case % 3];
            let logits: Vec<f32> = (0..5000).map(|_| rng.random::<f32>() * spread).collect();
            let (top_p, min_p) = [(0.9, 0.0), (1.0, 0.05), (0.5, 0.1), (0.999, 0.0)][case % 4];
            let p = params(|p| {
                p.temperature = 0.8;
                p.top_p = top_p;
                p.min_p = min_p;
                p.seed = Some(case as u64);
            });
            let mut s = Sampler::new(p.clone(), &[], 5000, 0);
            let r = rand::rngs::StdRng::seed_from_u64(case as u64).random::<f32>();
            let got = s.sample(&mut logits.clone()).id as usize;
            assert_eq!(got, reference_draw(&p, &logits, r), "case {case}");
        }
    }

    #[test]
    fn logprobs_without_top_logprobs_sort_nothing_and_a_few_are_selected() {
        // Comparisons counted over a Qwen-sized vocabulary: none for k = 0 (a full sort,
        // as before, is ~2.5 million), and linear for a few.
        let n = 151_936;
        let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32).collect();
        let count = |k: usize| {
            let seen = std::cell::Cell::new(0u64);
            let top = top_k_by(n, k, |a, b| {
                seen.set(seen.get() + 1);
                logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
            });
            (top, seen.get())
        };
        assert_eq!(count(0), (Vec::new(), 0));
        let (top, comparisons) = count(5);
        assert_eq!(top, top_k_indices(&logits, 5));
        assert!(logits[top[0]] >= logits[top[4]]);
        assert!(
            comparisons < 4 * n as u64,
            "{comparisons} comparisons for 5 of {n}"
        );
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.top_logprobs = Some(2)
            }),
            &[],
            4,
            0,
        );
        let out = s.sample(&mut [0.0, 2.0, 1.0, 2.0]);
        assert_eq!(out.id, 1);
        let z = (1.0f32 + 2.0f32.exp() * 2.0 + 1.0f32.exp()).ln();
        assert!((out.logprob.unwrap() - (2.0 - z)).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    /// The vectorized argmax against a one-pass scan: first of equal maxima, NaNs never
    /// chosen, maxima in the tail past the last 16 and in the first and last chunks.
    #[test]
    fn argmax_is_the_first_largest_and_skips_nans() {
        let plain = |x: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &l) in x.iter().enumerate() {
                if !l.is_nan() && best.is_none_or(|b| l > x[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0)
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for len in [1usize, 15, 16, 17, 33, 100, 49152] {
            for case in 0..20 {
                let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-5.0f32..5.0)).collect();
                match case % 5 {
                    0 => x[len - 1] = 9.0,
                    1 => x[0] = 9.0,
                    2 => {
                        let i = rng.random_range(0..len);
                        x[i] = f32::NAN;
                    }
                    3 => {
                        // A tie: the first of the two wins.
                        let (i, j) = (rng.random_range(0..len), rng.random_range(0..len));
                        x[i] = 9.0;
                        x[j] = 9.0;
                    }
                    _ => {}
                }
                assert_eq!(argmax(&x), plain(&x), "len {len} case {case}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 5]), 0);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_1_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), &[], 50, 0);
            (0..20)
                .map(|_| s.sample(&mut logits.clone()).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let mut s = Sampler::new(params(|p| p.top_k = 1), &[], 50, 0);
        assert_eq!(s.sample(&mut logits.clone()).id as usize, argmax(&logits));
    }

    #[test]
    fn top_p_and_min_p_exclude_unlikely_tokens() {
        // probabilities ~ [0.665, 0.245, 0.090]: top_p 0.6 keeps only the first.
        let logits = [2.0f32, 1.0, 0.0];
        for p in [params(|p| p.top_p = 0.6), params(|p| p.min_p = 0.5)] {
            let mut s = Sampler::new(p, &[], 3, 0);
            assert!((0..200).all(|_| s.sample(&mut logits.clone()).id == 0));
        }
    }

    #[test]
    fn penalties_and_bias_change_the_choice() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(2, 5.0)]
            }),
            &[],
            3,
            0,
        );
        assert_eq!(s.sample(&mut [1.0, 0.0, 0.0]).id, 2);
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 2.0
            }),
            &[],
            2,
            0,
        );
        assert_eq!(s.sample(&mut [1.0, 0.0]).id, 0);
        assert_eq!(
            s.sample(&mut [1.0, 0.0]).id,
            1,
            "token 0 was penalised by 2.0"
        );
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 3.0
            }),
            &[0],
            2,
            0,
        );
        assert_eq!(
            s.sample(&mut [1.0, 0.5]).id,
            1,
            "prompt token 0 divided by 3"
        );
    }
}
