//! HEALING.md §5 on the quorum driver: the metadata node (H19–H23). The intent bit is durable
//! before any child sees a write and concurrent writes share one metadata commit (H20, H21);
//! out-of-sync marks survive a restart (H21); an unclean shutdown turns the intent extents into
//! out-of-sync granules on every child and a `recover=lowest` resync makes the children equal
//! (H22); a clean shutdown leaves nothing to recover (H23); a node that does not match is
//! refused with the mismatch named, `metadata-reset=on` starts over (H23); a metadata write
//! that fails stops the guest write before any child sees it; the cooler clears cold extents
//! and keeps at most `intent-extents` hot (H21); hot add and remove rewrite the layout.
//! Time is paused: the cooler's ticks and the resync's start cost nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::quorum::durable::{summarize, MetadataOptions, OpenState};
use ballot::drivers::quorum::metadata::{Layout, INTENT_EXTENT_BYTES, SLOT_BYTES};
use ballot::drivers::quorum::{Quorum, QuorumOptions, ResyncMode};
use ballot::events::EventBus;
use ballot::host::{Captured, Host};
use ballot::{BlockDevice, ErrorKind, WriteFlags};
use bytes::Bytes;
use common::{Op, TestChild};

const G: u64 = 65536;
const EXT: u64 = INTENT_EXTENT_BYTES;
/// Eight intent extents, 512 granules.
const LEN: u64 = 8 * EXT;

fn layout(children: u64) -> Layout {
    Layout {
        disk_len: LEN,
        children,
        granule: G,
    }
}

/// A metadata node with room for `room` children, all zeroes (never formatted).
fn md_dev(room: u64) -> Arc<TestChild> {
    TestChild::sized("md", 0, layout(room).total_bytes())
}

struct Rig {
    q: Arc<Quorum>,
    kids: Vec<Arc<TestChild>>,
    md: Arc<TestChild>,
    captured: Captured,
    state: OpenState,
}

fn kids(n: usize) -> Vec<Arc<TestChild>> {
    (0..n)
        .map(|i| TestChild::sized(&format!("c{i}"), 0, LEN))
        .collect()
}

async fn open(
    kids: &[Arc<TestChild>],
    md: &Arc<TestChild>,
    opts: MetadataOptions,
) -> Result<Rig, String> {
    let (host, captured) = Host::recording(EventBus::new());
    let qopts = QuorumOptions {
        resync: ResyncMode::Manual,
        ..QuorumOptions::new("q0", 2)
    };
    let children = kids
        .iter()
        .map(|k| (k.name.clone(), k.clone() as ballot::Device))
        .collect();
    let q = Arc::new(Quorum::open(qopts, children, host).map_err(|e| e.to_string())?);
    let state = q
        .attach_metadata("md", md.clone() as ballot::Device, &opts)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Rig {
        q,
        kids: kids.to_vec(),
        md: md.clone(),
        captured,
        state,
    })
}

/// A formatted node whose children are in sync: opened blank (every granule out of sync),
/// then the record cleared the way `ballot metadata create --in-sync` leaves it.
async fn in_sync_rig(n: usize, opts: MetadataOptions) -> Rig {
    let kids = kids(n);
    let md = md_dev(n as u64 + 1);
    let r = open(&kids, &md, opts.clone()).await.expect("open blank");
    assert_eq!(r.state, OpenState::Fresh);
    r.q.close().await.expect("close");
    drop(r);
    // Clear the out-of-sync bitmaps as `--in-sync` would.
    let l = layout(n as u64);
    md.fill(l.oos_offset(0), (l.oos_bytes() * n as u64) as usize, 0);
    let r = open(&kids, &md, opts).await.expect("reopen");
    assert_eq!(r.state, OpenState::Clean);
    r
}

fn node(md: &TestChild) -> ballot::drivers::quorum::durable::Summary {
    let len = md.length().unwrap() as usize;
    summarize(&md.contents(0, len)).expect("summary")
}

