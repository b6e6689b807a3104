//! The batch subsystem's bounds, tested on the store and on the runner with a stand-in for
//! the HTTP layer: parsed input lines held at once, a large batch resumed after a reopen, the
//! result files streamed in bounded memory, a finalize that keeps failing, an answer that
//! cannot be stored, and the caps on unfinished batches. Nothing here waits on timing: state
//! is polled with a deadline.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::jsonl::JsonlCheck;
use super::results::{write_synced, MAX_FINALIZE_TRIES};
use super::store::{LineResult, Store};
use super::test_alloc::peak_bytes;
use super::*;

const URL: &str = "/v1/completions";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("idlerig-bt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(dir: &Path, concurrency: usize) -> BatchConfig {
    BatchConfig {
        dir: dir.into(),
        db_path: dir.join("batches.db"),
        max_file_bytes: 1 << 30,
        max_requests: 100_000,
        max_line_bytes: 1 << 20,
        concurrency,
        window_s: 86_400,
        max_active_per_key: 64,
        max_active: 64,
        max_result_bytes: MAX_RESULT_BYTES,
        responses_retention_s: 86_400,
    }
}

/// An input file of `n` requests whose prompts start with their custom ids (`{tag}{i}`),
/// padded to `pad` bytes, with a blank line after every seventh (blank lines are not
/// requests: the numbering must skip them).
fn input_text(tag: &str, n: usize, pad: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        let prompt = format!("{tag}{i} {}", "x".repeat(pad));
        let line = json!({"custom_id": format!("{tag}{i}"), "method": "POST", "url": URL,
                          "body": {"prompt": prompt, "max_tokens": 1}});
        text.push_str(&format!("{line}\n"));
        if i % 7 == 6 {
            text.push_str("  \n");
        }
    }
    text
}

fn create(s: &mut Store, text: &str, owner: Option<&str>) -> Result<BatchObject, BatchError> {
    let mut check = JsonlCheck::new(vec![URL], 100_000, 1 << 20);
    check.push(text.as_bytes());
    let summary = check.finish().map_err(BatchError::Io)?;
    let tmp = s.tmp_path()?;
    write_synced(&tmp, text.as_bytes()).map_err(|e| BatchError::Io(e.to_string()))?;
    let file = s.add_file(owner, "in.jsonl", "batch", &tmp, &summary)?;
    s.create_batch(&Viewer::All, owner, &file.id, URL, None, 86_400)
}

/// The custom id a stand-in call is for: its prompt's first word.
fn custom_id(call: &LineCall) -> String {
    let prompt = call.body["prompt"].as_str().unwrap_or_default();
    prompt.split(' ').next().unwrap_or_default().to_string()
}

fn answer(status: u16, body: Value) -> LineReply {
    LineReply {
        status,
        body,
        request_id: "req-test".into(),
    }
}

