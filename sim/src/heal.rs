//! Healing under simulation (HEALING.md §7): the faults that aim at a resync in progress
//! (H26: F25, F26, F27, F30), the jobs an operator runs over QMP while the guest works (H16,
//! H17), the invariants of H27 (I17, I18, I20) and the recovery paths P16–P18 and P20.
//!
//! The quorum reports what it decides through its audit hook ([`Audit`]); everything here
//! compares those decisions with what the virtual disks hold and what the oracle allows,
//! synchronously, at the instant the quorum makes them (madsim runs one task at a time).

use crate::ids::{Fault, Path, Rule};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::quorum::{Audit, OUT_OF_SYNC_GRANULARITY_BYTES as GRANULE};
use ballot::events::Event;
use serde_json::{json, Value as Json};

use crate::healcheck::{bump, overlaps, path, view};
pub(crate) use crate::healcheck::{check_durable, check_write_readable};
pub(crate) use crate::healstate::HealState;
use crate::oracle::OpKind;
use crate::sector::{decode, Decoded, SECTOR, SECTOR_U64};
use crate::vdisk::Sticky;
use crate::world::World;

/// Routes one of the quorum's audits that no guest op owns: the vote choice (I20), a resync
/// run about to be read (F25–F27) and a resync write (I17).
pub(crate) fn audit(w: &Arc<World>, a: &Audit) {
    match a {
        Audit::Voters {
            first,
            end,
            voters,
            degraded,
        } => check_voters(w, *first, *end, voters, *degraded),
        Audit::Copying { offset, len } => copying(w, *offset, *len),
        Audit::Copied {
            child,
            offset,
            data,
        } => check_copied(w, *child, *offset, data),
        _ => {}
    }
}

/// I20 (H1): the children chosen to vote are exactly those the record has in sync on the
/// range, or, when fewer than t are, every child.
fn check_voters(w: &World, first: u64, end: u64, voters: &[usize], degraded: bool) {
    let Some(v) = view(w) else { return };
    let (a, z) = (first * GRANULE, end * GRANULE);
    let in_sync: Vec<usize> = (0..v.len())
        .filter(|&i| !overlaps(&v[i].out_of_sync, a, z))
        .collect();
    bump(w, Rule::I20);
    let t = w.p.threshold;
    let want: Vec<usize> = if in_sync.len() >= t {
        in_sync.clone()
    } else {
        (0..v.len()).collect()
    };
    if voters != want.as_slice() || degraded != (in_sync.len() < t) {
        w.fail(
            Rule::I20,
            format!(
                "the vote on [{a}, {z}) chose children {voters:?} (degraded {degraded}); the out-of-sync record has {in_sync:?} in sync there, so the voters are {want:?} (docs/healing.md H1)"
            ),
        );
    }
}

