//! Table-driven quorum tests: one row per line of QUORUM.md §15's outcome matrix and per
//! D-rule, each asserting the exact result, the exact events (internal stream, in order) and
//! the exact effect on the children. Rule ids are cited in every row.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::quorum::{Quorum, QuorumOptions, ReadPattern, ResyncMode};
use ballot::events::{Event, EventBus, IoType, Stream};
use ballot::host::{Captured, Host};
use ballot::{BlockDevice, BlockStatus, ErrorKind, WriteFlags, ZeroFlags};
use bytes::Bytes;
use common::{Op, TestChild};

const EIO: ErrorKind = ErrorKind::Io;
const ENOSPC: ErrorKind = ErrorKind::NoSpc;

/// A child of a row: its contents byte, or the error its reads / writes / flushes fail with.
#[derive(Clone, Copy, Debug)]
enum C {
    /// Holds this byte everywhere; every operation succeeds.
    D(u8),
    /// Holds byte `.0`, and every read, write, flush and discard fails with `.1`.
    E(u8, ErrorKind),
    /// Holds byte `.0`; only reads fail, with `.1` (a latent sector error: rewrites land).
    R(u8, ErrorKind),
}

struct Fixture {
    q: Arc<Quorum>,
    kids: Vec<Arc<TestChild>>,
    internal: ballot::events::Recorder,
    captured: Captured,
}

fn opts(t: usize, pattern: ReadPattern, rewrite: bool) -> QuorumOptions {
    QuorumOptions {
        read_pattern: pattern,
        rewrite_corrupted: rewrite,
        discard_unmap: true,
        // The table isolates one request's rules: no background resync (HEALING.md H14).
        resync: ResyncMode::Manual,
        ..QuorumOptions::new("q0", t)
    }
}

fn fixture_with(children: &[C], o: QuorumOptions, discard_zeroes: bool) -> Fixture {
    let bus = EventBus::new();
    let internal = bus.record(Stream::Internal);
    let (host, captured) = Host::recording(bus);
    let kids: Vec<Arc<TestChild>> = children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = format!("c{i}");
            let (fill, err, read_only_err) = match *c {
                C::D(b) => (b, None, None),
                C::E(b, k) => (b, Some(k), None),
                C::R(b, k) => (b, None, Some(k)),
            };
            let k = if discard_zeroes {
                TestChild::with_discard_zeroes(&name, fill)
            } else {
                TestChild::new(&name, fill)
            };
            if let Some(e) = read_only_err {
                k.fail_reads(e);
            }
            if let Some(e) = err {
                k.fail_reads(e);
                k.fail_writes(e);
                k.fail_flushes(e);
            }
            k
        })
        .collect();
    let devs = kids
        .iter()
        .map(|k| (k.name.clone(), common::dev(k)))
        .collect();
    let q = Arc::new(Quorum::open(o, devs, host).expect("open"));
    Fixture {
        q,
        kids,
        internal,
        captured,
    }
}

fn fixture(children: &[C], t: usize, pattern: ReadPattern, rewrite: bool) -> Fixture {
    fixture_with(children, opts(t, pattern, rewrite), false)
}

fn rb(io: IoType, error: Option<ErrorKind>, node: &str, sn: u64, sc: u64) -> Event {
    Event::QuorumReportBad {
        io,
        error,
        node_name: node.into(),
        sector_num: sn,
        sectors_count: sc,
    }
}

fn fail(sn: u64, sc: u64) -> Event {
    Event::QuorumFailure {
        reference: "q0".into(),
        sector_num: sn,
        sectors_count: sc,
    }
}

/// Expected read outcome: Ok(byte of every returned byte, index of the child whose buffer is
/// returned) or Err(kind).
type ReadExpect = Result<(u8, usize), ErrorKind>;

struct ReadRow {
    rule: &'static str,
    children: &'static [C],
    t: usize,
    pattern: ReadPattern,
    rewrite: bool,
    expect: ReadExpect,
    events: fn() -> Vec<Event>,
    /// Children that must have been rewritten with the returned data (ascending).
    rewritten: &'static [usize],
    /// Children that must not have been read at all (fifo stops at the first success).
    unread: &'static [usize],
    /// Expected fatal line (blkverify, Q33).
    fatal: Option<&'static str>,
}

// Reads are 8 KiB at offset 4096: sectors 8..24, so sector-num 8 and sectors-count 16.
const OFF: u64 = 4096;
const LEN: usize = 8192;

