//! What a model is, read from its GGUF metadata or `config.json` before any weight is loaded:
//! its architecture and sizes, and the row of options that makes one decoder into that family.
//!
//! Every family idlerig runs is the same pre-norm transformer with a handful of switches, as
//! in llama.cpp's per-architecture tables: Q/K/V biases (Qwen2), per-head Q/K RMS norms
//! (Qwen3, Gemma 3), fused projections (Phi-3: a loading detail), rotary scaling (Llama 3.1's
//! `rope_freqs`, linear factors), sliding-window layers with their own rotary base (Gemma),
//! post-norms, embedding scaling, the MLP's activation, and logit soft-capping. [`Arch`] names
//! the family; [`ModelConfig::from_gguf`] reads its row.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::ModelError;

/// The model families idlerig runs: each is a set of options over one decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3.x, Mistral (7B, Nemo, Small), SmolLM, TinyLlama.
    Llama,
    /// Qwen2 and Qwen2.5: biases on Q, K and V.
    Qwen2,
    /// Qwen3 (dense): per-head RMS norms on Q and K, an explicit head dimension.
    Qwen3,
    /// Phi-3 and Phi-3.5 mini: fused QKV and gate/up projections.
    Phi3,
    /// Gemma 2: alternating sliding-window layers, post-norms, soft-capped logits.
    Gemma2,
    /// Gemma 3 (text): five sliding-window layers to one global, Q/K norms, post-norms.
    Gemma3,
}

impl Arch {
    /// The `general.architecture` values, in the order of the families table (docs/src/models.md).
    pub const ALL: [Arch; 6] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma2,
        Arch::Gemma3,
    ];

    /// The name GGUF files use (`general.architecture`, and the prefix of its keys).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
        }
    }

    fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.gguf_name() == name)
    }

    /// Whether GGUF stores this family's Q and K rows permuted for interleaved (GPT-J style)
    /// rotary pairs, as llama.cpp's converter does for Llama only; the others rotate the two
    /// halves of each head (GPT-NeoX style).
    fn rope_interleaved(self) -> bool {
        self == Arch::Llama
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU: `gelu_tanh(gate) · up` (Gemma).
    GeluTanh,
}

/// How positions turn into rotation angles: `angle_i = pos · position_scale · θ^(−2i/d) /
/// freq_factors[i]`, as ggml computes it without YaRN.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    /// Interleaved pairs (GGUF Llama) or rotated halves (Hugging Face, other GGUF families).
    pub interleaved: bool,
    /// `1 / rope.scaling.factor` for linear scaling; 1 without.
    pub position_scale: f32,
    /// Per-frequency divisors: Llama 3.1's `rope_freqs` tensor, Phi-3's short factors.
    pub freq_factors: Option<Vec<f32>>,
    /// Multiplies cos and sin, so Q and K alike (`rope.scaling.attn_factor`, Phi-3 LongRoPE).
    pub mscale: f32,
}

impl RopeConfig {
    fn plain(theta: f32, interleaved: bool) -> Self {
        Self {
            theta,
            interleaved,
            position_scale: 1.0,
            freq_factors: None,
            mscale: 1.0,
        }
    }
}

/// Hyper-parameters and options of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Per head, for queries, keys and values alike (`attention.key_length`; not always
    /// hidden ÷ heads: Qwen3, Gemma, Mistral Nemo differ).
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    /// The rotary embedding of global-attention layers (of every layer, without windows).
    pub rope: RopeConfig,
    /// Sliding-window attention: a windowed layer's query at position p sees keys at
    /// positions p − window < j ≤ p.
    pub sliding_window: Option<usize>,
    /// Which layers are windowed (with `sliding_window`): llama.cpp's pattern `n` makes layer
    /// `l` windowed when `l % n < n − 1` (Gemma 3: 6, five windowed then one global; Gemma 2:
    /// 2), or a file lists them.
    pub windowed_layers: Vec<bool>,
    /// The rotary embedding of windowed layers where it differs from `rope` (Gemma 3's local
    /// base of 10,000).
    pub local_rope: Option<RopeConfig>,
    /// Per-head RMS norms on Q and K before the rotation.
    pub qk_norm: bool,
    /// RMS norms on the attention's and the MLP's outputs before the residual (Gemma).
    pub post_norms: bool,
    /// Embeddings multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    /// The factor on Q·K.
    pub attn_scale: f32,
    /// `c·tanh(s / c)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `c·tanh(l / c)` on the output logits (Gemma 2).
    pub final_softcap: Option<f32>,
}

