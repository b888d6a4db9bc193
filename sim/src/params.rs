//! Run parameters: every one a function of the seed unless pinned (SIMULATION.md S1–S4).
//!
//! Each parameter draws from its own stream (`config/<key>`), so pinning one — by a scenario
//! file or `--set key=value` — leaves every other parameter of that seed unchanged (W3, S3).
//! [`Params::to_toml`] prints the whole set as a scenario that reproduces the run (S4).

use crate::ids::Fault;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use toml::Value as Tv;

use crate::rng::Rng;
use crate::units::{fmt_size, fmt_time, parse_range, parse_size, parse_time_ns};

/// Whether the fault budget is enforced (B2) or only kept for stale copies (B6, B7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// B2 enforced for every fault.
    Safety,
    /// B2 skipped for faults that fail or produce distinct wrong values.
    Beyond,
}

impl Budget {
    /// The scenario-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Safety => "safety",
            Budget::Beyond => "beyond",
        }
    }
}

/// Per-family random fault rates of a run; `None` is a disabled family (S2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultRates {
    /// F1: probability per read of marking a sector sticky-flipped.
    pub f1: Option<f64>,
    /// F2: probability per read of one transient flip.
    pub f2: Option<f64>,
    /// F3: probability per write of storing one sector corrupted.
    pub f3: Option<f64>,
    /// F4: probability per read of marking a latent sector error.
    pub f4: Option<f64>,
    /// F5: probability per write of failing it with EIO.
    pub f5: Option<f64>,
    /// F6: probability per write of misdirecting it.
    pub f6: Option<f64>,
    /// F7: probability per read of misdirecting it.
    pub f7: Option<f64>,
    /// F8: probability that a pending write survives a crash (None: all survive).
    pub f8: Option<f64>,
    /// F9: probability that a surviving pending write tears on a crash.
    pub f9: Option<f64>,
}

/// Latency of one disk (V4, F10), in nanoseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// Minimum read latency.
    pub read_min_ns: u64,
    /// Mean read latency (>= minimum).
    pub read_mean_ns: u64,
    /// Minimum write latency.
    pub write_min_ns: u64,
    /// Mean write latency.
    pub write_mean_ns: u64,
    /// F10: probability per op of a stall.
    pub stall_p: f64,
    /// F10: stall length range.
    pub stall_ns: (u64, u64),
    /// F10: slowdown factor of this disk (1: normal, 10..100: gray).
    pub factor: u64,
}

impl Latency {
    /// The liveness phase's latency: minimums only, no stalls (S6).
    pub fn minimal(&self) -> Latency {
        Latency {
            read_mean_ns: self.read_min_ns,
            write_mean_ns: self.write_min_ns,
            stall_p: 0.0,
            factor: 1,
            ..self.clone()
        }
    }
}

/// Fault families this simulator injects for the quorum topology with local children.
pub const FAMILIES: [Fault; 12] = [
    Fault::F1,
    Fault::F2,
    Fault::F3,
    Fault::F4,
    Fault::F5,
    Fault::F6,
    Fault::F7,
    Fault::F8,
    Fault::F9,
    Fault::F10,
    Fault::F11,
    Fault::F16,
];

/// Fault families the quorum-over-NBD topology adds (SIMULATION.md §4: network and replica
/// processes).
pub const NBD_FAMILIES: [Fault; 6] = [
    Fault::F12,
    Fault::F13,
    Fault::F14,
    Fault::F15,
    Fault::F17,
    Fault::F18,
];

/// Healing faults (HEALING.md H26): F26, F27 and F30 in both quorum topologies; F25
/// (a resync target's partition, crash or reformat) with NBD children.
pub const HEAL_FAMILIES: [Fault; 4] = [Fault::F25, Fault::F26, Fault::F27, Fault::F30];

/// Crash-safety faults (HEALING.md H26): F28 (a power cut of the quorum host with a metadata
/// node) and F29 (the metadata disk's own faults), in both quorum topologies; either gives the
/// quorum a metadata node.
pub const CRASH_FAMILIES: [Fault; 2] = [Fault::F28, Fault::F29];

/// Every family the quorum topologies inject: the local ones, the NBD ones, the healing ones.
pub fn all_families() -> Vec<Fault> {
    FAMILIES
        .iter()
        .chain(NBD_FAMILIES.iter())
        .chain(HEAL_FAMILIES.iter())
        .chain(CRASH_FAMILIES.iter())
        .copied()
        .collect()
}

/// The healing side of a quorum run (HEALING.md H26, H16): the faults that aim at a resync
/// in progress, and the jobs an operator starts over QMP during the safety phase.
#[derive(Debug, Clone, PartialEq)]
pub struct HealParams {
    /// F25: probability that a resync job's target is cut off, crashed or reformatted
    /// mid-copy, once per job.
    pub f25: f64,
    /// F26: per resync run, probability that a voter's copy flips or fails before it is read.
    pub f26: f64,
    /// F27: per resync run, probability that a guest write aims at the run being copied.
    pub f27: f64,
    /// F30: the guest op after which the last child is hot-swapped for an empty disk.
    pub f30_at: Option<u64>,
    /// An operator drives jobs over QMP during the safety phase (with `resync=manual` it
    /// starts the resync; every `verify_every` it verifies a range).
    pub operator: bool,
    /// Virtual ns between QMP `x-quorum-verify` jobs over a random range (0: none).
    pub verify_every_ns: u64,
    /// Probability that a QMP job is paused and resumed once.
    pub pause: f64,
    /// H19: the quorum has a metadata node (on a disk of its own on the quorum host).
    pub metadata: bool,
    /// F29: per metadata-disk request, probability that it fails (a write may land partly).
    pub f29: f64,
    /// H21's `intent-cold`, seconds.
    pub intent_cold_s: u64,
    /// F28: probability that a power cut of the quorum host falls during a clean shutdown
    /// (H23) rather than at a random instant of the workload.
    pub shutdown: f64,
}

/// The NBD side of a run (`topology.transport = "nbd"`): client timers (NBD.md N42–N46) and
/// the network and replica faults (F12–F18).
#[derive(Debug, Clone, PartialEq)]
pub struct NbdParams {
    /// `request-timeout`, ns (0: off).
    pub request_timeout_ns: u64,
    /// `reconnect-delay`, ns.
    pub reconnect_delay_ns: u64,
    /// `open-timeout`, ns.
    pub open_timeout_ns: u64,
    /// F12: one-way latency range, ns (uniform per message).
    pub latency_ns: (u64, u64),
    /// F13: per 100 ms tick, probability that a replica's partition starts, and that it heals.
    pub partition: (f64, f64),
    /// F15: swizzle clogs per virtual second, and the window range, ns.
    pub swizzle_rate: f64,
    /// F15 window.
    pub swizzle_ns: (u64, u64),
    /// F17: pauses per replica per virtual second, and their length range, ns.
    pub pause_rate: f64,
    /// F17 length.
    pub pause_ns: (u64, u64),
    /// F18: fraction of replica restarts that come back empty.
    pub reformat: f64,
    /// `network.tls`: every replica requires TLS with client certificates, and every nbd
    /// child starts it (docs/tls.md K11), so partitions and reconnects go through handshakes.
    pub tls: bool,
}

/// Fault families of the COLO topology (SIMULATION.md §4).
pub const COLO_FAMILIES: [Fault; 6] = [
    Fault::F19,
    Fault::F20,
    Fault::F21,
    Fault::F22,
    Fault::F23,
    Fault::F24,
];

/// The COLO side of a run (`topology.kind = "colo"`): hosts colo-p, colo-s and ham.
#[derive(Debug, Clone, PartialEq)]
pub struct ColoParams {
    /// Time between checkpoints, ns (W7).
    pub checkpoint_interval_ns: u64,
    /// ham's heartbeat timeout, ns (W8).
    pub heartbeat_timeout_ns: u64,
    /// Percent of the SVM's ops that are writes.
    pub svm_write_share: u64,
    /// The forward's nbd `request-timeout`, ns (W11: partitions become errors).
    pub request_timeout_ns: u64,
    /// One-way network latency range, ns.
    pub latency_ns: (u64, u64),
    /// Checkpoints ham runs before the run ends (when nothing fails over first).
    pub checkpoints: u64,
    /// The random COLO fault of a swarm seed: family and the checkpoint it aims at.
    pub event: Option<(Fault, u64)>,
    /// Guest ops the survivor runs after a failover or a lost secondary.
    pub after_ops: u64,
    /// SVM requests issued before replication starts (each must fail with EIO, R9).
    pub svm_early: u64,
    /// The secondary's active and hidden disks as qcow2 images with these parameters
    /// (`topology.layers = "qcow2"`, issue 19 item 5); None: ballot's overlays.
    pub layers: Option<ChildImageParams>,
}

/// Operation mix weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    /// Reads.
    pub read: u64,
    /// Writes.
    pub write: u64,
    /// Write-zeroes.
    pub write_zeroes: u64,
    /// Trims.
    pub trim: u64,
    /// Flushes.
    pub flush: u64,
}