fn read_rows() -> Vec<ReadRow> {
    use ReadPattern::{Fifo, Quorum as Qp};
    use C::{D, E, R};
    vec![
        ReadRow {
            rule: "§15 row 1, Q21: all succeed and agree -> child 0's data, no events",
            children: &[D(0xA), D(0xA), D(0xA)],
            t: 2,
            pattern: Qp,
            rewrite: false,
            expect: Ok((0xA, 0)),
            events: Vec::new,
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 2, Q19/Q21: one failed, the rest agree -> first successful child's data",
            children: &[E(0xA, EIO), D(0xA), D(0xA)],
            t: 2,
            pattern: Qp,
            rewrite: true,
            expect: Ok((0xA, 1)),
            events: || vec![rb(IoType::Read, Some(EIO), "c0", 8, 16)],
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 3, Q25: one loser, no rewrite -> winner's data, RB(read) without error",
            children: &[D(0xB), D(0xA), D(0xA)],
            t: 2,
            pattern: Qp,
            rewrite: false,
            expect: Ok((0xA, 1)),
            events: || vec![rb(IoType::Read, None, "c0", 8, 16)],
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 3, Q25-Q28: loser rewritten, failed child not rewritten (Q26), I/O events first (Q60)",
            children: &[D(0xA), D(0xB), E(0xC, EIO), D(0xA), D(0xA)],
            t: 3,
            pattern: Qp,
            rewrite: true,
            expect: Ok((0xA, 0)),
            events: || {
                vec![
                    rb(IoType::Read, Some(EIO), "c2", 8, 16),
                    rb(IoType::Read, None, "c1", 8, 16),
                ]
            },
            rewritten: &[1],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 3, Q25: two losers with different data, mismatch events in ascending order",
            children: &[D(0xC), D(0xA), D(0xB), D(0xA), D(0xA)],
            t: 3,
            pattern: Qp,
            rewrite: true,
            expect: Ok((0xA, 1)),
            events: || {
                vec![
                    rb(IoType::Read, None, "c0", 8, 16),
                    rb(IoType::Read, None, "c2", 8, 16),
                ]
            },
            rewritten: &[0, 2],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 4, Q24: top version below threshold -> EIO + FAILURE, no mismatch event, no rewrite",
            children: &[D(0xA), D(0xA), D(0xB)],
            t: 3,
            pattern: Qp,
            rewrite: true,
            expect: Err(EIO),
            events: || vec![fail(8, 16)],
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 5, Q23/D1: tie A A B B with t=2 -> EIO + FAILURE (QEMU would return B)",
            children: &[D(0xA), D(0xA), D(0xB), D(0xB)],
            t: 2,
            pattern: Qp,
            rewrite: true,
            expect: Err(EIO),
            events: || vec![fail(8, 16)],
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 5, Q23/D1: three-way tie with a failed child -> EIO, I/O event then FAILURE",
            children: &[D(0xA), D(0xB), E(0, EIO), D(0xC)],
            t: 1,
            pattern: Qp,
            rewrite: false,
            expect: Err(EIO),
            events: || vec![rb(IoType::Read, Some(EIO), "c2", 8, 16), fail(8, 16)],
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 6, Q18/Q20: s < t -> error vote (EIO, ENOSPC -> ENOSPC) + FAILURE, no compare",
            children: &[E(0, EIO), E(0, ENOSPC), D(0xA)],
            t: 2,
            pattern: Qp,
            rewrite: true,
            expect: Err(ENOSPC),
            events: || {
                vec![
                    rb(IoType::Read, Some(EIO), "c0", 8, 16),
                    rb(IoType::Read, Some(ENOSPC), "c1", 8, 16),
                    fail(8, 16),
                ]
            },
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 6, Q18: all failed -> error vote + FAILURE",
            children: &[E(0, EIO), E(0, EIO), E(0, EIO)],
            t: 1,
            pattern: Qp,
            rewrite: false,
            expect: Err(EIO),
            events: || {
                vec![
                    rb(IoType::Read, Some(EIO), "c0", 8, 16),
                    rb(IoType::Read, Some(EIO), "c1", 8, 16),
                    rb(IoType::Read, Some(EIO), "c2", 8, 16),
                    fail(8, 16),
                ]
            },
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 9, Q29: fifo, child 0 succeeds -> its data; later children not read",
            children: &[D(0xA), D(0xB), D(0xC)],
            t: 2,
            pattern: Fifo,
            rewrite: true,
            expect: Ok((0xA, 0)),
            events: Vec::new,
            rewritten: &[],
            unread: &[1, 2],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 10, Q30/Q31: fifo, child 0 fails -> child 1's data without any vote (t=3 unused)",
            children: &[E(0xA, EIO), D(0xB), D(0xC)],
            t: 3,
            pattern: Fifo,
            rewrite: false,
            expect: Ok((0xB, 1)),
            events: || vec![rb(IoType::Read, Some(EIO), "c0", 8, 16)],
            rewritten: &[],
            unread: &[2],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 10, Q32/D2: fifo, children 0 and 1 fail -> child 2's data, 0 and 1 rewritten",
            children: &[R(0xA, EIO), R(0xA, ENOSPC), D(0xC)],
            t: 1,
            pattern: Fifo,
            rewrite: true,
            expect: Ok((0xC, 2)),
            events: || {
                vec![
                    rb(IoType::Read, Some(EIO), "c0", 8, 16),
                    rb(IoType::Read, Some(ENOSPC), "c1", 8, 16),
                ]
            },
            rewritten: &[0, 1],
            unread: &[],
            fatal: None,
        },
        ReadRow {
            rule: "§15 row 11, Q30: fifo, all fail -> last child's error, RB x N, no FAILURE",
            children: &[E(0, EIO), E(0, EIO), E(0, ENOSPC)],
            t: 1,
            pattern: Fifo,
            rewrite: true,
            expect: Err(ENOSPC),
            events: || {
                vec![
                    rb(IoType::Read, Some(EIO), "c0", 8, 16),
                    rb(IoType::Read, Some(EIO), "c1", 8, 16),
                    rb(IoType::Read, Some(ENOSPC), "c2", 8, 16),
                ]
            },
            rewritten: &[],
            unread: &[],
            fatal: None,
        },
    ]
}

