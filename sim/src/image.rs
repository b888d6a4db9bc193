//! The image topology (issue 19 item 5): one qcow2 node over a byte-exact disk with a
//! volatile cache, driven by concurrent guest requests, with F5 on the image file's own writes
//! and F16 crashes resolved by F8 (each unflushed write survives or not) and F9 (a surviving
//! write torn between sectors, never inside one: the sector atomicity qcow2, like md and DRBD,
//! relies on).
//!
//! Checks:
//! - I1/I3 while running: every read returns, per sector, a value some write could have left
//!   there (the newest write completed before the read, or one overlapping it);
//! - I21 after every crash: the image opens, and every sector reads as the value of the last
//!   flush that covered it or of a write issued since (I2: a flushed write is never lost);
//! - I22 after every crash: the image's refcounts, checked on the durable bytes by
//!   `ballot::drivers::qcow2::check`, are never below the references (leaks allowed);
//! - P21 counts reopenings after a crash that found leaked clusters.
//!
//! Chasing a failure: `IMGDBG=SECTOR cargo sim replay --seed N` prints (stderr) the requests
//! that touch the sector, the flushes and FUA writes that settle values, and the cuts.

use crate::ids::{Fault, Path, Rule, Violation};
use crate::topology::Topology;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::qcow2::check::check;
use ballot::drivers::qcow2::create::{create, CreateOptions};
use ballot::drivers::qcow2::Qcow2;
use ballot::{BlockDevice, Device, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};

use crate::imagedisk::{open_named, ImageDisk};
use crate::outcome::{RunOpts, RunResult};
use crate::params::{ImageParams, Params};
use crate::rng::{hash_words, Rng};
use crate::scenario::Scenario;
use crate::sector::{decode, encode_into, Decoded, Value, SECTOR, SECTOR_U64};

/// One guest write's record for the model.
#[derive(Debug, Clone, Copy)]
struct W {
    value: Value,
    start: u64,
    end: Option<u64>,
    /// The request succeeded (a failed one may have landed in whole, in part or not at all).
    ok: bool,
    /// A flush (or the write's own FUA) made it durable.
    durable: bool,
}

/// Per sector: the values the last settlement (a flush, a FUA write, a crash) left possible,
/// and the writes since.
///
/// Concurrent writes to one sector are unordered (the driver may apply them in either order,
/// and may finish the one it applied first last), so "the newest write before t" is a set:
/// the writes completed before t that no other completed write started after.
struct Model {
    base: Vec<Vec<Value>>,
    hist: Vec<Vec<W>>,
}

/// The writes of `h` that ended before `t` and that no other successful write ended before
/// `t` follows (started after they ended); `None` when no successful write ended before `t`.
fn newest_before(h: &[W], t: u64) -> Option<Vec<W>> {
    let done: Vec<&W> = h
        .iter()
        .filter(|w| w.ok && w.end.is_some_and(|e| e < t))
        .collect();
    if done.is_empty() {
        return None;
    }
    Some(
        done.iter()
            .filter(|w| {
                let e = w.end.unwrap_or(0);
                !done.iter().any(|x| x.start > e)
            })
            .map(|w| **w)
            .collect(),
    )
}

impl Model {
    /// Values a read started at `rs` and ending at `re` may return for sector `s`.
    fn live_allowed(&self, s: usize, rs: u64, re: u64) -> Vec<Value> {
        let h = &self.hist[s];
        let newest = newest_before(h, rs);
        let mut out: Vec<Value> = match &newest {
            Some(ws) => ws.iter().map(|w| w.value).collect(),
            None => self.base[s].clone(),
        };
        // A failed write may have landed whenever it ran, unless a successful write that
        // ended before the read started began after it ended (then it is overwritten).
        let done: Vec<&W> = h
            .iter()
            .filter(|w| w.ok && w.end.is_some_and(|e| e < rs))
            .collect();
        for w in h {
            let overlaps = w.start < re && w.end.is_none_or(|e| e > rs);
            let failed_open =
                !w.ok && w.start < re && !done.iter().any(|x| w.end.is_some_and(|e| x.start > e));
            if overlaps || failed_open {
                out.push(w.value);
            }
        }
        out
    }

    /// Drops the writes of sector `s` a durable write strictly follows (they can never be
    /// read again, crash or not).
    fn prune(&mut self, s: usize) {
        let h = &mut self.hist[s];
        let durable: Vec<u64> = h.iter().filter(|w| w.durable).map(|w| w.start).collect();
        if durable.is_empty() {
            return;
        }
        h.retain(|w| !durable.iter().any(|&st| w.end.is_some_and(|e| st > e)));
    }