/// Every parameter of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// The seed.
    pub seed: u64,
    /// Budget mode (B2 / B6).
    pub budget: Budget,
    /// Children N.
    pub children: usize,
    /// vote-threshold t.
    pub threshold: usize,
    /// fifo (true) or quorum read pattern.
    pub fifo: bool,
    /// rewrite-corrupted.
    pub rewrite: bool,
    /// The quorum's `resync=auto` (HEALING.md H14); `manual` leaves healing to the liveness
    /// phase's jobs.
    pub resync_auto: bool,
    /// blkverify (pinned only: it needs N = 2, t = 2 and the quorum pattern, Q9-Q11).
    pub blkverify: bool,
    /// The quorum's discard=unmap.
    pub discard_unmap: bool,
    /// Whether the vdisks' discard zeroes (Q45).
    pub discard_zeroes: bool,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Initial image: write 0's pattern (true) or zeros.
    pub initial_pattern: bool,
    /// Guest ops in the safety phase.
    pub ops: u64,
    /// Op mix.
    pub mix: Mix,
    /// Op size range in bytes (log-uniform between).
    pub size: (u64, u64),
    /// Queue depth.
    pub queue_depth: usize,
    /// Byte region random ops fall in.
    pub region: (u64, u64),
    /// Fraction of ops aimed at a hot spot (1/16 of the region).
    pub hot: f64,
    /// Probability that a write carries FUA.
    pub fua: f64,
    /// Random faults on.
    pub random_faults: bool,
    /// Families the swarm enabled.
    pub families: Vec<Fault>,
    /// Rates of the vdisk families.
    pub rates: FaultRates,
    /// F16: crashes per virtual second.
    pub crash_rate: f64,
    /// F16: restart delay range, ns.
    pub restart_ns: (u64, u64),
    /// Base latency of every disk.
    pub latency: Latency,
    /// F10: the gray disk and its factor.
    pub gray: Option<(usize, u64)>,
    /// Liveness phase on.
    pub liveness: bool,
    /// Liveness deadline per op, ns (I14).
    pub deadline_ns: u64,
    /// Virtual-time limit of the safety phase, ns (W5).
    pub time_limit_ns: u64,
    /// Children are NBD replicas on their own hosts (None: local vdisks).
    pub nbd: Option<NbdParams>,
    /// The COLO topology (None: quorum).
    pub colo: Option<ColoParams>,
    /// Healing faults and QMP jobs (quorum topologies).
    pub heal: HealParams,
    /// A qcow2 image on a byte-exact disk instead of a quorum (issue 19; None: quorum).
    pub image: Option<ImageParams>,
    /// Local quorum children over qcow2 images of their own (`topology.child_image`,
    /// `sim/src/childimage.rs`; None: raw children).
    pub child_image: Option<ChildImageParams>,
}

/// Which topology a run is: COLO, quorum over NBD, the image topology, or a local quorum
/// with or without child images.
struct Kind {
    colo_on: bool,
    nbd_on: bool,
    image: Option<ImageParams>,
    child_image: Option<ChildImageParams>,
}

impl Kind {
    /// Draws the kind (`topology.kind`, `transport`, `image`, `child_image`) and the image
    /// parameters it needs.
    fn draw(p: &Pins, pins: &BTreeMap<String, Tv>) -> Result<Kind, String> {
        let kind = p.choice("topology.kind", &["quorum", "colo"], &[4, 1])?;
        let colo_on = kind == "colo";
        let transport = if colo_on {
            "local"
        } else {
            p.choice("topology.transport", &["local", "nbd"], &[3, 1])?
        };
        let nbd_on = transport == "nbd";
        // A pin only a quorum has (its children, vote, healing...) rules the image topology out:
        // a scenario or grid point that configures a quorum tests one. The draw stays, so
        // every other run derives as before.
        let image_on = !colo_on
            && !nbd_on
            && p.boolean("topology.image", 0.15)?
            && !pins.keys().any(|k| quorum_only(k));
        let image = if image_on {
            Some(image_params(p)?)
        } else {
            None
        };
        let child_image_on =
            !colo_on && !nbd_on && !image_on && p.boolean("topology.child_image", 0.15)?;
        let child_image = if child_image_on {
            Some(child_image_params(p)?)
        } else {
            None
        };
        Ok(Kind {
            colo_on,
            nbd_on,
            image,
            child_image,
        })
    }
}

/// The quorum's shape: children, vote, read pattern, repairs, resync, discards and disk.
struct Shape {
    children: usize,
    threshold: usize,
    fifo: bool,
    rewrite: bool,
    resync_auto: bool,
    blkverify: bool,
    discard_unmap: bool,
    discard_zeroes: bool,
    disk_size: u64,
    initial_pattern: bool,
}

impl Shape {
    /// Draws the shape (`topology.*`), checking the vote threshold, blkverify's needs
    /// (Q9-Q11) and the disk size.
    fn draw(p: &Pins) -> Result<Shape, String> {
        let children = p.int("topology.children", 1, 7, |r| {
            1 + r.weighted(&[1, 2, 4, 2, 2, 1, 1]) as u64
        })? as usize;
        let threshold = p.int("topology.vote_threshold", 1, children as u64, |r| {
            let n = children as u64;
            if r.chance(0.65) {
                r.range(n / 2 + 1, n)
            } else {
                r.range(1, n)
            }
        })? as usize;
        if threshold > children {
            return Err(format!(
                "key 'topology.vote_threshold': {threshold} exceeds topology.children = {children}"
            ));
        }
        let fifo = p.choice("topology.read_pattern", &["quorum", "fifo"], &[4, 1])? == "fifo";
        let rewrite = p.boolean("topology.rewrite_corrupted", 0.5)?;
        let resync_auto = p.choice("topology.resync", &["auto", "manual"], &[3, 1])? == "auto";
        let blkverify = p.boolean("topology.blkverify", 0.0)?;
        if blkverify && (children != 2 || threshold != 2 || fifo || rewrite) {
            return Err("key 'topology.blkverify': needs children = 2, vote_threshold = 2, read_pattern = \"quorum\" and rewrite_corrupted = false (docs/quorum.md Q9-Q11)".into());
        }
        let discard_unmap = p.boolean("topology.discard_unmap", 0.5)?;
        let discard_zeroes = p.boolean("topology.discard_zeroes", 0.7)?;
        let disk_size = p.size("topology.disk_size", |r| {
            [1u64, 2, 4, 8, 16, 32, 64][r.weighted(&[3, 3, 3, 2, 1, 1, 1])] << 20
        })?;
        if disk_size < 64 * 1024 || disk_size % 4096 != 0 || disk_size > 1 << 30 {
            return Err(format!(
                "key 'topology.disk_size': {disk_size} must be a multiple of 4k between 64k and 1G"
            ));
        }
        let initial_pattern =
            p.choice("topology.initial", &["pattern", "zero"], &[7, 3])? == "pattern";
        Ok(Shape {
            children,
            threshold,
            fifo,
            rewrite,
            resync_auto,
            blkverify,
            discard_unmap,
            discard_zeroes,
            disk_size,
            initial_pattern,
        })
    }
}

/// The guest workload: how many ops, their mix, sizes, queue depth, region, hot share and FUA.
struct Work {
    ops: u64,
    mix: Mix,
    size: (u64, u64),
    queue_depth: usize,
    region: (u64, u64),
    hot: f64,
    fua: f64,
}

impl Work {
    /// Draws the workload (`workload.*`) for a disk of `disk_size` bytes.
    fn draw(p: &Pins, disk_size: u64) -> Result<Work, String> {
        let ops = p.int("workload.ops", 0, 10_000_000, |r| r.range(2000, 3000))?;
        let mix = Mix {
            read: p.int("workload.mix.read", 0, 1000, |r| r.range(30, 60))?,
            write: p.int("workload.mix.write", 0, 1000, |r| r.range(20, 50))?,
            write_zeroes: p.int("workload.mix.write_zeroes", 0, 1000, |r| r.range(0, 10))?,
            trim: p.int("workload.mix.trim", 0, 1000, |r| r.range(0, 10))?,
            flush: p.int("workload.mix.flush", 0, 1000, |r| r.range(1, 10))?,
        };
        if mix.read + mix.write + mix.write_zeroes + mix.trim + mix.flush == 0 && ops > 0 {
            return Err("key 'workload.mix': every weight is 0".into());
        }
        let size = p.pair("workload.size", parse_size, |r| {
            (
                512,
                [4096u64, 16384, 65536, 262_144, 1 << 20][r.weighted(&[2, 3, 3, 2, 1])],
            )
        })?;
        if size.0 == 0 || size.0 % 512 != 0 || size.1 % 512 != 0 || size.1 > disk_size {
            return Err(format!(
                "key 'workload.size': {}..{} must be whole sectors, at least 512 and at most the disk size",
                size.0, size.1
            ));
        }
        let queue_depth = p.int("workload.queue_depth", 1, 64, |r| {
            [1u64, 2, 4, 8, 16, 32][r.weighted(&[2, 2, 3, 3, 2, 1])]
        })? as usize;
        let region = match p.get("workload.region") {
            Some(Tv::String(s)) => {
                parse_range(s).map_err(|e| format!("key 'workload.region': {e}"))?
            }
            Some(other) => {
                return Err(format!(
                    "key 'workload.region': expected a range string, got {}",
                    other.type_str()
                ))
            }
            None => (0, disk_size),
        };
        if region.1 > disk_size || region.1 - region.0 < size.1 {
            return Err(format!(
                "key 'workload.region': {}..{} must lie inside the disk and hold the largest op",
                region.0, region.1
            ));
        }
        let hot = p.float("workload.hot", 0.0, 1.0, |r| {
            if r.chance(0.5) {
                r.uniform(0.0, 0.9)
            } else {
                0.0
            }
        })?;
        let fua = p.float("workload.fua", 0.0, 1.0, |r| r.uniform(0.0, 0.2))?;
        Ok(Work {
            ops,
            mix,
            size,
            queue_depth,
            region,
            hot,
            fua,
        })
    }
}

