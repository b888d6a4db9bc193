//! The quorum-over-NBD topology (SIMULATION.md §3.1 `r0`..`r{N-1}`, §3.3, F12–F18): replica
//! hosts that serve their virtual disk with ballot's NBD server over madsim TCP, the `nbd`
//! children of the quorum on `qhost` (ballot's NBD client, unchanged), and the network and
//! replica-process faults.
//!
//! Two wrappers connect the driver to the oracle. [`Seen`] sits between the quorum and each
//! NBD client and logs every child request with the answer the quorum got — a timeout or a
//! lost connection included — since the vote is computed from those answers, not from what
//! the disk did. [`Landing`] sits between each server connection and the disk and notices
//! writes that arrive on a connection its client has already given up (NBD.md N43, F14): such
//! a write may be older than what the disk holds.
//!
//! The budget ledger (B1) treats a replica as failing on every sector while it is cut off,
//! paused, crashed, or still has a stale connection that may deliver old writes; a write the
//! quorum saw fail leaves that replica's copies stale. Node-level faults are checked against
//! the worst sector (B3). Because timeouts also come from slow disks and latency, damage can
//! arise without an injection; the oracle then re-derives which acknowledged writes are still
//! guaranteed from the copies the disks really hold (O5).

use crate::ids::{Fault, Rule};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use ballot::nbd::client::{Address, ClientOptions, NbdClient};
use ballot::nbd::server::{Export, Server};
use ballot::{BlockDevice, BlockStatus, Device, Result, WriteFlags, ZeroFlags};
use bytes::Bytes;

pub use crate::netmodel::{replica_ip, Cut, LiveCut, Replica, NBD_PORT};
use crate::params::NbdParams;
use crate::rng::Rng;
use crate::sector::{data_digest, SECTOR_U64};
use crate::vdisk::{current_op, ChildKind, ChildOp, ChildResult, Mark, VDisk};
use crate::world::World;

/// qhost crashed: every connection its clients had is stale from now on (N43: their queued
/// writes may still land).
pub(crate) fn fence_all(w: &World) {
    let n = {
        let mut net = w.net_lock();
        for r in net.iter_mut() {
            r.current = None;
        }
        net.len()
    };
    for i in 0..n {
        refresh_down(w, i);
    }
}

/// Recomputes whether replica `i` counts as failing everywhere (B1).
pub(crate) fn refresh_down(w: &World, i: usize) {
    let down = w.net_lock()[i].down();
    w.disks.set_down(i, down);
}

/// The child device the quorum sees for replica `i`: the NBD client, with every request and
/// its answer logged against the guest op (the oracle's view of the vote).
pub(crate) struct Seen {
    /// Weak: the quorum that owns this child is in the world (an Arc would keep every run's
    /// world alive after it ended).
    w: Weak<World>,
    i: usize,
    dev: Arc<NbdClient>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seen r{} {:?}", self.i, self.dev)
    }
}

impl Seen {
    /// Logs the answer; returns the fault that has the replica down now, if one does.
    fn log(
        &self,
        kind: ChildKind,
        offset: u64,
        len: u64,
        data: u64,
        result: ChildResult,
    ) -> Option<Fault> {
        // The report's fault × outcome: an answer from (or a timeout on) a replica that a
        // partition, pause or crash has down now is that fault's, for the op it served.
        let w = self.w.upgrade()?;
        let down = w.net_lock()[self.i].down_family();
        if let Some(family) = down {
            w.disks.charge(family);
        }
        w.disks.log_seen(
            current_op(),
            ChildOp {
                disk: self.i,
                kind,
                offset,
                len,
                data,
                result,
            },
        );
        down
    }