/// I17: a resync write that succeeded, with its range still held, carries the quorum's
/// value of every sector it wrote: no acknowledged write is undone. Where I17 is not asserted
/// (2t <= N, D1 and D13; beyond the budget, B6, where stale copies may outnumber the newest)
/// a stale copy the resync wrote stays marked in the ledger (B1), as any stale copy does.
fn check_copied(w: &World, child: usize, offset: u64, data: &[u8]) {
    let asserted = w.p.majority() && w.p.budget != crate::vdisk::Budget::Beyond;
    let first = offset / SECTOR_U64;
    let stale: Vec<(u64, Decoded)> = {
        let st = w.lock();
        data.chunks(SECTOR)
            .enumerate()
            .filter(|(_, chunk)| chunk.len() == SECTOR)
            .map(|(k, chunk)| (first + k as u64, decode(chunk)))
            .filter(|(s, d)| match d {
                Decoded::Value(v) => !st.oracle.allows_now(*s, *v),
                Decoded::Garbage => true,
            })
            .collect()
    };
    if stale.is_empty() {
        if asserted {
            bump(w, Rule::I17);
        }
        return;
    }
    if !asserted {
        for (s, _) in &stale {
            if child < w.p.children {
                w.disks.mark_missed(child, *s..*s + 1);
            }
            // Beyond the budget a recovery may copy anything (H22, README D19).
            w.lock().oracle.recovered_any.insert(*s);
        }
        return;
    }
    bump(w, Rule::I17);
    let excused = |s: u64| !w.disks.excused_in(s..s + 1).is_empty();
    // Beyond the budget when the copy began (a silent fault and a power cut's split with no
    // version left on t good copies, H22's recover=lowest): no copy is right, so whatever
    // was copied stays charged to the faults.
    let before: BTreeSet<u64> = w.lock().heal.copy_excused.clone();
    for (s, _) in stale
        .iter()
        .filter(|(s, _)| before.contains(s) || excused(*s))
    {
        if child < w.p.children {
            w.disks.mark_missed(child, *s..*s + 1);
        }
        w.lock().oracle.recovered_any.insert(*s);
    }
    if let Some((s, got)) = stale
        .into_iter()
        .find(|(s, _)| !excused(*s) && !before.contains(s))
    {
        let history = w.lock().oracle.history(Some(s), 6).join("; ");
        w.fail(
            Rule::I17,
            format!(
                "a resync wrote {got:?} to child {child} at sector {s}, which is not the quorum's value there any more (history: {history}); sector {s}:{}",
                w.disks.describe_sector(s)
            ),
        );
    }
}

/// P16: children a fault interrupted that are in sync everywhere now.
pub(crate) fn tally_resumed(w: &World) {
    let Some(v) = view(w) else { return };
    let done: Vec<usize> = {
        let st = w.lock();
        st.heal
            .interrupted
            .iter()
            .copied()
            .filter(|&i| v.get(i).is_some_and(|c| c.out_of_sync.is_empty()))
            .collect()
    };
    for i in &done {
        w.lock().heal.interrupted.remove(i);
    }
    path(w, Path::P16, done.len() as u64);
}

/// QMP events: job counting for F25, and P17, P18, P20 from the jobs' result counters.
pub(crate) fn on_qmp_event(w: &World, e: &Event) {
    match e {
        Event::JobStatusChange { status, .. } if *status == "created" => {
            w.lock().heal.jobs_created += 1;
        }
        Event::BlockJobCompleted {
            job_type, result, ..
        } => {
            let get = |k: &str| {
                result
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| *v)
                    .unwrap_or(0)
            };
            match *job_type {
                "x-resync" => path(w, Path::P17, get("equal")),
                "x-verify" => path(w, Path::P18, get("repaired")),
                _ => {}
            }
            path(w, Path::P20, get("unrecoverable"));
        }
        _ => {}
    }
}

/// I17's bookkeeping as a resync run begins: its sectors beyond the budget now, and those a
/// power cut's recovery may have filled from a silent fault, are the faults' from now on.
fn note_copy_excused(w: &World, offset: u64, len: u64) {
    let (s0, s1) = (offset / SECTOR_U64, (offset + len).div_ceil(SECTOR_U64));
    let over = w.disks.excused_in(s0..s1);
    let silent_all = w.disks.silently_damaged();
    let q = w.lock().quorum.clone();
    let spg = GRANULE / SECTOR_U64;
    let mut st = w.lock();
    let ex = &mut st.heal.copy_excused;
    ex.retain(|s| !(s0..s1).contains(s));
    ex.extend(over.range(s0..s1));
    // A power cut's granules beyond the budget: the recovery takes some child's copy
    // (H22), which can be a silent fault's; the sector is the faults' from now on.
    // Likewise where a silent fault sits on some child: with the cut's split there may be
    // no version on t good copies, and the re-read cannot tell the fault's bytes apart.
    let lost: Vec<u64> = over
        .range(s0..s1)
        .chain(silent_all.range(s0..s1))
        .copied()
        .filter(|s| q.as_ref().is_some_and(|q| q.recovering(s / spg)))
        .collect();
    ex.extend(lost.iter().copied());
    st.oracle.recovered_any.extend(lost);
}