/// The image topology's parameters (`image.*`).
fn image_params(p: &Pins) -> Result<ImageParams, String> {
    Ok(ImageParams {
        cluster_bits: p.int("image.cluster_bits", 9, 21, draw_cluster_bits)? as u32,
        version: p.int(
            "image.version",
            2,
            3,
            |r| if r.chance(0.25) { 2 } else { 3 },
        )? as u32,
        refcount_order: p.int("image.refcount_order", 0, 6, draw_refcount_order)? as u32,
        backing: p.boolean("image.backing", 0.5)?,
        concurrency: p.int("image.concurrency", 1, 64, |r| r.range(1, 9))?,
        f5: p.float("image.F5", 0.0, 1.0, |r| r.uniform(0.0, 0.05))?,
        f16: p.float("image.F16", 0.0, 1.0, |r| r.uniform(0.05, 0.3))?,
        f8: p.float("image.F8", 0.0, 1.0, |r| r.uniform(0.0, 0.5))?,
        f9: p.float("image.F9", 0.0, 1.0, |r| r.uniform(0.0, 1.0))?,
    })
}

/// The child images' parameters (`child_image.*`).
fn child_image_params(p: &Pins) -> Result<ChildImageParams, String> {
    Ok(ChildImageParams {
        cluster_bits: p.int("child_image.cluster_bits", 9, 21, draw_cluster_bits)? as u32,
        version: p.int("child_image.version", 2, 3, |r| {
            if r.chance(0.25) {
                2
            } else {
                3
            }
        })? as u32,
        refcount_order: p.int("child_image.refcount_order", 0, 6, draw_refcount_order)? as u32,
    })
}

/// The disks' fault rates (F1-F9: drawn whether or not the family is on, so enabling one
/// keeps the others), the crash rate (F16, F28) and the restart delay range.
fn fault_rates(
    p: &Pins,
    families: &[Fault],
    on: &dyn Fn(Fault) -> bool,
) -> Result<(FaultRates, f64, (u64, u64)), String> {
    let rate = |key: Fault, hi: f64| -> Result<f64, String> {
        p.float(&format!("faults.rates.{key}"), 0.0, 1.0, |r| {
            r.uniform(0.0, hi)
        })
    };
    // Rates are drawn whether or not the family is on, so enabling one keeps the others.
    let r1 = rate(Fault::F1, 0.10)?;
    let r2 = rate(Fault::F2, 0.05)?;
    let r3 = rate(Fault::F3, 0.10)?;
    let r4 = rate(Fault::F4, 0.05)?;
    let r5 = rate(Fault::F5, 0.10)?;
    let r6 = rate(Fault::F6, 0.01)?;
    let r7 = rate(Fault::F7, 0.01)?;
    let r8 = p.float("faults.rates.F8", 0.0, 1.0, |r| r.uniform(0.0, 0.5))?;
    let r9 = p.float("faults.rates.F9", 0.0, 1.0, |r| r.uniform(0.8, 1.0))?;
    let rates = FaultRates {
        f1: on(Fault::F1).then_some(r1),
        f2: on(Fault::F2).then_some(r2),
        f3: on(Fault::F3).then_some(r3),
        f4: on(Fault::F4).then_some(r4),
        f5: on(Fault::F5).then_some(r5),
        f6: on(Fault::F6).then_some(r6),
        f7: on(Fault::F7).then_some(r7),
        f8: families.contains(&Fault::F8).then_some(r8),
        f9: families.contains(&Fault::F9).then_some(r9),
    };
    let crash = p.float("faults.crash_rate", 0.0, 10.0, |r| r.uniform(0.005, 0.05))?;
    // F28 is a power cut of the quorum host: it needs the crashes F16 makes.
    let crash_rate = if on(Fault::F16) || on(Fault::F28) {
        crash
    } else {
        0.0
    };
    let restart_ns = p.pair("faults.restart", parse_time_ns, |r| {
        let hi = r.range(0, 10_000) * 1_000_000;
        (0, hi)
    })?;
    Ok((rates, crash_rate, restart_ns))
}

/// The disks' latencies (`disk.*`; F10 makes them slow and stalling) and the gray disk and
/// its slowdown.
fn disk_latency(
    p: &Pins,
    children: usize,
    nbd_on: bool,
    slow: bool,
) -> Result<(Latency, usize, u64), String> {
    let read_min = p.time("disk.read_min", |r| r.range(10, 200) * 1000)?;
    let read_mean = p.time("disk.read_mean", |r| read_min + r.range(100, 2000) * 1000)?;
    let write_min = p.time("disk.write_min", |r| r.range(20, 500) * 1000)?;
    let write_mean = p.time("disk.write_mean", |r| write_min + r.range(200, 5000) * 1000)?;
    let stall_p = p.float("disk.stall", 0.0, 1.0, |r| r.uniform(0.0, 0.01))?;
    let stall_ns = p.pair("disk.stall_time", parse_time_ns, |_| {
        (1_000_000_000, 5_000_000_000)
    })?;
    let gray_disk = p.int("disk.gray", 0, children as u64 - 1, |r| {
        r.below(children as u64)
    })? as usize;
    // Over NBD a disk slower than request-timeout makes every request to it time out and
    // be re-sent for ever (N42): a gray replica stays within a few times its peers.
    let gray_factor = p.int("disk.gray_factor", 1, 1000, |r| {
        if nbd_on {
            r.range(2, 10)
        } else {
            r.range(10, 100)
        }
    })?;
    // F10's own keys mean nothing while F10 is off: a pin would be silently ignored.
    if !slow {
        let f10 = [
            "disk.gray",
            "disk.gray_factor",
            "disk.slow_read_mean",
            "disk.slow_write_mean",
        ];
        if let Some(k) = f10.iter().find(|k| p.pinned(k)) {
            return Err(format!(
                "key '{k}': the gray and slow disks are F10's, which this run does not inject \
                 (list F10 in faults.families with faults.random = true, or script an F10 fault)"
            ));
        }
    }
    let slow_read = p.time("disk.slow_read_mean", |r| r.range(1, 100) * 1_000_000)?;
    let slow_write = p.time("disk.slow_write_mean", |r| {
        r.range(1, if nbd_on { 200 } else { 1000 }) * 1_000_000
    })?;
    let latency = Latency {
        read_min_ns: read_min,
        read_mean_ns: if slow {
            read_mean.max(slow_read)
        } else {
            read_mean.max(read_min)
        },
        write_min_ns: write_min,
        write_mean_ns: if slow {
            write_mean.max(slow_write)
        } else {
            write_mean.max(write_min)
        },
        stall_p: if slow { stall_p } else { 0.0 },
        stall_ns,
        factor: 1,
    };
    Ok((latency, gray_disk, gray_factor))
}