    fn wrote(&self, kind: ChildKind, offset: u64, len: u64, data: u64, r: &Result<()>) {
        let down = self.log(kind, offset, len, data, ChildResult::of(r));
        let Some(w) = self.w.upgrade() else { return };
        if r.is_err() {
            // B1: the copy missed this write (and may receive it late, F14); later reads of
            // it are charged to the fault that has the replica down, if one does.
            let sectors = offset / SECTOR_U64..(offset + len).div_ceil(SECTOR_U64);
            w.disks.mark_missed(self.i, sectors.clone());
            if let Some(family) = down {
                w.disks.damage(self.i, sectors, family);
            }
        }
    }
}

#[async_trait]
impl BlockDevice for Seen {
    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn length(&self) -> Result<u64> {
        self.dev.length()
    }

    fn request_alignment(&self) -> u32 {
        self.dev.request_alignment()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let r = self.dev.read(offset, len).await;
        let res = match &r {
            Ok(b) => ChildResult::Ok(data_digest(b)),
            Err(e) => ChildResult::Err(e.kind()),
        };
        self.log(ChildKind::Read, offset, len as u64, 0, res);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let dg = data_digest(&data);
        let len = data.len() as u64;
        let r = self.dev.write(offset, data, flags).await;
        self.wrote(ChildKind::Write, offset, len, dg, &r);
        r
    }

    async fn flush(&self) -> Result<()> {
        let r = self.dev.flush().await;
        self.log(ChildKind::Flush, 0, 0, 0, ChildResult::of(&r));
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let r = self.dev.write_zeroes(offset, len, flags).await;
        self.wrote(ChildKind::Zero, offset, len, 0, &r);
        r
    }

    fn can_fast_zero(&self) -> bool {
        self.dev.can_fast_zero()
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.dev.discard(offset, len).await;
        self.log(ChildKind::Discard, offset, len, 0, ChildResult::of(&r));
        r
    }

    fn discard_zeroes(&self) -> bool {
        self.dev.discard_zeroes()
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let r = self.dev.block_status(offset, len).await;
        let res = match &r {
            Ok(st) => ChildResult::Ok((u64::from(st.zero) << 63) | st.length),
            Err(e) => ChildResult::Err(e.kind()),
        };
        self.log(ChildKind::Status, offset, len, 0, res);
        r
    }
}

/// The disk as one server connection sees it: writes that arrive after the connection went
/// stale are late deliveries (F14).
pub(crate) struct Landing {
    /// Weak, as [`Seen::w`]: the server's tasks may outlive the run.
    w: Weak<World>,
    i: usize,
    inc: u64,
    conn: u64,
    disk: Arc<VDisk>,
}

impl std::fmt::Debug for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "landing r{} conn {}", self.i, self.conn)
    }
}

impl Landing {
    fn landed(&self, offset: u64, len: u64) {
        let Some(w) = self.w.upgrade() else { return };
        let stale = w.net_lock()[self.i].stale(self.inc, self.conn);
        if !stale {
            return;
        }
        let range = offset / SECTOR_U64..(offset + len).div_ceil(SECTOR_U64);
        w.disks.late_landing(self.i, range.clone());
        let sectors: Vec<u64> = range.collect();
        w.reassess(&sectors);
    }
}

#[async_trait]
impl BlockDevice for Landing {
    fn driver(&self) -> &'static str {
        "vdisk"
    }

    fn length(&self) -> Result<u64> {
        self.disk.length()
    }

    fn request_alignment(&self) -> u32 {
        self.disk.request_alignment()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.disk.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        let r = self.disk.write(offset, data, flags).await;
        self.landed(offset, len);
        r
    }

    async fn flush(&self) -> Result<()> {
        self.disk.flush().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let r = self.disk.write_zeroes(offset, len, flags).await;
        self.landed(offset, len);
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.disk.discard(offset, len).await;
        if self.disk.discard_zeroes() {
            self.landed(offset, len);
        }
        r
    }

    fn discard_zeroes(&self) -> bool {
        self.disk.discard_zeroes()
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.disk.block_status(offset, len).await
    }
}