/// The node-names a metadata node's header records, in child order.
fn names(s: &ballot::drivers::quorum::durable::Summary) -> Vec<&str> {
    s.header
        .children
        .iter()
        .map(|c| c.node_name.as_str())
        .collect()
}

fn data(byte: u8, len: u64) -> Bytes {
    Bytes::from(vec![byte; len as usize])
}

fn opts_cold(secs: u64) -> MetadataOptions {
    MetadataOptions {
        intent_cold: Duration::from_secs(secs),
        ..MetadataOptions::default()
    }
}

#[tokio::test(start_paused = true)]
async fn h20_a_blank_node_is_formatted_with_every_granule_out_of_sync() {
    let kids = kids(3);
    let md = md_dev(3);
    let r = open(&kids, &md, MetadataOptions::default()).await.unwrap();
    assert_eq!(r.state, OpenState::Fresh);
    let s = node(&md);
    assert!(!s.header.clean, "H23: not clean while open");
    assert_eq!(s.header.disk_len, LEN);
    assert_eq!(names(&s), ["c0", "c1", "c2"]);
    assert_eq!(s.out_of_sync, vec![(512, LEN); 3]);
    assert_eq!(s.dirty_extents, Vec::<u64>::new());
    let oos = r.q.out_of_sync().await;
    assert_eq!(
        oos.iter().map(|o| o.dirty_bytes()).collect::<Vec<_>>(),
        [LEN; 3]
    );
}

#[tokio::test(start_paused = true)]
async fn h21_the_intent_bit_is_durable_before_any_child_sees_the_write() {
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.md.clear_log();
    r.q.write(5 * EXT + 4096, data(7, 4096), WriteFlags::NONE)
        .await
        .unwrap();
    // The metadata node: one intent page, a flush, the header (clean flag cleared at open,
    // so no header now).
    let l = layout(3);
    assert_eq!(
        r.md.log(),
        vec![
            Op::Write(l.intent_offset(), 4096, false, 1 << 5, ptr(&r.md.log(), 0)),
            Op::Flush
        ]
    );
    assert_eq!(node(&r.md).dirty_extents, vec![5]);
    // A second write into the same extent costs no metadata I/O.
    r.md.clear_log();
    r.q.write(5 * EXT, data(8, 4096), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(r.md.log(), vec![]);
}

/// The buffer address of the `i`th logged op (the log records it; tests compare the rest).
fn ptr(log: &[Op], i: usize) -> usize {
    match log[i] {
        Op::Write(_, _, _, _, p) => p,
        _ => 0,
    }
}

#[tokio::test(start_paused = true)]
async fn h21_the_metadata_write_happens_before_the_child_write() {
    // Order across devices: a child whose write fails unless the intent bit is already on
    // the metadata node's media.
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.md.set_delay(Duration::from_millis(10));
    let q = r.q.clone();
    let w = tokio::spawn(async move { q.write(2 * EXT, data(9, G), WriteFlags::NONE).await });
    // Within the metadata write's 10 ms no child has seen the write.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for k in &r.kids {
        assert!(!k.log().iter().any(|o| matches!(o, Op::Write(..))));
    }
    w.await.unwrap().unwrap();
    assert_eq!(node(&r.md).dirty_extents, vec![2]);
    for k in &r.kids {
        assert_eq!(k.contents(2 * EXT, 1), vec![9]);
    }
}