/// A resync run `[offset, offset + len)` is held and about to be read: F26 (a voter's copy
/// flips or fails before it is read), F27 (a guest write aimed at the run) and F25 (the
/// target is cut off, crashed or reformatted while the copy is in flight).
fn copying(w: &Arc<World>, offset: u64, len: u64) {
    note_copy_excused(w, offset, len);
    if !w.in_safety() {
        return;
    }
    let h = w.p.heal.clone();
    let (f26, f27, f25) = {
        let mut st = w.lock();
        let jobs = st.heal.jobs_created;
        let hs = &mut st.heal;
        let f26 = h.f26 > 0.0 && hs.rng.chance(h.f26);
        let f27 = h.f27 > 0.0 && hs.rng.chance(h.f27);
        if hs.f25.0 != jobs {
            let fire = h.f25 > 0.0 && hs.rng.chance(h.f25);
            hs.f25 = (jobs, fire.then(|| hs.rng.below(3)));
        }
        let f25 = match hs.f25.1 {
            Some(0) => {
                hs.f25.1 = None;
                true
            }
            Some(k) => {
                hs.f25.1 = Some(k - 1);
                false
            }
            None => false,
        };
        (f26, f27, f25)
    };
    let (s0, s1) = (offset / SECTOR_U64, (offset + len) / SECTOR_U64);
    if s1 <= s0 {
        return;
    }
    let Some(v) = view(w) else { return };
    if f26 {
        let voters: Vec<usize> = (0..v.len().min(w.p.children))
            .filter(|&i| !overlaps(&v[i].out_of_sync, offset, offset + len))
            .collect();
        if !voters.is_empty() {
            let (c, s, k, latent) = {
                let mut st = w.lock();
                let r = &mut st.heal.rng;
                let c = voters[r.below(voters.len() as u64) as usize];
                let s = s0 + r.below(s1 - s0);
                let k = 1 + r.below(8.min(s1 - s));
                (c, s, k, r.chance(0.3))
            };
            let kind = if latent { Sticky::Latent } else { Sticky::Flip };
            w.disks.inject_sticky(c, s..s + k, kind, Fault::F26);
        }
    }
    if f27 {
        let (s, k) = {
            let mut st = w.lock();
            let r = &mut st.heal.rng;
            let s = s0 + r.below(s1 - s0);
            (s, 1 + r.below(16.min(s1 - s)))
        };
        w.disks.count_injected(Fault::F27);
        (w.extra_op)(w, OpKind::Write, s * SECTOR_U64, k * SECTOR_U64);
    }
    if f25 && w.p.nbd.is_some() {
        let targets: Vec<usize> = (0..v.len().min(w.p.children))
            .filter(|&i| overlaps(&v[i].out_of_sync, offset, offset + len))
            .collect();
        if targets.is_empty() {
            return;
        }
        let (t, kind, delay_us, back_ms) = {
            let mut st = w.lock();
            let r = &mut st.heal.rng;
            (
                targets[r.below(targets.len() as u64) as usize],
                r.below(3),
                r.below(3000),
                r.range(300, 3000),
            )
        };
        let w = w.clone();
        tokio::spawn(async move {
            // Mid-copy: while the reads or the write of the run are on the wire.
            tokio::time::sleep(Duration::from_micros(delay_us)).await;
            if !w.in_safety() {
                return;
            }
            let done = match kind {
                0 => crate::net::partition(&w, t, crate::net::Cut::Both, Fault::F25, true),
                _ => crate::net::crash(&w, t, true),
            };
            if !done {
                return;
            }
            w.disks.count_injected(Fault::F25);
            w.lock().heal.interrupted.insert(t);
            tokio::time::sleep(Duration::from_millis(back_ms)).await;
            match kind {
                0 => crate::net::heal(&w, t),
                k => crate::net::restart(&w, t, k == 2, true),
            }
        });
    }
}