/// The NBD transport's parameters: the clients' timeouts (N46), the network's latency (F12)
/// and TLS, and the network faults' rates (F13, F15, F17, F18).
fn nbd_params(p: &Pins, on: &dyn Fn(Fault) -> bool) -> Result<NbdParams, String> {
    // N46: request-timeout from {0} and [0.5 s, 10 s]; F14 needs one (a request given
    // up by its client) and a reconnect-delay (the re-send).
    let f14 = on(Fault::F14);
    let request_timeout_ns = p.time("nbd_client.request_timeout", |r| {
        if !f14 && r.chance(0.2) {
            0
        } else {
            r.range(500, 10_000) * 1_000_000
        }
    })?;
    let reconnect_delay_ns = p.time("nbd_client.reconnect_delay", |r| {
        if !f14 && r.chance(0.4) {
            0
        } else {
            r.range(500, 10_000) * 1_000_000
        }
    })?;
    let open_timeout_ns = p.time("nbd_client.open_timeout", |r| {
        if r.chance(0.3) {
            0
        } else {
            r.range(1_000, 30_000) * 1_000_000
        }
    })?;
    let latency_ns = p.pair("network.latency", parse_time_ns, |r| {
        if on(Fault::F12) {
            let min = r.range(0, 30_000) * 1000;
            let mean = min + r.range(1_000, 100_000) * 1000;
            (min, 2 * mean - min)
        } else {
            (50_000, 500_000)
        }
    })?;
    let partition = (
        p.float("faults.partition_start", 0.0, 1.0, |r| r.uniform(0.0, 0.03))?,
        p.float("faults.partition_heal", 0.0, 1.0, |r| r.uniform(0.01, 0.1))?,
    );
    let swizzle_rate = p.float("faults.swizzle_rate", 0.0, 10.0, |r| r.uniform(0.01, 0.1))?;
    let swizzle_ns = p.pair("faults.swizzle_window", parse_time_ns, |_| {
        (1_000_000_000, 10_000_000_000)
    })?;
    let pause_rate = p.float("faults.pause_rate", 0.0, 10.0, |r| r.uniform(0.0, 0.05))?;
    let pause_ns = p.pair("faults.pause", parse_time_ns, |_| {
        (100_000_000, 30_000_000_000)
    })?;
    let reformat = p.float("faults.reformat", 0.0, 1.0, |_| 0.3)?;
    let tls = p.boolean("network.tls", 0.5)?;
    Ok(NbdParams {
        tls,
        request_timeout_ns,
        reconnect_delay_ns,
        open_timeout_ns,
        latency_ns,
        partition: if on(Fault::F13) {
            partition
        } else {
            (0.0, 0.0)
        },
        swizzle_rate: if on(Fault::F15) { swizzle_rate } else { 0.0 },
        swizzle_ns,
        pause_rate: if on(Fault::F17) { pause_rate } else { 0.0 },
        pause_ns,
        reformat: if on(Fault::F18) { reformat } else { 0.0 },
    })
}

/// COLO's parameters: checkpoints, heartbeats, the secondary's workload, the forwarding
/// link and the random COLO fault (F19-F24) with the checkpoint it hits.
fn colo_params(p: &Pins, families: &[Fault], random_faults: bool) -> Result<ColoParams, String> {
    let checkpoints = p.int("topology.checkpoints", 1, 100_000, |r| r.range(3, 10))?;
    let event = {
        let mut r = p.rng("faults.colo_event");
        let fams: Vec<Fault> = families
            .iter()
            .filter(|f| COLO_FAMILIES.contains(f))
            .copied()
            .collect();
        let pick = r.below(fams.len().max(1) as u64) as usize;
        let at = r.range(1, checkpoints);
        (random_faults && !fams.is_empty() && r.chance(0.85)).then(|| (fams[pick], at))
    };
    Ok(ColoParams {
        checkpoint_interval_ns: p.time("topology.checkpoint_interval", |r| {
            r.range(50, 400) * 1_000_000
        })?,
        heartbeat_timeout_ns: p.time("topology.heartbeat_timeout", |r| {
            r.range(300, 2000) * 1_000_000
        })?,
        svm_write_share: p.int("workload.svm.write_share", 0, 100, |r| r.range(10, 60))?,
        request_timeout_ns: p.time("nbd_client.request_timeout", |r| {
            r.range(500, 3000) * 1_000_000
        })?,
        latency_ns: p.pair("network.latency", parse_time_ns, |r| {
            let min = r.range(10, 200) * 1000;
            (min, min + r.range(10, 2000) * 1000)
        })?,
        checkpoints,
        event,
        after_ops: p.int("workload.after_ops", 0, 10_000_000, |r| r.range(50, 300))?,
        svm_early: p.int("workload.svm.early", 0, 100, |r| {
            if r.chance(0.33) {
                r.range(1, 4)
            } else {
                0
            }
        })?,
        layers: if p.choice("topology.layers", &["overlay", "qcow2"], &[1, 1])? == "qcow2" {
            Some(ChildImageParams {
                cluster_bits: p.int("layers.cluster_bits", 9, 21, |r| {
                    [12, 16, 16][r.below(3) as usize]
                })? as u32,
                version: 3,
                refcount_order: p.int("layers.refcount_order", 0, 6, draw_refcount_order)? as u32,
            })
        } else {
            None
        },
    })
}

/// The healing harness's parameters (HEALING.md: F25-F30, the operator, verify, the
/// metadata node).
fn heal_params(
    p: &Pins,
    families: &[Fault],
    on: &dyn Fn(Fault) -> bool,
    ops: u64,
    colo_on: bool,
) -> Result<HealParams, String> {
    let f25 = p.float("healing.F25", 0.0, 1.0, |r| r.uniform(0.3, 1.0))?;
    let f26 = p.float("healing.F26", 0.0, 1.0, |r| r.uniform(0.0, 0.2))?;
    let f27 = p.float("healing.F27", 0.0, 1.0, |r| r.uniform(0.0, 0.3))?;
    let f30_at = p.int("healing.F30_at", 0, 10_000_000, |r| r.below(ops.max(1)))?;
    let verify_every_ns = p.time("healing.verify_every", |r| {
        if r.chance(0.5) {
            0
        } else {
            r.range(200, 3000) * 1_000_000
        }
    })?;
    let pause = p.float("healing.pause", 0.0, 1.0, |r| r.uniform(0.0, 0.3))?;
    let operator = p.boolean("healing.operator", 0.75)?;
    // Listed families count even without random faults: a scripted power cut (F16
    // at an op) with F28 listed has a metadata node.
    let listed = |f: Fault| families.contains(&f);
    let metadata = p.boolean(
        "healing.metadata",
        if listed(Fault::F28) || listed(Fault::F29) {
            1.0
        } else {
            0.0
        },
    )?;
    let f29 = p.float("healing.F29", 0.0, 1.0, |r| r.uniform(0.0, 0.05))?;
    let intent_cold_s = p.int("healing.intent_cold", 0, 3600, |r| r.below(3))?;
    let shutdown = p.float("healing.shutdown", 0.0, 1.0, |r| r.uniform(0.25, 1.0))?;
    Ok(HealParams {
        metadata: metadata && !colo_on,
        f29: if listed(Fault::F29) { f29 } else { 0.0 },
        intent_cold_s,
        shutdown: if listed(Fault::F28) { shutdown } else { 0.0 },
        f25: if on(Fault::F25) { f25 } else { 0.0 },
        f26: if on(Fault::F26) { f26 } else { 0.0 },
        f27: if on(Fault::F27) { f27 } else { 0.0 },
        f30_at: on(Fault::F30).then_some(f30_at),
        operator: operator && !colo_on,
        verify_every_ns,
        pause,
    })
}

/// Whether pin `key` configures something only a quorum has (children, vote, read pattern,
/// repairs, resync, discards, child images, healing, the child disks' faults and NBD).
pub fn quorum_only(key: &str) -> bool {
    const KEYS: &[&str] = &[
        "topology.children",
        "topology.vote_threshold",
        "topology.read_pattern",
        "topology.rewrite_corrupted",
        "topology.resync",
        "topology.blkverify",
        "topology.discard_unmap",
        "topology.discard_zeroes",
        "topology.child_image",
    ];
    KEYS.contains(&key)
        || [
            "healing.",
            "child_image.",
            "disk.",
            "nbd_client.",
            "network.",
        ]
        .iter()
        .any(|p| key.starts_with(p))
}

/// A qcow2 image's refcount width (log2): QEMU's 16 bits half the time, any other the rest.
fn draw_refcount_order(r: &mut Rng) -> u64 {
    if r.chance(0.5) {
        4
    } else {
        r.below(7)
    }
}

/// A qcow2 image's cluster size (log2): 512 B, 4 KiB, or QEMU's 64 KiB half the time.
fn draw_cluster_bits(r: &mut Rng) -> u64 {
    [9, 12, 16, 16][r.below(4) as usize]
}

/// The qcow2 images under a local quorum's children (`topology.child_image = true`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChildImageParams {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// log2 of the refcount width (v3; v2 has 16-bit refcounts).
    pub refcount_order: u32,
}

/// Fault families of the image topology: the same families, applied to the image file's own
/// writes (F5), and its crashes (F16, resolved by F8 and F9 at sector granularity).
pub const IMAGE_FAMILIES: [Fault; 4] = [Fault::F5, Fault::F8, Fault::F9, Fault::F16];

/// The image side of a run (`topology.image = true`): one qcow2 node over a byte-exact disk
/// with a volatile cache (`sim/src/image.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageParams {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// The image has a backing node (tags of write 0 over three quarters of the disk).
    pub backing: bool,
    /// Guest requests in flight at once.
    pub concurrency: u64,
    /// F5: share of the image file's writes that fail (applied none, all or in part).
    pub f5: f64,
    /// F16: chance of a crash after each batch of guest requests.
    pub f16: f64,
    /// F8: chance that one unflushed write survives a crash.
    pub f8: f64,
    /// F9: share of surviving unflushed writes torn between sectors.
    pub f9: f64,
}

