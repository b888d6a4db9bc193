//! Child images (issue 19 item 5): the local quorum's children as qcow2 images
//! (`topology.child_image = true`).
//!
//! Each child's [`crate::vdisk::VDisk`] keeps its sector model, fault map and budget ledger,
//! so the oracle judges the quorum exactly as over raw children; under it, every write the
//! model lands (whole, in part under F5, or misdirected under F6) is also written to a qcow2
//! image of its own, on a byte-exact disk with a volatile cache ([`crate::image`]'s
//! `ImageDisk`), and every read is checked against that image. Requests of one child reach its
//! image one at a time, in the order the model applied them.
//!
//! Crashes are the image's to resolve: at a power cut (F16) the image file's unflushed writes,
//! data and metadata alike, survive or not (F8) and tear between sectors (F9); the model then
//! takes the values the reopened image holds. Checks:
//! - I21: after every crash the image opens, and every sector holds the value the last flush
//!   left or one of the writes sent since; on every read the image holds what the model does;
//! - I22: after every crash and at the end of the run, the refcounts on the durable bytes are
//!   never below the references (leaks allowed; P21 counts crashes that leaked).
//!
//! Chasing a failure: `CHILDDBG=SECTOR cargo sim replay ...` prints (stderr), at every crash,
//! what each child's image holds at that sector beside the model's current, flushed and
//! pending values.

