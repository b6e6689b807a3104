//! Device facts and power draw for gpu-check, from `nvidia-smi` (it ships with the driver, so
//! it is on every GPU machine; idlerig's own power figure for the earnings comes from NVML).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Driver, GPU, clocks, power limit and memory, or `None` without `nvidia-smi`.
pub fn device_facts() -> Option<Value> {
    let fields = "driver_version,name,clocks.sm,clocks.max.sm,power.limit,memory.total,pci.bus_id";
    let out = Command::new("nvidia-smi")
        .args([
            &format!("--query-gpu={fields}"),
            "--format=csv,noheader,nounits",
            "--id=0",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Vec<&str> = line.trim().split(", ").collect();
    let num = |i: usize| v.get(i).and_then(|s| s.trim().parse::<f64>().ok());
    Some(json!({
        "driver": v.first(), "name": v.get(1),
        "sm_clock_mhz": num(2), "max_sm_clock_mhz": num(3),
        "power_limit_w": num(4), "memory_mib": num(5), "pci_bus_id": v.get(6),
    }))
}

/// Samples the board's power draw every 100 ms until finished; the mean.
pub struct Sampler {
    child: Option<Child>,
    samples: Arc<Mutex<Vec<f64>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(enabled: bool) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let child = enabled
            .then(|| {
                Command::new("nvidia-smi")
                    .args([
                        "--query-gpu=power.draw",
                        "--format=csv,noheader,nounits",
                        "--id=0",
                        "-lms",
                        "100",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .flatten();
        let mut s = Self {
            child,
            samples: samples.clone(),
            reader: None,
        };
        if let Some(out) = s.child.as_mut().and_then(|c| c.stdout.take()) {
            s.reader = Some(std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(w) = line.trim().parse::<f64>() {
                        samples.lock().expect("power samples").push(w);
                    }
                }
            }));
        }
        s
    }

    /// Waits `d` (the phase being measured is the wait itself), then finishes.
    pub fn finish_after(self, d: Duration) -> Option<f64> {
        if self.child.is_some() {
            std::thread::sleep(d);
        }
        self.finish()
    }

    pub fn finish(mut self) -> Option<f64> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let s = self.samples.lock().expect("power samples");
        (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
    }
}