#[tokio::test]
async fn read_outcome_matrix_rows() {
    for row in read_rows() {
        let f = fixture(row.children, row.t, row.pattern, row.rewrite);
        let got = f.q.read(OFF, LEN).await;
        match (&got, row.expect) {
            (Ok(buf), Ok((byte, from))) => {
                assert_eq!(buf.len(), LEN, "{}", row.rule);
                assert!(buf.iter().all(|&b| b == byte), "{}: wrong data", row.rule);
                // Q4: the returned buffer is the designated child's, not a copy.
                assert_eq!(
                    buf.as_ptr() as usize,
                    f.kids[from].addr(OFF),
                    "{}: returned buffer is not child {from}'s",
                    row.rule
                );
            }
            (Err(e), Err(kind)) => assert_eq!(e.kind(), kind, "{}", row.rule),
            (got, want) => panic!("{}: got {got:?}, want {want:?}", row.rule),
        }
        assert_eq!(f.internal.events(), (row.events)(), "{}", row.rule);
        for (i, k) in f.kids.iter().enumerate() {
            let writes: Vec<Op> = k
                .log()
                .into_iter()
                .filter(|o| matches!(o, Op::Write(..)))
                .collect();
            if row.rewritten.contains(&i) {
                let byte = row.expect.unwrap().0;
                // Q27: the whole request range, the winner's data, no FUA.
                assert_eq!(writes.len(), 1, "{}: child {i} rewrites", row.rule);
                assert!(
                    matches!(writes[0], Op::Write(OFF, LEN, false, b, _) if b == byte),
                    "{}: child {i} got {:?}",
                    row.rule,
                    writes[0]
                );
                assert!(
                    k.contents(OFF, LEN).iter().all(|&b| b == byte),
                    "{}: child {i} not repaired",
                    row.rule
                );
            } else {
                assert_eq!(
                    writes,
                    vec![],
                    "{}: child {i} must not be rewritten",
                    row.rule
                );
            }
            if row.unread.contains(&i) {
                assert_eq!(k.log(), vec![], "{}: child {i} must not be read", row.rule);
            }
        }
        assert_eq!(
            f.captured.fatals(),
            row.fatal.map(|s| vec![s.to_string()]).unwrap_or_default(),
            "{}",
            row.rule
        );
    }
}

fn blkverify_fixture(children: &[C]) -> Fixture {
    let mut o = opts(2, ReadPattern::Quorum, false);
    o.blkverify = true;
    fixture_with(children, o, false)
}

#[tokio::test]
async fn q33_d6_blkverify_mismatch_prints_the_line_and_exits() {
    // §15 row 7. Child 1 differs from byte 300 of the request on.
    let f = blkverify_fixture(&[C::D(0xA), C::D(0xA)]);
    f.kids[1].fill(OFF + 300, 10, 0xB);
    let got = f.q.read(OFF, LEN).await;
    assert_eq!(
        f.captured.fatals(),
        vec![format!(
            "quorum: offset=4096 bytes=8192 contents mismatch at offset {}",
            4096 + 300
        )]
    );
    // The recording host does not exit; the read then fails rather than return either side.
    assert_eq!(got.unwrap_err().kind(), EIO);
    assert_eq!(f.internal.events(), vec![]);
}

#[tokio::test]
async fn q33_blkverify_mismatch_line_for_a_10_mib_read_at_0() {
    // QUORUM.md's own example.
    let bus = EventBus::new();
    let (host, captured) = Host::recording(bus);
    let a = TestChild::sized("a", 1, 10 << 20);
    let b = TestChild::sized("b", 2, 10 << 20);
    let mut o = opts(2, ReadPattern::Quorum, false);
    o.blkverify = true;
    let q = Quorum::open(
        o,
        vec![("a".into(), common::dev(&a)), ("b".into(), common::dev(&b))],
        host,
    )
    .unwrap();
    let _ = q.read(0, 10 << 20).await;
    assert_eq!(
        captured.fatals(),
        vec!["quorum: offset=0 bytes=10485760 contents mismatch at offset 0".to_string()]
    );
}

#[tokio::test]
async fn q34_blkverify_one_child_fails_gives_its_error_and_failure_no_exit() {
    // §15 row 8.
    let f = blkverify_fixture(&[C::D(0xA), C::E(0xA, ENOSPC)]);
    let got = f.q.read(OFF, LEN).await;
    assert_eq!(got.unwrap_err().kind(), ENOSPC);
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Read, Some(ENOSPC), "c1", 8, 16), fail(8, 16)]
    );
    assert_eq!(f.captured.fatals(), Vec::<String>::new());
}

#[tokio::test]
async fn q35_blkverify_writes_and_flushes_vote_normally() {
    let f = blkverify_fixture(&[C::D(0), C::D(0)]);
    f.q.write(0, Bytes::from(vec![7u8; 512]), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(f.q.read(0, 512).await.unwrap(), Bytes::from(vec![7u8; 512]));
    f.kids[1].fail_writes(EIO);
    let e =
        f.q.write(0, Bytes::from(vec![8u8; 512]), WriteFlags::NONE)
            .await
            .unwrap_err();
    assert_eq!(e.kind(), EIO);
    f.q.flush().await.unwrap();
}

#[tokio::test]
async fn q28_rewrite_failure_leaves_result_records_range_and_emits_nothing() {
    // §15 "rewrite" row; Q49.
    let f = fixture(
        &[C::D(0xA), C::D(0xB), C::D(0xA)],
        2,
        ReadPattern::Quorum,
        true,
    );
    f.kids[1].fail_writes(EIO);
    let got = f.q.read(OFF, LEN).await.unwrap();
    assert_eq!(got, Bytes::from(vec![0xAu8; LEN]));
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Read, None, "c1", 8, 16)]
    );
    let oos = f.q.out_of_sync().await;
    assert_eq!(oos[1].ranges, vec![(0, 65536)]);
    assert_eq!(oos[0].ranges, vec![]);
    assert_eq!(oos[2].ranges, vec![]);
}

#[tokio::test(start_paused = true)]
async fn q28_read_completes_only_after_rewrites_finish() {
    let f = fixture(
        &[C::D(0xA), C::D(0xB), C::D(0xA)],
        2,
        ReadPattern::Quorum,
        true,
    );
    let start = tokio::time::Instant::now();
    // Reads are instant; child 1's write (the rewrite) takes 50 ms.
    f.kids[1].set_delay(Duration::from_millis(50));
    let got = f.q.read(OFF, LEN).await.unwrap();
    // child 1's read also waits 50 ms, then the rewrite another 50 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(got[0], 0xA);
    assert_eq!(f.kids[1].contents(OFF, LEN), vec![0xA; LEN]);
}

