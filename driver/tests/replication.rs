//! The replication driver through the graph: QEMU's tests/unit/test-replication.c cases
//! re-expressed with exact equality (and E2's corrected expectation), then the error cases QEMU
//! does not test, each rule of REPLICATION.md cited by its id.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::replication::{Mode, Stage};
use ballot::events::{Event, EventBus, Stream};
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::{BlockDevice, Device, ErrorKind, WriteFlags, ZeroFlags};
use bytes::Bytes;
use common::{dev, TestChild};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// QEMU's test image size.
const IMG: u64 = 64 * MIB;
const HALF: u64 = IMG / 2;

fn host() -> (Host, EventBus) {
    let bus = EventBus::new();
    let (h, _) = Host::recording(bus.clone());
    (h, bus)
}

fn fill(n: u64, b: u8) -> Bytes {
    Bytes::from(vec![b; n as usize])
}

async fn expect(d: &dyn BlockDevice, off: u64, len: u64, byte: u8) {
    let got = d.read(off, len as usize).await.unwrap();
    let bad = got.iter().position(|&b| b != byte);
    assert_eq!(
        bad.map(|i| (off + i as u64, got[i])),
        None,
        "expected 0x{byte:02x} over [{off}, {})",
        off + len
    );
}

/// The secondary of REPLICATION.md §2.2 over an in-memory S (QEMU's test uses 64 MiB files).
struct Secondary {
    g: Graph,
    s: Arc<TestChild>,
    /// S's export (where forwarded writes arrive).
    fwd: Device,
    /// The SVM's disk: the top quorum.
    view: Device,
    bus: EventBus,
}

tokio::task_local! {
    /// What COLO's active and hidden disks are in this run: `overlay` or `qcow2`.
    static LAYERS: &'static str;
}

/// Runs the test body `$name` once per layer kind (issue 19 item 4: the COLO tests run with
/// in-memory overlays and with qcow2 images).
macro_rules! both_layers {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn overlay() {
                super::LAYERS.scope("overlay", super::$name()).await
            }
            #[tokio::test]
            async fn qcow2() {
                super::LAYERS.scope("qcow2", super::$name()).await
            }
        }
    };
    ($name:ident, paused) => {
        mod $name {
            #[tokio::test(start_paused = true)]
            async fn overlay() {
                super::LAYERS.scope("overlay", super::$name()).await
            }
            #[tokio::test(start_paused = true)]
            async fn qcow2() {
                super::LAYERS.scope("qcow2", super::$name()).await
            }
        }
    };
}

/// The allocated clusters of layer `name` (A or H), ascending.
async fn clusters(sec: &Secondary, name: &str) -> Vec<u64> {
    let l = sec.g.get(name).unwrap().layer().unwrap();
    let g = l.granule();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(o) = l.next_allocated_at(at).await.unwrap() {
        out.push(o / g);
        at = o + g;
    }
    out
}

/// The definitions of A and H: in-memory overlays, or qcow2 images (in growable memory
/// files, made by ballot's own create) with S and H as their backing nodes.
async fn layers(g: &mut Graph) -> [String; 2] {
    if LAYERS.try_with(|k| *k).unwrap_or("overlay") == "overlay" {
        return [
            "driver=overlay,node-name=hidden0,backing=parent0".into(),
            "driver=overlay,node-name=active0,backing=hidden0".into(),
        ];
    }
    // S's length (read before a test makes it fail).
    let size = g.get("parent0").unwrap().dev.length().unwrap();
    for f in ["hfile", "afile"] {
        let file: Device = Arc::new(ballot::drivers::memory::MemoryDevice::growable(0));
        let o = ballot::drivers::qcow2::create::CreateOptions {
            size,
            ..Default::default()
        };
        ballot::drivers::qcow2::create::create(&file, &o)
            .await
            .unwrap();
        g.insert_device(f, file).unwrap();
    }
    [
        "driver=qcow2,node-name=hidden0,file=hfile,backing=parent0".into(),
        "driver=qcow2,node-name=active0,file=afile,backing=hidden0".into(),
    ]
}

async fn secondary_with(s: Arc<TestChild>, export: bool) -> Secondary {
    let (h, bus) = host();
    let mut g = Graph::new(h);
    g.insert_device("parent0", dev(&s)).unwrap();
    let [hidden, active] = layers(&mut g).await;
    for def in [
        hidden.as_str(),
        active.as_str(),
        "driver=replication,node-name=childs0,mode=secondary,top-id=colo-disk0,file=active0",
        r#"{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["childs0"]}"#,
    ] {
        g.blockdev_add_arg(def).await.unwrap();
    }
    let fwd = if export {
        g.claim("parent0", "export 'fwd'", true).unwrap()
    } else {
        dev(&s)
    };
    let view = g.get("colo-disk0").unwrap().dev.clone();
    Secondary {
        g,
        s,
        fwd,
        view,
        bus,
    }
}

