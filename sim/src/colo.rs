//! The COLO topology (SIMULATION.md §3.2, W6–W9; REPLICATION.md §2): hosts `colo-p`, `colo-s`
//! and `ham`, each a madsim node running ballot's unchanged graph, replication and overlay
//! drivers, NBD server and client, and QMP monitor.
//!
//! - `colo-p`: quorum `colo-disk0` (fifo, t = 1) over the primary disk P; the PVM's workload
//!   calls it directly; `replication0` (primary) is hot-added by `ham` over QMP, its file an
//!   `nbd` client to `colo-s` over madsim TCP.
//! - `colo-s`: S exported as `parent0` (the forwarded writes arrive there), the overlays A and
//!   H, `childs0` (secondary) and the top quorum; the SVM's workload calls the top quorum.
//! - `ham`: the controller. Start, checkpoints (W7), heartbeats and failover (W8), and the
//!   primary's continuation when the secondary is lost, all through QMP over madsim TCP.
//!
//! The oracle (O6) keeps the primary model (every acked PVM write), the snapshot of each
//! completed checkpoint and the secondary's view (snapshot + SVM writes since). Checked:
//! every PVM read against the primary model (I1); every SVM read against the view (R23, I9);
//! at each checkpoint S == P == snapshot and both overlays empty (R53, E3, I9); after a
//! completed failover S == view (R32, I10); no forwarded write lands on S after the
//! secondary's stop (O1, I11). Faults F19–F24 at checkpoints (scripted, or one per swarm seed).
//!
//! Disks here are plain in-memory devices with seeded latency and a write-failure switch: the
//! local disk faults F1–F11 are the quorum topology's subject; here faults are COLO races.