#[tokio::test(start_paused = true)]
async fn q16_q17_read_waits_for_every_child_and_reports_errors_as_they_complete() {
    let f = fixture(
        &[C::D(0xA), C::E(0xA, EIO), C::D(0xA)],
        2,
        ReadPattern::Quorum,
        false,
    );
    f.kids[0].set_delay(Duration::from_millis(300));
    f.kids[1].set_delay(Duration::from_millis(10));
    let q = f.q.clone();
    let start = tokio::time::Instant::now();
    let h = tokio::spawn(async move { q.read(OFF, LEN).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Q17: child 1's event is out at 10 ms, long before the read ends.
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Read, Some(EIO), "c1", 8, 16)]
    );
    assert!(!h.is_finished());
    let got = h.await.unwrap().unwrap();
    // Q16: no early completion; the slowest child decides.
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(got[0], 0xA);
}

#[tokio::test]
async fn q22_equal_digests_form_one_version() {
    // Two children agree on B at a different offset layout: versions are by content only.
    let f = fixture(
        &[C::D(0xA), C::D(0xB), C::D(0xB), C::D(0xA), C::D(0xB)],
        3,
        ReadPattern::Quorum,
        false,
    );
    let got = f.q.read(0, 512).await.unwrap();
    assert_eq!(got, Bytes::from(vec![0xBu8; 512]));
    assert_eq!(
        got.as_ptr() as usize,
        f.kids[1].addr(0),
        "Q25: lowest-index member of the winner"
    );
    assert_eq!(
        f.internal.events(),
        vec![
            rb(IoType::Read, None, "c0", 0, 1),
            rb(IoType::Read, None, "c3", 0, 1)
        ]
    );
}

#[tokio::test]
async fn q21_fast_path_compares_every_byte_not_a_prefix() {
    // The children differ only in the last byte of a 1 MiB read.
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    f.kids[2].fill(LEN as u64 * 64 - 1, 1, 9);
    let got = f.q.read(0, LEN * 64).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Read, None, "c2", 0, 1024)]
    );
}

// ---- writes, write-zeroes, FUA, flush (§15 rows 13-18) ----

#[tokio::test]
async fn q38_write_all_succeed_shares_one_buffer_and_emits_nothing() {
    // §15 row 13; Q4, Q36.
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    let data = Bytes::from(vec![5u8; 4096]);
    let addr = data.as_ptr() as usize;
    f.q.write(4096, data, WriteFlags::NONE).await.unwrap();
    for k in &f.kids {
        assert_eq!(k.log(), vec![Op::Write(4096, 4096, false, 5, addr)]);
        assert_eq!(k.contents(4096, 4096), vec![5u8; 4096]);
    }
    assert_eq!(f.internal.events(), vec![]);
    assert!(f.q.out_of_sync().await.iter().all(|r| r.ranges.is_empty()));
}

#[tokio::test]
async fn q38_q49_write_with_some_failures_succeeds_reports_and_records() {
    // §15 row 14.
    let f = fixture(
        &[C::D(0), C::E(0, EIO), C::D(0)],
        2,
        ReadPattern::Quorum,
        false,
    );
    f.q.write(
        70_000 - 70_000 % 512,
        Bytes::from(vec![5u8; 1024]),
        WriteFlags::NONE,
    )
    .await
    .unwrap();
    // offset 69632 = sector 136, 2 sectors.
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Write, Some(EIO), "c1", 136, 2)]
    );
    let oos = f.q.out_of_sync().await;
    assert_eq!(oos[1].ranges, vec![(65536, 65536)]);
    assert_eq!(
        oos[1].to_json(),
        serde_json::json!({"child": "children.1", "node-name": "c1", "granularity": 65536,
            "dirty-bytes": 65536, "ranges": [{"offset": 65536, "length": 65536}],
            "state": "out-of-sync", "unflushed-bytes": 1048576})
    );
    assert_eq!(
        oos[0].to_json(),
        serde_json::json!({"child": "children.0", "node-name": "c0", "granularity": 65536,
            "dirty-bytes": 0, "ranges": [], "state": "in-sync", "unflushed-bytes": 1048576})
    );
    // H7 at open (README D15): until its first completed flush, whatever a child's cache held
    // before the quorum opened counts as unflushed. The flush makes c0's data durable; c1's
    // fails, so all of c1 may have lost writes and is out of sync.
    f.q.flush().await.unwrap();
    let oos = f.q.out_of_sync().await;
    assert_eq!(oos[0].unflushed_bytes, 0);
    assert_eq!(oos[1].ranges, vec![(0, 1048576)]);
    assert_eq!(oos[1].unflushed_bytes, 0);
}

#[tokio::test]
async fn q39_write_below_threshold_fails_with_error_vote_and_no_rollback() {
    // §15 row 15.
    let f = fixture(
        &[C::D(0), C::E(0, EIO), C::E(0, ENOSPC)],
        2,
        ReadPattern::Quorum,
        false,
    );
    let e =
        f.q.write(0, Bytes::from(vec![5u8; 512]), WriteFlags::NONE)
            .await
            .unwrap_err();
    assert_eq!(e.kind(), ENOSPC);
    assert_eq!(
        f.internal.events(),
        vec![
            rb(IoType::Write, Some(EIO), "c1", 0, 1),
            rb(IoType::Write, Some(ENOSPC), "c2", 0, 1),
            fail(0, 1)
        ]
    );
    // No rollback: child 0 keeps the new data.
    assert_eq!(f.kids[0].contents(0, 512), vec![5u8; 512]);
    let oos = f.q.out_of_sync().await;
    assert_eq!(
        (
            oos[0].ranges.len(),
            oos[1].ranges.len(),
            oos[2].ranges.len()
        ),
        (0, 1, 1)
    );
}