async fn secondary() -> Secondary {
    secondary_with(TestChild::sized("parent0", 0x11, IMG), true).await
}

fn childs0(sec: &Secondary) -> Arc<ballot::drivers::replication::Replication> {
    sec.g.get("childs0").unwrap().replication.clone().unwrap()
}

/// A primary node over a scripted link standing in for the nbd client.
async fn primary() -> (Graph, Arc<TestChild>, Device) {
    let (h, _) = host();
    let mut g = Graph::new(h);
    let link = TestChild::sized("link", 0, IMG);
    g.insert_device("link", dev(&link)).unwrap();
    g.blockdev_add_arg("driver=replication,node-name=replication0,mode=primary,file=link")
        .await
        .unwrap();
    let d = g.get("replication0").unwrap().dev.clone();
    (g, link, d)
}

/// QEMU's stop and continuous_replication setup: start, 0x22 forwarded over [32M, 64M), the
/// SVM's 0x33 over [0, 32M), then stop with failover and wait for the commit.
async fn e2_writes_then_failover(sec: &Secondary) {
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.fwd
        .write(HALF, fill(HALF, 0x22), WriteFlags::NONE)
        .await
        .unwrap();
    sec.view
        .write(0, fill(HALF, 0x33), WriteFlags::NONE)
        .await
        .unwrap();
    sec.g.replication_stop_all(true).await.unwrap();
    childs0(sec).wait_commit().await;
}

fn msg(r: Result<(), ballot::ConfigError>) -> String {
    r.unwrap_err().to_string()
}

// ---- QEMU's primary cases ----

#[tokio::test]
async fn primary_read_fails_with_eio_in_every_stage_r10() {
    let (g, link, d) = primary().await;
    let e = d.read(0, 512).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.context()),
        (
            ErrorKind::Io,
            "replication node 'replication0' (primary) refuses reads in stage none"
        )
    );
    g.replication_start_all(Mode::Primary).await.unwrap();
    assert_eq!(d.read(0, 512).await.unwrap_err().kind(), ErrorKind::Io);
    g.replication_stop_all(false).await.unwrap();
    assert_eq!(d.read(0, 512).await.unwrap_err().kind(), ErrorKind::Io);
    assert!(
        !link.log().iter().any(|o| matches!(o, common::Op::Read(..))),
        "never read the link"
    );
}

#[tokio::test]
async fn primary_write_is_refused_before_start_and_forwarded_while_running_r11() {
    let (g, link, d) = primary().await;
    let e = d
        .write(0, fill(512, 1), WriteFlags::NONE)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(link.log(), vec![]);
    g.replication_start_all(Mode::Primary).await.unwrap();
    d.write(0, fill(512, 1), WriteFlags::FUA).await.unwrap();
    d.write_zeroes(512, 512, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(link.contents(0, 1), vec![1]);
    assert_eq!(
        link.log()[0],
        common::Op::Write(
            0,
            512,
            true,
            1,
            link.log()
                .iter()
                .find_map(|o| match o {
                    common::Op::Write(_, _, _, _, a) => Some(*a),
                    _ => None,
                })
                .unwrap()
        )
    );
    // A failed forward is recorded and hidden (R11, R29).
    link.fail_writes(ErrorKind::Io);
    d.write(4096, fill(512, 2), WriteFlags::NONE).await.unwrap();
    let (r, stage) = g.replication_status();
    assert_eq!(msg(r), "I/O error occurred");
    assert_eq!(stage, Some(Stage::Running));
    // A primary stop clears it (R29); afterwards writes fail again (R11).
    g.replication_stop_all(false).await.unwrap();
    assert_eq!(g.replication_status().0, Ok(()));
    assert_eq!(
        d.write(0, fill(512, 3), WriteFlags::NONE)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Io
    );
}

#[tokio::test]
async fn primary_start_checkpoint_get_error_stop_r24_r27_r28_r30() {
    let (g, _link, _d) = primary().await;
    // do_checkpoint succeeds on a primary in every stage, NONE included (R27 step 2).
    assert_eq!(g.replication_checkpoint_all().await, Ok(()));
    assert_eq!(
        msg(g.replication_status().0),
        "Block replication is not running"
    );
    g.replication_start_all(Mode::Primary).await.unwrap();
    assert_eq!(g.replication_checkpoint_all().await, Ok(()));
    assert_eq!(g.replication_status(), (Ok(()), Some(Stage::Running)));
    g.replication_stop_all(true).await.unwrap();
    assert_eq!(g.replication_status(), (Ok(()), Some(Stage::Done)));
    // R34: DONE ignores everything with success.
    assert_eq!(g.replication_start_all(Mode::Primary).await, Ok(()));
    assert_eq!(g.replication_stop_all(false).await, Ok(()));
}

// ---- QEMU's secondary cases ----

async fn secondary_read_and_write_fail_with_eio_before_start_r9() {
    let sec = secondary().await;
    let c = childs0(&sec);
    let e = c.read(0, 512).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.context()),
        (
            ErrorKind::Io,
            "replication node 'childs0' (secondary) refuses reads in stage none"
        )
    );
    let e = c
        .write(0, fill(512, 1), WriteFlags::NONE)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(
        c.write_zeroes(0, 512, ZeroFlags::default())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Io
    );
    assert_eq!((clusters(&sec, "active0").await.len() as u64), 0);
}
both_layers!(secondary_read_and_write_fail_with_eio_before_start_r9);