/// Pinned values by dotted key, with a record of which were used.
pub struct Pins<'a> {
    map: &'a BTreeMap<String, Tv>,
    used: RefCell<BTreeSet<String>>,
    seed: u64,
}

impl<'a> Pins<'a> {
    /// Wraps `map` for the run with `seed`.
    pub fn new(map: &'a BTreeMap<String, Tv>, seed: u64) -> Pins<'a> {
        Pins {
            map,
            used: RefCell::new(BTreeSet::new()),
            seed,
        }
    }

    fn get(&self, key: &str) -> Option<&'a Tv> {
        let v = self.map.get(key);
        if v.is_some() {
            self.used.borrow_mut().insert(key.to_string());
        }
        v
    }

    /// Whether the file pins `key` (without marking it used).
    fn pinned(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn rng(&self, key: &str) -> Rng {
        Rng::stream(self.seed, &format!("config/{key}"))
    }

    fn int(
        &self,
        key: &str,
        lo: u64,
        hi: u64,
        draw: impl FnOnce(&mut Rng) -> u64,
    ) -> Result<u64, String> {
        match self.get(key) {
            Some(Tv::Integer(i)) if *i >= lo as i64 && *i <= hi as i64 => Ok(*i as u64),
            Some(Tv::Integer(i)) => Err(format!("key '{key}': {i} is out of range {lo}..={hi}")),
            Some(other) => Err(format!(
                "key '{key}': expected an integer, got {}",
                other.type_str()
            )),
            None => Ok(draw(&mut self.rng(key))),
        }
    }

    fn float(
        &self,
        key: &str,
        lo: f64,
        hi: f64,
        draw: impl FnOnce(&mut Rng) -> f64,
    ) -> Result<f64, String> {
        let x = match self.get(key) {
            Some(Tv::Float(f)) => *f,
            Some(Tv::Integer(i)) => *i as f64,
            Some(other) => {
                return Err(format!(
                    "key '{key}': expected a number, got {}",
                    other.type_str()
                ))
            }
            None => return Ok(draw(&mut self.rng(key))),
        };
        if !(lo..=hi).contains(&x) {
            return Err(format!("key '{key}': {x} is out of range {lo}..={hi}"));
        }
        Ok(x)
    }

    fn boolean(&self, key: &str, p: f64) -> Result<bool, String> {
        match self.get(key) {
            Some(Tv::Boolean(b)) => Ok(*b),
            Some(other) => Err(format!(
                "key '{key}': expected true or false, got {}",
                other.type_str()
            )),
            None => Ok(self.rng(key).chance(p)),
        }
    }

    fn choice(
        &self,
        key: &str,
        options: &[&'static str],
        weights: &[u64],
    ) -> Result<&'static str, String> {
        match self.get(key) {
            Some(Tv::String(s)) => {
                options.iter().find(|o| **o == s).copied().ok_or_else(|| {
                    format!("key '{key}': '{s}' is not one of {}", options.join(", "))
                })
            }
            Some(other) => Err(format!(
                "key '{key}': expected a string, got {}",
                other.type_str()
            )),
            None => Ok(options[self.rng(key).weighted(weights)]),
        }
    }

    fn size(&self, key: &str, draw: impl FnOnce(&mut Rng) -> u64) -> Result<u64, String> {
        match self.get(key) {
            Some(Tv::Integer(i)) if *i >= 0 => Ok(*i as u64),
            Some(Tv::String(s)) => parse_size(s).map_err(|e| format!("key '{key}': {e}")),
            Some(other) => Err(format!(
                "key '{key}': expected a size, got {}",
                other.type_str()
            )),
            None => Ok(draw(&mut self.rng(key))),
        }
    }

    fn time(&self, key: &str, draw: impl FnOnce(&mut Rng) -> u64) -> Result<u64, String> {
        match self.get(key) {
            Some(Tv::String(s)) => parse_time_ns(s).map_err(|e| format!("key '{key}': {e}")),
            Some(other) => Err(format!(
                "key '{key}': expected a time such as \"200ms\", got {}",
                other.type_str()
            )),
            None => Ok(draw(&mut self.rng(key))),
        }
    }

    /// A range of sizes (`"4k..64k"`) or of times; `parse` turns one bound into a number.
    fn pair(
        &self,
        key: &str,
        parse: fn(&str) -> Result<u64, String>,
        draw: impl FnOnce(&mut Rng) -> (u64, u64),
    ) -> Result<(u64, u64), String> {
        match self.get(key) {
            Some(Tv::String(s)) => {
                let (a, b) = s
                    .split_once("..")
                    .ok_or_else(|| format!("key '{key}': '{s}' is not a range a..b"))?;
                let (a, b) = (
                    parse(a).map_err(|e| format!("key '{key}': {e}"))?,
                    parse(b).map_err(|e| format!("key '{key}': {e}"))?,
                );
                if a > b {
                    return Err(format!("key '{key}': range '{s}' is reversed"));
                }
                Ok((a, b))
            }
            Some(other) => Err(format!(
                "key '{key}': expected a range string \"a..b\", got {}",
                other.type_str()
            )),
            None => Ok(draw(&mut self.rng(key))),
        }
    }

    /// Pinned keys no parameter read: unknown keys (C2).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.map
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }
}

/// The fault families a run injects (S2): `faults.families` when pinned (each checked against
/// what the topology injects), else each of the topology's families with probability 1/2, on
/// streams of their own so that adding a group keeps the others' draws.
fn draw_families(p: &Pins, colo_on: bool, nbd_on: bool) -> Result<Vec<Fault>, String> {
    let known: Vec<Fault> = if colo_on {
        COLO_FAMILIES.to_vec()
    } else if nbd_on {
        all_families()
    } else {
        FAMILIES
            .iter()
            .chain(HEAL_FAMILIES.iter().filter(|f| **f != Fault::F25))
            .chain(CRASH_FAMILIES.iter())
            .copied()
            .collect()
    };
    let families: Vec<Fault> = match p.get("faults.families") {
        Some(Tv::Array(a)) => {
            let mut out = Vec::new();
            for x in a {
                match x {
                    Tv::String(s) => {
                        let f: Fault = s
                            .parse()
                            .map_err(|e| format!("key 'faults.families': {e}"))?;
                        if !known.contains(&f) {
                            let known: Vec<&str> = known.iter().map(|f| f.as_str()).collect();
                            return Err(format!(
                                "key 'faults.families': '{s}' is not a fault this topology injects ({})",
                                known.join(", ")
                            ));
                        }
                        out.push(f)
                    }
                    other => {
                        return Err(format!(
                            "key 'faults.families': expected strings, got {}",
                            other.type_str()
                        ))
                    }
                }
            }
            out
        }
        Some(other) => {
            return Err(format!(
                "key 'faults.families': expected an array, got {}",
                other.type_str()
            ))
        }
        None if colo_on => {
            // S2 in the COLO topology: each of F19-F24 with probability 1/2.
            let mut r = p.rng("faults.families.colo");
            COLO_FAMILIES
                .iter()
                .filter(|_| r.chance(0.5))
                .copied()
                .collect()
        }
        None => {
            // S2: each family with probability 1/2.
            let mut r = p.rng("faults.families");
            let mut out: Vec<Fault> = FAMILIES.iter().filter(|_| r.chance(0.5)).copied().collect();
            if nbd_on {
                let mut r = p.rng("faults.families.nbd");
                out.extend(NBD_FAMILIES.iter().filter(|_| r.chance(0.5)).copied());
            }
            // H26, on a stream of their own (the families above keep their draws).
            let mut r = p.rng("faults.families.heal");
            out.extend(
                HEAL_FAMILIES
                    .iter()
                    .filter(|_| r.chance(0.5))
                    .filter(|f| nbd_on || **f != Fault::F25)
                    .copied(),
            );
            // H26's crash-safety faults, on a stream of their own too.
            let mut r = p.rng("faults.families.crash");
            out.extend(CRASH_FAMILIES.iter().filter(|_| r.chance(0.5)).copied());
            out
        }
    };
    Ok(families)
}