#[tokio::test]
async fn q37_write_zeroes_reports_type_write_and_passes_flags_through() {
    let f = fixture(
        &[C::D(9), C::D(9), C::E(9, EIO)],
        2,
        ReadPattern::Quorum,
        false,
    );
    let flags = ZeroFlags {
        fua: true,
        may_unmap: true,
    };
    f.q.write_zeroes(0, 8192, flags).await.unwrap();
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Write, Some(EIO), "c2", 0, 16)]
    );
    // Q36, Q40: the caller's flags, FUA included, reach every child.
    assert_eq!(f.kids[0].log(), vec![Op::Zero(0, 8192, flags)]);
    assert_eq!(f.kids[0].contents(0, 8192), vec![0u8; 8192]);
    assert_eq!(f.q.out_of_sync().await[2].ranges, vec![(0, 65536)]);
}

#[tokio::test]
async fn q40_fua_write_goes_without_fua_then_a_flush_vote_decides() {
    // §15 row 16: write events, then flush events; the flush's result is the write's.
    let f = fixture(
        &[C::D(0), C::E(0, EIO), C::D(0)],
        2,
        ReadPattern::Quorum,
        false,
    );
    f.kids[2].fail_flushes(ENOSPC);
    let data = Bytes::from(vec![1u8; 512]);
    let addr = data.as_ptr() as usize;
    let e = f.q.write(0, data, WriteFlags::FUA).await.unwrap_err();
    assert_eq!(e.kind(), ENOSPC);
    assert_eq!(
        f.kids[0].log(),
        vec![Op::Write(0, 512, false, 1, addr), Op::Flush]
    );
    assert_eq!(
        f.internal.events(),
        vec![
            rb(IoType::Write, Some(EIO), "c1", 0, 1),
            rb(IoType::Flush, Some(EIO), "c1", 0, 0),
            rb(IoType::Flush, Some(ENOSPC), "c2", 0, 0),
        ]
    );
}

#[tokio::test]
async fn q40_fua_write_whose_vote_fails_sends_no_flush() {
    let f = fixture(
        &[C::D(0), C::E(0, EIO), C::E(0, EIO)],
        2,
        ReadPattern::Quorum,
        false,
    );
    let e =
        f.q.write(0, Bytes::from(vec![1u8; 512]), WriteFlags::FUA)
            .await
            .unwrap_err();
    assert_eq!(e.kind(), EIO);
    assert!(!f.kids[0].log().contains(&Op::Flush));
}