async fn secondary_start_shows_the_checkpoint_view_r19_r23() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    expect(&*sec.view, 0, IMG, 0x11).await;
    // A forwarded write of 0x22 over [32M, 64M) lands on S and is hidden from the view.
    sec.fwd
        .write(HALF, fill(HALF, 0x22), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(sec.s.contents(HALF, 1), vec![0x22]);
    assert_eq!(sec.s.contents(IMG - 1, 1), vec![0x22]);
    expect(&*sec.view, 0, IMG, 0x11).await;
    assert_eq!((clusters(&sec, "hidden0").await.len() as u64), HALF / 65536);
    // The SVM writes 0x33 over [0, 32M): into A only.
    sec.view
        .write(0, fill(HALF, 0x33), WriteFlags::NONE)
        .await
        .unwrap();
    expect(&*sec.view, 0, HALF, 0x33).await;
    expect(&*sec.view, HALF, HALF, 0x11).await;
    assert_eq!(sec.s.contents(0, 1), vec![0x11]);
    assert_eq!(sec.s.contents(HALF - 1, 1), vec![0x11]);
    // R22: SVM writes never go into H.
    assert_eq!((clusters(&sec, "hidden0").await.len() as u64), HALF / 65536);
}
both_layers!(secondary_start_shows_the_checkpoint_view_r19_r23);

async fn secondary_stop_with_failover_commits_the_view_e2_r31_r32() {
    let sec = secondary().await;
    let rec = sec.bus.record(Stream::Internal);
    e2_writes_then_failover(&sec).await;
    let c = childs0(&sec);
    assert_eq!(c.stage(), Stage::Done);
    // E2: QEMU's test asserts 0x22 for [32M, 64M) and passes only through memcmp <= 0.
    // The view at failover was 0x33 | 0x11, and so is S now, exactly.
    assert_eq!(sec.s.contents(0, HALF as usize), vec![0x33; HALF as usize]);
    assert_eq!(
        sec.s.contents(HALF, HALF as usize),
        vec![0x11; HALF as usize]
    );
    expect(&*sec.view, 0, HALF, 0x33).await;
    expect(&*sec.view, HALF, HALF, 0x11).await;
    assert_eq!(sec.g.replication_status(), (Ok(()), Some(Stage::Done)));
    // O2: the commit job's event, with len = offset = everything committed (32M + 32M).
    let events: Vec<Event> = rec.events();
    assert_eq!(
        events,
        vec![Event::BlockJobCompleted {
            job_type: "commit",
            device: "childs0".into(),
            len: IMG,
            offset: IMG,
            error: None,
            speed: 0,
            result: Vec::new(),
        }]
    );
    // Both overlays stay as empty nodes (R31 step 4).
    for o in ["active0", "hidden0"] {
        assert_eq!((clusters(&sec, o).await.len() as u64), 0);
    }
    // After failover the node reads and writes S directly.
    sec.view
        .write(0, fill(512, 0x44), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(sec.s.contents(0, 1), vec![0x44]);
}
both_layers!(secondary_stop_with_failover_commits_the_view_e2_r31_r32);

async fn continuous_replication_a_promoted_secondary_ignores_start_r34() {
    let sec = secondary().await;
    e2_writes_then_failover(&sec).await;
    // The host becomes a new primary: childs0 ignores start(primary), checkpoint and stop.
    assert_eq!(sec.g.replication_start_all(Mode::Primary).await, Ok(()));
    assert_eq!(sec.g.replication_checkpoint_all().await, Ok(()));
    assert_eq!(sec.g.replication_stop_all(false).await, Ok(()));
    assert_eq!(childs0(&sec).stage(), Stage::Done);
    // E2 as in the stop case: exactly 0x33 | 0x11.
    assert_eq!(sec.s.contents(HALF - 1, 2), vec![0x33, 0x11]);
    expect(&*sec.view, 0, HALF, 0x33).await;
    expect(&*sec.view, HALF, HALF, 0x11).await;
}
both_layers!(continuous_replication_a_promoted_secondary_ignores_start_r34);

async fn secondary_do_checkpoint_makes_the_view_equal_s_r27() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.fwd
        .write(HALF, fill(HALF, 0x22), WriteFlags::NONE)
        .await
        .unwrap();
    sec.view
        .write(0, fill(4096, 0x33), WriteFlags::NONE)
        .await
        .unwrap();
    expect(&*sec.view, HALF, HALF, 0x11).await;
    sec.g.replication_checkpoint_all().await.unwrap();
    // E2: exactly 0x22 after the checkpoint (QEMU's test accepts anything <= 0x22).
    expect(&*sec.view, HALF, HALF, 0x22).await;
    expect(&*sec.view, 0, HALF, 0x11).await;
    for o in ["active0", "hidden0"] {
        assert_eq!((clusters(&sec, o).await.len() as u64), 0);
    }
    sec.g.replication_stop_all(false).await.unwrap();
}
both_layers!(secondary_do_checkpoint_makes_the_view_equal_s_r27);