/// Marks a server connection closed when its task ends (or is dropped by a crash).
struct Open {
    w: Weak<World>,
    i: usize,
    inc: u64,
    conn: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        let Some(w) = self.w.upgrade() else { return };
        {
            let mut net = w.net_lock();
            if net[self.i].incarnation == self.inc {
                net[self.i].open.remove(&self.conn);
            }
        }
        refresh_down(&w, self.i);
    }
}

/// Replica `i`'s process: an NBD server exporting its virtual disk writable under the empty
/// name, one [`Server`] per connection so that each connection's writes are told apart.
pub(crate) async fn replica_main(w: Arc<World>, i: usize) {
    let inc = w.net_lock()[i].incarnation;
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", NBD_PORT)).await {
        Ok(l) => l,
        Err(e) => {
            w.fail(
                Rule::Harness,
                format!("r{i}: cannot listen on port {NBD_PORT}: {e}"),
            );
            return;
        }
    };
    w.disks.trace(&format!("r{i}"), "listen", 0, 0, 0, 0);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let conn = {
            let mut net = w.net_lock();
            let r = &mut net[i];
            let c = r.accepted;
            r.accepted += 1;
            r.current = Some(c);
            r.open.insert(c);
            c
        };
        refresh_down(&w, i);
        let server = Server::new();
        if w.p.nbd.as_ref().is_some_and(|n| n.tls) {
            let set = sim_tls(ballot::tls::Endpoint::Server).and_then(|c| server.set_tls(Some(c)));
            if let Err(e) = set {
                w.fail(Rule::Harness, format!("r{i}: {e}"));
                return;
            }
        }
        let dev: Device = Arc::new(Landing {
            w: Arc::downgrade(&w),
            i,
            inc,
            conn,
            disk: w.disks.device(i),
        });
        let added = server.add_export(Export {
            name: String::new(),
            description: format!("replica r{i}"),
            dev,
            writable: true,
            multi_conn: false,
        });
        if let Err(e) = added {
            w.fail(Rule::Harness, format!("r{i}: {e}"));
            return;
        }
        let guard = Open {
            w: Arc::downgrade(&w),
            i,
            inc,
            conn,
        };
        if w.p.nbd.as_ref().is_some_and(|n| n.tls) {
            w.note_tls_server(server.clone());
        }
        tokio::spawn(async move {
            server.serve(stream).await;
            drop(guard);
        });
    }
}

/// The name on the simulated replicas' certificate (K11).
pub const TLS_HOSTNAME: &str = "replica.sim";

/// The simulator's TLS credentials for `endpoint`, built afresh for each use so that no
/// session state passes from one run (or connection) to the next (K11). The PEM files are in
/// `sim/data/tls/` (made by its `make.sh`): Ed25519, valid 2020–2100, as the simulated clock
/// starts in 2022.
///
/// # Errors
/// A PEM file of the checkout does not parse (a broken checkout).
pub fn sim_tls(
    endpoint: ballot::tls::Endpoint,
) -> std::result::Result<Arc<ballot::tls::TlsCreds>, String> {
    use ballot::tls::{Endpoint, PemSet, TlsCreds};
    const CA: &[u8] = include_bytes!("../data/tls/ca-cert.pem");
    let pem = match endpoint {
        Endpoint::Server => PemSet {
            ca: Some(CA),
            cert: Some(include_bytes!("../data/tls/server-cert.pem")),
            key: Some(include_bytes!("../data/tls/server-key.pem")),
        },
        Endpoint::Client => PemSet {
            ca: Some(CA),
            cert: Some(include_bytes!("../data/tls/client-cert.pem")),
            key: Some(include_bytes!("../data/tls/client-key.pem")),
        },
    };
    TlsCreds::from_pem("sim-tls", endpoint, true, pem)
        .map(Arc::new)
        .map_err(|e| format!("sim/data/tls: {e}"))
}