#[tokio::test(start_paused = true)]
async fn h20_concurrent_writes_into_cold_extents_share_one_commit() {
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.md.set_delay(Duration::from_millis(1));
    r.md.clear_log();
    let futs: Vec<_> = (0..8u64)
        .map(|e| {
            let q = r.q.clone();
            tokio::spawn(async move {
                q.write(e * EXT, data(e as u8, 4096), WriteFlags::NONE)
                    .await
            })
        })
        .collect();
    for f in futs {
        f.await.unwrap().unwrap();
    }
    // The first write leads a commit of its own bit; the seven that arrive while it is on the
    // wire share the next one: two intent page writes, two flushes.
    let log = r.md.log();
    let flushes = log.iter().filter(|o| **o == Op::Flush).count();
    let writes = log.iter().filter(|o| matches!(o, Op::Write(..))).count();
    assert_eq!((writes, flushes), (2, 2), "{log:?}");
    assert_eq!(node(&r.md).dirty_extents, (0..8).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn h22_an_unclean_shutdown_recovers_the_intent_extents_with_recover_lowest() {
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.q.write(3 * EXT, data(0x33, 2 * G), WriteFlags::NONE)
        .await
        .unwrap();
    r.q.flush().await.unwrap();
    // A write in flight at the crash landed on child 2 only (any version is allowed, but the
    // children must end equal).
    r.q.write(6 * EXT + G, data(0x66, G), WriteFlags::NONE)
        .await
        .unwrap();
    r.kids[0].fill(6 * EXT + G, G as usize, 0);
    r.kids[1].fill(6 * EXT + G, G as usize, 0);
    let s = node(&r.md);
    assert_eq!(
        (s.header.clean, s.dirty_extents.clone()),
        (false, vec![3, 6])
    );
    let (kids, md) = (r.kids.clone(), r.md.clone());
    drop(r); // the process dies: no close
    let r = open(&kids, &md, opts_cold(3600)).await.unwrap();
    assert_eq!(r.state, OpenState::Recovered { extents: 2 });
    let per = EXT / G;
    // Every granule of the two extents, on every child, until the resync has run.
    let oos = r.q.out_of_sync().await;
    for o in &oos {
        assert_eq!(
            o.ranges,
            vec![(3 * EXT, EXT), (6 * EXT, EXT)],
            "{}",
            o.child
        );
    }
    // Durable before anything else happens: the record now holds them, the intent is clear.
    let s = node(&md);
    assert_eq!(s.out_of_sync, vec![(2 * per, 2 * EXT); 3]);
    assert_eq!(s.dirty_extents, Vec::<u64>::new());
    assert!(r
        .captured
        .logs()
        .iter()
        .any(|l| l.contains("was not shut down cleanly: 2 write-intent extents")));
    // The resync (recover=lowest) started by itself and makes every child equal.
    wait_idle(&r.q).await;
    for k in &kids {
        assert_eq!(k.contents(3 * EXT, 1), vec![0x33]);
        // Two children hold zeroes, one 0x66: the vote picks the zeroes.
        assert_eq!(k.contents(6 * EXT + G, 1), vec![0], "{}", k.name);
    }
    assert!(r.q.out_of_sync().await.iter().all(|o| o.ranges.is_empty()));
}

async fn wait_idle(q: &Quorum) {
    for _ in 0..1000 {
        if q.jobs_idle() && q.out_of_sync().await.iter().all(|o| o.ranges.is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("resync did not finish: {:?}", q.out_of_sync().await);
}

#[tokio::test(start_paused = true)]
async fn h21_out_of_sync_marks_survive_a_clean_restart_and_h23_leaves_nothing_to_recover() {
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.kids[1].fail_writes(ErrorKind::Io);
    r.q.write(EXT + 3 * G, data(1, G), WriteFlags::NONE)
        .await
        .unwrap();
    // H21: durable before the write returned.
    assert_eq!(node(&r.md).out_of_sync, vec![(0, 0), (1, G), (0, 0)]);
    r.q.close().await.unwrap();
    let s = node(&r.md);
    assert!(s.header.clean);
    assert_eq!(s.dirty_extents, Vec::<u64>::new());
    // Clean shutdown flushed every child (H23's order: flush, intent, clean flag).
    for k in &r.kids {
        assert_eq!(k.log().last(), Some(&Op::Flush), "{}", k.name);
    }
    let (kids, md) = (r.kids.clone(), r.md.clone());
    drop(r);
    kids[1].write_err.lock().unwrap().take();
    let r = open(&kids, &md, opts_cold(3600)).await.unwrap();
    assert_eq!(r.state, OpenState::Clean);
    let oos = r.q.out_of_sync().await;
    assert_eq!(oos[1].ranges, vec![(EXT + 3 * G, G)]);
    assert!(oos[0].ranges.is_empty() && oos[2].ranges.is_empty());
    assert!(r.q.jobs_idle(), "a clean open starts no recovery");
}

#[tokio::test(start_paused = true)]
async fn h23_a_node_that_does_not_match_is_refused_with_the_mismatch_named() {
    let r = in_sync_rig(3, MetadataOptions::default()).await;
    r.q.close().await.unwrap();
    let md = r.md.clone();
    drop(r);
    // Another child name.
    let mut k = kids(3);
    k[2] = TestChild::sized("other", 0, LEN);
    let e = open(&k, &md, MetadataOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        e,
        "quorum 'q0': metadata node 'md' does not match: it records child 2 as 'c2', the quorum's is 'other'; metadata-reset=on starts over with a full compare"
    );
    // Another child count.
    let e = open(&kids(2), &md, MetadataOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        e,
        "quorum 'q0': metadata node 'md' does not match: it records 3 children (c0,c1,c2), the quorum has 2 (c0,c1); metadata-reset=on starts over with a full compare"
    );
    // Another length.
    let short: Vec<_> = (0..3)
        .map(|i| TestChild::sized(&format!("c{i}"), 0, LEN - G))
        .collect();
    let e = open(&short, &md, MetadataOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        e,
        format!("quorum 'q0': metadata node 'md' does not match: it records a disk of {LEN} bytes, the quorum has {}; metadata-reset=on starts over with a full compare", LEN - G)
    );
    // Nothing was written by the refusals.
    assert!(node(&md).header.clean);
    // metadata-reset=on starts over: every granule of every child out of sync.
    let r = open(
        &k,
        &md,
        MetadataOptions {
            reset: true,
            ..MetadataOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(r.state, OpenState::Fresh);
    let s = node(&md);
    assert_eq!(s.header.children[2].node_name, "other");
    assert_eq!(s.out_of_sync, vec![(512, LEN); 3]);
}

#[tokio::test(start_paused = true)]
async fn h20_damaged_headers_and_small_nodes_are_refused_with_the_way_out() {
    let small = TestChild::sized("md", 0, layout(3).total_bytes() - 4096);
    let e = open(&kids(3), &small, MetadataOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        e,
        format!(
            "quorum 'q0': metadata node 'md' holds {} bytes; 3 children of {LEN} bytes need {}: create it with `ballot metadata create FILE --size {LEN} --children c0,c1,c2`",
            layout(3).total_bytes() - 4096,
            layout(3).total_bytes()
        )
    );
    let r = in_sync_rig(3, MetadataOptions::default()).await;
    r.q.close().await.unwrap();
    let md = r.md.clone();
    drop(r);
    // The newest slot torn: the other one is used (one sequence number older, not clean).
    let newest = node(&md);
    md.fill(newest.slot * SLOT_BYTES + 20, 8, 0xee);
    let older = node(&md);
    assert_eq!(older.header.seq, newest.header.seq - 1);
    assert!(!older.header.clean);
    let r = open(&kids(3), &md, MetadataOptions::default())
        .await
        .unwrap();
    assert_eq!(r.state, OpenState::Recovered { extents: 0 });
    drop(r);
    // Both slots damaged: refused, not reformatted.
    md.fill(8, 1, 0xee);
    md.fill(SLOT_BYTES + 8, 1, 0xee);
    let e = open(&kids(3), &md, MetadataOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        e,
        "quorum 'q0': metadata node 'md' has no valid header (slot 0: metadata format version 238, this ballot reads 1; slot 1: metadata format version 238, this ballot reads 1); metadata-reset=on starts over with a full compare"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_metadata_write_stops_the_guest_write_before_any_child() {
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.md.fail_writes(ErrorKind::Io);
    for k in &r.kids {
        k.clear_log();
    }
    let e =
        r.q.write(4 * EXT, data(4, G), WriteFlags::NONE)
            .await
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(
        e.to_string(),
        "quorum 'q0': metadata node 'md' could not be updated: Input/output error"
    );
    for k in &r.kids {
        assert_eq!(k.log(), vec![], "{}", k.name);
    }
    // The node recovers: the next write retries the page and succeeds.
    r.md.write_err.lock().unwrap().take();
    r.q.write(4 * EXT, data(4, G), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(node(&r.md).dirty_extents, vec![4]);
}

#[tokio::test(start_paused = true)]
async fn h21_the_cooler_clears_cold_extents_after_a_flush_of_every_child() {
    let r = in_sync_rig(3, opts_cold(5)).await;
    r.q.write(EXT, data(1, G), WriteFlags::NONE).await.unwrap();
    for k in &r.kids {
        k.clear_log();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node(&r.md).dirty_extents, vec![1], "not cold yet");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(node(&r.md).dirty_extents, Vec::<u64>::new());
    for k in &r.kids {
        assert_eq!(k.log(), vec![Op::Flush], "{}", k.name);
    }
    assert_eq!(r.q.durable().unwrap().hot_extents(), 0);
}

#[tokio::test(start_paused = true)]
async fn h21_at_most_intent_extents_stay_hot_least_recently_used_first() {
    let r = in_sync_rig(
        3,
        MetadataOptions {
            intent_cold: Duration::from_secs(3600),
            intent_extents: 2,
            reset: false,
        },
    )
    .await;
    for e in [0u64, 1, 2, 3] {
        r.q.write(e * EXT, data(1, G), WriteFlags::NONE)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node(&r.md).dirty_extents, vec![2, 3]);
}

#[tokio::test(start_paused = true)]
async fn hot_add_and_remove_rewrite_the_layout_and_the_names() {
    let r = in_sync_rig(3, opts_cold(3600)).await;
    r.q.write(7 * EXT, data(7, G), WriteFlags::NONE)
        .await
        .unwrap();
    let new = TestChild::sized("c3", 0, LEN);
    r.q.add_child("c3", new.clone()).await.unwrap();
    let s = node(&r.md);
    assert_eq!(names(&s), ["c0", "c1", "c2", "c3"]);
    assert_eq!(s.out_of_sync, vec![(0, 0), (0, 0), (0, 0), (512, LEN)]);
    assert_eq!(
        s.dirty_extents,
        vec![7],
        "the hot extent survives the new layout"
    );
    // No room for a fifth (the node was made for 3 + 1).
    let e =
        r.q.add_child("c4", TestChild::sized("c4", 0, LEN))
            .await
            .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Cannot add child 'c4' to quorum 'q0': metadata node 'md' holds {} bytes, 5 children need {}: recreate it with `ballot metadata create FILE --size {LEN} --children ... --max-children 5`",
            layout(4).total_bytes(),
            layout(5).total_bytes()
        )
    );
    r.q.remove_child("children.0").await.unwrap();
    let s = node(&r.md);
    assert_eq!(names(&s), ["c1", "c2", "c3"]);
    assert_eq!(s.out_of_sync, vec![(0, 0), (0, 0), (512, LEN)]);
    r.q.close().await.unwrap();
    let (md, kids) = (r.md.clone(), r.kids.clone());
    drop(r);
    // The next start names the new set and finds c3 still to be copied.
    let set = vec![kids[1].clone(), kids[2].clone(), new];
    let r = open(&set, &md, opts_cold(3600)).await.unwrap();
    assert_eq!(r.state, OpenState::Clean);
    assert_eq!(r.q.out_of_sync().await[2].dirty_bytes(), LEN);
}