async fn secondary_get_error_all_r28() {
    let sec = secondary().await;
    assert_eq!(
        sec.g.replication_status(),
        (
            Err(ballot::ConfigError::new("Block replication is not running")),
            Some(Stage::None)
        )
    );
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    assert_eq!(sec.g.replication_status(), (Ok(()), Some(Stage::Running)));
    sec.g.replication_stop_all(false).await.unwrap();
    assert_eq!(sec.g.replication_status(), (Ok(()), Some(Stage::Done)));
}
both_layers!(secondary_get_error_all_r28);

// ---- what QEMU does not test ----

async fn e1_stop_without_failover_empties_both_overlays_and_succeeds() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.fwd
        .write(0, fill(MIB, 0x22), WriteFlags::NONE)
        .await
        .unwrap();
    sec.view
        .write(MIB, fill(MIB, 0x33), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(sec.g.replication_stop_all(false).await, Ok(()));
    assert_eq!(sec.g.replication_status(), (Ok(()), Some(Stage::Done)));
    for o in ["active0", "hidden0"] {
        assert_eq!((clusters(&sec, o).await.len() as u64), 0);
    }
    // The view is S (R9, DONE after stop(false): A → H → S with both empty).
    expect(&*sec.view, 0, MIB, 0x22).await;
    expect(&*sec.view, MIB, MIB, 0x11).await;
}
both_layers!(e1_stop_without_failover_empties_both_overlays_and_succeeds);

async fn r24_wrong_mode_double_start_and_stop_before_start() {
    let sec = secondary().await;
    assert_eq!(
        msg(sec.g.replication_stop_all(false).await),
        "Block replication is not running"
    );
    assert_eq!(
        msg(sec.g.replication_start_all(Mode::Primary).await),
        "The parameter mode's value is invalid, needs 1, but got 0"
    );
    assert_eq!(childs0(&sec).stage(), Stage::None);
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    assert_eq!(
        msg(sec.g.replication_start_all(Mode::Secondary).await),
        "Block replication is running or done"
    );
    let (g, _, _) = primary().await;
    assert_eq!(
        msg(g.replication_start_all(Mode::Secondary).await),
        "The parameter mode's value is invalid, needs 0, but got 1"
    );
}
both_layers!(r24_wrong_mode_double_start_and_stop_before_start);

async fn r27_checkpoint_of_a_secondary_that_is_not_running() {
    let sec = secondary().await;
    assert_eq!(
        msg(sec.g.replication_checkpoint_all().await),
        "Backup job was cancelled unexpectedly"
    );
}
both_layers!(r27_checkpoint_of_a_secondary_that_is_not_running);