/// Opens the `nbd` client of replica `i` (N44: retried until `open-timeout`).
pub async fn open_child(p: &NbdParams, i: usize) -> Result<NbdClient> {
    let server = Address::Inet {
        host: replica_ip(i).to_string(),
        port: NBD_PORT,
    };
    let tls = if p.tls {
        let inval = |e: String| ballot::error::Error::whole(ballot::error::ErrorKind::Inval, e);
        let creds = sim_tls(ballot::tls::Endpoint::Client).map_err(inval)?;
        Some(
            ballot::nbd::client::ClientTls::new(creds, Some(TLS_HOSTNAME), &server)
                .map_err(inval)?,
        )
    } else {
        None
    };
    NbdClient::open(ClientOptions {
        server,
        export: String::new(),
        reconnect_delay: Duration::from_nanos(p.reconnect_delay_ns),
        open_timeout: Duration::from_nanos(p.open_timeout_ns),
        request_timeout: Duration::from_nanos(p.request_timeout_ns),
        tls,
    })
    .await
}

/// Wraps an opened client for the quorum.
pub(crate) fn seen(w: &Arc<World>, i: usize, dev: Arc<NbdClient>) -> Device {
    Arc::new(Seen {
        w: Arc::downgrade(w),
        i,
        dev,
    })
}

fn clog(w: &World, i: usize, cut: Cut, on: bool) {
    let net = madsim::net::NetSim::current();
    let (Some(q), Some(r)) = (w.qhost_node(), w.net_lock()[i].node) else {
        return;
    };
    match (cut, on) {
        (Cut::Both, true) => {
            net.clog_link(q, r);
            net.clog_link(r, q);
        }
        (Cut::Both, false) => {
            net.unclog_link(q, r);
            net.unclog_link(r, q);
        }
        (Cut::In, true) => net.clog_link(q, r),
        (Cut::In, false) => net.unclog_link(q, r),
        (Cut::Out, true) => net.clog_link(r, q),
        (Cut::Out, false) => net.unclog_link(r, q),
        (Cut::Isolate, true) => net.clog_node(r),
        (Cut::Isolate, false) => net.unclog_node(r),
    }
}

/// Starts a partition of replica `i` (F13, or one step of F15); `checked` applies B3.
pub(crate) fn partition(w: &World, i: usize, cut: Cut, family: Fault, checked: bool) -> bool {
    if w.net_lock()[i].cut.is_some() {
        return false;
    }
    if checked && !w.disks.allow_node(family, i, Mark::Failing) {
        return false;
    }
    let mark = w.disks.count_lasting(family, 0);
    w.net_lock()[i].cut = Some(LiveCut {
        kind: cut,
        family,
        mark,
    });
    refresh_down(w, i);
    clog(w, i, cut, true);
    w.disks.trace_full(
        &format!("r{i}"),
        "cut",
        0,
        0,
        0,
        0,
        0,
        format!("{family} {cut:?}"),
    );
    true
}

/// Heals replica `i`'s partition.
pub(crate) fn heal(w: &World, i: usize) {
    let Some(cut) = w.net_lock()[i].cut.take() else {
        return;
    };
    w.disks.ended(cut.mark);
    clog(w, i, cut.kind, false);
    refresh_down(w, i);
    w.disks.trace(&format!("r{i}"), "heal", 0, 0, 0, 0);
}

/// Pauses replica `i` for `ns` (F17).
pub(crate) fn pause(w: &Arc<World>, i: usize, ns: u64, checked: bool) -> bool {
    let node = {
        let r = &w.net_lock()[i];
        match r.node {
            Some(node) if !r.paused && !r.crashed => node,
            _ => return false,
        }
    };
    if checked && !w.disks.allow_node(Fault::F17, i, Mark::Failing) {
        return false;
    }
    w.net_lock()[i].paused = true;
    refresh_down(w, i);
    madsim::runtime::Handle::current().pause(node);
    w.disks.count_lasting(Fault::F17, ns);
    w.disks.trace_full(
        &format!("r{i}"),
        "pause",
        0,
        0,
        0,
        0,
        0,
        crate::units::fmt_time(ns),
    );
    let w = w.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_nanos(ns)).await;
        resume(&w, i);
    });
    true
}