use crate::ids::{Fault, Rule};
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::qcow2::check::check;
use ballot::drivers::qcow2::create::{create, CreateOptions};
use ballot::drivers::qcow2::Qcow2;
use ballot::{BlockDevice, Device, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use tokio::sync::OwnedMutexGuard;

use crate::imagedisk::{check_after_cut, open_named, ImageDisk};
use crate::params::ChildImageParams;
use crate::sector::{decode, encode_into, Decoded, Stored, Value, SECTOR, SECTOR_U64};

/// A violated rule and its message.
pub(crate) type Fail = (Rule, String);

/// Whether the node of a generation is open yet.
enum State {
    /// Open it over the disk before the first request (after a crash: the new life's file).
    Closed,
    /// The disk was wiped (F18, F30): create an empty image, then open it.
    Fresh,
    Open(Arc<Qcow2>),
}

/// One life of the image's node: a crash or a reformat starts a new one, so requests of the
/// old life (their tasks killed with the host) never reach the new node.
type Generation = Arc<tokio::sync::Mutex<State>>;

/// A child's qcow2 image.
pub(crate) struct ChildImage {
    /// `'c0.qcow2'`: the image as messages name it.
    what: String,
    node: String,
    disk: Arc<ImageDisk>,
    /// The initial image as a raw backing node (`topology.initial = "pattern"`); gone after
    /// a reformat.
    backing: Mutex<Option<Device>>,
    params: ChildImageParams,
    sectors: u64,
    generation: Mutex<Generation>,
    /// Writes of zeroes sent as write-zeroes so far (every other one may unmap).
    zero_writes: std::sync::atomic::AtomicU64,
    /// A crash left leaked clusters (they stay until a repair: the end's check allows them).
    leaked: std::sync::atomic::AtomicBool,
}

/// Exclusive use of a child's image for one request.
pub(crate) struct Held {
    guard: OwnedMutexGuard<State>,
    generation: Generation,
}

/// What a crash left in a child's image.
pub(crate) struct Crashed {
    /// Every sector as the reopened image reads it.
    pub sectors: Vec<Stored>,
    /// Unflushed writes of the image file lost (F8) and torn (F9).
    pub lost: u64,
    pub torn: u64,
    /// The check found leaked clusters (P21).
    pub leaked: bool,
}

fn encode(values: &[Stored]) -> Bytes {
    let mut b = BytesMut::zeroed(values.len() * SECTOR);
    for (i, v) in values.iter().enumerate() {
        let chunk = &mut b[i * SECTOR..(i + 1) * SECTOR];
        match v {
            Stored::V(v) => encode_into(*v, chunk),
            Stored::Raw(r) => chunk.copy_from_slice(r),
        }
    }
    b.freeze()
}

fn stored(chunk: &[u8]) -> Stored {
    match decode(chunk) {
        Decoded::Value(v) => Stored::V(v),
        Decoded::Garbage => Stored::Raw(Arc::from(chunk)),
    }
}

/// Runs `f` to completion without a runtime: for futures over in-memory devices that never
/// wait (a crash's check runs inside the harness's synchronous crash step). `None` if it
/// waited.
fn poll_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..64 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

impl ChildImage {
    /// Creates child `index`'s image of `sectors` sectors, over a raw backing node that
    /// holds `initial` when it is given.
    pub(crate) async fn create(
        seed: u64,
        index: usize,
        prefix: &str,
        sectors: u64,
        initial: Option<Vec<Stored>>,
        params: ChildImageParams,
    ) -> Result<Arc<ChildImage>, Fail> {
        let name = format!("{prefix}{index}");
        // Each request of the image file waits a little, so a power cut can fall between
        // the steps of a write-back.
        // Each request of the image file waits a little and a flush longer (a disk cache's
        // write-back), so a power cut can fall between the steps of a metadata write-back.
        let disk = Arc::new(
            ImageDisk::new(seed, &format!("child-image/{index}"), 0.0, (20, 300))
                .with_flush_latency((500, 4000)),
        );
        let backing =
            initial.map(|v| Arc::new(MemoryDevice::with_contents(encode(&v).to_vec())) as Device);
        let img = Arc::new(ChildImage {
            what: format!("'{name}.qcow2'"),
            node: format!("{name}-img"),
            disk,
            backing: Mutex::new(backing),
            params,
            sectors,
            generation: Mutex::new(Arc::new(tokio::sync::Mutex::new(State::Fresh))),
            zero_writes: Default::default(),
            leaked: Default::default(),
        });
        drop(img.enter().await?);
        Ok(img)
    }

    fn generation(&self) -> Generation {
        self.generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn backing(&self) -> Option<Device> {
        self.backing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the image (requests of one child reach it one at a time), opening or
    /// creating its node first when the generation has none yet.
    pub(crate) async fn enter(&self) -> Result<Held, Fail> {
        let generation = self.generation();
        let mut guard = generation.clone().lock_owned().await;
        if matches!(*guard, State::Fresh) {
            self.disk.wipe();
            let p = &self.params;
            let backing = self.backing().is_some();
            let opts = CreateOptions {
                size: self.sectors * SECTOR_U64,
                cluster_bits: p.cluster_bits,
                version: p.version,
                refcount_order: if p.version == 2 { 4 } else { p.refcount_order },
                backing: backing.then(|| ("initial".into(), "raw".into())),
            };
            create(&self.disk.lane(), &opts)
                .await
                .map_err(|e| (Rule::Harness, format!("{}: create: {e}", self.what)))?;
            *guard = State::Closed;
        }
        if matches!(*guard, State::Closed) {
            let q = open_named(
                &self.disk.lane(),
                &self.backing(),
                &self.node,
                &self.what,
                false,
            )
            .await
            .map_err(|e| (Rule::I21, format!("{} does not open: {e}", self.what)))?;
            *guard = State::Open(Arc::new(q));
        }
        Ok(Held { guard, generation })
    }

    fn node(h: &Held) -> Arc<Qcow2> {
        match &*h.guard {
            State::Open(q) => q.clone(),
            _ => unreachable!("enter opens the node"),
        }
    }

    /// Whether `h` still belongs to the image's current life.
    pub(crate) fn current(&self, h: &Held) -> bool {
        Arc::ptr_eq(&h.generation, &self.generation())
    }

    /// Writes `values` at sector `first` (zeroes as write-zeroes, every other one allowed to
    /// unmap); `durable` adds a flush, as the model's FUA write flushes the whole disk.
    pub(crate) async fn write(
        &self,
        h: &Held,
        first: u64,
        values: &[Stored],
        durable: bool,
    ) -> Result<(), Fail> {
        let q = Self::node(h);
        let zero = Stored::V(Value::Zero);
        let r = if values.iter().all(|v| *v == zero) {
            let k = self
                .zero_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            q.write_zeroes(
                first * SECTOR_U64,
                values.len() as u64 * SECTOR_U64,
                ZeroFlags {
                    fua: false,
                    may_unmap: k % 2 == 0,
                },
            )
            .await
        } else {
            q.write(first * SECTOR_U64, encode(values), WriteFlags::NONE)
                .await
        };
        r.map_err(|e| {
            (
                Rule::I21,
                format!("{}: a write at sector {first} failed: {e}", self.what),
            )
        })?;
        if durable {
            self.flush(h).await?;
        }
        Ok(())
    }

    /// Flushes the image: data and metadata durable.
    pub(crate) async fn flush(&self, h: &Held) -> Result<(), Fail> {
        Self::node(h)
            .flush()
            .await
            .map_err(|e| (Rule::I21, format!("{}: a flush failed: {e}", self.what)))
    }

    /// The image's sectors `range`.
    pub(crate) async fn read(&self, h: &Held, range: Range<u64>) -> Result<Vec<Stored>, Fail> {
        let len = ((range.end - range.start) * SECTOR_U64) as usize;
        let data = Self::node(h)
            .read(range.start * SECTOR_U64, len)
            .await
            .map_err(|e| {
                (
                    Rule::I21,
                    format!(
                        "{}: a read at sector {} failed: {e}",
                        self.what, range.start
                    ),
                )
            })?;
        Ok(data.chunks(SECTOR).map(stored).collect())
    }

    /// The host lost power: the image file's cache is resolved (F8 with `f8`, the chance a
    /// write survives; F9 with `f9`), and the image as the media holds it is opened, checked
    /// (I22) and read whole, without waiting (the crash step is synchronous).
    pub(crate) fn crash(&self, f8: f64, f9: f64) -> Result<Crashed, Fail> {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(tokio::sync::Mutex::new(State::Closed));
        let before = self.disk.injected();
        self.disk.cut(f8, f9);
        let after = self.disk.injected();
        let delta =
            |k: Fault| after.get(&k).copied().unwrap_or(0) - before.get(&k).copied().unwrap_or(0);
        let (lost, torn) = (delta(Fault::F8), delta(Fault::F9));
        let file: Device = Arc::new(MemoryDevice::with_contents(self.disk.durable_bytes()));
        let backing = self.backing();
        let sectors = self.sectors;
        let what = self.what.clone();
        let node = self.node.clone();
        let leaked = &self.leaked;
        let checked = async move {
            let leaks = check_after_cut(&file, &what, "after a crash").await?;
            let q = open_named(&file, &backing, &node, &what, true)
                .await
                .map_err(|e| {
                    (
                        Rule::I21,
                        format!("after a crash {what} does not open: {e}"),
                    )
                })?;
            let all = q
                .read(0, (sectors * SECTOR_U64) as usize)
                .await
                .map_err(|e| {
                    (
                        Rule::I21,
                        format!("after a crash {what} does not read: {e}"),
                    )
                })?;
            if leaks > 0 {
                leaked.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Crashed {
                sectors: all.chunks(SECTOR).map(stored).collect(),
                lost,
                torn,
                leaked: leaks > 0,
            })
        };
        poll_now(checked).unwrap_or_else(|| {
            Err((
                Rule::Harness,
                format!("the crash check of {} waited", self.what),
            ))
        })
    }

    /// F18, F30: the disk comes back empty; the next request creates a new image with no
    /// backing (all zeroes, as the model's reformat leaves it).
    pub(crate) fn reformat(&self) {
        *self.backing.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(tokio::sync::Mutex::new(State::Fresh));
    }

    /// The run's end: a flush, then every sector equal to the model's (`model`, taken once
    /// the image is held) and the refcounts on the media consistent, with no leak unless a
    /// crash left one (a flushed image checks clean).
    pub(crate) async fn final_check(
        &self,
        model: impl FnOnce() -> Vec<Stored>,
    ) -> Result<(), Fail> {
        let h = self.enter().await?;
        let model = model();
        self.flush(&h).await?;
        let got = self.read(&h, 0..self.sectors).await?;
        if let Some(s) = (0..got.len()).find(|&s| got[s] != model[s]) {
            return Err((
                Rule::I21,
                format!(
                    "at the end {} holds {:?} at sector {s}, the child {:?}",
                    self.what, got[s], model[s]
                ),
            ));
        }
        let file: Device = Arc::new(MemoryDevice::with_contents(self.disk.durable_bytes()));
        let hdr = Qcow2::read_header(&file, &self.what)
            .await
            .map_err(|e| (Rule::I21, format!("{}: {e}", self.what)))?;
        let report = check(&file, &hdr)
            .await
            .map_err(|e| (Rule::I22, format!("{}: check failed: {e}", self.what)))?;
        let leaks_allowed = self.leaked.load(std::sync::atomic::Ordering::Relaxed);
        if !report.is_consistent() || (report.leaks > 0 && !leaks_allowed) {
            return Err((
                Rule::I22,
                format!(
                    "at the end, flushed, {} does not check clean: {} corruptions, {} leaks: {}",
                    self.what,
                    report.corruptions,
                    report.leaks,
                    report.messages.join("; ")
                ),
            ));
        }
        Ok(())
    }
}