async fn r25_secondary_checks_in_order() {
    // 1: file is not an overlay.
    let (h, _) = host();
    let mut g = Graph::new(h);
    let s = TestChild::sized("s", 0, MIB);
    g.insert_device("s0", dev(&s)).unwrap();
    g.blockdev_add_arg("driver=replication,node-name=r,mode=secondary,top-id=r,file=s0")
        .await
        .unwrap();
    assert_eq!(
        msg(g.replication_start_all(Mode::Secondary).await),
        "Active disk doesn't have backing file"
    );
    // 2: A's backing is not an overlay.
    let (h, _) = host();
    let mut g = Graph::new(h);
    g.insert_device("s0", dev(&s)).unwrap();
    g.blockdev_add_arg("driver=overlay,node-name=a,backing=s0")
        .await
        .unwrap();
    g.blockdev_add_arg("driver=replication,node-name=r,mode=secondary,top-id=r,file=a")
        .await
        .unwrap();
    assert_eq!(
        msg(g.replication_start_all(Mode::Secondary).await),
        "Hidden disk doesn't have backing file"
    );
    // 3: S without an export.
    let sec = secondary_with(TestChild::sized("parent0", 0, MIB), false).await;
    assert_eq!(
        msg(sec.g.replication_start_all(Mode::Secondary).await),
        "The secondary disk doesn't have block backend"
    );
    assert_eq!(
        childs0(&sec).stage(),
        Stage::None,
        "a failed start changes nothing"
    );
    // 4: a length that cannot be read.
    let sec = secondary_with(TestChild::sized("parent0", 0, MIB), true).await;
    *sec.s.length_err.lock().unwrap() = Some(ErrorKind::Io);
    assert_eq!(
        msg(sec.g.replication_start_all(Mode::Secondary).await),
        "Active disk, hidden disk, secondary disk's length are not the same"
    );
    *sec.s.length_err.lock().unwrap() = None;
    assert_eq!(sec.g.replication_start_all(Mode::Secondary).await, Ok(()));
}
both_layers!(r25_secondary_checks_in_order);

#[tokio::test]
async fn r25_invalid_top_id() {
    for (top, extra) in [
        ("nothere", None),
        // Exists, but does not contain childs0.
        ("other", Some("driver=null-co,node-name=other,size=1048576")),
    ] {
        let (h, _) = host();
        let mut g = Graph::new(h);
        let s = TestChild::sized("s", 0, MIB);
        g.insert_device("parent0", dev(&s)).unwrap();
        if let Some(x) = extra {
            g.blockdev_add_arg(x).await.unwrap();
        }
        g.blockdev_add_arg("driver=overlay,node-name=hidden0,backing=parent0")
            .await
            .unwrap();
        g.blockdev_add_arg("driver=overlay,node-name=active0,backing=hidden0")
            .await
            .unwrap();
        g.blockdev_add_arg(&format!(
            "driver=replication,node-name=childs0,mode=secondary,top-id={top},file=active0"
        ))
        .await
        .unwrap();
        g.claim("parent0", "export 'fwd'", true).unwrap();
        assert_eq!(
            msg(g.replication_start_all(Mode::Secondary).await),
            "No top_bs or it is invalid",
            "top-id={top}"
        );
    }
    // A top that is itself some node's child is not a root.
    let (h, _) = host();
    let mut g = Graph::new(h);
    let s = TestChild::sized("s", 0, MIB);
    g.insert_device("parent0", dev(&s)).unwrap();
    g.blockdev_add_arg("driver=overlay,node-name=hidden0,backing=parent0")
        .await
        .unwrap();
    g.blockdev_add_arg("driver=overlay,node-name=active0,backing=hidden0")
        .await
        .unwrap();
    g.blockdev_add_arg(
        "driver=replication,node-name=childs0,mode=secondary,top-id=q1,file=active0",
    )
    .await
    .unwrap();
    g.blockdev_add_arg(
        r#"{"driver":"quorum","node-name":"q1","vote-threshold":1,"children":["childs0"]}"#,
    )
    .await
    .unwrap();
    g.blockdev_add_arg(
        r#"{"driver":"quorum","node-name":"q2","vote-threshold":1,"children":["q1"]}"#,
    )
    .await
    .unwrap();
    g.claim("parent0", "export 'fwd'", true).unwrap();
    assert_eq!(
        msg(g.replication_start_all(Mode::Secondary).await),
        "No top_bs or it is invalid"
    );
}

