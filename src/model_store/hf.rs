//! The Hugging Face cache, as `huggingface_hub` (`hf download`, vLLM, llama.cpp's `-hf`)
//! writes it: `models--ORG--REPO/refs/main` names a revision, `snapshots/REV/…` holds the
//! repository's files as links into `blobs/`. `hf:ORG/REPO` serves the snapshot's one GGUF
//! (or its safetensors, `config.json` beside them); `hf:ORG/REPO:Q4_K_M` the GGUF of that
//! quantization; `hf:ORG/REPO:FILE.gguf` that file.

use std::path::{Path, PathBuf};

use super::{quant_of_name, Listed, Resolved, StoreError};

/// The cache folder of `ORG/REPO`.
fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The snapshot `refs/main` names (or the only one there is).
fn snapshot(dir: &Path) -> Option<PathBuf> {
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs/main")) {
        let snap = dir.join("snapshots").join(rev.trim());
        if snap.is_dir() {
            return Some(snap);
        }
    }
    let mut snaps = std::fs::read_dir(dir.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path());
    let one = snaps.next()?;
    snaps.next().is_none().then_some(one)
}

/// The files under `dir` (links followed), relative to it, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => todo.push(path),
                Ok(_) => out.extend(path.strip_prefix(dir).ok().map(Path::to_path_buf)),
                Err(_) => {} // a link to a blob still downloading, or gone
            }
        }
    }
    out.sort();
    out
}

fn is_gguf(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A split GGUF's later parts (`…-00002-of-00003.gguf`): the first part names the model.
fn later_split_part(name: &str) -> bool {
    let stem = name.trim_end_matches(".gguf");
    let mut parts = stem.rsplitn(3, '-');
    let (total, of, index) = (parts.next(), parts.next(), parts.next());
    match (total, of, index) {
        (Some(_), Some("of"), Some(rest)) => rest
            .rsplit('-')
            .next()
            .is_some_and(|i| i.parse::<u32>().is_ok_and(|i| i > 1)),
        _ => false,
    }
}

/// Resolves `ORG/REPO[:QUANT|:FILE]` in the cache at `cache`.
pub fn resolve(cache: &Path, name: &str) -> Result<Resolved, StoreError> {
    let (repo, select) = match name.split_once(':') {
        Some((r, s)) => (r, Some(s)),
        None => (name, None),
    };
    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
        return Err(StoreError::BadName(format!("hf:{name}: expected hf:ORG/REPO[:QUANT|:FILE], e.g. hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")));
    }
    let fetch = |what: &str| match select {
        Some(s) if s.ends_with(".gguf") => format!("hf download {repo} {s}"),
        Some(q) => format!("hf download {repo} --include '*{q}*.gguf'{what}"),
        None => format!("hf download {repo}{what}"),
    };
    let dir = repo_dir(cache, repo);
    let Some(snap) = snapshot(&dir) else {
        return Err(StoreError::Missing(format!(
            "hf:{repo} is not in the Hugging Face cache ({}); fetch it with `{}` (HF_HUB_CACHE or HF_HOME choose another cache)",
            cache.display(),
            fetch("")
        )));
    };
    let all = files(&snap);
    let ggufs: Vec<&PathBuf> = all
        .iter()
        .filter(|p| is_gguf(p) && !later_split_part(&file_name(p)))
        .collect();
    let chosen: Vec<&PathBuf> = match select {
        Some(f) if f.ends_with(".gguf") => ggufs
            .iter()
            .copied()
            .filter(|p| p.as_path() == Path::new(f) || file_name(p) == f)
            .collect(),
        Some(q) => ggufs
            .iter()
            .copied()
            .filter(|p| {
                quant_of_name(&file_name(p)).is_some_and(|have| have.eq_ignore_ascii_case(q))
            })
            .collect(),
        None => ggufs.clone(),
    };
    let available = || {
        ggufs
            .iter()
            .map(|p| file_name(p))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match chosen.as_slice() {
        [one] => {
            let file = file_name(one);
            if file.contains("-00001-of-") {
                return Err(StoreError::BadName(format!(
                    "hf:{name}: {file} is the first part of a split GGUF; serving split GGUFs is not supported yet: merge the parts with llama.cpp's `llama-gguf-split --merge`"
                )));
            }
            Ok(Resolved { path: snap.join(one), name: file.trim_end_matches(".gguf").to_string() })
        }
        [] if select.is_none() && snap.join("config.json").is_file() => Ok(Resolved {
            path: snap,
            name: repo.rsplit('/').next().unwrap_or(repo).to_string(),
        }),
        [] if ggufs.is_empty() => Err(StoreError::Missing(format!(
            "hf:{repo} in the cache ({}) has no GGUF file{}; fetch one with `{}`",
            snap.display(),
            if select.is_none() { " and no config.json" } else { "" },
            fetch("")
        ))),
        [] => Err(StoreError::Missing(format!(
            "hf:{name}: no such GGUF in the cached snapshot (it has {}); fetch it with `{}`",
            available(),
            fetch("")
        ))),
        _ => Err(StoreError::BadName(format!(
            "hf:{name} holds several GGUF files ({}); name one as hf:{repo}:QUANT or hf:{repo}:FILE.gguf",
            available()
        ))),
    }
}

/// Every model in the cache at `cache`.
pub fn list(cache: &Path) -> Vec<Listed> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let Some(repo) = file_name(&dir)
            .strip_prefix("models--")
            .map(|r| r.replacen("--", "/", 1))
        else {
            continue;
        };
        let Some(snap) = snapshot(&dir) else { continue };
        let all = files(&snap);
        let size = |p: &Path| std::fs::metadata(snap.join(p)).map_or(0, |m| m.len());
        for p in all
            .iter()
            .filter(|p| is_gguf(p) && !later_split_part(&file_name(p)))
        {
            let quant = quant_of_name(&file_name(p));
            let spec = match &quant {
                Some(q) => format!("hf:{repo}:{q}"),
                None => format!("hf:{repo}:{}", p.display()),
            };
            out.push(Listed {
                spec,
                bytes: size(p),
                quant,
                path: snap.join(p),
            });
        }
        let weights: Vec<&PathBuf> = all
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        if snap.join("config.json").is_file() && !weights.is_empty() {
            out.push(Listed {
                spec: format!("hf:{repo}"),
                bytes: weights.iter().map(|p| size(p)).sum(),
                quant: None,
                path: snap.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parts_after_the_first_are_not_models_of_their_own() {
        assert!(later_split_part(
            "Qwen2.5-7B-Instruct-Q4_K_M-00002-of-00002.gguf"
        ));
        assert!(!later_split_part(
            "Qwen2.5-7B-Instruct-Q4_K_M-00001-of-00002.gguf"
        ));
        assert!(!later_split_part("SmolLM2-135M-Instruct.Q4_1.gguf"));
    }
}