/// F30: the last child is hot-removed, its disk replaced by an empty one and hot-added back
/// (H8: it is out of sync everywhere and the resync fills it). Refused removals (Q53: no
/// child may go below the threshold) count as skipped.
pub(crate) async fn hot_swap(w: Arc<World>) {
    let Some(q) = w.lock().quorum.clone() else {
        return;
    };
    let n = w.p.children;
    let last = n - 1;
    if w.p.nbd.is_some()
        || n <= w.p.threshold
        || !w
            .disks
            .allow_node(Fault::F30, last, crate::vdisk::Mark::Wrong)
    {
        return;
    }
    w.lock().heal.swapping = true;
    let name = format!("children.{last}");
    let removed = retry_f29(&w, || q.remove_child(&name)).await;
    if let Err(e) = removed {
        w.lock().heal.swapping = false;
        w.fail(
            Rule::I7,
            format!(
                "F30: removing {name} from a quorum of {n} children with threshold {} failed: {e}",
                w.p.threshold
            ),
        );
        return;
    }
    w.disks.set_down(last, true);
    let changed = w.disks.reformat(last, Fault::F30);
    w.reassess(&changed);
    let back = {
        let mut st = w.lock();
        st.heal.rng.range(10, 1000)
    };
    tokio::time::sleep(Duration::from_millis(back)).await;
    let dev: ballot::Device = w.disks.device(last);
    let cname = format!("c{last}");
    let r = retry_f29(&w, || q.add_child(&cname, dev.clone())).await;
    w.disks.set_down(last, false);
    {
        let mut st = w.lock();
        st.heal.swapping = false;
    }
    match r {
        Ok(got) if got == name => {}
        Ok(got) => w.fail(
            Rule::I7,
            format!("F30: the swapped child came back as {got}, expected {name} (Q55)"),
        ),
        Err(e) => w.fail(
            Rule::I7,
            format!("F30: hot add of an empty disk refused: {e}"),
        ),
    }
}

/// A hot add or remove, retried while the metadata node fails it (F29, README D17: nothing
/// changed), as an operator would.
async fn retry_f29<T, F, Fut>(w: &World, f: F) -> Result<T, ballot::error::ConfigError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ballot::error::ConfigError>>,
{
    let mut r = f().await;
    for _ in 0..50 {
        match &r {
            Err(e) if w.meta.is_some() && e.message().contains("could not be updated") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                r = f().await;
            }
            _ => break,
        }
    }
    r
}

/// One QMP command on the run's monitor; the reply's `return`, or its error text.
pub(crate) async fn qmp(w: &World, cmd: &str, args: Json) -> Result<Json, String> {
    let Some(m) = w.lock().monitor.clone() else {
        return Err("no monitor".into());
    };
    let (reply, _) = m.execute(cmd, &args).await;
    match reply.get("return") {
        Some(r) => Ok(r.clone()),
        None => Err(reply["error"]["desc"]
            .as_str()
            .unwrap_or("malformed reply")
            .to_string()),
    }
}

/// Whether `e` is the refusal of a second job (H16), which an operator retries later.
fn busy(e: &str) -> bool {
    e.contains("already has a")
}