#[tokio::test]
async fn r6_open_errors_in_order() {
    let cases = [
        (
            "driver=replication,node-name=r,file=x",
            "Parameter 'mode' is missing",
        ),
        (
            "driver=replication,node-name=r,mode=tertiary,file=x",
            "Parameter 'mode' does not accept value 'tertiary'",
        ),
        (
            "driver=replication,node-name=r,mode=primary",
            "Parameter 'file' is missing",
        ),
        (
            "driver=replication,node-name=r,mode=primary,file=nosuch",
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            "driver=replication,node-name=r,mode=primary,file=link,top-id=q",
            "The primary side does not support option top-id",
        ),
        (
            "driver=replication,node-name=r,mode=secondary,file=link",
            "Missing the option top-id",
        ),
        (
            "driver=overlay,node-name=o",
            "Parameter 'backing' is missing",
        ),
        (
            "driver=overlay,node-name=o,backing=nosuch",
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
    ];
    for (def, want) in cases {
        let (h, _) = host();
        let mut g = Graph::new(h);
        g.insert_device("link", dev(&TestChild::sized("l", 0, MIB)))
            .unwrap();
        let e = g.blockdev_add_arg(def).await.unwrap_err();
        assert_eq!(e.to_string(), want, "{def}");
        // Nothing was left behind (the staged file edge is released).
        assert!(g.get("r").is_none() && g.get("o").is_none());
        assert!(g.replication_nodes().is_empty());
    }
}

async fn r26_the_top_node_is_busy_while_copy_before_write_is_armed() {
    let mut sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    assert_eq!(
        sec.g
            .blockdev_del("colo-disk0")
            .await
            .unwrap_err()
            .to_string(),
        "Node 'colo-disk0' is busy: Block device is in use by internal backup job"
    );
    sec.g.replication_stop_all(false).await.unwrap();
    assert_eq!(sec.g.blockdev_del("colo-disk0").await, Ok(()));
}
both_layers!(r26_the_top_node_is_busy_while_copy_before_write_is_armed);

#[tokio::test]
async fn r33_closing_a_running_primary_stops_it_and_leaves_the_registry() {
    let (mut g, link, d) = primary().await;
    g.replication_start_all(Mode::Primary).await.unwrap();
    let r = g.get("replication0").unwrap().replication.clone().unwrap();
    g.blockdev_del("replication0").await.unwrap();
    assert_eq!(r.stage(), Stage::Done);
    assert!(g.replication_nodes().is_empty());
    // R38: no replication node left → no error.
    assert_eq!(g.replication_status(), (Ok(()), None));
    assert_eq!(
        d.write(0, fill(512, 1), WriteFlags::NONE)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Io
    );
    assert_eq!(link.log(), vec![]);
}

async fn r21_a_failed_preserve_fails_the_forwarded_write_and_leaves_s_unchanged() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.s.fail_reads(ErrorKind::Io);
    let e = sec
        .fwd
        .write(0, fill(4096, 0x22), WriteFlags::NONE)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(sec.s.contents(0, 4096), vec![0x11; 4096]);
    // The secondary records nothing (R21).
    assert_eq!(sec.g.replication_status(), (Ok(()), Some(Stage::Running)));
}
both_layers!(r21_a_failed_preserve_fails_the_forwarded_write_and_leaves_s_unchanged);

async fn o1_after_stop_the_export_of_s_refuses_writes() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.g.replication_stop_all(true).await.unwrap();
    childs0(&sec).wait_commit().await;
    let e = sec
        .fwd
        .write(0, fill(4096, 0x22), WriteFlags::NONE)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Perm);
    let e = sec
        .fwd
        .write_zeroes(0, 4096, ZeroFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Perm);
    assert_eq!(sec.s.contents(0, 4096), vec![0x11; 4096]);
    // Reads through the export still work.
    assert_eq!(sec.fwd.read(0, 4).await.unwrap().to_vec(), vec![0x11; 4]);
}
both_layers!(o1_after_stop_the_export_of_s_refuses_writes);

async fn r13_failover_failed_splits_writes_between_a_and_s() {
    let sec = secondary().await;
    let rec = sec.bus.record(Stream::Internal);
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    // Cluster 1 in A (SVM write), cluster 3 in H (forwarded write), the rest nowhere.
    let c = 65536u64;
    sec.view
        .write(c, fill(c, 0x33), WriteFlags::NONE)
        .await
        .unwrap();
    sec.fwd
        .write(3 * c, fill(c, 0x22), WriteFlags::NONE)
        .await
        .unwrap();
    sec.s.fail_writes(ErrorKind::NoSpc);
    sec.g.replication_stop_all(true).await.unwrap();
    let r = childs0(&sec);
    r.wait_commit().await;
    assert_eq!(r.stage(), Stage::FailoverFailed);
    assert_eq!(
        sec.g.replication_status(),
        (
            Err(ballot::ConfigError::new("I/O error occurred")),
            Some(Stage::FailoverFailed)
        )
    );
    let events: Vec<Event> = rec.events();
    assert_eq!(
        events,
        vec![Event::BlockJobCompleted {
            job_type: "commit",
            device: "childs0".into(),
            len: 2 * c,
            offset: 0,
            error: Some(ErrorKind::NoSpc),
            speed: 0,
            result: Vec::new(),
        }]
    );
    // The view is unchanged (R31 step 5): uncommitted clusters stay in A and H.
    expect(&*sec.view, c, c, 0x33).await;
    expect(&*sec.view, 3 * c, c, 0x11).await;
    // A write over clusters 0..4: clusters 1 and 3 go into A, 0 and 2 straight into S.
    sec.s.clear_log();
    *sec.s.write_err.lock().unwrap() = None;
    sec.view
        .write(0, fill(4 * c, 0x55), WriteFlags::NONE)
        .await
        .unwrap();
    let writes = s_writes(&sec);
    assert_eq!(writes, vec![(0, c as usize), (2 * c, c as usize)]);
    expect(&*sec.view, 0, 4 * c, 0x55).await;
    assert_eq!(clusters(&sec, "active0").await, vec![1, 3]);
    // A write inside one cluster allocated nowhere, with its neighbour allocated nowhere
    // either, goes to S as it is.
    sec.s.clear_log();
    sec.view
        .write(5 * c + 512, fill(512, 0x66), WriteFlags::NONE)
        .await
        .unwrap();
    let writes = s_writes(&sec);
    assert_eq!(writes, vec![(5 * c + 512, 512)]);
    // R27 step 3 and R30 step 2 in FAILOVER_FAILED.
    assert_eq!(
        msg(sec.g.replication_checkpoint_all().await),
        "Backup job was cancelled unexpectedly"
    );
    assert_eq!(
        msg(sec.g.replication_stop_all(false).await),
        "Block replication is not running"
    );
}
both_layers!(r13_failover_failed_splits_writes_between_a_and_s);