/// Ends replica `i`'s pause.
pub(crate) fn resume(w: &World, i: usize) {
    let node = {
        let mut net = w.net_lock();
        if !net[i].paused {
            return;
        }
        net[i].paused = false;
        net[i].node
    };
    if let Some(node) = node {
        madsim::runtime::Handle::current().resume(node);
    }
    refresh_down(w, i);
    w.disks.trace(&format!("r{i}"), "resume", 0, 0, 0, 0);
}

/// Crashes replica `i` (F16): its process and connections die, its disk's unflushed writes
/// are resolved by F8/F9, and the oracle re-derives what is still guaranteed.
pub(crate) fn crash(w: &World, i: usize, checked: bool) -> bool {
    let node = {
        let r = &w.net_lock()[i];
        if r.crashed || r.paused {
            return false;
        }
        r.node
    };
    let Some(node) = node else { return false };
    if checked && !w.disks.allow_node(Fault::F16, i, Mark::Failing) {
        return false;
    }
    // I18: what the quorum's record calls in sync and flushed on r{i} must survive this.
    crate::healcheck::check_durable(w, Some(i), &format!("as replica r{i} crashes"));
    madsim::runtime::Handle::current().kill(node);
    {
        let mut net = w.net_lock();
        let r = &mut net[i];
        r.crashed = true;
        r.open.clear();
    }
    refresh_down(w, i);
    let (report, touched) = w.disks.crash_disks(&[i], &[]);
    w.disks.record_crash(&format!("r{i}"), &report);
    w.reassess(&touched);
    true
}

/// Restarts crashed replica `i`, empty when `reformat` (F18) and B3 allow it.
pub(crate) fn restart(w: &World, i: usize, reformat: bool, checked: bool) {
    let node = {
        let mut net = w.net_lock();
        let r = &mut net[i];
        if !r.crashed {
            return;
        }
        r.crashed = false;
        r.incarnation += 1;
        r.accepted = 0;
        r.current = None;
        r.open.clear();
        r.node
    };
    if reformat && (!checked || w.disks.allow_node(Fault::F18, i, Mark::Wrong)) {
        let changed = w.disks.reformat(i, Fault::F18);
        w.reassess(&changed);
        w.disks.trace_full(
            &format!("r{i}"),
            "reformat",
            0,
            0,
            changed.len() as u64,
            0,
            0,
            Fault::F18.to_string(),
        );
    }
    refresh_down(w, i);
    if let Some(node) = node {
        madsim::runtime::Handle::current().restart(node);
    }
    w.disks.trace(&format!("r{i}"), "restart", 0, 0, 0, 0);
}

/// The random network and replica faults of the safety phase, one decision per replica every
/// 100 ms of virtual time (F13, F15, F16, F17, F18).
pub(crate) async fn random_faults(w: Arc<World>, p: NbdParams) {
    const TICK: Duration = Duration::from_millis(100);
    let n = w.p.children;
    let mut rng = Rng::stream(w.p.seed, "faults/net");
    let crash_rate = if w.p.family_on(Fault::F16) {
        w.p.crash_rate
    } else {
        0.0
    };
    let tick_s = TICK.as_secs_f64();
    let mut crashes = 0u64;
    while w.in_safety() {
        tokio::time::sleep(TICK).await;
        if !w.in_safety() {
            break;
        }
        for i in 0..n {
            let (cut, crashed) = {
                let r = &w.net_lock()[i];
                (r.cut.is_some(), r.crashed)
            };
            if cut {
                if rng.chance(p.partition.1) {
                    heal(&w, i);
                }
            } else if p.partition.0 > 0.0 && rng.chance(p.partition.0) {
                let cut = [Cut::Both, Cut::In, Cut::Out, Cut::Isolate][rng.below(4) as usize];
                partition(&w, i, cut, Fault::F13, true);
            }
            if p.pause_rate > 0.0 && rng.chance(p.pause_rate * tick_s) {
                let ns = rng.range(p.pause_ns.0, p.pause_ns.1.max(p.pause_ns.0));
                pause(&w, i, ns, true);
            }
            if !crashed
                && crash_rate > 0.0
                && crashes < REPLICA_CRASHES_MAX
                && rng.chance(crash_rate * tick_s)
                && crash(&w, i, true)
            {
                crashes += 1;
                let (a, b) = w.p.restart_ns;
                let after = rng.range(a, b.max(a));
                let reformat = rng.chance(p.reformat);
                let w2 = w.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_nanos(after)).await;
                    restart(&w2, i, reformat, true);
                });
            }
        }
        if p.swizzle_rate > 0.0 && rng.chance(p.swizzle_rate * tick_s) {
            let window = rng.range(p.swizzle_ns.0, p.swizzle_ns.1.max(p.swizzle_ns.0));
            let picked: Vec<usize> = (0..n).filter(|_| rng.chance(0.5)).collect();
            let seed = rng.next_u64();
            tokio::spawn(swizzle(w.clone(), picked, window, seed, true));
        }
    }
}

