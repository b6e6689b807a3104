//! Models by name from where people keep them: a Hugging Face cache and an Ollama store,
//! each laid out exactly as `huggingface_hub` and `ollama pull` write them (snapshot links
//! into `blobs/`, manifests naming `sha256-…` blobs), built around the default model's GGUF.
//! `serve` serves both at once, offline; `idlerig models` lists them; a model not in the store
//! is refused with the command that would fetch it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{default_model_path, start_serve, temp_dir};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_idlerig");
const REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";

#[cfg(unix)]
fn link(target: &Path, at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

/// A Hugging Face cache holding `REPO` at revision `abc123`: two GGUFs (Q4_1 and a Q8_0
/// name), links from the snapshot into `blobs/`, as `hf download` leaves them.
fn hf_cache(root: &Path, gguf: &Path) {
    let repo = root.join(format!("models--{}", REPO.replace('/', "--")));
    link(gguf, &repo.join("blobs/0f1e2d3c4b5a"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    for name in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.Q8_0.gguf",
    ] {
        link(
            Path::new("../../blobs/0f1e2d3c4b5a"),
            &repo.join("snapshots/abc123").join(name),
        );
    }
}

/// An Ollama store holding `smollm2:135m`.
fn ollama_store(root: &Path, gguf: &Path) {
    let hex = "a".repeat(64);
    link(gguf, &root.join(format!("blobs/sha256-{hex}")));
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": format!("sha256:{}", "b".repeat(64)), "size": 485},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": 98362432},
            {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "c".repeat(64)), "size": 182}]});
    let at = root.join("manifests/registry.ollama.ai/library/smollm2/135m");
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::write(at, manifest.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hf_and_ollama_models_are_served_by_name_offline_and_listed() {
    let dir = temp_dir("model-stores");
    let gguf = std::fs::canonicalize(default_model_path()).unwrap();
    let (hf, ollama) = (dir.join("hf/hub"), dir.join("ollama/models"));
    hf_cache(&hf, &gguf);
    ollama_store(&ollama, &gguf);
    // This test binary has this one test: the stores are found through the environment, as
    // their tools find them.
    std::env::set_var("HF_HUB_CACHE", &hf);
    std::env::set_var("OLLAMA_MODELS", &ollama);

    let listed = Command::new(BIN).arg("models").output().unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    for spec in [
        format!("hf:{REPO}:Q4_1"),
        format!("hf:{REPO}:Q8_0"),
        "ollama:smollm2:135m".into(),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{spec} "))),
            "{spec} not listed:\n{text}"
        );
    }

    let a = format!("a=hf:{REPO}:Q4_1");
    let argv = [
        "--local-pool-port",
        "0",
        "--no-mine",
        "--data-dir",
        "none",
        "--embedding-model",
        "none",
        "--model",
        &a,
        "--model",
        "ollama:smollm2:135m",
    ];
    let (_running, base) = start_serve(&argv, std::future::pending()).await;
    let http = reqwest::Client::new();
    let models: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "smollm2:135m"], "{models}");
    for model in ids {
        let res = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200, "{model}");
    }

    // Not in the store, or not one model: refused before anything starts, saying what to do.
    for (spec, says) in [
        (
            "hf:nobody/nothing".to_string(),
            "hf download nobody/nothing",
        ),
        (format!("hf:{REPO}"), "several GGUF files"),
        (format!("hf:{REPO}:Q5_K_M"), "--include '*Q5_K_M*.gguf'"),
        ("ollama:llama3.2".into(), "ollama pull llama3.2"),
    ] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--port",
                "0",
                "--local-pool-port",
                "0",
                "--no-mine",
                "--model",
                &spec,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{spec}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
