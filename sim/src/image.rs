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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::qcow2::create::{create, CreateOptions};
use ballot::drivers::qcow2::Qcow2;
use ballot::{BlockDevice, Device, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};

use crate::imagedisk::{check_after_cut, open_named, ImageDisk};
use crate::outcome::{RunOpts, RunResult};
use crate::params::{ImageParams, Params};
use crate::rng::Rng;
use crate::runlog::RunLog;
use crate::scenario::{Expect, Scenario};
use crate::sector::{decode, encode_into, Decoded, Value, SECTOR, SECTOR_U64};
use crate::trace::Record;

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
    /// The scenario, whose `injected` and `path` expectations the run checks at its end.
    sc: Scenario,
    /// The trace, the first violation and the counters.
    log: RunLog,
    /// The ops, crashes and virtual time `drive` measured.
    result: std::sync::Mutex<RunResult>,
}

#[async_trait::async_trait]
impl Topology for ImageRun {
    async fn build(p: Params, sc: Scenario, opts: RunOpts) -> Result<ImageRun, RunResult> {
        let refuse = |why: String| RunResult {
            violation: Some(Violation::new(Rule::Harness, why)),
            ..RunResult::default()
        };
        let Some(ip) = p.image.clone() else {
            return Err(refuse("an image run without image parameters".into()));
        };
        // The parser refuses these for the scenario's own seed; another seed may derive an
        // image run where the scenario's did not.
        if let Some(why) = crate::scenario::image_unsupported(&sc) {
            return Err(refuse(format!("scenario {}: {why}", sc.name)));
        }
        Ok(ImageRun {
            p,
            ip,
            sc,
            log: RunLog::new(&opts),
            result: Default::default(),
        })
    }

