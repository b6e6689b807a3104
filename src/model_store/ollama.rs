//! Ollama's store, as `ollama pull` writes it: a manifest per model and tag under
//! `manifests/registry.ollama.ai/NAMESPACE/NAME/TAG` (namespace `library` for official
//! models), whose `application/vnd.ollama.image.model` layer names the GGUF in `blobs/`
//! (`sha256-HEX`). `ollama:NAME[:TAG]` serves that blob (tag `latest` by default). The
//! manifest's template layer is Go template text, not the GGUF's Jinja template, so the chat
//! template comes from the GGUF, as Ollama's own GGUFs carry it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Listed, Resolved, StoreError};

const REGISTRY: &str = "registry.ollama.ai";
const MODEL_LAYER: &str = "application/vnd.ollama.image.model";

/// The manifest of `NAME[:TAG]`, and the name it is served as (`NAME:TAG`).
fn manifest_path(root: &Path, name: &str) -> Result<(PathBuf, String), StoreError> {
    let (model, tag) = match name.rsplit_once(':') {
        Some((m, t)) if !t.contains('/') => (m, t),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = model.split('/').collect();
    let bad = |why: &str| {
        StoreError::BadName(format!(
            "ollama:{name}: {why}; expected ollama:NAME[:TAG], e.g. ollama:llama3.2:1b"
        ))
    };
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
        || tag.is_empty()
        || tag == ".."
    {
        return Err(bad("an empty or relative part"));
    }
    let path = match parts.as_slice() {
        [m] => root
            .join("manifests")
            .join(REGISTRY)
            .join("library")
            .join(m),
        [ns, m] => root.join("manifests").join(REGISTRY).join(ns).join(m),
        [host, ns, m] => root.join("manifests").join(host).join(ns).join(m),
        _ => return Err(bad("too many parts")),
    };
    Ok((path.join(tag), format!("{model}:{tag}")))
}

/// The model blob a manifest names, if its layer is there.
fn model_blob(root: &Path, manifest: &Path) -> Result<(PathBuf, u64), StoreError> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| StoreError::Damaged(format!("{}: {e}", manifest.display())))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        StoreError::Damaged(format!(
            "{} is not an Ollama manifest: {e}",
            manifest.display()
        ))
    })?;
    let layer = v["layers"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["mediaType"] == MODEL_LAYER))
        .ok_or_else(|| StoreError::Damaged(format!("{} has no model layer", manifest.display())))?;
    let digest = layer["digest"].as_str().unwrap_or_default();
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            StoreError::Damaged(format!(
                "{}: the model layer's digest `{digest}` is not sha256:HEX",
                manifest.display()
            ))
        })?;
    let blob = root.join("blobs").join(format!("sha256-{hex}"));
    Ok((blob, layer["size"].as_u64().unwrap_or(0)))
}

/// Resolves `NAME[:TAG]` in the store at `root`.
pub fn resolve(root: &Path, name: &str) -> Result<Resolved, StoreError> {
    let (manifest, served) = manifest_path(root, name)?;
    if !manifest.is_file() {
        return Err(StoreError::Missing(format!(
            "ollama:{name} is not in Ollama's store ({}); fetch it with `ollama pull {name}` (OLLAMA_MODELS chooses another store)",
            root.display()
        )));
    }
    let (blob, _) = model_blob(root, &manifest)?;
    if !blob.is_file() {
        return Err(StoreError::Missing(format!(
            "ollama:{name}: its model blob {} is missing (an interrupted pull?); run `ollama pull {name}` again",
            blob.display()
        )));
    }
    Ok(Resolved {
        path: blob,
        name: served,
    })
}

/// Every model in the store at `root`.
pub fn list(root: &Path) -> Vec<Listed> {
    let base = root.join("manifests");
    let mut manifests = Vec::new();
    let mut todo = vec![base.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                manifests.push(p);
            }
        }
    }
    manifests.sort();
    manifests
        .into_iter()
        .filter_map(|m| {
            let rel: Vec<String> = m
                .strip_prefix(&base)
                .ok()?
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            let name = match rel.as_slice() {
                [host, ns, model, tag] if host == REGISTRY && ns == "library" => {
                    format!("{model}:{tag}")
                }
                [host, ns, model, tag] if host == REGISTRY => format!("{ns}/{model}:{tag}"),
                [host, ns, model, tag] => format!("{host}/{ns}/{model}:{tag}"),
                _ => return None,
            };
            let (blob, bytes) = model_blob(root, &m).ok()?;
            blob.is_file().then(|| Listed {
                spec: format!("ollama:{name}"),
                bytes,
                quant: None,
                path: blob,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_manifests_as_ollama_lays_them_out_and_escapes_are_refused() {
        let root = Path::new("/o");
        let m = |n: &str| manifest_path(root, n).map(|(p, s)| (p.display().to_string(), s));
        assert_eq!(
            m("llama3.2").unwrap(),
            (
                "/o/manifests/registry.ollama.ai/library/llama3.2/latest".into(),
                "llama3.2:latest".into()
            )
        );
        assert_eq!(
            m("qwen2.5:0.5b").unwrap().0,
            "/o/manifests/registry.ollama.ai/library/qwen2.5/0.5b"
        );
        assert_eq!(
            m("me/mine:v1").unwrap().0,
            "/o/manifests/registry.ollama.ai/me/mine/v1"
        );
        for bad in ["../x", "a/../../b", "a//b", "a:..", "a/b/c/d"] {
            assert!(m(bad).is_err(), "{bad}");
        }
    }
}