#[tokio::test]
async fn q41_flush_vote_sequential_with_zero_sectors_and_never_failure() {
    // §15 rows 17 and 18.
    let f = fixture(
        &[C::E(0, EIO), C::D(0), C::D(0)],
        2,
        ReadPattern::Quorum,
        false,
    );
    f.q.flush().await.unwrap();
    assert_eq!(
        f.internal.take(),
        vec![rb(IoType::Flush, Some(EIO), "c0", 0, 0)]
    );
    f.kids[2].fail_flushes(ENOSPC);
    let e = f.q.flush().await.unwrap_err();
    // Q20 tie (1 EIO, 1 ENOSPC): the later first occurrence wins.
    assert_eq!(e.kind(), ENOSPC);
    assert_eq!(
        f.internal.events(),
        vec![
            rb(IoType::Flush, Some(EIO), "c0", 0, 0),
            rb(IoType::Flush, Some(ENOSPC), "c2", 0, 0)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn q41_flush_goes_to_children_one_after_another_in_order() {
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    for k in &f.kids {
        k.set_delay(Duration::from_millis(10));
    }
    let start = tokio::time::Instant::now();
    f.q.flush().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(30));
}

// ---- discard (§15 rows 19-20, Q45-Q46, D3) ----

#[tokio::test]
async fn q46_d3_discard_is_a_noop_when_some_child_lacks_the_zero_guarantee() {
    let f = fixture(&[C::D(1), C::D(1), C::D(1)], 2, ReadPattern::Quorum, false);
    f.q.discard(0, 4096).await.unwrap();
    for k in &f.kids {
        assert_eq!(k.log(), vec![]);
    }
    assert!(!f.q.discard_zeroes());
    assert_eq!(f.internal.events(), vec![]);
}

#[tokio::test]
async fn q46_d3_discard_is_forwarded_and_voted_when_every_child_zeroes() {
    let f = fixture_with(
        &[C::D(1), C::D(1), C::E(1, EIO)],
        opts(2, ReadPattern::Quorum, false),
        true,
    );
    assert!(f.q.discard_zeroes());
    f.q.discard(0, 4096).await.unwrap();
    assert_eq!(f.kids[0].log(), vec![Op::Discard(0, 4096)]);
    assert_eq!(
        f.internal.take(),
        vec![rb(IoType::Write, Some(EIO), "c2", 0, 8)]
    );
    assert_eq!(f.q.out_of_sync().await[2].ranges, vec![(0, 65536)]);
    f.kids[1].fail_writes(EIO);
    let e = f.q.discard(0, 4096).await.unwrap_err();
    assert_eq!(e.kind(), EIO);
    assert_eq!(
        f.internal.events(),
        vec![
            rb(IoType::Write, Some(EIO), "c1", 0, 8),
            rb(IoType::Write, Some(EIO), "c2", 0, 8),
            fail(0, 8)
        ]
    );
}

#[tokio::test]
async fn q46_discard_ignore_on_the_quorum_node_keeps_the_noop() {
    // QEMU's generic `discard=ignore` (the default) drops discards at the node.
    let mut o = opts(2, ReadPattern::Quorum, false);
    o.discard_unmap = false;
    let f = fixture_with(&[C::D(1), C::D(1)], o, true);
    f.q.discard(0, 4096).await.unwrap();
    assert_eq!(f.kids[0].log(), vec![]);
    assert!(!f.q.discard_zeroes());
}

// ---- block status (§15 rows 21-22, Q43-Q44) ----

#[tokio::test]
async fn q44_block_status_zero_takes_min_length_data_takes_max_nonzero_length() {
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    f.kids[0].set_status(Ok(BlockStatus::zero(8192)));
    f.kids[1].set_status(Ok(BlockStatus::zero(4096)));
    f.kids[2].set_status(Ok(BlockStatus::zero(65536)));
    assert_eq!(
        f.q.block_status(0, 65536).await.unwrap(),
        BlockStatus::zero(4096)
    );
    f.kids[1].set_status(Ok(BlockStatus::data(1024)));
    f.kids[2].set_status(Ok(BlockStatus::data(2048)));
    assert_eq!(
        f.q.block_status(0, 65536).await.unwrap(),
        BlockStatus::data(2048)
    );
    assert_eq!(f.internal.events(), vec![]);
}

#[tokio::test]
async fn q43_block_status_child_error_gives_data_over_the_count_and_stops() {
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    f.kids[0].set_status(Ok(BlockStatus::zero(4096)));
    f.kids[1].set_status(Err(EIO));
    assert_eq!(
        f.q.block_status(4096, 65536).await.unwrap(),
        BlockStatus::data(65536)
    );
    assert_eq!(
        f.internal.events(),
        vec![rb(IoType::Read, Some(EIO), "c1", 8, 128)]
    );
    assert_eq!(f.kids[2].log(), vec![], "later children are not queried");
}

// ---- open, length, warning (§15 rows 23-24, Q14, Q15, Q42) ----

#[test]
fn q14_length_mismatch_fails_open_with_eio_text() {
    let (host, _) = Host::recording(EventBus::new());
    let a = TestChild::sized("a", 0, 1 << 20);
    let b = TestChild::sized("b", 0, 2 << 20);
    let e = Quorum::open(
        opts(1, ReadPattern::Quorum, false),
        vec![("a".into(), common::dev(&a)), ("b".into(), common::dev(&b))],
        host,
    )
    .unwrap_err();
    assert_eq!(
        e.message(),
        "Could not refresh total sector count: Input/output error"
    );
}

#[test]
fn q15_d1_weak_threshold_warns_once_and_opens() {
    let f = fixture(
        &[C::D(0), C::D(0), C::D(0), C::D(0)],
        2,
        ReadPattern::Quorum,
        false,
    );
    assert_eq!(
        f.captured.warnings(),
        vec!["ballot: warning: quorum node 'q0': vote-threshold 2 with 4 children is not a strict majority; stale or tied reads are possible".to_string()]
    );
    let g = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    assert_eq!(g.captured.warnings(), Vec::<String>::new());
}

#[tokio::test]
async fn q42_length_is_the_common_child_length_and_requests_past_it_fail() {
    let f = fixture(&[C::D(0), C::D(0)], 1, ReadPattern::Quorum, false);
    assert_eq!(f.q.length().unwrap(), common::LEN);
    assert_eq!(
        f.q.read(common::LEN, 1).await.unwrap_err().kind(),
        ErrorKind::Inval
    );
    let e =
        f.q.write(
            common::LEN - 1,
            Bytes::from_static(&[1, 2]),
            WriteFlags::NONE,
        )
        .await;
    assert_eq!(e.unwrap_err().kind(), ErrorKind::NoSpc);
    // Rejected before any child is touched.
    assert_eq!(f.kids[0].log(), vec![]);
}

#[tokio::test]
async fn read_only_quorum_refuses_writes_with_eperm_but_still_rewrites() {
    let mut o = opts(2, ReadPattern::Quorum, true);
    o.read_only = true;
    let f = fixture_with(&[C::D(0xA), C::D(0xB), C::D(0xA)], o, false);
    let e =
        f.q.write(0, Bytes::from_static(&[1]), WriteFlags::NONE)
            .await
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Perm);
    // Q28: rewrites happen even when read-only.
    f.q.read(0, 512).await.unwrap();
    assert_eq!(f.kids[1].contents(0, 512), vec![0xA; 512]);
}

/// H1, H2, H4, H5: after a failed write, the child is out of sync on the granule: a later
/// partial write to it does not clear it (and its success does not count), reads leave it out
/// (no read, no REPORT_BAD), and a write covering the whole granule followed by a flush clears
/// it.
#[tokio::test]
async fn h1_h5_out_of_sync_child_is_not_read_and_only_a_covering_write_and_flush_clear_it() {
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    f.kids[1].fail_writes(EIO);
    f.q.write(0, Bytes::from(vec![5u8; 512]), WriteFlags::NONE)
        .await
        .unwrap();
    f.kids[1].clear_log();
    *f.kids[1].write_err.lock().unwrap() = None;
    // H5: a partial-granule write clears nothing, even with a flush after it.
    f.q.write(0, Bytes::from(vec![6u8; 512]), WriteFlags { fua: true })
        .await
        .unwrap();
    assert_eq!(f.q.out_of_sync().await[1].ranges, vec![(0, 65536)]);
    // H1, H2: the out-of-sync child is not read and gets no event.
    f.kids[1].clear_log();
    f.internal.take();
    let got = f.q.read(0, 512).await.unwrap();
    assert_eq!(got, Bytes::from(vec![6u8; 512]));
    assert_eq!(f.kids[1].log(), vec![]);
    assert_eq!(f.internal.events(), vec![]);
    // H5: a write covering the granule, then a flush, clears it.
    f.q.write(0, Bytes::from(vec![7u8; 65536]), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(f.q.out_of_sync().await[1].ranges, vec![(0, 65536)]);
    f.q.flush().await.unwrap();
    assert_eq!(f.q.out_of_sync().await[1].ranges, vec![]);
    assert_eq!(f.kids[1].contents(0, 512), vec![7u8; 512]);
}

/// H4: when only t - 1 in-sync children take a write and the out-of-sync one succeeds on a
/// partial granule, the write fails: that success is a copy no read would count.
#[tokio::test]
async fn h4_a_success_on_a_child_that_stays_out_of_sync_does_not_count() {
    let f = fixture(&[C::D(0), C::D(0), C::D(0)], 2, ReadPattern::Quorum, false);
    f.kids[2].fail_writes(EIO);
    f.q.write(0, Bytes::from(vec![5u8; 512]), WriteFlags::NONE)
        .await
        .unwrap();
    *f.kids[2].write_err.lock().unwrap() = None;
    f.kids[1].fail_writes(EIO);
    f.internal.take();
    // In sync on granule 0: children 0 and 1 (t = 2), so the range is not degraded; child 1
    // fails and child 2's partial success leaves it out of sync.
    let e =
        f.q.write(512, Bytes::from(vec![6u8; 512]), WriteFlags::NONE)
            .await
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(
        f.internal.events(),
        vec![
            rb(IoType::Write, Some(EIO), "c1", 1, 1),
            Event::QuorumFailure {
                reference: "q0".into(),
                sector_num: 1,
                sectors_count: 1
            }
        ]
    );
}

/// D7: a guest write that overlaps a read with rewrite-corrupted, issued while the read is in
/// flight, waits for the read and its repair (D8), so the repair cannot undo it: every child
/// ends with the newer data, not the read's vote winner.
#[tokio::test(start_paused = true)]
async fn d7_a_write_during_a_repairing_read_is_not_undone_by_the_repair() {
    let f = fixture_with(
        &[C::D(b'A'), C::D(b'A'), C::D(b'X')],
        opts(2, ReadPattern::Quorum, true),
        false,
    );
    for k in &f.kids {
        k.set_delay(Duration::from_millis(10));
    }
    let q = f.q.clone();
    let read = tokio::spawn(async move { q.read(0, 4096).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    f.q.write(0, Bytes::from(vec![b'B'; 4096]), WriteFlags::NONE)
        .await
        .unwrap();
    let got = read.await.unwrap().unwrap();
    assert!(
        got.iter().all(|&b| b == b'A'),
        "the read's vote is the data it read"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for k in &f.kids {
        let now = k.read(0, 4096).await.unwrap();
        assert!(now.iter().all(|&b| b == b'B'), "{} holds the write", k.name);
    }
}

const MS: fn(u64) -> Duration = Duration::from_millis;

/// A guest write of 4 KiB of `byte` at `offset`, running in its own task.
fn spawn_write(
    q: &Arc<Quorum>,
    offset: u64,
    byte: u8,
) -> tokio::task::JoinHandle<ballot::Result<()>> {
    let q = q.clone();
    tokio::spawn(async move {
        q.write(offset, Bytes::from(vec![byte; 4096]), WriteFlags::NONE)
            .await
    })
}

/// `(byte, run length)` of `data`: short failure messages for whole-buffer comparisons.
fn runs(data: &[u8]) -> Vec<(u8, usize)> {
    let mut out: Vec<(u8, usize)> = Vec::new();
    for &b in data {
        match out.last_mut() {
            Some((x, n)) if *x == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// D8: a read that arrives while an overlapping write is in flight waits for the write, so
/// with t = N it sees every child at the same point: the new data and no event. QEMU's quorum
/// reads the children mid-write here (c0 written, c1 and c2 not) and fails the read with EIO
/// and QUORUM_FAILURE although no disk is at fault.
#[tokio::test(start_paused = true)]
async fn d8_a_read_arriving_during_a_write_waits_and_every_child_agrees() {
    let f = fixture_with(&[C::D(b'A'); 3], opts(3, ReadPattern::Quorum, false), false);
    for (k, ms) in f.kids.iter().zip([1, 10, 20]) {
        k.set_delay(MS(ms));
    }
    let w = spawn_write(&f.q, 0, b'B');
    tokio::time::sleep(MS(5)).await;
    // Mid-write: the children differ now.
    assert_eq!(
        f.kids
            .iter()
            .map(|k| k.contents(0, 1)[0])
            .collect::<Vec<u8>>(),
        b"BAA"
    );
    // Reads are fast from now on: unordered, this read would be served at once, mid-write,
    // and fail with EIO (one B against two A with t = 3).
    let fast = || {
        for k in &f.kids {
            k.set_delay(MS(1));
        }
    };
    fast();
    let started = tokio::time::Instant::now();
    let got = f.q.read(0, 4096).await.map(|d| runs(&d));
    assert_eq!(got, Ok(vec![(b'B', 4096)]));
    // It waited for the write's slowest child (20 ms from the write's start), then read.
    assert_eq!(started.elapsed(), MS(15 + 1));
    assert_eq!(w.await.unwrap(), Ok(()));
    assert_eq!(f.internal.events(), vec![]);
    // A read of other sectors does not wait for a write in flight.
    for (k, ms) in f.kids.iter().zip([1, 10, 20]) {
        k.set_delay(MS(ms));
    }
    let w = spawn_write(&f.q, 0, b'C');
    tokio::time::sleep(MS(5)).await;
    fast();
    let started = tokio::time::Instant::now();
    let got = f.q.read(4096, 4096).await.map(|d| runs(&d));
    assert_eq!(got, Ok(vec![(b'A', 4096)]));
    assert_eq!(started.elapsed(), MS(1));
    assert_eq!(w.await.unwrap(), Ok(()));
    assert_eq!(f.internal.events(), vec![]);
}

/// D8: a write that arrives while an overlapping read is in flight waits for the read, which
/// therefore votes on the old data on every child; the write then lands everywhere.
#[tokio::test(start_paused = true)]
async fn d8_a_write_arriving_during_a_read_waits_for_it() {
    let f = fixture_with(&[C::D(b'A'); 3], opts(3, ReadPattern::Quorum, false), false);
    for k in &f.kids {
        k.set_delay(MS(20));
    }
    let q = f.q.clone();
    let r = tokio::spawn(async move { q.read(0, 8192).await });
    tokio::time::sleep(MS(5)).await;
    // c0 turns fast: unordered, the write would land on c0 before c0 serves the read.
    f.kids[0].set_delay(MS(1));
    f.q.write(4096, Bytes::from(vec![b'B'; 4096]), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(runs(&r.await.unwrap().unwrap()), [(b'A', 8192)]);
    for k in &f.kids {
        assert_eq!(
            runs(&k.contents(0, 8192)),
            [(b'A', 4096), (b'B', 4096)],
            "{}",
            k.name
        );
    }
    assert_eq!(f.internal.events(), vec![]);
}

/// D8: overlapping writes reach every child in the order they arrived, so the replicas cannot
/// end up holding different versions. Here c2 is slow for the first write and fast for the
/// second: unordered (QEMU), c2 would apply B before A and keep A while c0 and c1 keep B — a
/// divergence no later vote with t = N can resolve.
#[tokio::test(start_paused = true)]
async fn d8_overlapping_writes_land_in_arrival_order_on_every_child() {
    let f = fixture_with(&[C::D(b'0'); 3], opts(3, ReadPattern::Quorum, false), false);
    for k in &f.kids {
        k.set_delay(MS(5));
    }
    f.kids[2].set_delay(MS(30));
    let first = spawn_write(&f.q, 0, b'A');
    tokio::time::sleep(MS(1)).await;
    f.kids[2].set_delay(MS(1));
    let second = spawn_write(&f.q, 2048, b'B');
    assert_eq!(first.await.unwrap(), Ok(()));
    assert_eq!(second.await.unwrap(), Ok(()));
    for k in &f.kids {
        assert_eq!(
            runs(&k.contents(0, 6144)),
            [(b'A', 2048), (b'B', 4096)],
            "{}",
            k.name
        );
    }
    assert_eq!(
        runs(&f.q.read(0, 6144).await.unwrap()),
        [(b'A', 2048), (b'B', 4096)]
    );
    assert_eq!(f.internal.events(), vec![]);
}

/// A child with a request alignment.
#[derive(Debug)]
struct Aligned(Arc<TestChild>, u32);

#[async_trait::async_trait]
impl BlockDevice for Aligned {
    fn driver(&self) -> &'static str {
        "aligned"
    }
    fn length(&self) -> ballot::Result<u64> {
        self.0.length()
    }
    fn request_alignment(&self) -> u32 {
        self.1
    }
    async fn read(&self, offset: u64, len: usize) -> ballot::Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> ballot::Result<()> {
        self.0.write(offset, data, flags).await
    }
    async fn flush(&self) -> ballot::Result<()> {
        self.0.flush().await
    }
}

/// The quorum's identity and capabilities: driver name, no fast zero, and the largest request
/// alignment of its children, enforced before any child is asked.
#[tokio::test]
async fn quorum_takes_the_largest_child_alignment_and_never_fast_zeroes() {
    let kids = [TestChild::new("a", 1), TestChild::new("b", 1)];
    let devs: Vec<(String, ballot::Device)> = vec![
        ("a".into(), Arc::new(Aligned(kids[0].clone(), 512))),
        ("b".into(), Arc::new(Aligned(kids[1].clone(), 4096))),
    ];
    let (host, _) = Host::recording(EventBus::new());
    let q = Quorum::open(opts(2, ReadPattern::Quorum, false), devs, host).unwrap();
    assert_eq!((q.driver(), q.request_alignment()), ("quorum", 4096));
    assert!(!q.can_fast_zero());
    let e = q.read(512, 512).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Inval);
    assert!(kids.iter().all(|k| k.log.lock().unwrap().is_empty()));
    assert_eq!(q.read(4096, 4096).await.map(|d| d.len()), Ok(4096));
}

/// Q36: write-zeroes may unmap on the children only when the caller allows it and the quorum
/// has discard=unmap.
#[tokio::test]
async fn q36_write_zeroes_may_unmap_only_with_discard_unmap() {
    for (discard_unmap, may_unmap, want) in [
        (false, true, false),
        (true, false, false),
        (true, true, true),
        (false, false, false),
    ] {
        let o = QuorumOptions {
            discard_unmap,
            ..opts(1, ReadPattern::Quorum, false)
        };
        let f = fixture_with(&[C::D(1)], o, false);
        let flags = ZeroFlags {
            fua: true,
            may_unmap,
        };
        f.q.write_zeroes(0, 4096, flags).await.unwrap();
        let log = f.kids[0].log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![Op::Zero(
                0,
                4096,
                ZeroFlags {
                    fua: true,
                    may_unmap: want
                }
            )],
            "discard_unmap={discard_unmap} may_unmap={may_unmap}"
        );
    }
}