/// The operator of the safety phase (H16, H17): with `resync=manual` starts `x-quorum-resync`
/// when a child is out of sync, runs `x-quorum-verify` over a random range every
/// `verify_every`, and pauses and resumes some jobs, all over QMP.
pub(crate) async fn operator(w: Arc<World>) {
    let h = w.p.heal.clone();
    if !h.operator {
        return;
    }
    let tick = Duration::from_millis(250);
    let mut next_verify = h.verify_every_ns;
    let mut elapsed = 0u64;
    while w.in_safety() {
        tokio::time::sleep(tick).await;
        elapsed += tick.as_nanos() as u64;
        if !w.in_safety() || w.lock().heal.swapping {
            continue;
        }
        let mut started = None;
        if !w.p.resync_auto && view(&w).is_some_and(|v| v.iter().any(|c| !c.out_of_sync.is_empty()))
        {
            match qmp(&w, "x-quorum-resync", json!({"node-name": "q0"})).await {
                Ok(_) => started = Some("q0-resync"),
                Err(e) if busy(&e) => {}
                Err(e) => return w.fail(Rule::I7, format!("x-quorum-resync refused: {e}")),
            }
        }
        if h.verify_every_ns > 0 && elapsed >= next_verify && started.is_none() {
            next_verify = elapsed + h.verify_every_ns;
            let (start, end) = {
                let mut st = w.lock();
                let r = &mut st.wrng;
                let sectors = w.p.disk_size / SECTOR_U64;
                let a = r.below(sectors);
                (a * SECTOR_U64, (a + 1 + r.below(sectors - a)) * SECTOR_U64)
            };
            match qmp(
                &w,
                "x-quorum-verify",
                json!({"node-name": "q0", "start": start, "end": end}),
            )
            .await
            {
                Ok(_) => started = Some("q0-verify"),
                Err(e) if busy(&e) => {}
                Err(e) => {
                    return w.fail(
                        Rule::I7,
                        format!("x-quorum-verify over [{start}, {end}) refused: {e}"),
                    )
                }
            }
        }
        let Some(id) = started else { continue };
        let pause = {
            let mut st = w.lock();
            let r = &mut st.heal.rng;
            r.chance(h.pause).then(|| r.range(50, 500))
        };
        if let Some(ms) = pause {
            // The job may already have finished; only a refusal other than that is wrong.
            if qmp(&w, "job-pause", json!({"id": id})).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Err(e) = qmp(&w, "job-resume", json!({"id": id})).await {
                    return w.fail(
                        Rule::I7,
                        format!("job-resume of a paused {id} refused: {e}"),
                    );
                }
            }
        }
    }
}

/// H10, H16 (`verify`: H17): the liveness phase's job over QMP: starts it (or, with a job
/// already running, waits for that one first) and waits until `query-jobs` is empty, within
/// the liveness deadline (I14). Then I18 over every child.
pub(crate) async fn job_to_completion(w: &Arc<World>, verify: bool) {
    let start = tokio::time::Instant::now();
    let deadline = Duration::from_nanos(w.p.deadline_ns);
    // F30 under way: the empty disk comes back first.
    while w.lock().heal.swapping && start.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let what = if verify { "verify" } else { "resync" };
    let mut started = false;
    while start.elapsed() < deadline && !w.failed() {
        let jobs = match qmp(w, "query-jobs", json!({})).await {
            Ok(Json::Array(a)) => a,
            Ok(other) => return w.fail(Rule::I7, format!("query-jobs returned {other}")),
            Err(e) => return w.fail(Rule::I7, format!("query-jobs refused: {e}")),
        };
        if jobs.is_empty() {
            if started {
                check_durable(w, None, &format!("after the liveness {what}"));
                tally_resumed(w);
                return;
            }
            let cmd = if verify {
                "x-quorum-verify"
            } else {
                "x-quorum-resync"
            };
            match qmp(w, cmd, json!({"node-name": "q0"})).await {
                Ok(_) => started = true,
                Err(e) if busy(&e) => {}
                Err(e) => return w.fail(Rule::I7, format!("{cmd} refused: {e}")),
            }
        } else if !verify {
            // A job already running (resync=auto) counts as the liveness resync once it ends.
            started |= jobs
                .iter()
                .any(|j| j["type"] == "x-resync" && j["status"] != "concluded");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if w.failed() {
        return;
    }
    w.fail(
        Rule::I14,
        format!(
            "the liveness {what} did not finish within {}",
            crate::units::fmt_time(w.p.deadline_ns)
        ),
    );
}
