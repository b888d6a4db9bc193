//! HEALING.md §1–4 end to end on the quorum driver: the automatic resync heals a child that
//! failed writes (H6, H10, H12, H14), a hot-added copy costs reads and no writes while an empty
//! one is copied (H8, P17), verify reports and repairs a silent corruption (H17, H18, P18), a
//! granule with no winner is counted and reported once (H13, P20), and the jobs' bad input is
//! refused with a message that names it (H16). Time is paused: the 1 s start delay and the
//! retry delays cost nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::quorum::resync::ResyncRequest;
use ballot::drivers::quorum::verify::VerifyRequest;
use ballot::drivers::quorum::{Quorum, QuorumOptions, ResyncMode};
use ballot::events::{Event, EventBus, IoType, Recorder, Stream};
use ballot::host::{Captured, Host};
use ballot::{BlockDevice, ErrorKind, WriteFlags};
use bytes::Bytes;
use common::{Op, TestChild};

const G: u64 = 65536;
/// 16 granules.
const LEN: u64 = 16 * G;

struct Rig {
    q: Arc<Quorum>,
    kids: Vec<Arc<TestChild>>,
    rec: Recorder,
    captured: Captured,
}

fn rig(fills: &[u8], t: usize, resync: ResyncMode) -> Rig {
    rig_with(fills, t, resync, |_| {})
}

/// [`rig`] with the quorum's options adjusted by `tweak`.
fn rig_with(
    fills: &[u8],
    t: usize,
    resync: ResyncMode,
    tweak: impl FnOnce(&mut QuorumOptions),
) -> Rig {
    let bus = EventBus::new();
    let rec = bus.record(Stream::Internal);
    let (host, captured) = Host::recording(bus);
    let kids: Vec<Arc<TestChild>> = fills
        .iter()
        .enumerate()
        .map(|(i, &f)| TestChild::sized(&format!("c{i}"), f, LEN))
        .collect();
    let mut opts = QuorumOptions {
        resync,
        ..QuorumOptions::new("q0", t)
    };
    tweak(&mut opts);
    let children = kids
        .iter()
        .map(|k| (k.name.clone(), k.clone() as ballot::Device))
        .collect();
    let q = Arc::new(Quorum::open(opts, children, host).expect("open"));
    Rig {
        q,
        kids,
        rec,
        captured,
    }
}

/// The job events of `events`, as `(event, id or device, status or result)` strings.
fn job_events(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::JobStatusChange { id, status } => Some(format!("{id} {status}")),
            Event::BlockJobCompleted { .. } => Some(format!("completed {}", e.data())),
            _ => None,
        })
        .collect()
}

