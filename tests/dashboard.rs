//! The dashboard in a real headless Chromium against a running server that mines on the
//! embedded pool and has served requests: the page renders the status, both charts have
//! points, the earnings are shown, and a screenshot is written (its path is printed).
//! Needs Debian's `chromium` (`.ci/run` installs it).

use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use idlerig::config::{Cli, Command as Cmd};
use serde_json::{json, Value};

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("no Chromium found: install Debian's `chromium` package (.ci/run does)");
}

/// Chromium, headless, with the flags a closed network and a root user need.
fn browser(profile: &std::path::Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1400,1000",
        // Virtual time runs only while the page waits on no request: enough for the first
        // poll of /v1/status and a second one.
        "--virtual-time-budget=5000",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_in_a_real_browser() {
    let Cmd::Serve(args) = Cli::parse_from([
        "idlerig",
        "serve",
        "--local-pool-port",
        "0",
        "--mine-threads",
        "1",
        "--idle-grace-ms",
        "50",
        "--history-interval-ms",
        "400",
    ])
    .command
    else {
        unreachable!()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = idlerig::server::start(args, listener, std::future::pending())
        .await
        .unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let status = || async {
        let r = http.get(format!("{base}/v1/status")).send().await;
        match r {
            Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    };
    let t = Instant::now();
    while status().await["engine"].is_null() {
        assert!(t.elapsed() < Duration::from_secs(60), "model did not load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Some serving between stretches of mining, so every series has data.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = http
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let s = loop {
        let s = status().await;
        let points = s["telemetry"]["history"].as_array().map_or(0, Vec::len);
        if points >= 6 && s["mining"]["hashes"].as_u64().unwrap_or(0) > 0 {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "no history: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let history = s["telemetry"]["history"].as_array().unwrap();
    assert!(
        history.iter().any(|p| p["mining"].as_f64().unwrap() > 0.0),
        "{s}"
    );

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let profile = dir.join(format!("chromium-profile-{}", std::process::id()));
    let out = tokio::task::spawn_blocking({
        let (base, profile) = (base.clone(), profile.clone());
        move || {
            browser(&profile)
                .arg("--dump-dom")
                .arg(format!("{base}/"))
                .output()
        }
    })
    .await
    .unwrap()
    .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-state=\"ready\""),
        "the page never rendered a status:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let points = |id: &str| -> usize {
        let at = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id}"));
        let tag = &dom[at..at + dom[at..].find('>').unwrap()];
        let p = tag.find("data-points=\"").expect("data-points") + 13;
        tag[p..p + tag[p..].find('"').unwrap()].parse().unwrap()
    };
    assert!(points("split-chart") >= 6, "device-time chart:\n{dom}");
    assert!(points("rate-chart") >= 6, "rate chart:\n{dom}");
    assert!(dom.contains("<polygon class=\"mining\""), "{dom}");
    // Both charts have labelled axes: five times ending "now" below, values beside.
    let ticks = |id: &str| -> Vec<String> {
        let at = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id}"));
        let end = at + dom[at..].find("</div>").unwrap();
        dom[at..end]
            .split("<span class=\"tick\">")
            .skip(1)
            .map(|t| t.split("</span>").next().unwrap().to_string())
            .collect()
    };
    for x in ["split-x", "rate-x"] {
        let t = ticks(x);
        assert!(
            t.len() == 5 && t[4] == "now" && t[0].starts_with('−'),
            "{x}: {t:?}"
        );
    }
    assert_eq!(ticks("split-y"), ["100%", "50%", "0%"]);
    let hashrate = ticks("rate-y");
    assert!(
        hashrate.len() == 3 && hashrate[0].ends_with("H/s"),
        "{hashrate:?}"
    );
    assert!(
        ticks("rate-y2")[0].ends_with("req/s"),
        "{:?}",
        ticks("rate-y2")
    );
    assert!(dom.contains("<polygon class=\"deferred\""), "{dom}");
    assert!(dom.contains("<polyline class=\"hashrate\""), "{dom}");
    assert!(dom.contains("embedded pool: no payouts"), "{dom}");
    let text_of = |id: &str| -> String {
        let at = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id}"));
        let start = at + dom[at..].find('>').unwrap() + 1;
        dom[start..start + dom[start..].find('<').unwrap()].to_string()
    };
    assert!(
        text_of("hashrate").ends_with("H/s"),
        "{}",
        text_of("hashrate")
    );
    assert!(
        text_of("d-total").contains("tokens = $"),
        "deferred work's value: {}",
        text_of("d-total")
    );
    assert!(
        text_of("e-pow").starts_with('$'),
        "power cost: {}",
        text_of("e-pow")
    );
    assert!(
        text_of("e-net").starts_with("-$"),
        "net: {}",
        text_of("e-net")
    );
    assert!(text_of("ttft").contains("ms"), "ttft: {}", text_of("ttft"));
    // The CPU miner's stop is not called pre-emption latency: inference does not wait for it.
    assert!(
        text_of("preempt-k").starts_with("CPU miner stop"),
        "the CPU figure's label: {}",
        text_of("preempt-k")
    );

    let shot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = tokio::task::spawn_blocking({
        let (base, profile, shot) = (base.clone(), profile.clone(), shot.clone());
        move || {
            browser(&profile)
                .arg(format!("--screenshot={}", shot.display()))
                .arg(format!("{base}/"))
                .output()
        }
    })
    .await
    .unwrap()
    .expect("chromium runs");
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("dashboard screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(profile);
}