impl Params {
    /// Derives every parameter from `seed`, taking pinned ones from `pins` (dotted keys).
    ///
    /// # Errors
    /// A message naming the key, for a pinned value of the wrong type or out of range, an
    /// unknown key, or a topology this simulator does not model yet.
    pub fn derive(seed: u64, pins: &BTreeMap<String, Tv>) -> Result<Params, String> {
        let p = Pins::new(pins, seed);
        let Kind {
            colo_on,
            nbd_on,
            image,
            child_image,
        } = Kind::draw(&p, pins)?;
        let path = p.choice("topology.guest_path", &["direct", "nbd"], &[1, 0])?;
        if path == "nbd" {
            return Err("key 'topology.guest_path': \"nbd\" is not simulated yet (the guest calls qhost's quorum directly; the NBD server runs on the replica hosts)".into());
        }
        let budget = match p.choice("budget", &["safety", "beyond"], &[4, 1])? {
            "beyond" => Budget::Beyond,
            _ => Budget::Safety,
        };
        let shape = Shape::draw(&p)?;
        let work = Work::draw(&p, shape.disk_size)?;
        let random_faults = p.boolean("faults.random", 1.0)?;
        let families = draw_families(&p, colo_on, nbd_on)?;
        let on = |f: Fault| random_faults && families.contains(&f);
        let (rates, crash_rate, restart_ns) = fault_rates(&p, &families, &on)?;
        let slow = on(Fault::F10);
        let (latency, gray_disk, gray_factor) = disk_latency(&p, shape.children, nbd_on, slow)?;
        let nbd = if nbd_on {
            Some(nbd_params(&p, &on)?)
        } else {
            None
        };
        let colo = if colo_on {
            Some(colo_params(&p, &families, random_faults)?)
        } else {
            None
        };
        let heal = heal_params(&p, &families, &on, work.ops, colo_on)?;
        let liveness = p.boolean(
            "phases.liveness",
            if budget == Budget::Beyond { 0.0 } else { 1.0 },
        )?;
        let deadline_ns = p.time("phases.deadline", |_| 600_000_000_000)?;
        let time_limit_ns = p.time("phases.time_limit", |_| 36_000_000_000_000)?;
        let unknown = p.unused();
        if let Some(k) = unknown.first() {
            return Err(format!("unknown key '{k}'"));
        }
        let Shape {
            children,
            threshold,
            fifo,
            rewrite,
            resync_auto,
            blkverify,
            discard_unmap,
            discard_zeroes,
            disk_size,
            initial_pattern,
        } = shape;
        let Work {
            ops,
            mix,
            size,
            queue_depth,
            region,
            hot,
            fua,
        } = work;
        Ok(Params {
            seed,
            budget,
            children,
            threshold,
            fifo,
            rewrite,
            resync_auto,
            blkverify,
            discard_unmap,
            discard_zeroes,
            disk_size,
            initial_pattern,
            ops,
            mix,
            size,
            queue_depth,
            region,
            hot,
            fua,
            random_faults,
            families,
            rates,
            crash_rate,
            restart_ns,
            latency,
            gray: slow.then_some((gray_disk, gray_factor)),
            liveness,
            deadline_ns,
            time_limit_ns,
            nbd,
            colo,
            heal,
            image,
            child_image,
        })
    }

    /// Whether 2t > N (I3 applies).
    pub fn majority(&self) -> bool {
        2 * self.threshold > self.children
    }

    /// Whether family `f` is enabled for random injection.
    pub fn family_on(&self, f: Fault) -> bool {
        self.random_faults && self.families.contains(&f)
    }

    /// The parameter block as TOML: a scenario that reproduces this run (S4).
    pub fn to_toml(&self, name: &str) -> String {
        let mut s = format!(
            "name = \"{name}\"\nseed = {}\nbudget = \"{}\"\n",
            self.seed,
            self.budget.as_str()
        );
        if let Some(c) = &self.colo {
            s += &self.colo_toml(c);
        } else if let Some(i) = &self.image {
            s += &self.image_toml(i);
        } else {
            s += &self.quorum_topology_toml();
            s += &self.workload_toml();
            s += &self.faults_toml();
            s += &self.tail_toml();
        }
        s
    }

    /// A COLO run's tables: topology, layers, client, network, workload, faults, and its
    /// random COLO fault as a comment.
    fn colo_toml(&self, c: &ColoParams) -> String {
        let mut s = String::new();
        s += &format!(
            "topology = {{ kind = \"colo\", disk_size = \"{}\", initial = \"{}\", checkpoint_interval = \"{}\", heartbeat_timeout = \"{}\", checkpoints = {}, layers = \"{}\" }}\n",
            fmt_size(self.disk_size),
            if self.initial_pattern { "pattern" } else { "zero" },
            fmt_time(c.checkpoint_interval_ns),
            fmt_time(c.heartbeat_timeout_ns),
            c.checkpoints,
            if c.layers.is_some() { "qcow2" } else { "overlay" }
        );
        if let Some(l) = &c.layers {
            s += &format!(
                "layers = {{ cluster_bits = {}, refcount_order = {} }}\n",
                l.cluster_bits, l.refcount_order
            );
        }
        s += &format!(
            "nbd_client = {{ request_timeout = \"{}\" }}\nnetwork = {{ latency = \"{}..{}\" }}\n",
            fmt_time(c.request_timeout_ns),
            fmt_time(c.latency_ns.0),
            fmt_time(c.latency_ns.1)
        );
        s += &format!(
            "workload = {{ mix = {{ read = {}, write = {}, write_zeroes = {}, trim = {}, flush = {} }}, size = \"{}..{}\", svm = {{ write_share = {}, early = {} }}, after_ops = {} }}\n",
            self.mix.read,
            self.mix.write,
            self.mix.write_zeroes,
            self.mix.trim,
            self.mix.flush,
            fmt_size(self.size.0),
            fmt_size(self.size.1),
            c.svm_write_share,
            c.svm_early,
            c.after_ops
        );
        let fams: Vec<String> = self.families.iter().map(|f| format!("\"{f}\"")).collect();
        s += &format!(
            "faults = {{ random = {}, families = [{}] }}\n",
            self.random_faults,
            fams.join(", ")
        );
        if let Some((f, k)) = &c.event {
            s += &format!("# random COLO fault: {f} at checkpoint {k}\n");
        }
        s
    }

    /// An image run's tables.
    fn image_toml(&self, i: &ImageParams) -> String {
        let mut s = String::new();
        s += &format!(
            "topology = {{ kind = \"quorum\", transport = \"local\", image = true, disk_size = \"{}\" }}\n",
            fmt_size(self.disk_size)
        );
        s += &format!(
            "image = {{ cluster_bits = {}, version = {}, refcount_order = {}, backing = {}, concurrency = {}, F5 = {:?}, F16 = {:?}, F8 = {:?}, F9 = {:?} }}\n",
            i.cluster_bits, i.version, i.refcount_order, i.backing, i.concurrency, i.f5, i.f16, i.f8, i.f9
        );
        s += &format!("workload = {{ ops = {} }}\n", self.ops);
        s
    }

