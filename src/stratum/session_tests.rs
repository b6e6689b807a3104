//! The client session's tests: the handshake, live jobs, the queue and the bounds.

use super::*;
use crate::stratum::protocol::parse_line;

const NOTIFY: &str = r#"{"params": ["JOB", "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000", "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008", "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000", [], "00000002", "1c2ac4af", "504e86b9", CLEAN], "id": null, "method": "mining.notify"}"#;

fn feed(s: &mut ClientSession, line: &str) -> Vec<Action> {
    s.on_message(parse_line(line).unwrap())
}

fn notify(job: &str, clean: bool) -> String {
    NOTIFY
        .replace("JOB", job)
        .replace("CLEAN", if clean { "true" } else { "false" })
}

/// Connects and completes the handshake with ids 1 (subscribe) and 2 (authorize) of this
/// connection, numbered from `first_id`.
fn handshake(s: &mut ClientSession, first_id: u64) {
    let sent = s.on_connect();
    assert!(matches!(&sent[0], Action::Send(l) if l.contains("mining.subscribe")));
    feed(
        s,
        &format!(
            r#"{{"id": {first_id}, "result": [[["mining.notify", "sid1"]], "08000002", 4], "error": null}}"#
        ),
    );
    feed(
        s,
        &format!(
            r#"{{"id": {}, "result": true, "error": null}}"#,
            first_id + 1
        ),
    );
    assert!(s.is_authorized());
}

fn share(job: &str, nonce: u32) -> Share {
    Share {
        generation: 1,
        job_id: job.into(),
        extranonce1: vec![8, 0, 0, 2],
        extranonce2: vec![0, 0, 0, 1],
        ntime: 0x504e86ed,
        nonce,
        version_bits: None,
        hash: [0; 32],
        difficulty: 1.0,
        is_block: false,
    }
}

fn submits(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Send(l) if l.contains("mining.submit")))
        .count()
}

#[test]
fn shares_are_submitted_once_and_only_for_live_jobs() {
    let mut s = ClientSession::new("w", "p", false);
    handshake(&mut s, 1);
    let work = feed(&mut s, &notify("a", true));
    assert!(work.iter().any(|a| matches!(a, Action::SetWork(_))));
    assert_eq!(submits(&s.on_share(share("a", 1))), 1);
    assert_eq!(
        submits(&s.on_share(share("a", 1))),
        0,
        "a duplicate is not sent twice"
    );
    assert_eq!(s.counts.duplicates_suppressed, 1);
    feed(&mut s, &notify("b", true)); // clean_jobs: job a is gone
    assert_eq!(submits(&s.on_share(share("a", 2))), 0);
    assert_eq!(s.counts.stale, 1);
    feed(&mut s, &notify("c", false)); // not clean: b and c both live
    assert_eq!(submits(&s.on_share(share("b", 3))), 1);
}

#[test]
fn a_share_found_while_disconnected_is_submitted_after_reconnect_if_its_job_lives() {
    let mut s = ClientSession::new("w", "p", false);
    handshake(&mut s, 1);
    feed(&mut s, &notify("a", true));
    assert!(matches!(s.on_disconnect()[0], Action::ClearWork));
    assert_eq!(
        submits(&s.on_share(share("a", 7))),
        0,
        "kept, not sent, while down"
    );
    handshake(&mut s, 4); // ids 1–3 were used by the first connection
                          // The pool resumed the session (same extranonce1) and job a is still valid.
    let out = feed(&mut s, &notify("b", false));
    assert_eq!(submits(&out), 1);
    assert_eq!(s.counts.stale, 0);
}

#[test]
fn a_share_found_while_disconnected_is_stale_if_the_pool_cleaned_its_jobs() {
    let mut s = ClientSession::new("w", "p", false);
    handshake(&mut s, 1);
    feed(&mut s, &notify("a", true));
    s.on_disconnect();
    s.on_share(share("a", 7));
    handshake(&mut s, 4);
    let out = feed(&mut s, &notify("b", true));
    assert_eq!(submits(&out), 0);
    assert_eq!(s.counts.stale, 1, "counted, never submitted");
}

#[test]
fn the_password_is_never_in_debug_output() {
    let s = ClientSession::new("worker", "hunter2", true);
    assert!(!format!("{s:?}").contains("hunter2"));
}

#[test]
fn a_pool_that_never_cleans_cannot_grow_the_live_jobs_or_the_remembered_shares() {
    let mut s = ClientSession::new("w", "p", false);
    handshake(&mut s, 1);
    feed(&mut s, &notify("j0", true));
    for n in 0..200u32 {
        let job = format!("j{n}");
        if n > 0 {
            feed(&mut s, &notify(&job, false));
        }
        let out = s.on_share(share(&job, n));
        assert_eq!(submits(&out), 1, "job {job} is live when its share comes");
        answer_all(&mut s, &out);
    }
    assert_eq!(s.live_jobs(), MAX_LIVE_JOBS);
    assert_eq!(
        s.remembered_submits(),
        MAX_LIVE_JOBS,
        "shares of ended jobs are forgotten"
    );
    assert_eq!(
        submits(&s.on_share(share("j0", 7))),
        0,
        "the oldest job has ended"
    );
    assert_eq!(s.counts.stale, 1);
    feed(&mut s, &notify("new-block", true));
    assert_eq!((s.live_jobs(), s.remembered_submits()), (1, 0));
}

/// Answers every submit in `out` with `true`.
fn answer_all(s: &mut ClientSession, out: &[Action]) {
    for a in out {
        if let Action::Send(line) = a {
            let id = serde_json::from_str::<Value>(line).unwrap()["id"].clone();
            feed(
                s,
                &format!(r#"{{"id": {id}, "result": true, "error": null}}"#),
            );
        }
    }
}

#[test]
fn shares_past_the_queue_bound_are_dropped_and_counted_oldest_first() {
    let mut s = ClientSession::new("w", "p", false);
    handshake(&mut s, 1);
    feed(&mut s, &notify("a", true));
    s.on_disconnect();
    for n in 0..(MAX_QUEUED_SHARES as u32 + 76) {
        assert_eq!(submits(&s.on_share(share("a", n))), 0);
    }
    assert_eq!(s.queued_shares(), MAX_QUEUED_SHARES);
    assert_eq!(s.counts.dropped, 76);
    handshake(&mut s, 4);
    let out = feed(&mut s, &notify("b", false));
    assert_eq!(submits(&out), MAX_QUEUED_SHARES);
    let first = out
        .iter()
        .find_map(|a| match a {
            Action::Send(l) if l.contains("mining.submit") => Some(l.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        first.contains(&format!("{:08x}", 76u32)),
        "the oldest were dropped: {first}"
    );
}

#[test]
fn a_pool_that_stops_answering_bounds_the_submissions_in_flight() {
    let mut s = ClientSession::new("w", "p", false);
    handshake(&mut s, 1);
    feed(&mut s, &notify("a", true));
    let mut sent = Vec::new();
    for n in 0..(MAX_SUBMITS_IN_FLIGHT as u32 + 6) {
        sent.extend(s.on_share(share("a", n)));
    }
    assert_eq!(submits(&sent), MAX_SUBMITS_IN_FLIGHT);
    assert_eq!(s.pending_submits(), MAX_SUBMITS_IN_FLIGHT);
    assert_eq!(s.counts.dropped, 6);
    // One answer makes room for one more.
    answer_all(&mut s, &sent[..1]);
    assert_eq!(submits(&s.on_share(share("a", 1 << 30))), 1);
}