fn small_answer(id: &str) -> Value {
    json!({"choices": [{"text": id}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
}

fn executor(
    f: impl Fn(LineCall) -> BoxFuture<'static, LineReply> + Send + Sync + 'static,
) -> Executor {
    Arc::new(f)
}

/// Starts the runner; stopping it is sending `true` and awaiting the handle.
fn start(batches: &Batches, exec: Executor) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = watch::channel(false);
    (
        stop,
        tokio::spawn(runner::run(batches.clone(), exec, stopped)),
    )
}

async fn wait_for(
    batches: &Batches,
    id: &str,
    what: &str,
    done: impl Fn(&BatchObject) -> bool,
) -> BatchObject {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let id = id.to_string();
        let b = batches
            .call(move |s| s.batch(&id, &Viewer::All))
            .await
            .unwrap();
        if done(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "{what}: {b:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn finished(b: &BatchObject) -> bool {
    use BatchStatus::*;
    matches!(b.status, Completed | Failed | Cancelled | Expired)
}

/// The lines of a batch's output or error file.
async fn lines_of(batches: &Batches, file: &Option<String>) -> Vec<Value> {
    let Some(id) = file.clone() else {
        return Vec::new();
    };
    let path = batches
        .call(move |s| s.file_content(&id, &Viewer::All))
        .await
        .unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_concurrency_input_lines_are_parsed_and_held_across_all_batches() {
    let dir = temp_dir("held");
    let batches = Batches::open(config(&dir, 3)).unwrap();
    let mut ids = Vec::new();
    for tag in ["a", "b", "c", "d"] {
        let text = input_text(tag, 40, 2_000);
        ids.push(
            batches
                .call(move |s| create(s, &text, None))
                .await
                .unwrap()
                .id,
        );
    }
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let most_held = Arc::new(AtomicUsize::new(0));
    let (c, most, held) = (calls.clone(), most_held.clone(), batches.lines_held.clone());
    let exec = executor(move |call| {
        let (c, most, held) = (c.clone(), most.clone(), held.clone());
        Box::pin(async move {
            most.fetch_max(held.load(Ordering::SeqCst), Ordering::SeqCst);
            // Let other lines start meanwhile, so that several are held at once.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let id = custom_id(&call);
            *c.lock().unwrap().entry(id.clone()).or_default() += 1;
            answer(200, small_answer(&id))
        })
    });
    let (stop, runner) = start(&batches, exec);
    for id in &ids {
        let b = wait_for(&batches, id, "the batch completes", finished).await;
        assert_eq!(b.status, BatchStatus::Completed, "{b:?}");
        assert_eq!(b.request_counts.completed, 40);
    }
    let most = most_held.load(Ordering::SeqCst);
    assert!((1..=3).contains(&most), "{most} parsed lines held at once");
    assert_eq!(batches.lines_held.load(Ordering::SeqCst), 0);
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 160);
        assert!(calls.values().all(|&n| n == 1), "{calls:?}");
    }
    stop.send(true).unwrap();
    runner.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_many_lines_stopped_midway_resumes_after_a_reopen_running_each_line_once() {
    let dir = temp_dir("resume");
    let (n, first) = (500, 120);
    let batches = Batches::open(config(&dir, 4)).unwrap();
    let text = input_text("r", n, 10);
    let id = batches
        .call(move |s| create(s, &text, None))
        .await
        .unwrap()
        .id;
    // The first run answers `first` lines; later ones never get an answer.
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let a = answered.clone();
    let exec = executor(move |call| {
        let a = a.clone();
        Box::pin(async move {
            let id = custom_id(&call);
            {
                let mut a = a.lock().unwrap();
                if a.len() < first {
                    a.push(id.clone());
                    return answer(200, small_answer(&id));
                }
            }
            futures::future::pending().await
        })
    });
    let (stop, runner) = start(&batches, exec);
    wait_for(&batches, &id, "the first lines are recorded", |b| {
        b.request_counts.completed == first as u64
    })
    .await;
    stop.send(true).unwrap();
    runner.await.unwrap();
    drop(batches);

    let batches = Batches::open(config(&dir, 4)).unwrap();
    let second: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = second.clone();
    let exec = executor(move |call| {
        let s2 = s2.clone();
        Box::pin(async move {
            let id = custom_id(&call);
            s2.lock().unwrap().push(id.clone());
            answer(200, small_answer(&id))
        })
    });
    let (stop, runner) = start(&batches, exec);
    let done = wait_for(&batches, &id, "the batch completes", finished).await;
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!(done.request_counts.completed, n as u64);
    let first_run: HashSet<String> = answered.lock().unwrap().iter().cloned().collect();
    let second_run = second.lock().unwrap().clone();
    assert_eq!(second_run.len(), n - first, "each remaining line once");
    let second_set: HashSet<String> = second_run.into_iter().collect();
    assert_eq!(second_set.len(), n - first);
    assert!(
        first_run.is_disjoint(&second_set),
        "no recorded line ran again"
    );
    // Every line once in the output, in order, numbered as the input counts requests.
    let output = lines_of(&batches, &done.output_file_id).await;
    assert_eq!(output.len(), n);
    let prefix = id.strip_prefix("batch_").unwrap();
    for (i, line) in output.iter().enumerate() {
        assert_eq!(line["custom_id"], format!("r{i}"));
        assert_eq!(line["id"], format!("batch_req_{prefix}_{i}"));
        assert_eq!(
            line["response"]["body"]["choices"][0]["text"],
            format!("r{i}")
        );
    }
    stop.send(true).unwrap();
    runner.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn finalize_streams_results_and_unrun_lines_in_bounded_memory() {
    let dir = temp_dir("stream");
    let mut s = Store::open(&dir, &dir.join("batches.db")).unwrap();
    // 5 MB of input lines and 5 MB of results; half the lines never ran.
    let b = create(&mut s, &input_text("s", 100, 50_000), None).unwrap();
    for line in 0..50 {
        let body = json!({"data": "y".repeat(100_000), "usage": {"prompt_tokens": 1}});
        let code = if line % 5 == 0 { 400 } else { 200 };
        let r = LineResult {
            line,
            custom_id: format!("s{line}"),
            status_code: code,
            request_id: format!("req-{line}"),
            body,
        };
        s.record(&b.id, &r).unwrap();
    }
    s.cancel(&b.id, &Viewer::All).unwrap();
    let (status, peak) = peak_bytes(|| s.finalize(&b, BatchStatus::Cancelled, "batch_cancelled"));
    assert_eq!(status.unwrap(), BatchStatus::Cancelled);
    assert!(peak < 1 << 20, "finalize held {peak} bytes at once");
    let end = s.batch(&b.id, &Viewer::All).unwrap();
    let read = |s: &mut Store, id: &Option<String>| -> Vec<Value> {
        let path = s
            .file_content(id.as_deref().unwrap(), &Viewer::All)
            .unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let output = read(&mut s, &end.output_file_id);
    let errors = read(&mut s, &end.error_file_id);
    assert_eq!((output.len(), errors.len()), (40, 60));
    assert_eq!(output[0]["custom_id"], "s1");
    assert_eq!(
        output[0]["response"]["body"]["data"]
            .as_str()
            .unwrap()
            .len(),
        100_000
    );
    assert_eq!(errors[0]["response"]["status_code"], 400);
    let unrun: Vec<&Value> = errors.iter().filter(|e| e["response"].is_null()).collect();
    assert_eq!(unrun.len(), 50);
    assert_eq!(unrun[0]["custom_id"], "s50");
    assert_eq!(unrun[0]["error"]["code"], "batch_cancelled");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_finalize_that_keeps_failing_fails_the_batch_and_a_reopen_does_not_retry_it() {
    let dir = temp_dir("finalize-fails");
    let mut s = Store::open(&dir, &dir.join("batches.db")).unwrap();
    let text = input_text("f", 3, 10);
    let b = create(&mut s, &text, None).unwrap();
    let crashed = create(&mut s, &text, None).unwrap();
    for line in 0..2 {
        let r = LineResult {
            line,
            custom_id: format!("f{line}"),
            status_code: 200 + 200 * line as u16,
            request_id: "req".into(),
            body: small_answer("f"),
        };
        s.record(&b.id, &r).unwrap();
    }
    // No result file can be written: `tmp` is a file, not a folder (whoever runs the test).
    let tmp = dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "in the way").unwrap();
    for _ in 1..MAX_FINALIZE_TRIES {
        assert!(s
            .finalize(&b, BatchStatus::Completed, "batch_cancelled")
            .is_err());
        assert_eq!(
            s.batch(&b.id, &Viewer::All).unwrap().status,
            BatchStatus::Finalizing
        );
    }
    let last = s.finalize(&b, BatchStatus::Completed, "batch_cancelled");
    assert_eq!(last.unwrap(), BatchStatus::Failed);
    let failed = s.batch(&b.id, &Viewer::All).unwrap();
    assert_eq!(failed.status, BatchStatus::Failed);
    let error = &failed.errors.as_ref().unwrap().data[0];
    assert_eq!(error.code, "finalize_failed");
    assert!(
        error.message.contains("3 tries") && error.message.contains("writing a result file"),
        "{}",
        error.message
    );
    assert_eq!(
        failed.request_counts.completed, 1,
        "the results stay counted"
    );
    assert!(failed.output_file_id.is_none() && failed.error_file_id.is_none());
    // Nothing was left behind: the two input files are the only files.
    assert_eq!(s.files(&Viewer::All, None, 100, None).unwrap().len(), 2);
    assert_eq!(std::fs::read_dir(dir.join("files")).unwrap().count(), 2);

    // The other batch died three times while finalizing (out of memory, say).
    s.conn()
        .unwrap()
        .execute(
            "UPDATE batches SET status = 'finalizing', finalize_tries = ?2 WHERE id = ?1",
            rusqlite::params![crashed.id, MAX_FINALIZE_TRIES],
        )
        .unwrap();
    drop(s);
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let mut s = Store::open(&dir, &dir.join("batches.db")).unwrap();
    let active = s.active_batches().unwrap();
    assert_eq!(active.len(), 1, "the failed batch is not taken up again");
    assert_eq!(active[0].id, crashed.id);
    let ended = s.finalize(&active[0], BatchStatus::Cancelled, "batch_cancelled");
    assert_eq!(
        ended.unwrap(),
        BatchStatus::Failed,
        "a fourth start does not try again"
    );
    let failed = s.batch(&crashed.id, &Viewer::All).unwrap();
    let message = &failed.errors.as_ref().unwrap().data[0].message;
    assert!(message.contains("the server stopped"), "{message}");
    assert!(s.active_batches().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_cannot_be_stored_fails_its_line_once_and_it_never_runs_again() {
    let dir = temp_dir("unstorable");
    let mut cfg = config(&dir, 2);
    cfg.max_result_bytes = 10_000;
    let batches = Batches::open(cfg).unwrap();
    let text = input_text("u", 6, 10);
    let id = batches
        .call(move |s| {
            let b = create(s, &text, None)?;
            // SQLite refuses u1's answer (as it would a full disk); u2's is over the bound.
            s.conn()?
                .execute_batch(
                    "CREATE TRIGGER refuse_u1 BEFORE INSERT ON batch_results
                     WHEN NEW.custom_id = 'u1' AND NEW.status_code = 200
                     BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
                )
                .map_err(|e| BatchError::Db(e.to_string()))?;
            Ok(b.id)
        })
        .await
        .unwrap();
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let twice = Arc::new(AtomicBool::new(false));
    let (c, t) = (calls.clone(), twice.clone());
    let exec = executor(move |call| {
        let (c, t) = (c.clone(), t.clone());
        Box::pin(async move {
            let id = custom_id(&call);
            let n = {
                let mut c = c.lock().unwrap();
                let n = c.entry(id.clone()).or_default();
                *n += 1;
                *n
            };
            if n > 1 {
                t.store(true, Ordering::SeqCst);
            }
            let mut body = small_answer(&id);
            if id == "u2" {
                body["data"] = json!("z".repeat(20_000));
            }
            answer(200, body)
        })
    });
    let (stop, runner) = start(&batches, exec);
    let t = twice.clone();
    let done = wait_for(&batches, &id, "the batch completes", move |b| {
        finished(b) || t.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        !twice.load(Ordering::SeqCst),
        "a line ran twice: {:?}",
        calls.lock().unwrap()
    );
    assert_eq!(done.status, BatchStatus::Completed, "{done:?}");
    assert_eq!(
        (done.request_counts.completed, done.request_counts.failed),
        (4, 2)
    );
    assert_eq!(
        done.usage.input_tokens,
        6 * 3,
        "the stand-ins keep their usage"
    );
    let errors = lines_of(&batches, &done.error_file_id).await;
    assert_eq!(errors.len(), 2);
    for (e, who) in errors.iter().zip(["u1", "u2"]) {
        assert_eq!(e["custom_id"], who);
        assert_eq!(e["response"]["status_code"], 500);
        let error = &e["response"]["body"]["error"];
        assert_eq!(error["code"], "result_not_stored", "{e}");
    }
    let message = errors[1]["response"]["body"]["error"]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("at most 10000"), "{message}");
    assert_eq!(lines_of(&batches, &done.output_file_id).await.len(), 4);
    stop.send(true).unwrap();
    runner.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unfinished_batches_are_capped_per_key_and_in_all() {
    let dir = temp_dir("caps");
    let mut s = Store::open(&dir, &dir.join("batches.db")).unwrap();
    s.limits.max_active_per_key = 2;
    s.limits.max_active = 3;
    let text = input_text("k", 1, 1);
    let first = create(&mut s, &text, Some("alice")).unwrap();
    create(&mut s, &text, Some("alice")).unwrap();
    match create(&mut s, &text, Some("alice")) {
        Err(BatchError::Limit(m)) => {
            assert!(
                m.contains("`alice`") && m.contains("--batch-max-active-per-key 2"),
                "{m}"
            )
        }
        other => panic!("alice's third batch: {other:?}"),
    }
    create(&mut s, &text, Some("bob")).unwrap();
    match create(&mut s, &text, Some("carol")) {
        Err(BatchError::Limit(m)) => assert!(m.contains("--batch-max-active 3"), "{m}"),
        other => panic!("a fourth batch: {other:?}"),
    }
    // A finished batch no longer counts.
    s.cancel(&first.id, &Viewer::All).unwrap();
    s.finalize(&first, BatchStatus::Cancelled, "batch_cancelled")
        .unwrap();
    create(&mut s, &text, Some("alice")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