/// Bounds a model file must keep: beyond them it is damaged or hostile, not just big.
const MAX_CONTEXT: usize = 1 << 24;
const MAX_VOCAB: usize = 1 << 22;
const MAX_WIDTH: usize = 1 << 18;
const MAX_LAYERS: usize = 1024;

impl ModelConfig {
    /// A Llama-family configuration with every option off (the Hugging Face loader's, and
    /// the base every GGUF family starts from).
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        vocab_size: usize,
        rms_norm_eps: f64,
        rope_theta: f32,
        context_length: usize,
        rope_interleaved: bool,
    ) -> Self {
        Self {
            arch: Arch::Llama,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            context_length,
            rope: RopeConfig::plain(rope_theta, rope_interleaved),
            sliding_window: None,
            windowed_layers: Vec::new(),
            local_rope: None,
            qk_norm: false,
            post_norms: false,
            embed_scale: None,
            activation: Activation::Silu,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
        }
    }

    /// Whether layer `layer` attends through the sliding window.
    pub fn layer_is_windowed(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.windowed_layers.get(layer) == Some(&true)
    }

    /// The rotary embedding layer `layer` uses.
    pub fn layer_rope(&self, layer: usize) -> &RopeConfig {
        match &self.local_rope {
            Some(local) if self.layer_is_windowed(layer) => local,
            _ => &self.rope,
        }
    }

    /// Reads the configuration of a GGUF file's architecture from its metadata.
    /// `rope_freqs` is the `rope_freqs.weight` tensor (Llama 3.1) or, for Phi-3, its
    /// `rope_factors_short.weight`, when the file has one.
    pub fn from_gguf(
        md: &HashMap<String, Value>,
        rope_freqs: Option<Vec<f32>>,
    ) -> Result<Self, ModelError> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| ModelError::Metadata(format!("GGUF metadata lacks `{k}`")))
        };
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|e| ModelError::Metadata(e.to_string()))?
            .clone();
        let arch = Arch::from_gguf_name(&arch_name).ok_or_else(|| {
            let known: Vec<_> = Arch::ALL.iter().map(|a| a.gguf_name()).collect();
            ModelError::Unsupported(format!(
                "GGUF architecture `{arch_name}`; idlerig runs {}",
                known.join(", ")
            ))
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| md.get(&key(k)).and_then(super::gguf_int);
        let u = |k: &str| -> Result<usize, ModelError> {
            match md.get(&key(k)) {
                None => Err(ModelError::Metadata(format!(
                    "GGUF metadata lacks `{}`",
                    key(k)
                ))),
                Some(v) => super::gguf_int(v)
                    .ok_or_else(|| ModelError::Metadata(format!("`{}` is not an integer", key(k)))),
            }
        };
        let float = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok());
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let vocab = match int("vocab_size") {
            Some(v) => v,
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| ModelError::Metadata("cannot tell the vocabulary size".into()))?,
        };
        let head_dim = match int("attention.key_length") {
            Some(d) => d,
            None => derived_head_dim(
                hidden,
                heads,
                &key("embedding_length"),
                &key("attention.head_count"),
            )?,
        };
        if let Some(v) = int("attention.value_length").filter(|&v| v != head_dim) {
            return Err(ModelError::Unsupported(format!(
                "`{}` = {v} differs from the key length {head_dim}",
                key("attention.value_length")
            )));
        }
        if let Some(r) = int("rope.dimension_count").filter(|&r| r != head_dim) {
            return Err(ModelError::Unsupported(format!(
                "`{}` = {r}: partial rotary embeddings (over fewer than the {head_dim} \
                 dimensions of a head) are not supported",
                key("rope.dimension_count")
            )));
        }
        let heads_kv = match md.get(&key("attention.head_count_kv")) {
            // Per-layer counts (an array) exist in a few families idlerig does not run.
            Some(v) => super::gguf_int(v).ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "`{}` is not one integer (per-layer KV head counts are not supported)",
                    key("attention.head_count_kv")
                ))
            })?,
            None => heads,
        };
        let eps = float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64;
        let theta = float("rope.freq_base").unwrap_or(10_000.0);
        let mut rope = RopeConfig::plain(theta, arch.rope_interleaved());
        match md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => {}
            Some("linear") => {
                let factor = float("rope.scaling.factor").unwrap_or(1.0);
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(ModelError::Metadata(format!(
                        "`{}` = {factor}: must be a positive number",
                        key("rope.scaling.factor")
                    )));
                }
                rope.position_scale = 1.0 / factor;
            }
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "`{}` = `{other}`: only linear rotary scaling (and Llama 3.1's rope_freqs) \
                     is supported",
                    key("rope.scaling.type")
                )))
            }
        }
        if let Some(f) = &rope_freqs {
            if f.len() != head_dim / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(ModelError::Metadata(format!(
                    "tensor `rope_freqs.weight` must hold {} positive factors",
                    head_dim / 2
                )));
            }
        }
        rope.freq_factors = rope_freqs;
        if let Some(m) = float("rope.scaling.attn_factor") {
            if !(m.is_finite() && m > 0.0) {
                return Err(ModelError::Metadata(format!(
                    "`{}` = {m}: must be a positive number",
                    key("rope.scaling.attn_factor")
                )));
            }
            rope.mscale = m;
        }
        let mut cfg = Self::llama(
            hidden,
            u("feed_forward_length")?,
            u("block_count")?,
            heads,
            heads_kv,
            head_dim,
            vocab,
            eps,
            theta,
            u("context_length")?,
            arch.rope_interleaved(),
        );
        cfg.arch = arch;
        cfg.rope = rope;
        let pattern = |default: usize| -> Result<Vec<bool>, ModelError> {
            let layers = cfg.num_layers;
            match md.get(&key("attention.sliding_window_pattern")) {
                Some(Value::Array(flags)) => {
                    let flags: Vec<bool> = flags.iter().filter_map(|f| f.to_bool().ok()).collect();
                    if flags.len() != layers {
                        return Err(ModelError::Metadata(format!(
                            "`{}` must hold one flag per layer ({layers})",
                            key("attention.sliding_window_pattern")
                        )));
                    }
                    Ok(flags)
                }
                other => {
                    let n = other.and_then(super::gguf_int).unwrap_or(default);
                    Ok((0..layers).map(|l| n == 0 || l % n < n - 1).collect())
                }
            }
        };
        match arch {
            Arch::Llama | Arch::Qwen2 => {}
            Arch::Qwen3 => cfg.qk_norm = true,
            Arch::Phi3 => {
                // Phi-3's LongRoPE: llama.cpp takes the short factors while the context stays
                // within the original one, which idlerig then keeps to. Its sliding window
                // (`attention.sliding_window`) llama.cpp turns off, and so does idlerig.
                if let Some(orig) = int("rope.scaling.original_context_length") {
                    cfg.context_length = cfg.context_length.min(orig);
                }
            }
            Arch::Gemma2 | Arch::Gemma3 => {
                cfg.post_norms = true;
                cfg.embed_scale = Some((hidden as f32).sqrt());
                cfg.activation = Activation::GeluTanh;
                if arch == Arch::Gemma3 {
                    cfg.qk_norm = true;
                    cfg.final_softcap = float("final_logit_softcapping").filter(|c| *c != 0.0);
                    cfg.sliding_window = int("attention.sliding_window").filter(|&w| w > 0);
                    if cfg.sliding_window.is_some() {
                        cfg.windowed_layers = pattern(6)?;
                        // Windowed layers rotate with their own base and no scaling.
                        let base = float("rope.freq_base_swa").unwrap_or(10_000.0);
                        cfg.local_rope = Some(RopeConfig::plain(base, false));
                    }
                } else {
                    cfg.attn_softcap = Some(float("attn_logit_softcapping").unwrap_or(50.0));
                    cfg.final_softcap = Some(float("final_logit_softcapping").unwrap_or(30.0));
                    cfg.sliding_window = Some(int("attention.sliding_window").unwrap_or(4096));
                    cfg.windowed_layers = pattern(2)?;
                    if let Some(base) = float("rope.freq_base_swa") {
                        cfg.local_rope = Some(RopeConfig {
                            theta: base,
                            ..cfg.rope.clone()
                        });
                    }
                }
                // Gemma scales queries by 1/√query_pre_attn_scalar, which GGUF does not
                // store: llama.cpp knows it is hidden ÷ heads for the 27B models (46 or 62
                // layers) and the head dimension for the others.
                let big = (arch == Arch::Gemma2 && cfg.num_layers == 46)
                    || (arch == Arch::Gemma3 && cfg.num_layers == 62);
                // (`validate` below refuses zero heads; this must not divide by them first.)
                let scalar = if big { hidden / heads.max(1) } else { head_dim };
                cfg.attn_scale = 1.0 / (scalar as f32).sqrt();
            }
        }
        cfg.validate(Some(&arch_name))?;
        Ok(cfg)
    }

    /// Refuses a configuration no real model has, naming the field (in the file's own
    /// convention: GGUF metadata keys with `gguf_prefix`, or config.json's), before any
    /// tensor is read.
    pub fn validate(&self, gguf_prefix: Option<&str>) -> Result<(), ModelError> {
        let key = |g: &str, h: &str| match gguf_prefix {
            Some(prefix) => format!("{prefix}.{g}"),
            None => h.to_string(),
        };
        let bad = |k: String, v: &dyn std::fmt::Display, why: &str| {
            Err(ModelError::Metadata(format!("`{k}` = {v}: {why}")))
        };
        let heads = key("attention.head_count", "num_attention_heads");
        let kv = key("attention.head_count_kv", "num_key_value_heads");
        if self.num_heads == 0 || self.num_heads > MAX_WIDTH {
            return bad(heads, &self.num_heads, "needs at least one attention head");
        }
        if self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(
                kv,
                &self.num_kv_heads,
                &format!("must divide the {} query heads", self.num_heads),
            );
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 || self.head_dim > MAX_WIDTH {
            let k = key("attention.key_length", "head_dim");
            return bad(
                k,
                &self.head_dim,
                "the head dimension must be even and positive (rotary pairs)",
            );
        }
        let checks = [
            (
                key("embedding_length", "hidden_size"),
                self.hidden_size,
                MAX_WIDTH,
            ),
            (
                key("feed_forward_length", "intermediate_size"),
                self.intermediate_size,
                MAX_WIDTH,
            ),
            (
                key("block_count", "num_hidden_layers"),
                self.num_layers,
                MAX_LAYERS,
            ),
            (
                key("context_length", "max_position_embeddings"),
                self.context_length,
                MAX_CONTEXT,
            ),
            (key("vocab_size", "vocab_size"), self.vocab_size, MAX_VOCAB),
            (
                key("attention.sliding_window", "sliding_window"),
                self.sliding_window.unwrap_or(1),
                MAX_CONTEXT,
            ),
        ];
        for (k, v, max) in checks {
            if v == 0 || v > max {
                return bad(k, &v, &format!("must be between 1 and {max}"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            let k = key("attention.layer_norm_rms_epsilon", "rms_norm_eps");
            return bad(k, &self.rms_norm_eps, "must be a positive number");
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 0.0) {
            return bad(
                key("rope.freq_base", "rope_theta"),
                &self.rope.theta,
                "must be a positive number",
            );
        }
        for (name, cap) in [
            ("attn_logit_softcapping", self.attn_softcap),
            ("final_logit_softcapping", self.final_softcap),
        ] {
            if let Some(c) = cap.filter(|c| !(c.is_finite() && *c > 0.0)) {
                return bad(key(name, name), &c, "must be a positive number");
            }
        }
        Ok(())
    }
}

/// hidden ÷ heads, when the file gives no head dimension: heads must divide hidden.
pub(super) fn derived_head_dim(
    hidden: usize,
    heads: usize,
    hidden_key: &str,
    heads_key: &str,
) -> Result<usize, ModelError> {
    if heads == 0 || hidden % heads != 0 {
        return Err(ModelError::Metadata(format!(
            "`{heads_key}` = {heads} does not divide `{hidden_key}` = {hidden}"
        )));
    }
    Ok(hidden / heads)
}
