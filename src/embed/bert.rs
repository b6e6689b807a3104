//! The BERT encoder (Devlin et al., 2019) of sentence-transformers models such as
//! all-MiniLM-L6-v2, on candle: word, position and token-type embeddings with a LayerNorm,
//! then post-norm layers of bidirectional self-attention and a GELU MLP. A batch of inputs of
//! different lengths runs padded, with padding hidden from attention by a mask.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::EmbedError;

/// The fields of a BERT `config.json` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}

fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn read(dir: &Path) -> Result<Self, EmbedError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        match cfg.model_type.as_deref() {
            Some("bert") | None => {}
            Some(other) => {
                return Err(EmbedError::Load(format!(
                    "model_type `{other}`: idlerig's encoder runs BERT models"
                )))
            }
        }
        if let Some(act) = cfg.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(EmbedError::Load(format!(
                "hidden_act `{act}`: idlerig's BERT encoder runs `gelu`"
            )));
        }
        if let Some(kind) = cfg
            .position_embedding_type
            .as_deref()
            .filter(|k| *k != "absolute")
        {
            return Err(EmbedError::Load(format!(
                "position_embedding_type `{kind}`: only absolute positions are supported"
            )));
        }
        let heads = cfg.num_attention_heads;
        if heads == 0 || cfg.hidden_size % heads != 0 || cfg.num_hidden_layers == 0 {
            return Err(EmbedError::Load(format!(
                "{}: {} attention heads do not divide a hidden size of {}",
                path.display(),
                heads,
                cfg.hidden_size
            )));
        }
        Ok(cfg)
    }
}

struct Layer {
    qkv: Linear,
    out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// The encoder's weights.
pub struct Bert {
    cfg: BertConfig,
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

impl Bert {
    /// Loads `model.safetensors` (a `bert.` prefix, as some exports have, is accepted).
    pub fn load(dir: &Path, cfg: BertConfig, device: &Device) -> Result<Self, EmbedError> {
        let file = dir.join("model.safetensors");
        if !file.exists() {
            return Err(EmbedError::Load(format!("{} is missing", file.display())));
        }
        // SAFETY: read-only mapping of a file idlerig never writes (see the chat model's loader).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }
            .map_err(|e| EmbedError::Load(format!("{}: {e}", file.display())))?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        Self::build(vb, cfg, device)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", file.display())))
    }

    fn build(vb: VarBuilder, cfg: BertConfig, device: &Device) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let e = vb.pp("embeddings");
        let words = embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let positions = embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let types = embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?;
        let norm = layer_norm(h, eps, e.pp("LayerNorm"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                // Q, K and V stacked into one product.
                let part = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                    let p = a.pp("self").pp(name);
                    Ok((p.get((h, h), "weight")?, p.get(h, "bias")?))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let qkv = Linear::new(
                    Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                    Some(Tensor::cat(&[&q.1, &k.1, &v.1], 0)?),
                );
                Ok(Layer {
                    qkv,
                    out: linear(h, h, a.pp("output").pp("dense"))?,
                    attn_norm: layer_norm(h, eps, a.pp("output").pp("LayerNorm"))?,
                    up: linear(h, cfg.intermediate_size, l.pp("intermediate").pp("dense"))?,
                    down: linear(cfg.intermediate_size, h, l.pp("output").pp("dense"))?,
                    out_norm: layer_norm(h, eps, l.pp("output").pp("LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            words,
            positions,
            types,
            norm,
            layers,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The last layer's hidden states of each input, `[inputs, longest, hidden]`, and the
    /// padding mask `[inputs, longest]` (1 for a token, 0 for padding), in f32.
    pub fn encode(&self, inputs: &[&[u32]]) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, t) = (
            inputs.len(),
            inputs.iter().map(|i| i.len()).max().unwrap_or(0),
        );
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (r, input) in inputs.iter().enumerate() {
            ids[r * t..r * t + input.len()].copy_from_slice(input);
            mask[r * t..r * t + input.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?;
        let x = self
            .words
            .forward(&ids)?
            .broadcast_add(&self.positions.forward(&pos)?)?
            .broadcast_add(
                &self
                    .types
                    .forward(&Tensor::zeros(t, DType::U32, &self.device)?)?,
            )?;
        let mut x = self.norm.forward(&x)?;
        // Padding keys get −∞ before the softmax: `[b, 1, 1, t]`, broadcast over heads and
        // queries.
        let hide = ((mask.ones_like()? - &mask)? * -1e30)?.reshape((b, 1, 1, t))?;
        let heads = self.cfg.num_attention_heads;
        let (h, d) = (self.cfg.hidden_size, self.cfg.hidden_size / heads);
        let scale = 1.0 / (d as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?; // [b, t, 3h]
            let split = |i: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(D::Minus1, i * h, h)?
                    .reshape((b, t, heads, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&hide)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            let a = layer.attn_norm.forward(&(layer.out.forward(&ctx)? + &x)?)?;
            let m = layer.up.forward(&a)?.gelu_erf()?;
            x = layer.out_norm.forward(&(layer.down.forward(&m)? + a)?)?;
        }
        Ok((x, mask))
    }
}