    /// A flush that started at `fs` succeeded: the successful writes completed before it are
    /// durable.
    fn flushed(&mut self, fs: u64) {
        for s in 0..self.base.len() {
            let mut any = false;
            for w in self.hist[s].iter_mut() {
                if w.ok && w.end.is_some_and(|e| e < fs) {
                    w.durable = true;
                    any = true;
                }
            }
            if any {
                self.prune(s);
            }
        }
    }

    /// A FUA write (started at `t0`) of `n` sectors from `s` succeeded: it is durable.
    fn fua_done(&mut self, s: usize, n: usize, t0: u64) {
        for i in s..s + n {
            for w in self.hist[i].iter_mut() {
                if w.start == t0 && w.ok {
                    w.durable = true;
                }
            }
            self.prune(i);
        }
    }

    /// Values sector `s` may hold after a crash: the durable base when no write since is
    /// durable, and every write not strictly followed by a durable one.
    fn crash_allowed(&self, s: usize) -> Vec<Value> {
        let h = &self.hist[s];
        let mut out = Vec::new();
        if !h.iter().any(|w| w.durable) {
            out.extend(self.base[s].iter().copied());
        }
        out.extend(h.iter().map(|w| w.value));
        out
    }
}

/// A run of the image topology ([`Topology`]): one qcow2 image over a faulty file. Its
/// batches build and check as they go, so `drive` is the whole run and `judge` hands on what
/// it found.
pub(crate) struct ImageRun {
    p: Params,
    ip: ImageParams,
    result: std::sync::Mutex<RunResult>,
}

#[async_trait::async_trait]
impl Topology for ImageRun {
    async fn build(p: Params, _sc: Scenario, _opts: RunOpts) -> Result<ImageRun, RunResult> {
        let Some(ip) = p.image.clone() else {
            let why = "an image run without image parameters";
            return Err(RunResult {
                violation: Some(Violation::new(Rule::Harness, why)),
                ..RunResult::default()
            });
        };
        Ok(ImageRun {
            p,
            ip,
            result: Default::default(),
        })
    }