use crate::ids::{Fault, Path, Rule};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::topology::Topology;
use ballot::device::{check_request, Access};
use ballot::drivers::cow::Layer;
use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::qcow2::create::{create, CreateOptions};
use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::nbd::server::{Export, Server};
use ballot::qmp::Monitor;
use ballot::{BlockDevice, Device, Error, ErrorKind, Result, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::measure::{fault_outcomes, latency_histograms, OpSpan};
use crate::outcome::{RunOpts, RunResult};
use crate::params::{ColoParams, Params};
use crate::rng::Rng;
use crate::runlog::RunLog;
use crate::scenario::{Expect, Scenario, When};
use crate::trace::Record;
use crate::vdisk::FaultMark;

const SECTOR: u64 = 512;
const QMP_PORT: u16 = 4444;
const NBD_PORT: u16 = 9999;
const P_IP: &str = "10.0.2.1";
const S_IP: &str = "10.0.2.2";
const HAM_IP: &str = "10.0.2.3";

/// The bytes of one sector holding `tag`: the tag repeated (tag 0 = zeroes).
fn sector_bytes(tag: u64, out: &mut [u8]) {
    for w in out.chunks_mut(8) {
        w.copy_from_slice(&tag.to_le_bytes());
    }
}

/// Tags of `data`'s sectors; a sector that is not one tag repeated decodes as `u64::MAX`.
fn tags(data: &[u8]) -> Vec<u64> {
    data.chunks(SECTOR as usize)
        .map(|s| {
            let t = u64::from_le_bytes(s[..8].try_into().unwrap_or([0; 8]));
            if s.chunks(8).all(|w| w == t.to_le_bytes()) {
                t
            } else {
                u64::MAX
            }
        })
        .collect()
}

/// A virtual disk: memory, seeded latency, and a switch that fails writes (F21, F22).
struct SimDisk {
    name: &'static str,
    data: Mutex<Vec<u8>>,
    fail_writes: AtomicBool,
    /// Bumped each time `fail_writes` turns on, so an op can tell whether S refused writes at
    /// any time while it ran.
    fail_gen: AtomicU64,
    lat: (u64, u64),
    rng: Mutex<Rng>,
    ops: AtomicU64,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl SimDisk {
    /// S starts or stops refusing writes.
    fn set_failing(&self, on: bool) {
        if on {
            self.fail_gen.fetch_add(1, Ordering::SeqCst);
        }
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    fn new(name: &'static str, seed: u64, bytes: Vec<u8>, lat: (u64, u64)) -> Arc<SimDisk> {
        Arc::new(SimDisk {
            name,
            data: Mutex::new(bytes),
            fail_writes: AtomicBool::new(false),
            fail_gen: AtomicU64::new(0),
            lat,
            rng: Mutex::new(Rng::stream(seed, &format!("colo/disk/{name}"))),
            ops: AtomicU64::new(0),
        })
    }

    fn mem(&self) -> MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn delay(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let ns = {
            let mut r = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            r.range(self.lat.0, self.lat.1)
        };
        tokio::time::sleep(Duration::from_nanos(ns)).await;
    }

    fn tags(&self) -> Vec<u64> {
        tags(&self.mem())
    }

    fn refuse(&self) -> Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{}: injected write failure", self.name),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for SimDisk {
    fn driver(&self) -> &'static str {
        "simdisk"
    }
    fn length(&self) -> Result<u64> {
        Ok(self.mem().len() as u64)
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.length()?, 1, offset, len as u64, Access::Read)?;
        self.delay().await;
        let m = self.mem();
        Ok(Bytes::copy_from_slice(
            &m[offset as usize..offset as usize + len],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_request(self.length()?, 1, offset, data.len() as u64, Access::Write)?;
        self.delay().await;
        self.refuse()?;
        self.mem()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_request(self.length()?, 1, offset, len, Access::Write)?;
        self.delay().await;
        self.refuse()?;
        self.mem()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// The export of S as the primary sees it: counts forwarded writes that land after the
/// secondary's stop (I11, O1).
struct Tap {
    w: Arc<Colo>,
    inner: Device,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

impl Tap {
    fn landed(&self, offset: u64, len: u64) {
        let stopped = self.w.lock().stop_at_ns;
        if let Some(t) = stopped {
            self.w.fail(
                Rule::I11,
                format!("a forwarded write [{offset}, +{len}) landed on S after the secondary's stop at {t} ns"),
            );
        }
    }
}

#[async_trait]
impl BlockDevice for Tap {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }
    fn length(&self) -> Result<u64> {
        self.inner.length()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let n = data.len() as u64;
        self.inner.write(offset, data, flags).await?;
        self.landed(offset, n);
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags).await?;
        self.landed(offset, len);
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sec {
    /// Replicating (or not yet started).
    Running,
    /// COLO stopped after an error: S no longer mirrors P (W7).
    Unusable,
    /// Failover commit running.
    Promoting,
    /// Failover completed: the SVM runs on S.
    Promoted,
    /// The commit failed (R31 step 5).
    FailoverFailed,
    /// Crashed.
    Lost,
}

#[derive(Default)]
struct Guest {
    inflight: u64,
    ops: u64,
    stop: bool,
}

struct St {
    p_model: Vec<u64>,
    view: Vec<u64>,
    snapshots: Vec<Vec<u64>>,
    epoch: u64,
    primary_alive: bool,
    primary_paused: bool,
    sec: Sec,
    pvm: Guest,
    svm: Guest,
    paused: bool,
    stop_at_ns: Option<u64>,
    /// Completed PVM and SVM ops and fault marks, for the report (not traced).
    spans: Vec<OpSpan>,
    marks: Vec<FaultMark>,
    jobs_completed: u64,
    /// Set by the secondary host once built.
    overlays: Option<(Layer, Layer)>,
    nodes: BTreeMap<&'static str, madsim::task::NodeId>,
    last_status: BTreeMap<&'static str, Value>,
}

/// One COLO run.
pub(crate) struct Colo {
    p: Params,
    cp: ColoParams,
    sc: Scenario,
    pdisk: Arc<SimDisk>,
    sdisk: Arc<SimDisk>,
    st: Mutex<St>,
    /// The trace, the first violation and the counters.
    log: RunLog,
    start: tokio::time::Instant,
    changed: tokio::sync::Notify,
}

impl Colo {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn trace(
        &self,
        node: &str,
        kind: &'static str,
        op: u64,
        (offset, len): (u64, u64),
        result: i64,
        note: String,
    ) {
        let r = Record {
            t_ns: self.now_ns(),
            node: node.to_string(),
            kind,
            op,
            offset,
            len,
            result,
            digest: 0,
            note,
        };
        self.log.record(r);
    }

    fn fail(&self, rule: Rule, message: String) {
        self.trace(
            "oracle",
            "violation",
            0,
            (0, 0),
            1,
            format!("{rule}: {message}"),
        );
        self.log.fail(rule, message);
        self.changed.notify_waiters();
    }

    fn failed(&self) -> bool {
        self.log.failed()
    }

    fn inject(&self, f: Fault, note: &str) {
        let t_ns = self.start.elapsed().as_nanos() as u64;
        self.log.inject(f);
        let mut st = self.lock();
        // COLO faults act on a node or link: the report charges them to the ops in flight.
        st.marks.push(FaultMark {
            t_ns,
            op: 0,
            family: f,
            until_ns: t_ns,
        });
        drop(st);
        self.trace("ham", "fault", 0, (0, 0), 0, format!("{f} {note}"));
    }

    fn path(&self, p: Path) {
        self.log.path(p);
    }

    fn check(&self, rule: Rule) {
        self.log.check(rule);
    }

    /// Waits until `ready` returns a value, re-checking whenever the shared state changes.
    async fn wait_until<T>(&self, ready: impl FnMut(&mut St) -> Option<T>) -> T {
        ballot::waiter::wait_until(&self.st, &self.changed, ready).await
    }

    fn node(&self, name: &str) -> Option<madsim::task::NodeId> {
        self.lock().nodes.get(name).copied()
    }

    fn sectors(&self) -> u64 {
        self.p.disk_size / SECTOR
    }

    /// Compares `got` with `want` over all sectors; the first difference as text.
    fn diff(got: &[u64], want: &[u64]) -> Option<String> {
        got.iter().zip(want).position(|(a, b)| a != b).map(|i| {
            format!(
                "sector {i}: holds tag {:#x}, expected {:#x}",
                got[i], want[i]
            )
        })
    }
}

/// A run of the COLO topology ([`Topology`]): hosts colo-p and colo-s, then ham drives the
/// checkpoints and the failover.
pub(crate) struct ColoRun {
    w: Arc<Colo>,
}

#[async_trait]
impl Topology for ColoRun {
    /// Both disks identical (R1), the model, and the primary and secondary hosts.
    async fn build(p: Params, sc: Scenario, opts: RunOpts) -> Result<ColoRun, RunResult> {
        let Some(cp) = p.colo.clone() else {
            return Err(RunResult::default());
        };
        let start = tokio::time::Instant::now();
        let n = (p.disk_size / SECTOR) as usize;
        let initial: Vec<u64> = (0..n as u64)
            .map(|s| if p.initial_pattern { (1 << 40) | s } else { 0 })
            .collect();
        let mut bytes = vec![0u8; p.disk_size as usize];
        for (i, t) in initial.iter().enumerate() {
            sector_bytes(
                *t,
                &mut bytes[i * SECTOR as usize..(i + 1) * SECTOR as usize],
            );
        }
        // R1: P and S identical before replication starts.
        let lat = (
            p.latency.write_min_ns / 4,
            p.latency.write_min_ns.max(p.latency.read_mean_ns / 4),
        );
        let pdisk = SimDisk::new("P", p.seed, bytes.clone(), lat);
        let sdisk = SimDisk::new("S", p.seed, bytes, lat);
        let w = Arc::new(Colo {
            cp,
            sc,
            pdisk,
            sdisk,
            st: Mutex::new(St {
                p_model: initial.clone(),
                view: initial.clone(),
                snapshots: vec![initial],
                epoch: 0,
                primary_alive: true,
                primary_paused: false,
                sec: Sec::Running,
                pvm: Guest::default(),
                svm: Guest::default(),
                paused: true,
                stop_at_ns: None,
                spans: Vec::new(),
                marks: Vec::new(),
                jobs_completed: 0,
                overlays: None,
                nodes: BTreeMap::new(),
                last_status: BTreeMap::new(),
            }),
            log: RunLog::new(&opts),
            start,
            changed: tokio::sync::Notify::new(),
            p,
        });
        let handle = madsim::runtime::Handle::current();
        for (name, ip) in [("colo-s", S_IP), ("colo-p", P_IP)] {
            let w2 = w.clone();
            let node = handle
                .create_node()
                .name(name)
                .ip(ip.parse().expect("ip"))
                .init(move || {
                    let w = w2.clone();
                    async move {
                        if name == "colo-s" {
                            secondary_main(w).await
                        } else {
                            primary_main(w).await
                        }
                    }
                })
                .build();
            crate::nodes::track_node(node.id());
            w.lock().nodes.insert(name, node.id());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(ColoRun { w })
    }

    /// ham: checkpoints, faults and the failover, until it ends the run.
    async fn drive(&self) {
        let w = &self.w;
        let handle = madsim::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let w2 = w.clone();
        let ham = handle
            .create_node()
            .name("ham")
            .ip(HAM_IP.parse().expect("ip"))
            .init(move || {
                let w = w2.clone();
                let tx = tx.clone();
                async move {
                    ham_main(w).await;
                    if let Some(t) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        let _ = t.send(());
                    }
                }
            })
            .build();
        crate::nodes::track_node(ham.id());
        w.lock().nodes.insert("ham", ham.id());
        let _ = rx.await;
    }

    async fn judge(&self) -> RunResult {
        finish(&self.w).await
    }
}

/// Bytes the secondary's active and hidden disks hold (0 before its graph is built; an
/// error counts as not empty).
async fn layers_allocated(w: &Colo) -> u64 {
    let layers = w.lock().overlays.clone();
    let Some((a, h)) = layers else { return 0 };
    let mut n = 0;
    for l in [a, h] {
        n += l.allocated_bytes().await.unwrap_or(1);
    }
    n
}

async fn serve_qmp(m: Arc<Monitor>) {
    let Ok(l) = tokio::net::TcpListener::bind(("0.0.0.0", QMP_PORT)).await else {
        return;
    };
    loop {
        let Ok((s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(m.clone().serve(s));
    }
}

/// `colo-s`: the graph of REPLICATION.md §2.2 over S, the exports, QMP, and the SVM.
async fn secondary_main(w: Arc<Colo>) {
    let bus = EventBus::new();
    let (host, _) = Host::recording(bus.clone());
    let mut g = Graph::new(host);
    let built = async {
        g.insert_device("parent0", w.sdisk.clone())?;
        // The active and hidden disks: ballot's overlays, or qcow2 images as seed 003 keeps
        // them (on growable in-memory files of the secondary, empty qcow2 images made before
        // the graph, backed by the node below as `backing=` names it).
        let layer_defs: [String; 2] = match &w.cp.layers {
            None => [
                "driver=overlay,node-name=hidden0,backing=parent0".into(),
                "driver=overlay,node-name=active0,backing=hidden0".into(),
            ],
            Some(lp) => {
                for name in ["hidden-file0", "active-file0"] {
                    let file: Device = Arc::new(MemoryDevice::growable(0));
                    let opts = CreateOptions {
                        size: w.p.disk_size,
                        cluster_bits: lp.cluster_bits,
                        version: lp.version,
                        refcount_order: lp.refcount_order,
                        backing: None,
                    };
                    create(&file, &opts).await.map_err(|e| {
                        ballot::error::ConfigError::new(format!("{name}: create: {e}"))
                    })?;
                    g.insert_device(name, file)?;
                }
                [
                    "driver=qcow2,node-name=hidden0,file=hidden-file0,backing=parent0".into(),
                    "driver=qcow2,node-name=active0,file=active-file0,backing=hidden0".into(),
                ]
            }
        };
        for def in layer_defs.iter().map(String::as_str).chain([
            "driver=replication,node-name=childs0,mode=secondary,top-id=colo-disk0,file=active0",
            r#"{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["childs0"]}"#,
        ]) {
            g.blockdev_add_arg(def).await?;
        }
        g.claim("parent0", "export 'fwd'", true)
    }
    .await;
    let port = match built {
        Ok(p) => p,
        Err(e) => return w.fail(Rule::Harness, format!("colo-s graph: {e}")),
    };
    let get = |n: &str| g.get(n).and_then(|x| x.layer());
    let (Some(a), Some(h)) = (get("active0"), get("hidden0")) else {
        return w.fail(Rule::Harness, "colo-s: overlays missing".into());
    };
    let view = g.get("colo-disk0").map(|n| n.dev.clone());
    {
        let mut st = w.lock();
        st.overlays = Some((a, h));
    }
    let nbd = Server::new();
    let tap: Device = Arc::new(Tap {
        w: w.clone(),
        inner: port,
    });
    if let Err(e) = nbd.add_export(Export {
        name: "parent0".into(),
        description: String::new(),
        dev: tap,
        writable: true,
        multi_conn: false,
    }) {
        return w.fail(Rule::Harness, format!("colo-s export: {e}"));
    }
    let m = Monitor::new(g, nbd.clone(), bus);
    m.note_export("fwd", "parent0", "parent0").await;
    let m = Arc::new(m);
    if let Some(view) = &view {
        svm_before_start(&w, view).await;
    }
    tokio::spawn(serve_qmp(m));
    if let Some(view) = view {
        tokio::spawn(guest(w.clone(), false, view));
    }
    let Ok(l) = tokio::net::TcpListener::bind(("0.0.0.0", NBD_PORT)).await else {
        return w.fail(Rule::Harness, "colo-s: cannot listen for NBD".into());
    };
    loop {
        let Ok((s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(nbd.clone().serve(s));
    }
}

/// In some seeds (`workload.svm.early`) the SVM is started too early, before replication (a controller
/// race §2.4 warns about): every one of its requests must fail with EIO in stage NONE (R9),
/// since a write accepted there would be dropped by the start's checkpoint.
async fn svm_before_start(w: &Colo, view: &Device) {
    let mut r = Rng::stream(w.p.seed, "colo/svm-early");
    for i in 0..w.cp.svm_early {
        let off = r.below(w.sectors() - 8) * SECTOR;
        let res = if i % 2 == 0 {
            view.write(off, Bytes::from(vec![0xEEu8; 4096]), WriteFlags::NONE)
                .await
        } else {
            view.read(off, 4096).await.map(|_| ())
        };
        w.trace(
            "svm",
            "early",
            i,
            (off, 4096),
            i64::from(res.is_err()),
            String::new(),
        );
        match res {
            Err(e) if e.kind() == ErrorKind::Io => w.check(Rule::R9),
            other => w.fail(
                Rule::R9,
                format!(
                    "an SVM request before start returned {other:?}, expected EIO (stage NONE)"
                ),
            ),
        }
    }
}

/// `colo-p`: quorum over P (REPLICATION.md §2.1), QMP, and the PVM.
async fn primary_main(w: Arc<Colo>) {
    let bus = EventBus::new();
    let (host, _) = Host::recording(bus.clone());
    let mut g = Graph::new(host);
    let built = async {
        g.insert_device("plocal", w.pdisk.clone())?;
        g.blockdev_add_arg(r#"{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["plocal"]}"#).await
    }
    .await;
    if let Err(e) = built {
        return w.fail(Rule::Harness, format!("colo-p graph: {e}"));
    }
    let view = g.get("colo-disk0").map(|n| n.dev.clone());
    let m = Arc::new(Monitor::new(g, Server::new(), bus));
    if let Some(view) = view {
        tokio::spawn(guest(w.clone(), true, view));
    }
    serve_qmp(m).await;
}

/// One guest read: the primary's must match its model (I1), the secondary's the view O6
/// predicts (I9).
async fn guest_read(w: &Colo, primary: bool, dev: &Device, first: u64, n: u64) -> Result<()> {
    let who = if primary { "pvm" } else { "svm" };
    let (off, len) = (first * SECTOR, n * SECTOR);
    match dev.read(off, len as usize).await {
        Ok(data) => {
            let got = tags(&data);
            let st = w.lock();
            let want = if primary { &st.p_model } else { &st.view };
            let want = &want[first as usize..(first + n) as usize];
            if let Some(d) = Colo::diff(&got, want) {
                let rule = if primary { Rule::I1 } else { Rule::I9 };
                let stage = if primary { "primary" } else { "view" };
                drop(st);
                w.fail(
                    rule,
                    format!("{who} read [{off}, +{len}) of the {stage}: {d}"),
                );
            } else {
                drop(st);
                w.check(if primary { Rule::I1 } else { Rule::I9 });
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// One guest write (`data`) or write-zeroes of sectors `first..` with the op's tags: on
/// success the model takes them; a failed one leaves each sector old or new (I9).
async fn guest_write(
    w: &Colo,
    primary: bool,
    dev: &Device,
    data: bool,
    first: u64,
    new_tags: &[u64],
) -> Result<()> {
    let who = if primary { "pvm" } else { "svm" };
    let n = new_tags.len() as u64;
    let (off, len) = (first * SECTOR, n * SECTOR);
    let r = if data {
        let mut b = BytesMut::zeroed(len as usize);
        for (i, t) in new_tags.iter().enumerate() {
            sector_bytes(*t, &mut b[i * SECTOR as usize..(i + 1) * SECTOR as usize]);
        }
        dev.write(off, b.freeze(), WriteFlags::NONE).await
    } else {
        dev.write_zeroes(off, len, ZeroFlags::default()).await
    };
    let put: Vec<u64> = if data {
        new_tags.to_vec()
    } else {
        vec![0; n as usize]
    };
    match r {
        Ok(()) => {
            let mut st = w.lock();
            let split = !primary && st.sec == Sec::FailoverFailed;
            let m = if primary {
                &mut st.p_model
            } else {
                &mut st.view
            };
            m[first as usize..(first + n) as usize].copy_from_slice(&put);
            if split {
                w.path(Path::P15);
            }
            Ok(())
        }
        Err(e) => {
            // A failed write leaves each sector old or new; adopt what is there.
            if let Ok(data) = dev.read(off, len as usize).await {
                let got = tags(&data);
                let mut st = w.lock();
                let m = if primary {
                    &mut st.p_model
                } else {
                    &mut st.view
                };
                for (i, t) in got.iter().enumerate() {
                    let s = first as usize + i;
                    if *t == put[i] || *t == m[s] {
                        m[s] = *t;
                    } else {
                        let (old, new) = (m[s], put[i]);
                        drop(st);
                        w.fail(Rule::I9, format!("{who}: failed write left sector {s} holding {t:#x}, neither old {old:#x} nor new {new:#x}"));
                        break;
                    }
                }
            }
            Err(e)
        }
    }
}

/// The PVM (`primary`) or SVM workload: one op at a time, paused by ham for checkpoints.
async fn guest(w: Arc<Colo>, primary: bool, dev: Device) {
    let who = if primary { "pvm" } else { "svm" };
    let mut rng = Rng::stream(w.p.seed, &format!("colo/{who}"));
    let sectors = w.sectors();
    let mut op_id = 0u64;
    loop {
        // Wait while paused; count the op in flight before the pause can see it.
        let go = w
            .wait_until(|st| {
                let paused = st.paused;
                let g = if primary { &mut st.pvm } else { &mut st.svm };
                if g.stop {
                    Some(false)
                } else if !paused {
                    g.inflight += 1;
                    Some(true)
                } else {
                    None
                }
            })
            .await;
        if !go {
            return;
        }
        op_id += 1;
        let max = (w.p.size.1 / SECTOR).clamp(1, sectors);
        let min = (w.p.size.0 / SECTOR).clamp(1, max);
        let n = rng.range(min, max);
        let first = rng.below(sectors - n + 1);
        let (off, len) = (first * SECTOR, n * SECTOR);
        let kind = if primary {
            let m = &w.p.mix;
            ["read", "write", "write_zeroes", "flush"]
                [rng.weighted(&[m.read + m.trim, m.write, m.write_zeroes, m.flush])]
        } else if rng.below(100) < w.cp.svm_write_share {
            if rng.chance(0.1) {
                "write_zeroes"
            } else {
                "write"
            }
        } else {
            "read"
        };
        let side = if primary { 1u64 } else { 2 };
        let start_ns = w.start.elapsed().as_nanos() as u64;
        let (failing0, fail_gen0) = (
            w.sdisk.fail_writes.load(Ordering::SeqCst),
            w.sdisk.fail_gen.load(Ordering::SeqCst),
        );
        let new_tags: Vec<u64> = (0..n).map(|i| (side << 56) | (op_id << 24) | i).collect();
        let result: Result<()> = match kind {
            "read" => guest_read(&w, primary, &dev, first, n).await,
            "write" | "write_zeroes" => {
                guest_write(&w, primary, &dev, kind == "write", first, &new_tags).await
            }
            _ => dev.flush().await,
        };
        let code = match &result {
            Ok(()) => 0,
            Err(e) => {
                -(ballot::ErrorKind::ALL
                    .iter()
                    .position(|k| *k == e.kind())
                    .unwrap_or(0) as i64)
                    - 1
            }
        };
        w.trace(
            who,
            if kind == "read" { "read" } else { "write" },
            op_id,
            (off, len),
            code,
            String::new(),
        );
        {
            let end_ns = w.start.elapsed().as_nanos() as u64;
            let mut st = w.lock();
            let outcome = format!("{who}/{kind}/{}", if code == 0 { "ok" } else { "error" });
            w.log.outcome(outcome.clone());
            st.spans.push(OpSpan {
                id: (side << 56) | op_id,
                start_ns,
                end_ns,
                kind: format!("{who}/{kind}"),
                outcome,
            });
            let g = if primary { &mut st.pvm } else { &mut st.svm };
            g.inflight -= 1;
            g.ops += 1;
        }
        w.changed.notify_waiters();
        if let Err(e) = result {
            // PVM writes never fail (t = 1 over a fault-free P); SVM I/O fails only if S
            // refused writes (F21) at some time while the op ran.
            let expected = !primary
                && (failing0
                    || w.sdisk.fail_writes.load(Ordering::SeqCst)
                    || w.sdisk.fail_gen.load(Ordering::SeqCst) != fail_gen0);
            if !expected {
                w.fail(
                    Rule::I1,
                    format!("{who} {kind} [{off}, +{len}) failed: {e}"),
                );
            }
        }
        let think = rng.range(0, 200_000);
        tokio::time::sleep(Duration::from_nanos(think)).await;
    }
}

/// A QMP client over madsim TCP (W6).
struct Qmp {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
    events: Vec<Value>,
}

impl Qmp {
    async fn connect(ip: &str, timeout: Duration) -> Option<Qmp> {
        let fut = async {
            let s = tokio::net::TcpStream::connect((ip, QMP_PORT)).await.ok()?;
            let mut q = Qmp {
                s,
                buf: Vec::new(),
                events: Vec::new(),
            };
            q.next().await?; // greeting
            q.call("qmp_capabilities", json!({})).await?;
            Some(q)
        };
        tokio::time::timeout(timeout, fut).await.ok().flatten()
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            if let Some(Ok(v)) = it.next() {
                let used = it.byte_offset();
                self.buf.drain(..used);
                return Some(v);
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a command; its reply (`{"return": ..}` or `{"error": ..}`), None if the stream
    /// ended.
    async fn call(&mut self, cmd: &str, args: Value) -> Option<Value> {
        let line = json!({"execute": cmd, "arguments": args}).to_string() + "\r\n";
        self.s.write_all(line.as_bytes()).await.ok()?;
        self.s.flush().await.ok()?;
        loop {
            let v = self.next().await?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return Some(v);
        }
    }
}

/// ham's handle on one side: reconnects after a timeout broke the stream.
struct Side {
    ip: &'static str,
    q: Option<Qmp>,
    timeout: Duration,
}

impl Side {
    /// `Some(reply)`, or None when the side did not answer within the heartbeat timeout.
    async fn call(&mut self, cmd: &str, args: Value) -> Option<Value> {
        if self.q.is_none() {
            self.q = Qmp::connect(self.ip, self.timeout).await;
        }
        let q = self.q.as_mut()?;
        match tokio::time::timeout(self.timeout, q.call(cmd, args)).await {
            Ok(Some(v)) => Some(v),
            _ => {
                self.q = None;
                None
            }
        }
    }

    fn take_events(&mut self) -> Vec<Value> {
        self.q
            .as_mut()
            .map(|q| std::mem::take(&mut q.events))
            .unwrap_or_default()
    }
}

fn is_ok(v: &Option<Value>) -> bool {
    v.as_ref().is_some_and(|v| v.get("return").is_some())
}

/// Scripted or random COLO fault aimed at checkpoint `k`: (family, kind).
fn fault_at(w: &Colo, k: u64) -> Option<(Fault, String)> {
    for f in &w.sc.faults {
        if f.when == When::AtCheckpoint(k) {
            let kind = f
                .params
                .get("kind")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            return Some((f.id, kind));
        }
    }
    match &w.cp.event {
        Some((f, at)) if *at == k && w.p.random_faults => {
            let mut r = Rng::stream(w.p.seed, "colo/event-kind");
            let kind = match f {
                Fault::F21 => ["fail", "second", "crash"][r.below(3) as usize],
                Fault::F22 => ["error", "partition"][r.below(2) as usize],
                Fault::F23 => ["lose-primary", "lose-secondary"][r.below(2) as usize],
                _ => "",
            };
            Some((*f, kind.to_string()))
        }
        _ => None,
    }
}

/// Pauses both guests and waits until neither has an op in flight (W7 step 1).
async fn quiesce(w: &Colo) {
    w.lock().paused = true;
    w.changed.notify_waiters();
    w.wait_until(|st| {
        let p_busy = st.primary_alive && !st.primary_paused && st.pvm.inflight > 0;
        let s_busy = st.sec != Sec::Lost && st.svm.inflight > 0;
        (!p_busy && !s_busy).then_some(())
    })
    .await
}

fn resume(w: &Colo) {
    w.lock().paused = false;
    w.changed.notify_waiters();
}

fn kill(w: &Colo, name: &str) {
    if let Some(id) = w.node(name) {
        madsim::runtime::Handle::current().kill(id);
    }
    let mut st = w.lock();
    if name == "colo-p" {
        st.primary_alive = false;
        st.pvm.inflight = 0;
    } else {
        st.sec = Sec::Lost;
        st.svm.inflight = 0;
    }
    drop(st);
    w.trace(name, "crash", 0, (0, 0), 0, String::new());
    w.changed.notify_waiters();
}

fn clog(w: &Colo, a: &str, b: &str, on: bool) {
    let (Some(x), Some(y)) = (w.node(a), w.node(b)) else {
        return;
    };
    let net = madsim::net::NetSim::current();
    if on {
        net.clog_link(x, y);
        net.clog_link(y, x);
    } else {
        net.unclog_link(x, y);
        net.unclog_link(y, x);
    }
}

/// ham (W6–W8): starts replication, runs the checkpoints, then fails over or continues on
/// the survivor and lets it run its ops.
async fn ham_main(w: Arc<Colo>) {
    let hb = Duration::from_nanos(w.cp.heartbeat_timeout_ns);
    let mut p = Side {
        ip: P_IP,
        q: None,
        timeout: hb,
    };
    let mut s = Side {
        ip: S_IP,
        q: None,
        timeout: hb,
    };
    if !start(&w, &mut p, &mut s, hb).await {
        return w.fail(Rule::Harness, "ham: the start sequence failed".into());
    }
    w.trace("ham", "start", 0, (0, 0), 0, String::new());
    resume(&w);
    let (outcome, k) = run_checkpoints(&w, &mut p, &mut s).await;
    w.trace("ham", "end", k, (0, 0), 0, format!("{outcome:?}"));
    match outcome {
        End::PrimaryLost => {
            let usable = w.lock().sec == Sec::Running;
            if usable {
                failover(&w, &mut s, k).await;
            }
        }
        End::SecondaryLost | End::Unusable => {
            if w.lock().primary_alive {
                continue_primary(&w, &mut p).await;
            }
        }
        End::Clean | End::Violation => {}
    }
    // Let the survivor run its ops after failover or continuation.
    resume(&w);
    run_survivors(&w).await;
    quiesce(&w).await;
    final_statuses(&w, &mut p, &mut s).await;
    let jobs = s
        .take_events()
        .iter()
        .filter(|e| e["event"] == "BLOCK_JOB_COMPLETED")
        .count() as u64;
    w.lock().jobs_completed += jobs;
    let mut st = w.lock();
    st.pvm.stop = true;
    st.svm.stop = true;
    drop(st);
    w.changed.notify_waiters();
}

/// The start sequence (REPLICATION.md §2.4): the secondary first, then the primary's hot add.
/// The secondary's monitor may not listen yet: the connection is retried for a while.
async fn start(w: &Colo, p: &mut Side, s: &mut Side, hb: Duration) -> bool {
    for _ in 0..500 {
        if s.q.is_some() {
            break;
        }
        s.q = Qmp::connect(S_IP, hb).await;
        if s.q.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    is_ok(&s.call("xen-set-replication", json!({"enable": true, "primary": false})).await)
        && is_ok(&p.call("blockdev-add", json!({"driver": "replication", "node-name": "replication0", "mode": "primary",
            "file": {"driver": "nbd", "export": "parent0", "request-timeout": (w.cp.request_timeout_ns / 1_000_000_000).max(1),
                     "server": {"type": "inet", "host": S_IP, "port": NBD_PORT.to_string()}}})).await)
        && is_ok(&p.call("x-blockdev-change", json!({"parent": "colo-disk0", "node": "replication0"})).await)
        && is_ok(&p.call("xen-set-replication", json!({"enable": true, "primary": true})).await)
}

/// Checkpoints every interval, with heartbeats between them, until the scenario's count is
/// done, a side is lost or a checkpoint ends replication: how it ended and at which one.
async fn run_checkpoints(w: &Arc<Colo>, p: &mut Side, s: &mut Side) -> (End, u64) {
    let interval = Duration::from_nanos(w.cp.checkpoint_interval_ns);
    let mut k = 0u64;
    loop {
        if w.failed() {
            return (End::Violation, k);
        }
        if let Some(lost) = heartbeats(p, s, interval).await {
            return (lost, k);
        }
        if k >= w.cp.checkpoints {
            return (End::Clean, k);
        }
        k += 1;
        if let Err(e) = checkpoint(w, p, s, k).await {
            return (e, k);
        }
    }
}

/// Heartbeats through one checkpoint interval: the side that stopped answering, if any.
async fn heartbeats(p: &mut Side, s: &mut Side, interval: Duration) -> Option<End> {
    let until = tokio::time::Instant::now() + interval;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
        if p.call("query-xen-replication-status", json!({}))
            .await
            .is_none()
        {
            return Some(End::PrimaryLost);
        }
        if s.call("query-xen-replication-status", json!({}))
            .await
            .is_none()
        {
            return Some(End::SecondaryLost);
        }
    }
    None
}

/// Waits (at most 600 virtual seconds) until each VM still running has done the scenario's
/// `after_ops` more ops.
async fn run_survivors(w: &Colo) {
    let target = w.cp.after_ops;
    let base = {
        let st = w.lock();
        (st.pvm.ops, st.svm.ops)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        if w.failed() || tokio::time::Instant::now() > deadline {
            break;
        }
        let done = {
            let st = w.lock();
            let pvm = !st.primary_alive || st.primary_paused || st.pvm.ops >= base.0 + target;
            let svm = matches!(st.sec, Sec::Lost | Sec::Unusable) || st.svm.ops >= base.1 + target;
            pvm && svm
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The replication status of each side still alive, for the scenario's expectations.
async fn final_statuses(w: &Colo, p: &mut Side, s: &mut Side) {
    for (name, side) in [("colo-p", p), ("colo-s", s)] {
        let alive = {
            let st = w.lock();
            if name == "colo-p" {
                st.primary_alive && !st.primary_paused
            } else {
                st.sec != Sec::Lost
            }
        };
        if alive {
            if let Some(v) = side.call("query-xen-replication-status", json!({})).await {
                w.lock().last_status.insert(name, v["return"].clone());
            }
        }
    }
}

#[derive(Debug)]
enum End {
    Clean,
    PrimaryLost,
    SecondaryLost,
    Unusable,
    Violation,
}

/// One checkpoint (W7), with the COLO fault aimed at it.
async fn checkpoint(
    w: &Arc<Colo>,
    p: &mut Side,
    s: &mut Side,
    k: u64,
) -> std::result::Result<(), End> {
    let fault = fault_at(w, k);
    let f = |id: Fault| fault.as_ref().is_some_and(|(x, _)| *x == id);
    quiesce(w).await;
    w.trace("ham", "pause", k, (0, 0), 0, String::new());
    if f(Fault::F19) {
        // The primary dies while checkpoint k's VM state is in flight.
        w.inject(Fault::F19, &format!("checkpoint {k}"));
        kill(w, "colo-p");
        return Err(End::PrimaryLost);
    }
    let snapshot = w.lock().p_model.clone();
    primary_checkpoint(w, p, s, k).await?;
    if f(Fault::F20) {
        // The VM state arrived; the primary dies before the secondary's checkpoint runs.
        w.inject(Fault::F20, &format!("checkpoint {k}"));
        kill(w, "colo-p");
    }
    let nonempty = layers_allocated(w).await > 0;
    if !is_ok(&s.call("xen-colo-do-checkpoint", json!({})).await) {
        return Err(End::SecondaryLost);
    }
    if nonempty {
        w.path(Path::P13);
    }
    check_checkpoint(w, k, snapshot).await;
    w.trace("ham", "checkpoint", k, (0, 0), 0, String::new());
    if f(Fault::F20) {
        return Err(End::PrimaryLost);
    }
    after_checkpoint(w, k, fault).await
}

/// The primary's half of checkpoint `k`, then both sides' statuses: an error on either
/// stops COLO (W7: the checkpoint does not count; S is unusable until a resync).
async fn primary_checkpoint(
    w: &Colo,
    p: &mut Side,
    s: &mut Side,
    k: u64,
) -> std::result::Result<(), End> {
    if !is_ok(&p.call("xen-colo-do-checkpoint", json!({})).await) {
        return Err(End::PrimaryLost);
    }
    let ps = p.call("query-xen-replication-status", json!({})).await;
    let ss = s.call("query-xen-replication-status", json!({})).await;
    let Some(ps) = ps else {
        return Err(End::PrimaryLost);
    };
    let Some(ss) = ss else {
        return Err(End::SecondaryLost);
    };
    if ps["return"]["error"] != json!(false) || ss["return"]["error"] != json!(false) {
        w.trace(
            "ham",
            "colo-stop",
            k,
            (0, 0),
            0,
            format!("{} / {}", ps["return"], ss["return"]),
        );
        w.lock().sec = Sec::Unusable;
        w.log.outcome("colo/stopped-on-error".to_string());
        return Err(End::Unusable);
    }
    Ok(())
}

/// R53 and I9 after a completed checkpoint: S (and P, if alive) equal the primary model at
/// the pause point and the overlays are empty; the snapshot becomes the new epoch's view.
async fn check_checkpoint(w: &Arc<Colo>, k: u64, snapshot: Vec<u64>) {
    let s_tags = w.sdisk.tags();
    let empty = layers_allocated(w).await == 0;
    let alive = w.lock().primary_alive;
    if let Some(d) = Colo::diff(&s_tags, &snapshot) {
        w.fail(
            Rule::R53,
            format!("after checkpoint {k}, S differs from P at the pause point: {d}"),
        );
    }
    if alive {
        if let Some(d) = Colo::diff(&w.pdisk.tags(), &snapshot) {
            w.fail(
                Rule::R53,
                format!("after checkpoint {k}, P differs from the primary model: {d}"),
            );
        }
    }
    if !empty {
        w.fail(
            Rule::I9,
            format!("after checkpoint {k}, an overlay is not empty"),
        );
    }
    {
        let mut st = w.lock();
        st.epoch = k;
        st.snapshots.push(snapshot.clone());
        st.view = snapshot;
    }
    w.check(Rule::R53);
}

/// The faults aimed just after checkpoint `k` (F21-F24), then the VMs resume.
async fn after_checkpoint(
    w: &Arc<Colo>,
    k: u64,
    fault: Option<(Fault, String)>,
) -> std::result::Result<(), End> {
    let (family, kind) = fault.unzip();
    let kind = kind.unwrap_or_default();
    match family {
        Some(Fault::F21) => {
            w.inject(Fault::F21, &kind);
            kill(w, "colo-p");
            resume(w);
            return Err(End::PrimaryLost);
        }
        Some(Fault::F22) => {
            w.inject(Fault::F22, &kind);
            resume(w);
            let hold = Duration::from_nanos(w.cp.request_timeout_ns * 2 + 100_000_000);
            if kind == "partition" {
                clog(w, "colo-p", "colo-s", true);
                tokio::time::sleep(hold).await;
                clog(w, "colo-p", "colo-s", false);
            } else {
                w.sdisk.set_failing(true);
                tokio::time::sleep(Duration::from_millis(50)).await;
                w.sdisk.set_failing(false);
            }
            return Ok(());
        }
        Some(Fault::F23) => {
            w.inject(Fault::F23, &kind);
            resume(w);
            let other = if kind == "lose-secondary" {
                "colo-s"
            } else {
                "colo-p"
            };
            clog(w, "ham", other, true);
            return Ok(());
        }
        Some(Fault::F24) => {
            w.inject(Fault::F24, &format!("checkpoint {k}"));
            if let Some(id) = w.node("colo-p") {
                madsim::runtime::Handle::current().pause(id);
            }
            w.lock().primary_paused = true;
            resume(w);
            return Err(End::PrimaryLost);
        }
        _ => {}
    }
    resume(w);
    Ok(())
}

/// Promotes the secondary (W8): fence, stop with failover, wait for the commit, check I10.
async fn failover(w: &Arc<Colo>, s: &mut Side, k: u64) {
    let fault = fault_at(w, k);
    let f21 = fault
        .as_ref()
        .filter(|(f, _)| *f == Fault::F21)
        .map(|(_, kind)| kind.clone());
    if !is_ok(
        &s.call("block-export-del", json!({"id": "fwd", "mode": "hard"}))
            .await,
    ) {
        return w.fail(Rule::Harness, "ham: block-export-del fwd failed".into());
    }
    if f21.as_deref() == Some("fail") {
        w.sdisk.set_failing(true);
    }
    w.lock().sec = Sec::Promoting;
    let r = s
        .call(
            "xen-set-replication",
            json!({"enable": false, "primary": false, "failover": true}),
        )
        .await;
    w.lock().stop_at_ns = Some(w.now_ns());
    if !is_ok(&r) {
        return w.fail(Rule::I10, format!("failover refused: {r:?}"));
    }
    w.trace("ham", "failover", k, (0, 0), 0, String::new());
    match f21.as_deref() {
        Some("second") => {
            let r = s
                .call(
                    "xen-set-replication",
                    json!({"enable": false, "primary": false, "failover": true}),
                )
                .await;
            if !is_ok(&r) {
                w.fail(
                    Rule::R30,
                    format!("a second failover request during the commit: {r:?}"),
                );
            }
        }
        Some("crash") => {
            kill(w, "colo-s");
            return;
        }
        _ => {}
    }
    // Wait for the commit to end (O2's stage).
    let stage = loop {
        let v = s.call("query-xen-replication-status", json!({})).await;
        let st = v
            .as_ref()
            .and_then(|v| v["return"]["stage"].as_str().map(String::from))
            .unwrap_or_default();
        if st != "failover" {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if f21.as_deref() == Some("fail") {
        if stage != "failover-failed" {
            // The commit had nothing to write into S, so nothing failed.
            w.trace("ham", "commit-had-nothing", k, (0, 0), 0, stage.clone());
        }
        w.lock().sec = if stage == "failover-failed" {
            Sec::FailoverFailed
        } else {
            Sec::Promoted
        };
        // The SVM keeps writing (R13 split) while S still fails, then S recovers.
        tokio::time::sleep(Duration::from_millis(20)).await;
        w.sdisk.set_failing(false);
        return;
    }
    if stage != "done" {
        return w.fail(Rule::I10, format!("failover ended in stage '{stage}'"));
    }
    w.path(Path::P14);
    w.lock().sec = Sec::Promoted;
    quiesce(w).await;
    let (view, epoch) = {
        let st = w.lock();
        (st.view.clone(), st.epoch)
    };
    match Colo::diff(&w.sdisk.tags(), &view) {
        Some(d) => w.fail(
            Rule::I10,
            format!("after failover S is not checkpoint {epoch} plus the SVM's writes: {d}"),
        ),
        None => w.check(Rule::I10),
    }
    if fault.as_ref().is_some_and(|(f, _)| *f == Fault::F24) {
        // The stale primary resumes, still forwarding: nothing may land on S (I11).
        if let Some(id) = w.node("colo-p") {
            madsim::runtime::Handle::current().resume(id);
        }
        w.lock().primary_paused = false;
    }
    resume(w);
}

/// The secondary is lost or unusable: the primary continues alone (W8, §2.4).
async fn continue_primary(w: &Arc<Colo>, p: &mut Side) {
    let r1 = p
        .call(
            "x-blockdev-change",
            json!({"parent": "colo-disk0", "child": "children.1"}),
        )
        .await;
    let r2 = p
        .call("blockdev-del", json!({"node-name": "replication0"}))
        .await;
    w.trace(
        "ham",
        "primary-alone",
        0,
        (0, 0),
        0,
        format!("{r1:?} {r2:?}"),
    );
    if !is_ok(&r1) || !is_ok(&r2) {
        // With the link to the primary cut (F23), ham cannot reach it: not a driver fault.
        if w.lock().primary_alive && r1.is_some() {
            w.fail(
                Rule::Harness,
                format!("primary continuation refused: {r1:?} {r2:?}"),
            );
        }
    }
    let mut st = w.lock();
    if st.sec == Sec::Running {
        st.sec = Sec::Unusable;
    }
    st.svm.stop = true;
}

async fn finish(w: &Arc<Colo>) -> RunResult {
    // Final contents (I10 again after the survivor's ops, and the primary model).
    let (sec, alive, paused) = {
        let st = w.lock();
        (st.sec, st.primary_alive, st.primary_paused)
    };
    if sec == Sec::Promoted && !w.failed() {
        let view = w.lock().view.clone();
        if let Some(d) = Colo::diff(&w.sdisk.tags(), &view) {
            w.fail(
                Rule::I10,
                format!("at the end S differs from the view: {d}"),
            );
        }
    }
    if alive && !paused && !w.failed() {
        let pm = w.lock().p_model.clone();
        if let Some(d) = Colo::diff(&w.pdisk.tags(), &pm) {
            w.fail(
                Rule::I1,
                format!("at the end P differs from the primary model: {d}"),
            );
        }
    }
    check_expectations(w);
    let st = w.lock();
    RunResult {
        ops: st.pvm.ops + st.svm.ops,
        child_ops: w.pdisk.ops.load(Ordering::Relaxed) + w.sdisk.ops.load(Ordering::Relaxed),
        virtual_s: w.start.elapsed().as_secs_f64(),
        latency: latency_histograms(&st.spans),
        fault_outcomes: fault_outcomes(&st.spans, &st.marks),
        ..w.log.result()
    }
}

fn check_expectations(w: &Colo) {
    for e in &w.sc.expects {
        let st = w.lock();
        let problem = match e {
            Expect::Replication { node, error, stage } => {
                let got = st.last_status.get(node.as_str()).cloned();
                match got {
                    None => Some(format!("{node}: no final status (host not reachable)")),
                    Some(v) => {
                        let err_ok = v["error"] == json!(*error);
                        let stage_ok = stage.as_ref().is_none_or(|s| v["stage"] == json!(s));
                        (!err_ok || !stage_ok).then(|| {
                            format!("{node}: status {v}, expected error={error} stage={stage:?}")
                        })
                    }
                }
            }
            Expect::ColoContents {
                node,
                range,
                equals,
            } => {
                let disk = if node == "colo-s" { &w.sdisk } else { &w.pdisk };
                let got = disk.tags();
                let want = if equals == "primary" {
                    st.p_model.clone()
                } else {
                    // checkpoint:K+svm is the view the oracle kept: snapshot K with the SVM's
                    // writes since; K must be the last completed checkpoint.
                    let k = equals
                        .strip_prefix("checkpoint:")
                        .and_then(|x| x.strip_suffix("+svm"))
                        .unwrap_or("last");
                    match k.parse::<u64>() {
                        Ok(k) if k != st.epoch => {
                            drop(st);
                            w.fail(
                                Rule::C5,
                                format!(
                                    "{equals}: the last completed checkpoint is {}",
                                    w.lock().epoch
                                ),
                            );
                            continue;
                        }
                        _ => st.view.clone(),
                    }
                };
                let (a, b) = ((range.0 / SECTOR) as usize, (range.1 / SECTOR) as usize);
                Colo::diff(&got[a..b.min(got.len())], &want[a..b.min(want.len())])
                    .map(|d| format!("{node} {equals}: {d}"))
            }
            Expect::Injected { fault, min } => {
                let n = w.log.counts().injected.get(fault).copied().unwrap_or(0);
                (n < *min).then(|| format!("{fault} injected {n} times, expected at least {min}"))
            }
            Expect::Path { path, min } => {
                let n = w.log.counts().paths.get(path).copied().unwrap_or(0);
                (n < *min).then(|| format!("{path} reached {n} times, expected at least {min}"))
            }
            _ => None,
        };
        drop(st);
        if let Some(m) = problem {
            w.fail(Rule::C5, m);
        }
    }
}