    /// A quorum run's topology, child image, NBD client and network tables.
    fn quorum_topology_toml(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "topology = {{ kind = \"quorum\", transport = \"{}\", guest_path = \"direct\", children = {}, vote_threshold = {}, read_pattern = \"{}\", rewrite_corrupted = {}, resync = \"{}\", blkverify = {}, discard_unmap = {}, discard_zeroes = {}, disk_size = \"{}\", initial = \"{}\"{} }}\n",
            if self.nbd.is_some() { "nbd" } else { "local" },
            self.children,
            self.threshold,
            if self.fifo { "fifo" } else { "quorum" },
            self.rewrite,
            if self.resync_auto { "auto" } else { "manual" },
            self.blkverify,
            self.discard_unmap,
            self.discard_zeroes,
            fmt_size(self.disk_size),
            if self.initial_pattern { "pattern" } else { "zero" },
            if self.child_image.is_some() { ", child_image = true" } else { "" }
        );
        if let Some(c) = &self.child_image {
            s += &format!(
                "child_image = {{ cluster_bits = {}, version = {}, refcount_order = {} }}\n",
                c.cluster_bits, c.version, c.refcount_order
            );
        }
        if let Some(n) = &self.nbd {
            s += &format!(
                "nbd_client = {{ request_timeout = \"{}\", reconnect_delay = \"{}\", open_timeout = \"{}\" }}\n",
                fmt_time(n.request_timeout_ns),
                fmt_time(n.reconnect_delay_ns),
                fmt_time(n.open_timeout_ns)
            );
            s += &format!(
                "network = {{ latency = \"{}..{}\", tls = {} }}\n",
                fmt_time(n.latency_ns.0),
                fmt_time(n.latency_ns.1),
                n.tls
            );
        }
        s
    }

    /// A quorum run's workload table.
    fn workload_toml(&self) -> String {
        format!(
            "workload = {{ ops = {}, mix = {{ read = {}, write = {}, write_zeroes = {}, trim = {}, flush = {} }}, size = \"{}..{}\", queue_depth = {}, region = \"{}..{}\", hot = {:?}, fua = {:?} }}\n",
            self.ops,
            self.mix.read,
            self.mix.write,
            self.mix.write_zeroes,
            self.mix.trim,
            self.mix.flush,
            fmt_size(self.size.0),
            fmt_size(self.size.1),
            self.queue_depth,
            self.region.0,
            self.region.1,
            self.hot,
            self.fua
        )
    }

    /// A quorum run's faults table, with the NBD families' knobs when it has NBD.
    fn faults_toml(&self) -> String {
        let r = |x: Option<f64>| x.map(|v| format!("{v:?}")).unwrap_or_else(|| "0.0".into());
        let rate_or = |x: Option<f64>, d: f64| format!("{:?}", x.unwrap_or(d));
        let fams: Vec<String> = self.families.iter().map(|f| format!("\"{f}\"")).collect();
        let mut s = String::new();
        s += &format!(
            "faults = {{ random = {}, families = [{}], crash_rate = {:?}, restart = \"{}..{}\", rates = {{ F1 = {}, F2 = {}, F3 = {}, F4 = {}, F5 = {}, F6 = {}, F7 = {}, F8 = {}, F9 = {} }} }}\n",
            self.random_faults,
            fams.join(", "),
            self.crash_rate,
            fmt_time(self.restart_ns.0),
            fmt_time(self.restart_ns.1),
            r(self.rates.f1),
            r(self.rates.f2),
            r(self.rates.f3),
            r(self.rates.f4),
            r(self.rates.f5),
            r(self.rates.f6),
            r(self.rates.f7),
            rate_or(self.rates.f8, 1.0),
            rate_or(self.rates.f9, 0.0)
        );
        if let Some(n) = &self.nbd {
            // The faults table above is closed; the NBD families' knobs go in a second one.
            s = s.trim_end_matches(" } }\n").to_string();
            s += &format!(
                " }}, partition_start = {:?}, partition_heal = {:?}, swizzle_rate = {:?}, swizzle_window = \"{}..{}\", pause_rate = {:?}, pause = \"{}..{}\", reformat = {:?} }}\n",
                n.partition.0,
                n.partition.1,
                n.swizzle_rate,
                fmt_time(n.swizzle_ns.0),
                fmt_time(n.swizzle_ns.1),
                n.pause_rate,
                fmt_time(n.pause_ns.0),
                fmt_time(n.pause_ns.1),
                n.reformat
            );
        }
        s
    }

    /// A quorum run's healing, disk and phases tables.
    fn tail_toml(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "healing = {{ F25 = {:?}, F26 = {:?}, F27 = {:?}{}, operator = {}, verify_every = \"{}\", pause = {:?}, metadata = {}, F29 = {:?}, intent_cold = {}, shutdown = {:?} }}\n",
            self.heal.f25,
            self.heal.f26,
            self.heal.f27,
            match self.heal.f30_at {
                Some(k) => format!(", F30_at = {k}"),
                None => String::new(),
            },
            self.heal.operator,
            fmt_time(self.heal.verify_every_ns),
            self.heal.pause,
            self.heal.metadata,
            self.heal.f29,
            self.heal.intent_cold_s,
            self.heal.shutdown
        );
        s += &format!(
            "disk = {{ read_min = \"{}\", read_mean = \"{}\", write_min = \"{}\", write_mean = \"{}\", stall = {:?}, stall_time = \"{}..{}\"{} }}\n",
            fmt_time(self.latency.read_min_ns),
            fmt_time(self.latency.read_mean_ns),
            fmt_time(self.latency.write_min_ns),
            fmt_time(self.latency.write_mean_ns),
            self.latency.stall_p,
            fmt_time(self.latency.stall_ns.0),
            fmt_time(self.latency.stall_ns.1),
            match self.gray {
                Some((d, f)) => format!(", gray = {d}, gray_factor = {f}"),
                None => String::new(),
            }
        );
        s += &format!(
            "phases = {{ liveness = {}, deadline = \"{}\", time_limit = \"{}\" }}\n",
            self.liveness,
            fmt_time(self.deadline_ns),
            fmt_time(self.time_limit_ns)
        );
        s
    }

    /// The 16-hex-digit configuration id printed in the header (U6).
    pub fn config_id(&self) -> String {
        let body = self.to_toml("");
        format!("{:016x}", crate::sector::digest(body.as_bytes()))
    }
}