    async fn drive(&self) {
        let mut r = RunResult::default();
        let start = tokio::time::Instant::now();
        if let Err((rule, msg)) = run(&self.p, &self.ip, &self.log, &mut r).await {
            self.log.fail(rule, msg);
        }
        r.virtual_s = start.elapsed().as_secs_f64();
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    async fn judge(&self) -> RunResult {
        self.check_expectations();
        let r = std::mem::take(&mut *self.result.lock().unwrap_or_else(|p| p.into_inner()));
        RunResult {
            ops: r.ops,
            crashes: r.crashes,
            virtual_s: r.virtual_s,
            ..self.log.result()
        }
    }
}

impl ImageRun {
    /// C5: the scenario's `injected` and `path` expectations (the only kinds an image run
    /// takes, [`crate::scenario::image_unsupported`]).
    fn check_expectations(&self) {
        for e in &self.sc.expects {
            let c = self.log.counts();
            let (what, n, min) = match e {
                Expect::Injected { fault, min } => (
                    format!("{fault} injected"),
                    c.injected.get(fault).copied().unwrap_or(0),
                    *min,
                ),
                Expect::Path { path, min } => (
                    format!("{path} reached"),
                    c.paths.get(path).copied().unwrap_or(0),
                    *min,
                ),
                _ => continue,
            };
            drop(c);
            if n < min {
                self.log.fail(
                    Rule::C5,
                    format!("expect: {what} {n} time(s), expected at least {min}"),
                );
            }
        }
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
    log: &RunLog,
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
            log.check(Rule::I1);
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
async fn recover(rig: &Rig, crashes: u64, log: &RunLog) -> std::result::Result<Qcow2, Fail> {
    let (file, backing, model, size) = (&rig.file, &rig.backing, &*rig.model, rig.size);
    let lane = &rig.disk.lane();
    let leaks = check_after_cut(file, "'sim.qcow2'", &format!("after crash {crashes}")).await?;
    log.check(Rule::I22);
    if leaks > 0 {
        log.path(Path::P21);
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

    if let Some(d) = rig.dbg {
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
    log.check(Rule::I21);
    Ok(fresh)
}

/// What an image run works on: the image file (under F5 once created), its backing, the
/// model of what each sector may hold and the clock that orders requests for it.
struct Rig {
    sectors: u64,
    size: u64,
    cluster_sectors: u64,
    /// Sectors the backing file covers (0 without one).
    backing_sectors: u64,
    v3: bool,
    disk: Arc<ImageDisk>,
    file: Device,
    backing: Option<Device>,
    model: Arc<Mutex<Model>>,
    clock: Arc<AtomicU64>,
    /// `IMGDBG=SECTOR`: the sector whose requests are printed.
    dbg: Option<u64>,
    /// The run's start, for the trace's virtual time.
    start: tokio::time::Instant,
}

/// One guest request of a batch: its kind (a draw below 20: 0-8 write, 9-12 read, 13-14
/// write-zeroes, 15 discard, else flush), first sector, length in sectors and id.
#[derive(Clone, Copy)]
struct Req {
    kind: u64,
    s: u64,
    len: u64,
    id: u64,
}

impl Req {
    /// The request's kind as the trace names it.
    fn kind_name(&self) -> &'static str {
        match self.kind {
            0..=8 => "write",
            9..=12 => "read",
            13..=14 => "write-zeroes",
            15 => "discard",
            _ => "flush",
        }
    }
}

impl Rig {
    /// Creates the image (cluster size, version, refcount width and backing from `ip`), then
    /// puts F5 on the file's own writes.
    async fn new(p: &Params, ip: &ImageParams) -> std::result::Result<Rig, Fail> {
        let sectors = (p.disk_size / SECTOR_U64).clamp(64, 1 << 15);
        let size = sectors * SECTOR_U64;
        let backing_sectors = if ip.backing { sectors * 3 / 4 } else { 0 };
        let backing: Option<Device> = ip.backing.then(|| {
            let vals: Vec<Value> = (0..backing_sectors)
                .map(|s| Value::Data { id: 0, sector: s })
                .collect();
            Arc::new(MemoryDevice::with_contents(encode(&vals).to_vec())) as Device
        });
        let disk = Arc::new(ImageDisk::new(p.seed, "image", 0.0, (5, 200)));
        let file: Device = disk.clone();
        let copts = CreateOptions {
            size,
            cluster_bits: ip.cluster_bits,
            version: ip.version,
            refcount_order: if ip.version == 2 {
                4
            } else {
                ip.refcount_order
            },
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
        let rig = Rig {
            sectors,
            size,
            cluster_sectors: 1u64 << (ip.cluster_bits - 9),
            backing_sectors,
            v3: ip.version >= 3,
            file: disk_f5.clone(),
            disk: disk_f5,
            backing,
            model: Arc::new(Mutex::new(Model {
                base: Vec::new(),
                hist: vec![Vec::new(); sectors as usize],
            })),
            clock: Arc::new(AtomicU64::new(1)),
            dbg: std::env::var("IMGDBG")
                .ok()
                .and_then(|v| v.parse::<u64>().ok()),
            start: tokio::time::Instant::now(),
        };
        rig.model.lock().unwrap_or_else(|p| p.into_inner()).base =
            (0..sectors).map(|x| vec![rig.base_value(x)]).collect();
        Ok(rig)
    }

    /// Appends a trace record at the current virtual time.
    fn record(
        &self,
        log: &RunLog,
        node: &str,
        kind: &'static str,
        op: u64,
        (offset, len): (u64, u64),
        digest: u64,
    ) {
        log.record(Record {
            t_ns: self.start.elapsed().as_nanos() as u64,
            node: node.into(),
            kind,
            op,
            offset,
            len,
            result: 0,
            digest,
            note: String::new(),
        });
    }

    /// What sector `s` holds before any write: the backing's data, or zeros.
    fn base_value(&self, s: u64) -> Value {
        if s < self.backing_sectors {
            Value::Data { id: 0, sector: s }
        } else {
            Value::Zero
        }
    }

    /// The image opened through F5's lane.
    async fn open(&self) -> std::result::Result<Qcow2, String> {
        open(&self.disk.lane(), &self.backing).await
    }

    /// Draws a batch's request: kind, first sector and length (up to three clusters).
    fn draw(&self, rng: &mut Rng, id: u64) -> Req {
        let kind = rng.below(20);
        let s = rng.below(self.sectors);
        let max = (self.sectors - s).min(3 * self.cluster_sectors);
        let len = 1 + rng.below(max);
        Req { kind, s, len, id }
    }

    /// Starts request `r` on the image as a task of its own.
    fn spawn(&self, q: &Arc<Qcow2>, r: Req) -> tokio::task::JoinHandle<Done> {
        let dbg_on = self.dbg.is_some_and(|d| d >= r.s && d < r.s + r.len);
        if dbg_on {
            eprintln!("op id={} kind={} s={} len={}", r.id, r.kind, r.s, r.len);
        }
        let (model, clock) = (self.model.clone(), self.clock.clone());
        let (v3, cl, sectors) = (self.v3, self.cluster_sectors, self.sectors);
        let bv: Vec<Value> = (r.s..r.s + r.len).map(|x| self.base_value(x)).collect();
        let q = q.clone();
        tokio::spawn(async move {
            let op = GuestOp {
                r,
                t0: clock.fetch_add(1, Ordering::SeqCst),
                model,
                clock,
                dbg_on,
            };
            match r.kind {
                0..=8 => op.write(&q).await,
                9..=12 => op.read(&q).await,
                13..=14 => op.write_zeroes(&q).await,
                15 => op.discard(&q, v3, cl, sectors, &bv).await,
                _ => op.flush(&q).await,
            }
        })
    }
}

/// A guest request running on the image, recording its writes in the model: each with its
/// start `t0` and, once it completes, its end and outcome.
struct GuestOp {
    r: Req,
    t0: u64,
    model: Arc<Mutex<Model>>,
    clock: Arc<AtomicU64>,
    dbg_on: bool,
}

impl GuestOp {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next tick of the clock: the instant the request completed.
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Records `vals` as written from the request's first sector, not yet complete.
    fn record(&self, vals: &[Value]) {
        let mut m = self.model();
        for (i, v) in vals.iter().enumerate() {
            m.hist[(self.r.s + i as u64) as usize].push(W {
                value: *v,
                start: self.t0,
                end: None,
                ok: true,
                durable: false,
            });
        }
    }

    /// The request's writes on `sectors` completed at `end`, successfully or not.
    fn set_end(&self, sectors: std::ops::Range<u64>, end: u64, ok: bool) {
        let mut m = self.model();
        for x in sectors {
            if let Some(w) = m.hist[x as usize]
                .iter_mut()
                .rev()
                .find(|w| w.start == self.t0)
            {
                w.end = Some(end);
                w.ok = ok;
            }
        }
    }

    /// A write of values tagged with the request's id (FUA for one id in nine).
    async fn write(&self, q: &Qcow2) -> Done {
        let Req { s, len, id, .. } = self.r;
        let vals: Vec<Value> = (s..s + len)
            .map(|x| Value::Data { id, sector: x })
            .collect();
        self.record(&vals);
        let fua = id % 9 == 0;
        let res = q
            .write(s * SECTOR_U64, encode(&vals), WriteFlags { fua })
            .await;
        let end = self.tick();
        if self.dbg_on {
            eprintln!(
                "write id={id} t0={} end={end} fua={fua} ok={}",
                self.t0,
                res.is_ok()
            );
        }
        self.set_end(s..s + len, end, res.is_ok());
        if fua && res.is_ok() {
            return Done::Fua(s as usize, vals, self.t0, end);
        }
        Done::Nothing
    }

    /// A read, checked with its batch.
    async fn read(&self, q: &Qcow2) -> Done {
        let Req { s, len, .. } = self.r;
        let res = q.read(s * SECTOR_U64, (len * SECTOR_U64) as usize).await;
        let t1 = self.tick();
        match res {
            Ok(d) => Done::Read(s, self.t0, t1, d),
            Err(_) => Done::Nothing,
        }
    }

    /// Write-zeroes, which may unmap for even ids.
    async fn write_zeroes(&self, q: &Qcow2) -> Done {
        let Req { s, len, id, .. } = self.r;
        self.record(&vec![Value::Zero; len as usize]);
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
        self.set_end(s..s + len, self.tick(), res.is_ok());
        Done::Nothing
    }

    /// A discard: only whole clusters change, to zeros (v3) or to the backing's data (v2);
    /// the image's last cluster counts as whole.
    async fn discard(&self, q: &Qcow2, v3: bool, cl: u64, sectors: u64, bv: &[Value]) -> Done {
        let Req { s, len, .. } = self.r;
        let a = s.div_ceil(cl) * cl;
        let b = ((s + len) / cl * cl).max(a);
        let b = if s + len == sectors { s + len } else { b };
        if b > a {
            let mut m = self.model();
            for x in a..b {
                m.hist[x as usize].push(W {
                    value: if v3 {
                        Value::Zero
                    } else {
                        bv[(x - s) as usize]
                    },
                    start: self.t0,
                    end: None,
                    ok: true,
                    durable: false,
                });
            }
        }
        let ok = q.discard(s * SECTOR_U64, len * SECTOR_U64).await.is_ok();
        let end = self.tick();
        self.set_end(a..b, end, ok);
        Done::Nothing
    }

    /// A flush; one that succeeds settles the writes completed before it started.
    async fn flush(&self, q: &Qcow2) -> Done {
        let ok = q.flush().await.is_ok();
        self.tick();
        if ok {
            Done::Flushed(self.t0)
        } else {
            Done::Nothing
        }
    }
}

/// How a batch's requests ended: the settling flushes and FUA writes (oldest first), the
/// reads to check, and whether a power cut came in the middle.
struct Batch {
    settle: Vec<Done>,
    reads: Vec<(u64, u64, u64, Bytes)>,
    cut: bool,
}

/// Waits for a batch's requests; with `cut_at`, F16 cuts power at that instant if requests
/// are still in flight: earlier requests' I/O fails from then on, the cache is resolved (F8,
/// F9), and the requests in flight never answer (their writes stay possible).
async fn collect(
    rig: &Rig,
    ip: &ImageParams,
    tasks: Vec<tokio::task::JoinHandle<Done>>,
    cut_at: Option<Duration>,
) -> std::result::Result<Batch, Fail> {
    let mut b = Batch {
        settle: Vec::new(),
        reads: Vec::new(),
        cut: false,
    };
    if let Some(at) = cut_at {
        tokio::time::sleep(at).await;
        if tasks.iter().any(|t| !t.is_finished()) {
            b.cut = true;
            rig.disk.cut(ip.f8, ip.f9);
            for t in &tasks {
                t.abort();
            }
        }
    }
    for t in tasks {
        match t.await {
            Ok(Done::Read(s, t0, t1, d)) => b.reads.push((s, t0, t1, d)),
            Ok(Done::Nothing) => {}
            Ok(other) => b.settle.push(other),
            // Aborted by the cut: it never answered.
            Err(_) if b.cut => {}
            Err(e) => return Err((Rule::I16, format!("task: {e}"))),
        }
    }
    b.settle.sort_by_key(|d| match d {
        Done::Flushed(t) => *t,
        Done::Fua(_, _, _, end) => *end,
        _ => 0,
    });
    Ok(b)
}

/// Applies a batch's flushes and FUA writes to the model, in the order they completed.
fn settle(rig: &Rig, settle: Vec<Done>) {
    let mut m = rig.model.lock().unwrap_or_else(|p| p.into_inner());
    for d in settle {
        if rig.dbg.is_some() {
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

/// The run: batches of concurrent requests (reads checked against the batch's whole history
/// first, then the flushes and FUA writes that settle values applied, as they drop history
/// a read may need), with F16 power cuts inside or between batches, each followed by
/// [`recover`]; at the end a flush.
async fn run(
    p: &Params,
    ip: &ImageParams,
    log: &RunLog,
    r: &mut RunResult,
) -> std::result::Result<(), Fail> {
    let rig = Rig::new(p, ip).await?;
    let res = drive(p, ip, &rig, log, r).await;
    // The faults the disk injected count whether or not the run passed: a failed run's
    // report says what it was under.
    log.counts().injected = rig.disk.injected();
    res
}

/// The batches of [`run`] on `rig`.
async fn drive(
    p: &Params,
    ip: &ImageParams,
    rig: &Rig,
    log: &RunLog,
    r: &mut RunResult,
) -> std::result::Result<(), Fail> {
    let mut rng = Rng::stream(p.seed, "image/ops");
    let mut q = Arc::new(
        rig.open()
            .await
            .map_err(|e| (Rule::Harness, format!("open: {e}")))?,
    );
    let mut next_id = 1u64;
    let ops_total = p.ops.min(4000);
    let mut done = 0u64;
    let mut crashes = 0u64;
    while done < ops_total {
        let n = ip.concurrency.min(ops_total - done);
        // F16 in the middle of the batch: a power cut at a random instant while requests (and
        // write-backs) are in flight.
        let cut_at = rng
            .chance(ip.f16 / 2.0)
            .then(|| Duration::from_micros(rng.range(0, 3000)));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let req = rig.draw(&mut rng, next_id);
            next_id += 1;
            rig.record(
                log,
                "guest",
                req.kind_name(),
                req.id,
                (req.s * SECTOR_U64, req.len * SECTOR_U64),
                req.kind,
            );
            tasks.push(rig.spawn(&q, req));
        }
        let batch = collect(rig, ip, tasks, cut_at).await?;
        check_reads(&rig.model, batch.reads, log)?;
        settle(rig, batch.settle);
        done += n;
        r.ops = done;
        // F16: the cut in this batch, or one between batches.
        if batch.cut || rng.chance(ip.f16 / 2.0) {
            if rig.dbg.is_some() {
                eprintln!("crash after {done} (in flight: {})", batch.cut);
            }
            crashes += 1;
            r.crashes = crashes;
            *rig.disk.lock().injected.entry(Fault::F16).or_default() += 1;
            drop(q);
            if !batch.cut {
                rig.disk.cut(ip.f8, ip.f9);
            }
            rig.record(log, "image", "crash", crashes, (0, 0), 0);
            q = Arc::new(recover(rig, crashes, log).await?);
        }
    }
    let _ = q.flush().await;
    Ok(())
}