    async fn drive(&self) {
        let mut r = RunResult::default();
        let start = tokio::time::Instant::now();
        if let Err((rule, msg)) = run(&self.p, &self.ip, &mut r).await {
            r.violation = Some(Violation::new(rule, msg));
        }
        r.virtual_s = start.elapsed().as_secs_f64();
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    async fn judge(&self) -> RunResult {
        std::mem::take(&mut *self.result.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

type Fail = (Rule, String);

/// What a guest request leaves for the checks after its batch.
enum Done {
    Nothing,
    Read(u64, u64, u64, Bytes),
    Flushed(u64),
    Fua(usize, Vec<Value>, u64, u64),
}

fn encode(values: &[Value]) -> Bytes {
    let mut b = BytesMut::zeroed(values.len() * SECTOR);
    for (i, v) in values.iter().enumerate() {
        encode_into(*v, &mut b[i * SECTOR..(i + 1) * SECTOR]);
    }
    b.freeze()
}

async fn open(file: &Device, backing: &Option<Device>) -> std::result::Result<Qcow2, String> {
    open_named(file, backing, "img", "'sim.qcow2'", false).await
}

/// Checks a batch's reads against the model (I1: each sector decodes; I3: to a value the
/// writes overlapping the read allow).
fn check_reads(
    model: &Mutex<Model>,
    reads: Vec<(u64, u64, u64, Bytes)>,
    checks: &mut BTreeMap<Rule, u64>,
) -> std::result::Result<(), Fail> {
    for (s, t0, t1, data) in reads {
        let m = model.lock().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            let sec = s as usize + i;
            let got = match decode(chunk) {
                Decoded::Value(v) => v,
                Decoded::Garbage => {
                    return Err((Rule::I1, format!("sector {sec} reads garbage")));
                }
            };
            *checks.entry(Rule::I1).or_default() += 1;
            let allowed = m.live_allowed(sec, t0, t1);
            if !allowed.contains(&got) {
                return Err((
                    Rule::I3,
                    format!("sector {sec} reads {got:?}, allowed {allowed:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// After a crash (F16): the image opens and its refcounts hold (I21, I22; a leak is P21), it
/// reopens through F5's lane, and every sector reads the durable value or a later write (I21,
/// I2); the model restarts from what it read.
#[allow(clippy::too_many_arguments)]
async fn recover(
    file: &Device,
    lane: &Device,
    backing: &Option<Device>,
    model: &Mutex<Model>,
    size: u64,
    crashes: u64,
    checks: &mut BTreeMap<Rule, u64>,
    paths: &mut BTreeMap<Path, u64>,
) -> std::result::Result<Qcow2, Fail> {
    let h = Qcow2::read_header(file, "'sim.qcow2'").await.map_err(|e| {
        (
            Rule::I21,
            format!("after crash {crashes}: the image does not open: {e}"),
        )
    })?;
    let report = check(file, &h).await.map_err(|e| {
        (
            Rule::I22,
            format!("after crash {crashes}: check failed: {e}"),
        )
    })?;
    *checks.entry(Rule::I22).or_default() += 1;
    if !report.is_consistent() {
        return Err((
            Rule::I22,
            format!(
                "after crash {crashes}: refcounts below references: {}",
                report.messages.join("; ")
            ),
        ));
    }
    if report.leaks > 0 {
        *paths.entry(Path::P21).or_default() += 1;
    }
    // Reopening must not itself fail under F5: retry the open a few times.
    let mut reopened = None;
    for _ in 0..8 {
        if let Ok(x) = open(lane, backing).await {
            reopened = Some(x);
            break;
        }
    }
    let fresh = reopened.ok_or_else(|| {
        (
            Rule::I21,
            format!("after crash {crashes}: the image does not reopen"),
        )
    })?;

    if let Some(d) = std::env::var("IMGDBG")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let st = fresh.block_status(d * SECTOR_U64, SECTOR_U64).await;
        let v = fresh.read(d * SECTOR_U64, SECTOR).await.map(|b| decode(&b));
        eprintln!("reopen {crashes}: sector {d} status {st:?} value {v:?}");
    }
    // Every sector: the durable value or a write since.
    let mut all = None;
    for _ in 0..8 {
        if let Ok(d) = fresh.read(0, size as usize).await {
            all = Some(d);
            break;
        }
    }
    let all = all.ok_or_else(|| (Rule::Harness, "full read keeps failing".to_string()))?;
    let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
    for (i, chunk) in all.chunks(SECTOR).enumerate() {
        let got = match decode(chunk) {
            Decoded::Value(v) => v,
            Decoded::Garbage => {
                return Err((
                    Rule::I21,
                    format!("after crash {crashes}: sector {i} reads garbage"),
                ));
            }
        };
        let allowed = m.crash_allowed(i);
        if !allowed.contains(&got) {
            return Err((
                Rule::I21,
                format!(
                    "after crash {crashes}: sector {i} reads {got:?}, allowed {allowed:?} (I2)"
                ),
            ));
        }
        m.base[i] = vec![got];
        m.hist[i].clear();
    }
    *checks.entry(Rule::I21).or_default() += 1;
    Ok(fresh)
}

async fn run(p: &Params, ip: &ImageParams, r: &mut RunResult) -> std::result::Result<(), Fail> {
    let mut rng = Rng::stream(p.seed, "image/ops");
    let sectors = (p.disk_size / SECTOR_U64).clamp(64, 1 << 15);
    let size = sectors * SECTOR_U64;
    let refcount_order = if ip.version == 2 {
        4
    } else {
        ip.refcount_order
    };
    let disk = Arc::new(ImageDisk::new(p.seed, "image", 0.0, (5, 200)));
    let file: Device = disk.clone();
    let backing_sectors = sectors * 3 / 4;
    let backing: Option<Device> = ip.backing.then(|| {
        let vals: Vec<Value> = (0..backing_sectors)
            .map(|s| Value::Data { id: 0, sector: s })
            .collect();
        Arc::new(MemoryDevice::with_contents(encode(&vals).to_vec())) as Device
    });
    let base_value = |s: u64| {
        if ip.backing && s < backing_sectors {
            Value::Data { id: 0, sector: s }
        } else {
            Value::Zero
        }
    };
    let copts = CreateOptions {
        size,
        cluster_bits: ip.cluster_bits,
        version: ip.version,
        refcount_order,
        backing: ip.backing.then(|| ("base".into(), "raw".into())),
    };
    create(&file, &copts)
        .await
        .map_err(|e| (Rule::Harness, format!("create: {e}")))?;
    // F5 from here on: the image exists.
    let disk_f5 = Arc::new(ImageDisk {
        st: Mutex::new(std::mem::replace(
            &mut *disk.lock(),
            ImageDisk::new(p.seed, "image/unused", 0.0, (0, 0))
                .st
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
        )),
        f5: ip.f5,
        lat_us: (5, 200),
        flush_us: (0, 0),
        life: AtomicU64::new(0),
    });
    let file: Device = disk_f5.clone();
    let lane = |d: &Arc<ImageDisk>| -> Device { d.lane() };

    let mut q = Arc::new(
        open(&lane(&disk_f5), &backing)
            .await
            .map_err(|e| (Rule::Harness, format!("open: {e}")))?,
    );
    let model = Arc::new(Mutex::new(Model {
        base: (0..sectors).map(|x| vec![base_value(x)]).collect(),
        hist: vec![Vec::new(); sectors as usize],
    }));
    let clock = Arc::new(AtomicU64::new(1));
    let cluster_sectors = 1u64 << (ip.cluster_bits - 9);
    let mut next_id = 1u64;
    let ops_total = p.ops.min(4000);
    let mut done = 0u64;
    let mut trace: Vec<u64> = Vec::new();
    let mut checks: BTreeMap<Rule, u64> = BTreeMap::new();
    let mut paths: BTreeMap<Path, u64> = BTreeMap::new();
    let mut crashes = 0u64;
    while done < ops_total {
        // A batch of concurrent requests.
        let n = ip.concurrency.min(ops_total - done);
        // F16 in the middle of the batch: a power cut at a random instant while requests (and
        // write-backs) are in flight.
        let cut_at = rng
            .chance(ip.f16 / 2.0)
            .then(|| Duration::from_micros(rng.range(0, 3000)));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let kind = rng.below(20);
            let s = rng.below(sectors);
            let max = (sectors - s).min(3 * cluster_sectors);
            let len = 1 + rng.below(max);
            let id = next_id;
            next_id += 1;
            trace.extend([kind, s, len, id]);
            let dbg = std::env::var("IMGDBG")
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            let q = q.clone();
            let dbg_on = dbg.is_some_and(|d| d >= s && d < s + len);
            let model = model.clone();
            let clock = clock.clone();
            let v3 = ip.version >= 3;
            let bv: Vec<Value> = (s..s + len).map(base_value).collect();
            let cl = cluster_sectors;
            let dbg = std::env::var("IMGDBG")
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if dbg.is_some_and(|d| d >= s && d < s + len) {
                eprintln!("op id={id} kind={kind} s={s} len={len} batch_done={done}");
            }
            tasks.push(tokio::spawn(async move {
                let t0 = clock.fetch_add(1, Ordering::SeqCst);
                let record = |vals: &[Value], end: Option<u64>| {
                    let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
                    for (i, v) in vals.iter().enumerate() {
                        m.hist[(s + i as u64) as usize].push(W {
                            value: *v,
                            start: t0,
                            end,
                            ok: true,
                            durable: false,
                        });
                    }
                };
                let set_end = |end: u64, ok: bool| {
                    let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
                    for i in 0..len {
                        if let Some(w) = m.hist[(s + i) as usize]
                            .iter_mut()
                            .rev()
                            .find(|w| w.start == t0)
                        {
                            w.end = Some(end);
                            w.ok = ok;
                        }
                    }
                };
                match kind {
                    0..=8 => {
                        let vals: Vec<Value> = (s..s + len)
                            .map(|x| Value::Data { id, sector: x })
                            .collect();
                        record(&vals, None);
                        let fua = id % 9 == 0;
                        let res = q
                            .write(s * SECTOR_U64, encode(&vals), WriteFlags { fua })
                            .await;
                        let end = clock.fetch_add(1, Ordering::SeqCst);
                        if dbg_on {
                            eprintln!(
                                "write id={id} t0={t0} end={end} fua={fua} ok={}",
                                res.is_ok()
                            );
                        }
                        set_end(end, res.is_ok());
                        if fua && res.is_ok() {
                            return Done::Fua(s as usize, vals, t0, end);
                        }
                        Done::Nothing
                    }
                    9..=12 => {
                        let res = q.read(s * SECTOR_U64, (len * SECTOR_U64) as usize).await;
                        let t1 = clock.fetch_add(1, Ordering::SeqCst);
                        match res {
                            Ok(d) => Done::Read(s, t0, t1, d),
                            Err(_) => Done::Nothing,
                        }
                    }
                    13..=14 => {
                        record(&vec![Value::Zero; len as usize], None);
                        let res = q
                            .write_zeroes(
                                s * SECTOR_U64,
                                len * SECTOR_U64,
                                ZeroFlags {
                                    fua: false,
                                    may_unmap: id % 2 == 0,
                                },
                            )
                            .await;
                        set_end(clock.fetch_add(1, Ordering::SeqCst), res.is_ok());
                        Done::Nothing
                    }
                    15 => {
                        // Whole clusters become zero (v3) or show the backing (v2).
                        let a = s.div_ceil(cl) * cl;
                        let b = ((s + len) / cl * cl).max(a);
                        let b = if s + len == sectors { s + len } else { b };
                        let vals: Vec<Value> = (s..s + len)
                            .map(|x| {
                                if x >= a && x < b {
                                    if v3 {
                                        Value::Zero
                                    } else {
                                        bv[(x - s) as usize]
                                    }
                                } else {
                                    Value::Zero
                                }
                            })
                            .collect();
                        // Only the whole clusters change; record those.
                        if b > a {
                            let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
                            for x in a..b {
                                m.hist[x as usize].push(W {
                                    value: vals[(x - s) as usize],
                                    start: t0,
                                    end: None,
                                    ok: true,
                                    durable: false,
                                });
                            }
                        }
                        let ok = q.discard(s * SECTOR_U64, len * SECTOR_U64).await.is_ok();
                        let end = clock.fetch_add(1, Ordering::SeqCst);
                        let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
                        for x in a..b {
                            if let Some(w) =
                                m.hist[x as usize].iter_mut().rev().find(|w| w.start == t0)
                            {
                                w.end = Some(end);
                                w.ok = ok;
                            }
                        }
                        Done::Nothing
                    }
                    _ => {
                        let ok = q.flush().await.is_ok();
                        clock.fetch_add(1, Ordering::SeqCst);
                        if ok {
                            Done::Flushed(t0)
                        } else {
                            Done::Nothing
                        }
                    }
                }
            }));
        }
        // Reads are checked against the batch's whole history first; the flushes and FUA
        // writes that settle values are applied after (they drop history a read may need).
        let mut settle = Vec::new();
        let mut reads = Vec::new();
        let mut cut = false;
        if let Some(at) = cut_at {
            tokio::time::sleep(at).await;
            if tasks.iter().any(|t| !t.is_finished()) {
                // The cut: earlier requests' I/O fails from now on, the cache is resolved,
                // and the requests in flight never answer (their writes stay possible).
                cut = true;
                disk_f5.life.fetch_add(1, Ordering::SeqCst);
                disk_f5.crash(ip.f8, ip.f9);
                for t in &tasks {
                    t.abort();
                }
            }
        }
        for t in tasks {
            match t.await {
                Ok(Done::Read(s, t0, t1, d)) => reads.push((s, t0, t1, d)),
                Ok(Done::Nothing) => {}
                Ok(other) => settle.push(other),
                // Aborted by the cut: it never answered.
                Err(_) if cut => {}
                Err(e) => return Err((Rule::I16, format!("task: {e}"))),
            }
        }
        check_reads(&model, reads, &mut checks)?;
        settle.sort_by_key(|d| match d {
            Done::Flushed(t) => *t,
            Done::Fua(_, _, _, end) => *end,
            _ => 0,
        });
        {
            let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
            for d in settle {
                if std::env::var("IMGDBG").is_ok() {
                    match &d {
                        Done::Flushed(fs) => eprintln!("settle flush fs={fs}"),
                        Done::Fua(s, v, t0, end) => {
                            eprintln!("settle fua s={s} n={} t0={t0} end={end}", v.len())
                        }
                        _ => {}
                    }
                }
                match d {
                    Done::Flushed(fs) => m.flushed(fs),
                    Done::Fua(s, vals, t0, _) => m.fua_done(s, vals.len(), t0),
                    _ => {}
                }
            }
        }
        done += n;
        // F16: the cut in this batch, or one between batches.
        if cut || rng.chance(ip.f16 / 2.0) {
            if std::env::var("IMGDBG").is_ok() {
                eprintln!("crash after {done} (in flight: {cut})");
            }
            crashes += 1;
            *disk_f5.lock().injected.entry(Fault::F16).or_default() += 1;
            drop(q);
            if !cut {
                disk_f5.life.fetch_add(1, Ordering::SeqCst);
                disk_f5.crash(ip.f8, ip.f9);
            }
            q = Arc::new(
                recover(
                    &file,
                    &lane(&disk_f5),
                    &backing,
                    &model,
                    size,
                    crashes,
                    &mut checks,
                    &mut paths,
                )
                .await?,
            );
        }
    }
    // The end: a flush, then the image checks clean (no leaks after a flush).
    let _ = q.flush().await;
    r.ops = done;
    r.crashes = crashes;
    r.checks = checks;
    r.paths = paths;
    r.injected = disk_f5.lock().injected.clone();
    r.child_ops = 0;
    r.trace_hash = format!("{:016x}", hash_words(&trace));
    r.records = trace.len() as u64 / 4;
    Ok(())
}