async fn wait_idle(q: &Quorum, host_jobs_done: impl Fn() -> bool) {
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if host_jobs_done() && q.out_of_sync().await.iter().all(|r| r.ranges.is_empty()) {
            return;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn h6_h14_a_child_that_failed_writes_is_healed_by_the_automatic_resync() {
    let r = rig(&[0, 0, 0], 2, ResyncMode::Auto);
    r.kids[1].fail_writes(ErrorKind::Io);
    for (i, off) in [0u64, 3 * G + 100, 9 * G].into_iter().enumerate() {
        r.q.write(off, Bytes::from(vec![i as u8 + 1; 4096]), WriteFlags::NONE)
            .await
            .expect("write with two of three");
    }
    let oos = r.q.out_of_sync().await;
    assert_eq!(oos[1].ranges, vec![(0, G), (3 * G, G), (9 * G, G)]);
    assert_eq!(oos[1].state.as_str(), "out-of-sync");
    *r.kids[1].write_err.lock().unwrap() = None;
    r.rec.clear();
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    // No guest read happened: the child is byte-identical to the others.
    assert_eq!(
        r.kids[1].contents(0, LEN as usize),
        r.kids[0].contents(0, LEN as usize)
    );
    assert!(r.q.out_of_sync().await.iter().all(|c| c.ranges.is_empty()));
    assert_eq!(
        job_events(&r.rec.events()),
        vec![
            "q0-resync created".to_string(),
            "q0-resync running".to_string(),
            "q0-resync concluded".to_string(),
            r#"completed {"copied":3,"device":"q0-resync","equal":0,"len":196608,"offset":196608,"speed":0,"type":"x-resync","unrecoverable":0}"#.to_string(),
            "q0-resync null".to_string(),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn h8_p17_a_hot_added_copy_costs_reads_and_an_empty_disk_is_copied() {
    let r = rig(&[7, 7], 1, ResyncMode::Manual);
    let copy = TestChild::sized("copy", 7, LEN);
    let name = r.q.add_child("copy", copy.clone()).await.expect("add");
    assert_eq!(name, "children.2");
    assert_eq!(r.q.out_of_sync().await[2].ranges, vec![(0, LEN)]);
    r.q.start_resync(ResyncRequest::default()).expect("start");
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    assert!(
        copy.log().iter().all(|op| !matches!(op, Op::Write(..))),
        "an equal copy is never written: {:?}",
        copy.log()
    );
    let done = job_events(&r.rec.events());
    assert!(
        done.iter()
            .any(|e| e.contains(r#""copied":0"#) && e.contains(r#""equal":16"#)),
        "{done:?}"
    );
    // An empty disk instead: every granule copied.
    let empty = TestChild::sized("empty", 0, LEN);
    r.q.add_child("empty", empty.clone()).await.expect("add");
    r.rec.clear();
    r.q.start_resync(ResyncRequest::default()).expect("start");
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    assert_eq!(empty.contents(0, LEN as usize), vec![7u8; LEN as usize]);
    let done = job_events(&r.rec.events());
    assert!(
        done.iter()
            .any(|e| e.contains(r#""copied":16"#) && e.contains(r#""equal":0"#)),
        "{done:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn h17_h18_verify_reports_and_repairs_a_silent_corruption() {
    let r = rig(&[5, 5, 5], 2, ResyncMode::Manual);
    r.kids[2].fill(2 * G + 10, 1, 9);
    r.kids[2].fill(7 * G, 4096, 9);
    r.q.start_verify(VerifyRequest {
        auto_dismiss: false,
        ..VerifyRequest::default()
    })
    .expect("verify");
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    assert_eq!(r.kids[2].contents(0, LEN as usize), vec![5u8; LEN as usize]);
    let bad: Vec<(u64, u64)> = r
        .rec
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::QuorumReportBad {
                io: IoType::Read,
                error: None,
                node_name,
                sector_num,
                sectors_count,
            } if node_name == "c2" => Some((*sector_num, *sectors_count)),
            _ => None,
        })
        .collect();
    assert_eq!(bad, vec![(256, 128), (896, 128)]);
    let info = r.q.host_jobs().list();
    assert_eq!(info.len(), 1, "kept: auto-dismiss off");
    assert_eq!(
        info[0].to_query_jobs(),
        serde_json::json!({"id": "q0-verify", "type": "x-verify", "status": "concluded",
            "current-progress": LEN, "total-progress": LEN,
            "checked": 16, "mismatched": 2, "repaired": 2, "unrecoverable": 0})
    );
    // A second verify over the same, now healed, range writes nothing.
    r.q.host_jobs().dismiss("q0-verify").expect("dismiss");
    for k in &r.kids {
        k.clear_log();
    }
    r.q.start_verify(VerifyRequest::default()).expect("verify");
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    for k in &r.kids {
        assert!(
            k.log().iter().all(|op| !matches!(op, Op::Write(..))),
            "{}",
            k.name
        );
    }
}

#[tokio::test(start_paused = true)]
async fn h13_p20_a_granule_with_no_winner_is_counted_and_reported_once() {
    // Child 1 fails a write on granule 0; children 0 and 2 then disagree there: a tie.
    let r = rig(&[1, 1, 1], 2, ResyncMode::Manual);
    r.kids[1].fail_writes(ErrorKind::Io);
    r.q.write(0, Bytes::from(vec![2u8; 512]), WriteFlags::NONE)
        .await
        .expect("write");
    *r.kids[1].write_err.lock().unwrap() = None;
    r.kids[2].fill(0, 512, 3);
    r.rec.clear();
    r.q.start_resync(ResyncRequest::default()).expect("start");
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = r.rec.events();
    let failures = events
        .iter()
        .filter(|e| matches!(e, Event::QuorumFailure { .. }))
        .count();
    assert_eq!(failures, 1);
    let done = job_events(&events);
    assert!(
        done.iter()
            .any(|e| e.contains(r#""error":"Input/output error""#)
                && e.contains(r#""unrecoverable":1"#)),
        "{done:?}"
    );
    assert_eq!(r.q.out_of_sync().await[1].ranges, vec![(0, G)]);
    assert!(r.captured.fatals().is_empty());
}

#[tokio::test(start_paused = true)]
async fn h16_h17_bad_requests_are_refused_with_their_reason() {
    let r = rig(&[0, 0, 0], 2, ResyncMode::Manual);
    // A hot-added child keeps a slow resync busy.
    r.q.add_child("x", TestChild::sized("x", 1, LEN))
        .await
        .expect("add");
    r.q.start_resync(ResyncRequest {
        speed: 1,
        ..ResyncRequest::default()
    })
    .expect("start");
    assert_eq!(
        r.q.start_resync(ResyncRequest::default()).unwrap_err(),
        "Quorum 'q0' already has a resync job"
    );
    assert_eq!(
        r.q.start_verify(VerifyRequest {
            job_id: Some("q0-resync".into()),
            ..VerifyRequest::default()
        })
        .unwrap_err(),
        "Job ID 'q0-resync' already in use"
    );
    assert_eq!(
        r.q.start_verify(VerifyRequest {
            end: Some(LEN + 1),
            ..VerifyRequest::default()
        })
        .unwrap_err(),
        format!(
            "Parameter 'end' ({}) is beyond the end of quorum 'q0' ({LEN} bytes)",
            LEN + 1
        )
    );
    assert_eq!(
        r.q.start_verify(VerifyRequest {
            start: 2 * G,
            end: Some(G),
            ..VerifyRequest::default()
        })
        .unwrap_err(),
        format!("Parameter 'start' ({}) is after 'end' ({G})", 2 * G)
    );
    let jobs = r.q.host_jobs();
    assert_eq!(
        jobs.set_speed("q0-resync", -5).unwrap_err(),
        "Parameter 'speed' expects a non-negative value"
    );
    jobs.pause("q0-resync").expect("pause");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(jobs.list()[0].status.as_str(), "paused");
    // A paused job keeps the record; cancelling leaves the rest for a later job (H16).
    jobs.cancel("q0-resync").expect("cancel");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(jobs.list().is_empty());
    assert!(!r.q.out_of_sync().await[3].ranges.is_empty());
    r.q.start_resync(ResyncRequest::default())
        .expect("a later job resumes");
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    assert!(r.q.out_of_sync().await[3].ranges.is_empty());
}

/// H16: while a job runs, the server's log gets a progress line every 5 s: percent, bytes, rate
/// and ETA.
#[tokio::test(start_paused = true)]
async fn h16_a_running_job_logs_its_progress_every_five_seconds() {
    let r = rig_with(&[3, 3], 1, ResyncMode::Manual, |o| o.resync_inflight = 16);
    r.q.add_child("e", TestChild::sized("e", 0, LEN))
        .await
        .expect("add");
    // 64 KiB/s with 16 granules in flight: runs of four granules, one every 4 s (at 0, 4, 8
    // and 12 s); a line is written when a run ends 5 s or more after the last line (or the
    // start): at 8 s, and not again before the end.
    r.q.start_resync(ResyncRequest {
        speed: G,
        ..ResyncRequest::default()
    })
    .expect("start");
    wait_idle(&r.q, || r.q.jobs_idle()).await;
    let logs = r.captured.logs();
    assert_eq!(
        logs,
        vec!["ballot: quorum 'q0' resync: 75.0% (0.8 of 1.0 MiB), 0.1 MiB/s, ETA 3 s".to_string()]
    );
}

/// H16–H18 over QMP: the commands, their bad input (a node that is not a quorum, an unknown
/// node, a second job, a range past the end, a negative or non-integer speed, an unknown job)
/// and the job queries, with QEMU's error shape.
#[tokio::test(start_paused = true)]
async fn h16_h17_qmp_commands_and_their_errors() {
    use serde_json::json;
    let bus = EventBus::new();
    let (host, _cap) = Host::recording(bus.clone());
    let mut g = ballot::graph::Graph::new(host);
    for i in 0..3 {
        g.blockdev_add_arg(&format!("driver=null-co,node-name=n{i},size=1048576"))
            .await
            .expect("null child");
    }
    g.blockdev_add_arg(
        "driver=quorum,node-name=q0,vote-threshold=2,children.0=n0,children.1=n1,children.2=n2,resync=manual",
    )
    .await
    .expect("quorum");
    let m = common::monitor(g, bus);
    let run = |cmd: &'static str, args: serde_json::Value| {
        let m = &m;
        async move { m.execute(cmd, &args).await.0 }
    };
    let err = |desc: &str| json!({"error": {"class": "GenericError", "desc": desc}});
    assert_eq!(
        run("x-quorum-resync", json!({"node-name": "n0"})).await,
        err("Node 'n0' is not a quorum node")
    );
    assert_eq!(
        run("x-quorum-verify", json!({"node-name": "zz"})).await,
        err("Cannot find device='zz' nor node-name='zz'")
    );
    assert_eq!(
        run(
            "x-quorum-verify",
            json!({"node-name": "q0", "end": 2 << 20})
        )
        .await,
        err("Parameter 'end' (2097152) is beyond the end of quorum 'q0' (1048576 bytes)")
    );
    assert_eq!(
        run("x-quorum-resync", json!({"node-name": "q0", "speed": -1})).await,
        err("Parameter 'speed' expects a non-negative value")
    );
    assert_eq!(
        run(
            "x-quorum-resync",
            json!({"node-name": "q0", "speed": "fast"})
        )
        .await,
        err("Invalid parameter type for 'speed', expected: integer")
    );
    assert_eq!(
        run(
            "x-quorum-verify",
            json!({"node-name": "q0", "auto-dismiss": false, "speed": 1})
        )
        .await,
        json!({"return": {}})
    );
    assert_eq!(
        run("x-quorum-verify", json!({"node-name": "q0"})).await,
        err("Quorum 'q0' already has a verify job")
    );
    let jobs = run("query-jobs", json!({})).await;
    assert_eq!(jobs["return"][0]["id"], "q0-verify");
    assert_eq!(jobs["return"][0]["type"], "x-verify");
    let block = run("query-block-jobs", json!({})).await;
    assert_eq!(block["return"][0]["device"], "q0-verify");
    assert_eq!(block["return"][0]["auto-dismiss"], false);
    assert_eq!(block["return"][0]["len"], 1 << 20);
    assert_eq!(block["return"][0]["speed"], 1);
    assert_eq!(
        run(
            "block-job-set-speed",
            json!({"device": "q0-verify", "speed": 0})
        )
        .await,
        json!({"return": {}})
    );
    assert_eq!(
        run("job-pause", json!({"id": "nope"})).await,
        err("Job 'nope' not found")
    );
    // Speed 0 now: the verify of 1 MiB of zeroes finishes and stays until dismissed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs = run("query-jobs", json!({})).await;
    assert_eq!(
        jobs["return"][0],
        json!({"id": "q0-verify", "type": "x-verify", "status": "concluded",
            "current-progress": 1 << 20, "total-progress": 1 << 20,
            "checked": 16, "mismatched": 0, "repaired": 0, "unrecoverable": 0})
    );
    assert_eq!(
        run("job-dismiss", json!({"id": "q0-verify"})).await,
        json!({"return": {}})
    );
    assert_eq!(run("query-jobs", json!({})).await, json!({"return": []}));
}
