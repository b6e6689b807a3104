//! llama.cpp as a reference in the same run: `scripts/llama-cpp-setup` provides a Python
//! with llama-cpp-python (built once per CPU into a cache, natively less AMX), and
//! `scripts/llama-cpp-ref.py` runs as a child process that loads the model once, says what
//! its llama.cpp was built for, and times each request it is sent. The scripts are found in
//! the working tree (`--scripts-dir`), never through the path the binary was compiled in.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use super::infer::StreamTiming;

/// The running reference process.
pub struct LlamaCppRef {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    build: serde_json::Value,
}

impl LlamaCppRef {
    /// Sets up llama-cpp-python if needed (the scripts in `scripts`) and starts the
    /// reference on `model`.
    pub fn start(scripts: &Path, model: &Path, threads: usize) -> Result<Self, String> {
        let setup_path = scripts.join("llama-cpp-setup");
        if !setup_path.is_file() {
            return Err(format!(
                "{} not found: run from the repository root, or give --scripts-dir",
                setup_path.display()
            ));
        }
        let setup = Command::new(&setup_path)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", setup_path.display()))?;
        if !setup.status.success() {
            return Err(format!(
                "{} failed ({})",
                setup_path.display(),
                setup.status
            ));
        }
        let python = String::from_utf8_lossy(&setup.stdout).trim().to_string();
        let mut child = Command::new(&python)
            .arg(scripts.join("llama-cpp-ref.py"))
            .arg("--model")
            .arg(model)
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {python}: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut reference = Self {
            child,
            stdin,
            stdout,
            build: serde_json::Value::Null,
        };
        let ready = reference.read_line()?;
        if ready.get("ready") != Some(&json!(true)) {
            return Err(format!("llama.cpp reference did not start: {ready}"));
        }
        reference.build = ready
            .get("build")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        Ok(reference)
    }

    /// What the reference was built for (compiler flags, ggml's instruction sets), as
    /// scripts/llama-cpp-setup recorded it.
    pub fn build(&self) -> &serde_json::Value {
        &self.build
    }

    fn read_line(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading the llama.cpp reference: {e}"))?;
        if n == 0 {
            return Err("the llama.cpp reference exited (see its error above)".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("llama.cpp reference said {line:?}: {e}"))
    }

    /// Runs one greedy request of `gen` tokens after `prompt`, timed by the reference itself.
    pub fn run(&mut self, prompt: &[u32], gen: usize) -> Result<StreamTiming, String> {
        let request = json!({ "prompt": prompt, "gen": gen });
        writeln!(self.stdin, "{request}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("writing to the llama.cpp reference: {e}"))?;
        let reply = self.read_line()?;
        let secs = |key: &str| {
            reply[key]
                .as_f64()
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("llama.cpp reference reply lacks {key}: {reply}"))
        };
        let ttft = secs("ttft_s")?;
        Ok(StreamTiming {
            ttft,
            total: ttft + secs("decode_s")?,
            tokens: gen,
            prompt_tokens: 0,
            cached_tokens: 0,
        })
    }
}

impl Drop for LlamaCppRef {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
