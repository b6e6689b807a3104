//! Models by name, from where people already keep them: the Hugging Face cache
//! (`hf:ORG/REPO[:QUANT|:FILE]`, see [`hf`]) and Ollama's store (`ollama:NAME[:TAG]`, see
//! [`ollama`]). This subsystem only reads those folders, as the tools that wrote them laid them
//! out, and resolves a name to a file (or a safetensors folder) the loader opens like any
//! other; it never writes to them. [`list`] lists what both stores hold (`idlerig models`).

pub mod hf;
pub mod ollama;

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum StoreError {
    /// The store has no such model, or not the file asked for: what is missing, and how to
    /// get it.
    #[error("{0}")]
    Missing(String),
    /// The name is not one this store understands.
    #[error("{0}")]
    BadName(String),
    /// The store's files are not what its tool writes.
    #[error("{0}")]
    Damaged(String),
}

/// A model found in a store: the file (or folder) to load and the name it is served as.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub path: PathBuf,
    pub name: String,
}

/// Where the stores are: from the environment as their tools read it.
#[derive(Debug, Clone)]
pub struct Stores {
    /// The Hugging Face hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub hf_cache: PathBuf,
    /// Ollama's models folder (`OLLAMA_MODELS`, else `~/.ollama/models`).
    pub ollama: PathBuf,
}

impl Stores {
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = var("HOME").unwrap_or_else(|| PathBuf::from("."));
        let hf_cache = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .unwrap_or_else(|| home.join(".cache/huggingface/hub"));
        let ollama = var("OLLAMA_MODELS").unwrap_or_else(|| home.join(".ollama/models"));
        Self { hf_cache, ollama }
    }

    /// `hf:…` or `ollama:…` resolved in its store; `None` for anything else (a path).
    pub fn resolve(&self, spec: &str) -> Option<Result<Resolved, StoreError>> {
        if let Some(name) = spec.strip_prefix("hf:") {
            return Some(hf::resolve(&self.hf_cache, name));
        }
        if let Some(name) = spec.strip_prefix("ollama:") {
            return Some(ollama::resolve(&self.ollama, name));
        }
        None
    }
}

/// A model a store holds, as `idlerig models` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// What `--model` takes to serve it.
    pub spec: String,
    pub bytes: u64,
    /// The quantization its file name (or header) says, when known.
    pub quant: Option<String>,
    pub path: PathBuf,
}

/// Every model both stores hold.
pub fn list(stores: &Stores) -> Vec<Listed> {
    let mut out = hf::list(&stores.hf_cache);
    out.extend(ollama::list(&stores.ollama));
    out
}

/// What `idlerig models` prints: one line per model (what `--model` takes, its size, its
/// quantization, its file), and where it looked.
pub fn listing(stores: &Stores) -> String {
    let found = list(stores);
    let mut out = format!(
        "# Hugging Face cache: {}\n# Ollama store: {}\n",
        stores.hf_cache.display(),
        stores.ollama.display()
    );
    if found.is_empty() {
        out.push_str(
            "# no models found; `hf download ORG/REPO` or `ollama pull NAME` puts them there\n",
        );
    }
    let width = found.iter().map(|m| m.spec.len()).max().unwrap_or(0);
    for m in &found {
        out.push_str(&format!(
            "{:width$}  {:>9}  {:7}  {}\n",
            m.spec,
            human_bytes(m.bytes),
            m.quant.as_deref().unwrap_or("-"),
            m.path.display()
        ));
    }
    out
}

/// The quantization a GGUF file name carries (`…-Q4_K_M.gguf`, `….q8_0.gguf`, `…-f16.gguf`):
/// the last `-` or `.` separated word that is one.
pub fn quant_of_name(name: &str) -> Option<String> {
    let stem = name
        .strip_suffix(".gguf")
        .unwrap_or(name)
        .to_ascii_uppercase();
    let is_quant = |w: &str| {
        let digit_at = |i: usize| w.as_bytes().get(i).is_some_and(u8::is_ascii_digit);
        matches!(w, "F16" | "F32" | "BF16")
            || (w.starts_with('Q') && digit_at(1))
            || (w.starts_with("IQ") && digit_at(2))
    };
    stem.rsplit(['-', '.'])
        .find(|w| is_quant(w))
        .map(str::to_string)
}

/// Sizes as people read them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizations_are_read_from_file_names_as_the_tools_write_them() {
        for (name, q) in [
            ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", Some("Q4_K_M")),
            ("SmolLM2-135M-Instruct.Q4_1.gguf", Some("Q4_1")),
            ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", Some("IQ4_XS")),
            ("gemma-3-270m-it-F16.gguf", Some("F16")),
            ("model.gguf", None),
        ] {
            assert_eq!(quant_of_name(name).as_deref(), q, "{name}");
        }
    }
}