/// Replica crashes per run (each restart re-opens a disk, and slow seeds run long).
const REPLICA_CRASHES_MAX: u64 = 12;

/// F15: the picked replicas are clogged one by one at staggered times in the first half of
/// the window and unclogged in another random order in the second half.
pub(crate) async fn swizzle(
    w: Arc<World>,
    picked: Vec<usize>,
    window_ns: u64,
    seed: u64,
    checked: bool,
) {
    let mut rng = Rng::stream(seed, "swizzle");
    let half = window_ns / 2;
    let mut on: Vec<(u64, usize)> = picked
        .iter()
        .map(|&i| (rng.below(half.max(1)), i))
        .collect();
    on.sort_unstable();
    let mut off: Vec<(u64, usize)> = picked
        .iter()
        .map(|&i| (half + rng.below(half.max(1)), i))
        .collect();
    off.sort_unstable();
    let start = tokio::time::Instant::now();
    let mut mine = Vec::new();
    for (at, i) in on {
        tokio::time::sleep_until(start + Duration::from_nanos(at)).await;
        if w.in_safety() && partition(&w, i, Cut::Isolate, Fault::F15, checked) {
            mine.push(i);
        }
    }
    for (at, i) in off {
        tokio::time::sleep_until(start + Duration::from_nanos(at)).await;
        if mine.contains(&i) {
            heal(&w, i);
        }
    }
}

/// S6 for the network: every partition healed, every pause ended, every crashed replica
/// restarted, latency at its minimum; then waits until no stale connection can deliver an
/// old write any more (bounded by `limit`).
pub(crate) async fn quiesce(w: &Arc<World>, limit: Duration) -> bool {
    let n = w.p.children;
    for i in 0..n {
        heal(w, i);
        resume(w, i);
        restart(w, i, false, false);
    }
    if let Some(p) = &w.p.nbd {
        let lo = Duration::from_nanos(p.latency_ns.0);
        madsim::net::NetSim::current().update_config(|c| {
            c.send_latency = lo..lo + Duration::from_micros(1);
        });
    }
    let until = tokio::time::Instant::now() + limit;
    loop {
        let stale: usize = w.net_lock().iter().map(|r| r.stale_open()).sum();
        // Every client of the live qhost reconnected (with reconnect-delay 0 requests fail
        // at once until then, N42).
        let down = match (w.qhost_node(), w.clients()) {
            (Some(q), clients) if !clients.is_empty() => {
                // Polled on qhost: a reconnect it starts must dial from qhost's address.
                let node = madsim::runtime::Handle::current().get_node(q);
                match node {
                    Some(node) => node
                        .spawn(async move { clients.iter().filter(|c| !c.is_connected()).count() })
                        .await
                        .unwrap_or(1),
                    None => 1,
                }
            }
            _ => 0,
        };
        if stale == 0 && down == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