/// Flattens a TOML table into dotted keys, leaving arrays as values.
pub fn flatten(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, Tv>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Tv::Table(inner) => flatten(&key, inner, out),
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Derivation (SIMULATION.md §4): deterministic per seed, within the documented ranges,
    //! pins honoured and bad pins named.
    use super::*;

    fn pins(kv: &[(&str, Tv)]) -> BTreeMap<String, Tv> {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn derive(seed: u64) -> Params {
        Params::derive(seed, &BTreeMap::new()).expect("derives")
    }

    #[test]
    fn a_seed_derives_the_same_parameters_every_time_and_another_seed_others() {
        for seed in [0, 1, 99, 1 << 40] {
            assert_eq!(derive(seed).to_toml("x"), derive(seed).to_toml("x"));
        }
        let distinct: BTreeSet<String> = (0..50).map(|s| derive(s).to_toml("x")).collect();
        // The seed is printed, so every text differs; the draws must too.
        let bodies: BTreeSet<String> = distinct
            .iter()
            .map(|t| t.lines().skip(3).collect::<Vec<_>>().join("\n"))
            .collect();
        assert_eq!(bodies.len(), 50);
    }

    #[test]
    fn derived_values_stay_inside_their_ranges() {
        let (mut colo, mut nbd, mut image, mut child_image) = (0, 0, 0, 0);
        for seed in 0..400 {
            let p = derive(seed);
            assert!((1..=7).contains(&p.children), "seed {seed}");
            assert!((1..=p.children).contains(&p.threshold), "seed {seed}");
            assert!(p.disk_size % 4096 == 0 && (1 << 20..=64 << 20).contains(&p.disk_size));
            assert!(p.size.0 == 512 && p.size.1 <= p.disk_size, "seed {seed}");
            assert!(p.region.1 <= p.disk_size && p.region.1 - p.region.0 >= p.size.1);
            assert!([1, 2, 4, 8, 16, 32].contains(&p.queue_depth), "seed {seed}");
            assert!((2000..=3000).contains(&p.ops), "seed {seed}");
            // One topology at a time.
            let kinds = [
                p.colo.is_some(),
                p.nbd.is_some(),
                p.image.is_some(),
                p.child_image.is_some(),
            ];
            assert!(kinds.iter().filter(|&&k| k).count() <= 1, "seed {seed}");
            colo += usize::from(kinds[0]);
            nbd += usize::from(kinds[1]);
            image += usize::from(kinds[2]);
            child_image += usize::from(kinds[3]);
            // A family that is off injects nothing: its rate is absent, crashes need F16/F28.
            assert_eq!(p.rates.f1.is_some(), p.family_on(Fault::F1), "seed {seed}");
            assert_eq!(p.rates.f5.is_some(), p.family_on(Fault::F5), "seed {seed}");
            if !p.family_on(Fault::F16) && !p.family_on(Fault::F28) {
                assert_eq!(p.crash_rate, 0.0, "seed {seed}");
            }
            assert_eq!(p.gray.is_some(), p.family_on(Fault::F10), "seed {seed}");
            rates_inside_their_ranges(&p);
        }
        // Every topology is drawn (weights 4:1 quorum:colo, 3:1 local:nbd, 15% image...).
        assert!(colo > 0 && nbd > 0 && image > 0 && child_image > 0);
    }

    /// The bounds `fault_rates` draws from: F1-F7 in [0, hi), F8 in [0, 0.5), F9 in
    /// [0.8, 1), crashes (F16, F28) 0 or in [0.005, 0.05), restarts within 0..10 s in ms.
    fn rates_inside_their_ranges(p: &Params) {
        let seed = p.seed;
        let r = &p.rates;
        let his = [0.10, 0.05, 0.10, 0.05, 0.10, 0.01, 0.01, 0.5];
        for (i, (x, hi)) in [r.f1, r.f2, r.f3, r.f4, r.f5, r.f6, r.f7, r.f8]
            .into_iter()
            .zip(his)
            .enumerate()
        {
            if let Some(x) = x {
                assert!((0.0..hi).contains(&x), "seed {seed} F{}: {x}", i + 1);
            }
        }
        if let Some(x) = r.f9 {
            assert!((0.8..1.0).contains(&x), "seed {seed} F9: {x}");
        }
        assert!(
            p.crash_rate == 0.0 || (0.005..0.05).contains(&p.crash_rate),
            "seed {seed}: {}",
            p.crash_rate
        );
        let (lo, hi) = p.restart_ns;
        assert!(
            lo == 0 && hi % 1_000_000 == 0 && hi <= 10_000_000_000,
            "seed {seed}"
        );
    }

    /// Pins for a quorum over NBD (every quorum family is known there) with `families`.
    fn nbd_with(families: &[Fault], random: bool) -> BTreeMap<String, Tv> {
        let list = families.iter().map(|f| Tv::String(f.as_str().into()));
        pins(&[
            ("topology.kind", Tv::String("quorum".into())),
            ("topology.transport", Tv::String("nbd".into())),
            ("faults.families", Tv::Array(list.collect())),
            ("faults.random", Tv::Boolean(random)),
        ])
    }

    #[test]
    fn a_family_that_is_off_injects_nothing_and_keeps_the_others_draws() {
        for seed in 0..30 {
            let all = Params::derive(seed, &nbd_with(&all_families(), true)).expect("all");
            let one = Params::derive(seed, &nbd_with(&[Fault::F1], true)).expect("F1");
            let (ra, r1) = (&all.rates, &one.rates);
            // Every family on: every rate, crash, gray disk and NBD fault is drawn.
            assert!(
                [ra.f1, ra.f2, ra.f3, ra.f4, ra.f5, ra.f6, ra.f7, ra.f8, ra.f9]
                    .iter()
                    .all(Option::is_some),
                "seed {seed}"
            );
            assert!(all.crash_rate > 0.0 && all.gray.is_some(), "seed {seed}");
            let nbd = all.nbd.as_ref().expect("nbd");
            assert_eq!(nbd.reformat, 0.3);
            assert!(all.heal.f25 >= 0.3 && all.heal.f30_at.is_some() && all.heal.metadata);
            // Only F1: its rate is the same draw, every other family has none.
            assert_eq!(one.families, vec![Fault::F1]);
            assert_eq!(r1.f1, ra.f1, "seed {seed}");
            assert_eq!(
                [r1.f2, r1.f3, r1.f4, r1.f5, r1.f6, r1.f7, r1.f8, r1.f9],
                [None; 8]
            );
            assert_eq!(
                (one.crash_rate, one.gray, one.latency.stall_p),
                (0.0, None, 0.0)
            );
            let nbd = one.nbd.as_ref().expect("nbd");
            assert_eq!(
                (
                    nbd.partition,
                    nbd.swizzle_rate,
                    nbd.pause_rate,
                    nbd.reformat
                ),
                ((0.0, 0.0), 0.0, 0.0, 0.0)
            );
            let h = &one.heal;
            assert_eq!((h.f25, h.f26, h.f27, h.f30_at), (0.0, 0.0, 0.0, None));
            assert_eq!((h.metadata, h.f29, h.shutdown), (false, 0.0, 0.0));
            // Keys no family decides keep their draws.
            assert_eq!(one.latency.read_min_ns, all.latency.read_min_ns);
            assert_eq!(
                (one.children, one.ops, one.mix.clone()),
                (all.children, all.ops, all.mix.clone())
            );
        }
    }

    #[test]
    fn without_random_faults_only_the_listed_crash_outcomes_and_metadata_node_stay() {
        for seed in 0..30 {
            let all = Params::derive(seed, &nbd_with(&all_families(), true)).expect("all");
            let off = Params::derive(seed, &nbd_with(&all_families(), false)).expect("off");
            let (ra, ro) = (&all.rates, &off.rates);
            // faults.random = false: no random rate, crash, gray disk or healing fault...
            assert_eq!([ro.f1, ro.f2, ro.f3, ro.f4, ro.f5, ro.f6, ro.f7], [None; 7]);
            assert_eq!((off.crash_rate, off.gray), (0.0, None), "seed {seed}");
            assert_eq!((off.heal.f25, off.heal.f30_at), (0.0, None), "seed {seed}");
            // ...but what a listed family decides without random injection stays: the
            // crash outcomes (F8, F9) and the metadata node with its faults (F28, F29).
            assert_eq!((ro.f8, ro.f9), (ra.f8, ra.f9), "seed {seed}");
            assert!(ro.f8.is_some() && ro.f9.is_some(), "seed {seed}");
            assert_eq!(
                (off.heal.metadata, off.heal.f29, off.heal.shutdown),
                (true, all.heal.f29, all.heal.shutdown)
            );
        }
    }

    #[test]
    fn a_pin_sets_its_value_and_printed_parameters_derive_the_same_run() {
        let p = Params::derive(
            3,
            &pins(&[
                ("topology.children", Tv::Integer(5)),
                ("topology.vote_threshold", Tv::Integer(3)),
                ("workload.ops", Tv::Integer(10)),
            ]),
        )
        .expect("derives");
        assert_eq!((p.children, p.threshold, p.ops), (5, 3, 10));
        // S4: the printed parameters, pinned, give the same parameters.
        let text = p.to_toml("x");
        let table: toml::Table = text.parse().expect("printed parameters parse");
        let mut flat = BTreeMap::new();
        for (section, v) in &table {
            if let Tv::Table(t) = v {
                flatten(section, t, &mut flat);
            }
        }
        let again = Params::derive(3, &flat).expect("printed parameters derive");
        assert_eq!(again.to_toml("x"), text);
    }

    /// `section.key` pins of a printed table (nested tables as `section.key.sub`).
    fn flatten(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, Tv>) {
        for (k, v) in t {
            let key = format!("{prefix}.{k}");
            match v {
                Tv::Table(sub) => flatten(&key, sub, out),
                v => {
                    out.insert(key, v.clone());
                }
            }
        }
    }

    #[test]
    fn bad_pins_are_refused_naming_the_key() {
        let cases: [(&[(&str, Tv)], &str); 5] = [
            (
                &[
                    ("topology.children", Tv::Integer(2)),
                    ("topology.vote_threshold", Tv::Integer(3)),
                ],
                "key 'topology.vote_threshold': 3 is out of range 1..=2",
            ),
            (
                &[("topology.guest_path", Tv::String("nbd".into()))],
                "key 'topology.guest_path': \"nbd\" is not simulated yet (the guest calls qhost's quorum directly; the NBD server runs on the replica hosts)",
            ),
            (&[("workload.opps", Tv::Integer(1))], "unknown key 'workload.opps'"),
            (
                &[
                    ("topology.blkverify", Tv::Boolean(true)),
                    ("topology.children", Tv::Integer(3)),
                ],
                "key 'topology.blkverify': needs children = 2, vote_threshold = 2, read_pattern = \"quorum\" and rewrite_corrupted = false (docs/quorum.md Q9-Q11)",
            ),
            (
                &[("topology.disk_size", Tv::String("66k".into()))],
                "key 'topology.disk_size': 67584 must be a multiple of 4k between 64k and 1G",
            ),
        ];
        for (kv, want) in cases {
            assert_eq!(Params::derive(1, &pins(kv)).unwrap_err(), want);
        }
    }

    #[test]
    fn pins_of_the_wrong_type_or_family_are_refused_naming_the_key() {
        let s = |x: &str| Tv::String(x.into());
        let local = [
            ("topology.kind", s("quorum")),
            ("topology.transport", s("local")),
        ];
        let cases: [(Vec<(&str, Tv)>, &str); 10] = [
            (
                vec![("topology.children", s("3"))],
                "key 'topology.children': expected an integer, got string",
            ),
            (
                vec![("topology.kind", s("raid"))],
                "key 'topology.kind': 'raid' is not one of quorum, colo",
            ),
            (
                vec![("faults.random", Tv::Integer(1))],
                "key 'faults.random': expected true or false, got integer",
            ),
            (
                vec![("faults.rates.F1", Tv::Float(1.5))],
                "key 'faults.rates.F1': 1.5 is out of range 0..=1",
            ),
            (
                vec![("disk.stall_time", s("5s..1s"))],
                "key 'disk.stall_time': range '5s..1s' is reversed",
            ),
            (
                vec![("faults.families", s("F1"))],
                "key 'faults.families': expected an array, got string",
            ),
            (
                vec![("faults.families", Tv::Array(vec![Tv::Integer(1)]))],
                "key 'faults.families': expected strings, got integer",
            ),
            (
                vec![("faults.families", Tv::Array(vec![s("F31")]))],
                "key 'faults.families': unknown fault family 'F31' (known: F1-F30)",
            ),
            (
                // A local quorum injects neither COLO's faults nor F25 or the NBD ones.
                [local.to_vec(), vec![("faults.families", Tv::Array(vec![s("F19")]))]].concat(),
                "key 'faults.families': 'F19' is not a fault this topology injects (F1, F2, F3, F4, F5, F6, F7, F8, F9, F10, F11, F16, F26, F27, F30, F28, F29)",
            ),
            (
                // F10's gray disk, pinned while random faults are off.
                [
                    local.to_vec(),
                    vec![("faults.random", Tv::Boolean(false)), ("disk.gray", Tv::Integer(2))],
                ]
                .concat(),
                "key 'disk.gray': the gray and slow disks are F10's, which this run does not \
                 inject (list F10 in faults.families with faults.random = true, or script an \
                 F10 fault)",
            ),
        ];
        for (kv, want) in cases {
            assert_eq!(Params::derive(1, &pins(&kv)).unwrap_err(), want);
        }
    }

    #[test]
    fn quorum_only_pins_are_recognised() {
        for k in [
            "topology.children",
            "topology.vote_threshold",
            "healing.F25",
            "disk.read_min",
            "nbd_client.request_timeout",
        ] {
            assert!(quorum_only(k), "{k}");
        }
        for k in [
            "topology.disk_size",
            "image.F5",
            "workload.ops",
            "topology.image",
        ] {
            assert!(!quorum_only(k), "{k}");
        }
    }
}