async fn r17_a_checkpoint_waits_for_a_forwarded_write_in_flight() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.s.set_delay(Duration::from_millis(200));
    let fwd = sec.fwd.clone();
    let w = tokio::spawn(async move { fwd.write(0, fill(4096, 0x22), WriteFlags::NONE).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The checkpoint starts while the write is in flight: it must end after it, so that the
    // preserved cluster is dropped and the view shows the new data.
    sec.g.replication_checkpoint_all().await.unwrap();
    assert!(w.is_finished());
    w.await.unwrap().unwrap();
    sec.s.set_delay(Duration::ZERO);
    expect(&*sec.view, 0, 4096, 0x22).await;
}
both_layers!(r17_a_checkpoint_waits_for_a_forwarded_write_in_flight);

async fn qmp_commands_r37_r38_r39() {
    let sec = secondary().await;
    let bus = sec.bus.clone();
    let m = common::monitor(sec.g, bus);
    let run = |cmd: &'static str, args: serde_json::Value| {
        let m = &m;
        async move { m.execute(cmd, &args).await.0 }
    };
    assert_eq!(
        run("xen-set-replication", json!({"primary": false})).await,
        json!({"error": {"class": "GenericError", "desc": "Parameter 'enable' is missing"}})
    );
    assert_eq!(
        run(
            "xen-set-replication",
            json!({"enable": true, "primary": false, "failover": false})
        )
        .await,
        json!({"error": {"class": "GenericError", "desc": "Parameter 'failover' is only for stopping replication"}})
    );
    assert_eq!(
        run("query-xen-replication-status", json!({})).await,
        json!({"return": {"error": true, "desc": "Block replication is not running", "stage": "none"}})
    );
    assert_eq!(
        run(
            "xen-set-replication",
            json!({"enable": true, "primary": false})
        )
        .await,
        json!({"return": {}})
    );
    assert_eq!(
        run("query-xen-replication-status", json!({})).await,
        json!({"return": {"error": false, "stage": "running"}})
    );
    assert_eq!(
        run("xen-colo-do-checkpoint", json!({})).await,
        json!({"return": {}})
    );
    // failover=true ignores errors (R37); here there are none.
    assert_eq!(
        run(
            "xen-set-replication",
            json!({"enable": false, "primary": false, "failover": true})
        )
        .await,
        json!({"return": {}})
    );
    let r = m.graph.lock().await.replication_nodes()[0].clone();
    r.wait_commit().await;
    assert_eq!(
        run("query-xen-replication-status", json!({})).await,
        json!({"return": {"error": false, "stage": "done"}})
    );
    // Stopping again without failover in DONE is ignored with success (R30 step 1).
    assert_eq!(
        run(
            "xen-set-replication",
            json!({"enable": false, "primary": true})
        )
        .await,
        json!({"return": {}})
    );
}
both_layers!(qmp_commands_r37_r38_r39);

const CL: u64 = 65536;

/// Debug output names the node, its mode, and the overlays of its chain.
async fn debug_names_the_node_its_mode_and_its_chain() {
    let sec = secondary().await;
    let c = childs0(&sec);
    assert_eq!(
        format!("{c:?}"),
        r#"Replication { name: "childs0", mode: Secondary }"#
    );
    assert!(c.chain().is_none(), "no chain before start");
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    let chain = c.chain().expect("the chain once started");
    assert_eq!(
        format!("{chain:?}"),
        r#"SecondaryChain { active: "active0", hidden: "hidden0" }"#
    );
}
both_layers!(debug_names_the_node_its_mode_and_its_chain);

/// E1, R9: after stop without failover the node is DONE but not promoted: requests still go
/// through A (A → H → S, both empty), so a write lands in A and S keeps its data.
async fn e1_after_stop_without_failover_writes_go_through_a() {
    let sec = secondary().await;
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.g.replication_stop_all(false).await.unwrap();
    assert_eq!(childs0(&sec).stage(), Stage::Done);
    sec.view
        .write(0, fill(512, 0x44), WriteFlags::NONE)
        .await
        .unwrap();
    expect(&*sec.view, 0, 512, 0x44).await;
    assert_eq!(sec.s.contents(0, 1), vec![0x11], "S unchanged");
    assert_eq!(clusters(&sec, "active0").await, vec![0]);
}
both_layers!(e1_after_stop_without_failover_writes_go_through_a);

/// `(offset, length)` of every write S received since its log was last cleared.
fn s_writes(sec: &Secondary) -> Vec<(u64, usize)> {
    sec.s
        .log()
        .iter()
        .filter_map(|o| match o {
            common::Op::Write(off, n, ..) => Some((*off, *n)),
            _ => None,
        })
        .collect()
}

/// A running secondary whose SVM wrote 0x33 over the first `clusters` clusters (into A), with
/// every request to S now taking 10 ms, and failover started: the first commit pass is in
/// progress. Returns it and a recorder of its events.
async fn failover_with_slow_s(clusters: u64) -> (Secondary, ballot::events::Recorder) {
    let sec = secondary().await;
    let rec = sec.bus.record(Stream::Internal);
    sec.g.replication_start_all(Mode::Secondary).await.unwrap();
    sec.view
        .write(0, fill(clusters * CL, 0x33), WriteFlags::NONE)
        .await
        .unwrap();
    sec.s.set_delay(Duration::from_millis(10));
    sec.g.replication_stop_all(true).await.unwrap();
    (sec, rec)
}

/// O2: a cluster the SVM dirties behind the first commit pass is committed by the final pass
/// and counted in the job's len and offset.
async fn o2_a_cluster_dirtied_during_the_first_pass_counts_in_len_and_offset() {
    // The first pass commits cluster 0 by t=10, cluster 1 by t=20.
    let (sec, rec) = failover_with_slow_s(2).await;
    let s = sec.s.clone();
    tokio::time::sleep(Duration::from_millis(15)).await;
    sec.view
        .write(0, fill(CL, 0x55), WriteFlags::NONE)
        .await
        .unwrap();
    childs0(&sec).wait_commit().await;
    assert_eq!(
        rec.events(),
        vec![Event::BlockJobCompleted {
            job_type: "commit",
            device: "childs0".into(),
            len: 3 * CL,
            offset: 3 * CL,
            error: None,
            speed: 0,
            result: Vec::new(),
        }]
    );
    assert_eq!(s.contents(0, CL as usize), vec![0x55; CL as usize]);
    assert_eq!(s.contents(CL, CL as usize), vec![0x33; CL as usize]);
}
both_layers!(
    o2_a_cluster_dirtied_during_the_first_pass_counts_in_len_and_offset,
    paused
);

/// R33: closing a node in FAILOVER cancels the commit at a cluster boundary: the cluster in
/// progress completes, nothing after it reaches S, the rest stays in A, and (as for QEMU's
/// cancelled job) no BLOCK_JOB_COMPLETED is sent.
async fn r33_closing_during_failover_cancels_the_commit_at_a_cluster_boundary() {
    let (sec, rec) = failover_with_slow_s(3).await;
    let s = sec.s.clone();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let c = childs0(&sec);
    assert_eq!(c.stage(), Stage::Failover);
    c.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        s.contents(0, 1),
        vec![0x33],
        "the cluster in progress completed"
    );
    assert_eq!(s.contents(CL, 1), vec![0x11], "nothing after it reached S");
    assert_eq!(s.contents(2 * CL, 1), vec![0x11]);
    assert_eq!(clusters(&sec, "active0").await, vec![1, 2]);
    assert_eq!(rec.events(), vec![]);
}
both_layers!(
    r33_closing_during_failover_cancels_the_commit_at_a_cluster_boundary,
    paused
);

/// R14: flush is forwarded and its error returned; R15: discard succeeds at once inside the
/// disk and is refused past its end; the driver's name.
async fn r14_r15_flush_forwards_its_error_and_discard_checks_its_range() {
    let sec = secondary().await;
    let c = childs0(&sec);
    assert_eq!(c.driver(), "replication");
    assert_eq!(c.flush().await, Ok(()));
    sec.s.fail_flushes(ErrorKind::Io);
    assert_eq!(c.flush().await.map_err(|e| e.kind()), Err(ErrorKind::Io));
    assert_eq!(c.discard(0, 512).await, Ok(()));
    assert_eq!(
        c.discard(IMG, 512).await.map_err(|e| e.kind()),
        Err(ErrorKind::Inval)
    );
}
both_layers!(r14_r15_flush_forwards_its_error_and_discard_checks_its_range);
