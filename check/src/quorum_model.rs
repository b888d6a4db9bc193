//! The model behind the quorum state machine (`tests/quorum_machine.rs`): a quorum over
//! [`FaultyChild`]ren, driven by operations and fault injections, against per-child byte
//! models and the vote model of [`crate::vote`].
//!
//! [`QuorumModel::apply`] predicts what an operation must return, which events it must emit
//! (QUORUM.md Q17, Q25, Q37, Q39, Q41, Q57), which children it must change (Q36, Q26–Q28,
//! Q32) and which ranges become out of sync (Q47–Q49); [`QuorumRig::apply`] runs it on the
//! real [`Quorum`] and checks every prediction.

use std::collections::BTreeSet;
use std::sync::Arc;

use ballot::drivers::quorum::{Quorum, QuorumOptions, ReadPattern};
use ballot::events::{EventBus, IoType, Recorder, Stream};
use ballot::host::Host;
use ballot::{BlockDevice, Device, ErrorKind, WriteFlags, ZeroFlags};
use bytes::Bytes;

use crate::child::{Faults, FaultyChild};
use crate::vote::{check_out_of_sync, granules, model_error_vote, model_read, recorded, Ev};

/// Each child's length: two 64 KiB out-of-sync granules and a shorter third.
pub const DISK_BYTES: u64 = 2 * 65536 + 4096;
const SECTOR: u64 = 512;

/// A quorum configuration the machine runs (always valid: Q7–Q12 are the fuzz target's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Children.
    pub children: usize,
    /// `vote-threshold`.
    pub threshold: usize,
    /// `read-pattern=fifo`.
    pub fifo: bool,
    /// `rewrite-corrupted`.
    pub rewrite: bool,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Guest write of `sectors` sectors at `sector`, filled with `byte`, maybe FUA.
    Write {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
        /// Fill.
        byte: u8,
        /// FUA.
        fua: bool,
    },
    /// Guest write-zeroes.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
    },
    /// Guest read.
    Read {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
    },
    /// Guest flush.
    Flush,
    /// Sets a child's faults (F-families of SIMULATION.md: I/O errors, lost writes).
    Fault {
        /// Child.
        child: usize,
        /// Faults from now on.
        faults: Faults,
    },
    /// Silent corruption of one byte of a child.
    Corrupt {
        /// Child.
        child: usize,
        /// Byte offset.
        at: u64,
        /// XOR mask (nonzero).
        mask: u8,
    },
}

/// What a step must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// Data of a successful read, empty for other successes; or the error kind.
    pub result: Result<Vec<u8>, ErrorKind>,
    /// Events, in order, with their I/O type for REPORT_BAD.
    pub events: Vec<(Ev, Option<IoType>)>,
}

/// The reference: configuration, each child's bytes and faults, out-of-sync granules.
#[derive(Debug, Clone)]
pub struct QuorumModel {
    /// The configuration.
    pub config: Config,
    /// Each child's bytes.
    pub mem: Vec<Vec<u8>>,
    /// Each child's faults.
    pub faults: Vec<Faults>,
    /// Each child's out-of-sync granules.
    pub out_of_sync: Vec<BTreeSet<u64>>,
    /// Each child's granules written since its last successful flush (HEALING.md H7).
    pub unflushed: Vec<BTreeSet<u64>>,
    /// Each child's out-of-sync granules a covering write made current, cleared from
    /// `out_of_sync` by the child's next successful flush (H5).
    pub pending: Vec<BTreeSet<u64>>,
    /// Granules acknowledged written since the last successful quorum flush (README D14).
    pub acked: BTreeSet<u64>,
}

fn initial() -> Vec<u8> {
    (0..DISK_BYTES).map(|i| (i / SECTOR % 251) as u8).collect()
}

impl QuorumModel {
    /// Every child starts with the same pattern, no faults, and everything unflushed.
    pub fn new(config: Config) -> QuorumModel {
        QuorumModel {
            config,
            mem: vec![initial(); config.children],
            faults: vec![Faults::default(); config.children],
            out_of_sync: vec![BTreeSet::new(); config.children],
            // README D15 (H7 at open): nothing is known to be flushed before a first flush.
            unflushed: vec![granules(0, DISK_BYTES).collect(); config.children],
            pending: vec![BTreeSet::new(); config.children],
            acked: BTreeSet::new(),
        }
    }

    fn mark(&mut self, child: usize, off: u64, len: u64) {
        for g in granules(off, len) {
            self.out_of_sync[child].insert(g);
            self.pending[child].remove(&g);
        }
    }

    /// H5: the granules `[off, off + len)` covers whole (the last, shorter one counts when
    /// the range reaches the disk's end).
    fn whole(off: u64, len: u64) -> std::ops::Range<u64> {
        let g = ballot::drivers::quorum::OUT_OF_SYNC_GRANULARITY_BYTES;
        let end = off + len;
        let last = if end >= DISK_BYTES {
            DISK_BYTES.div_ceil(g)
        } else {
            end / g
        };
        off.div_ceil(g)..last.max(off.div_ceil(g))
    }

    /// A successful write on `child` (H5, H7): its granules are unflushed; the out-of-sync
    /// ones it covers whole become pending.
    fn wrote(&mut self, child: usize, off: u64, len: u64) {
        self.unflushed[child].extend(granules(off, len));
        for g in Self::whole(off, len) {
            if self.out_of_sync[child].contains(&g) {
                self.pending[child].insert(g);
            }
        }
    }

    /// H1: whether `child` is in sync on every granule of the range.
    fn in_sync(&self, child: usize, off: u64, len: u64) -> bool {
        granules(off, len).all(|g| !self.out_of_sync[child].contains(&g))
    }

    /// Q36–Q39, H3–H6: every child gets the write; failures are reported and marked; a
    /// success counts if the child was in sync on the range, the write covers every
    /// out-of-sync granule it touches, or the range is degraded (fewer than t in sync).
    fn write_all(&mut self, off: u64, data: &[u8]) -> Expect {
        let len = data.len() as u64;
        let n = self.config.children;
        let in_sync: Vec<bool> = (0..n).map(|i| self.in_sync(i, off, len)).collect();
        let degraded = in_sync.iter().filter(|s| **s).count() < self.config.threshold;
        let whole = Self::whole(off, len);
        let mut events = Vec::new();
        let mut errors = Vec::new();
        let mut counted = 0;
        for (i, &was_in_sync) in in_sync.iter().enumerate() {
            let f = self.faults[i];
            match f.write {
                Some(k) => {
                    events.push((
                        Ev::Bad {
                            child: i,
                            error: Some(k),
                        },
                        Some(IoType::Write),
                    ));
                    errors.push(k);
                    self.mark(i, off, len);
                }
                None => {
                    if !f.lose_writes {
                        self.mem[i][off as usize..off as usize + data.len()].copy_from_slice(data);
                    }
                    self.wrote(i, off, len);
                    let covers = granules(off, len)
                        .filter(|g| self.out_of_sync[i].contains(g))
                        .all(|g| whole.contains(&g));
                    if degraded || was_in_sync || covers {
                        counted += 1;
                    }
                }
            }
        }
        let result = if counted >= self.config.threshold {
            self.acked.extend(granules(off, len));
            Ok(Vec::new())
        } else {
            events.push((Ev::Failure, None));
            Err(if errors.is_empty() {
                ErrorKind::Io
            } else {
                model_error_vote(&errors)
            })
        };
        Expect { result, events }
    }

    /// Applies `step` to the model; returns what the real quorum must do.
    pub fn apply(&mut self, step: &Step) -> Expect {
        let none = Expect {
            result: Ok(Vec::new()),
            events: Vec::new(),
        };
        match *step {
            Step::Write {
                sector,
                sectors,
                byte,
                fua,
            } => {
                let mut w =
                    self.write_all(sector * SECTOR, &vec![byte; (sectors * SECTOR) as usize]);
                if fua && w.result.is_ok() {
                    // Q40: the children get the write without FUA, then a quorum flush decides.
                    let f = self.apply(&Step::Flush);
                    w.events.extend(f.events);
                    w.result = f.result;
                }
                w
            }
            Step::WriteZeroes { sector, sectors } => {
                self.write_all(sector * SECTOR, &vec![0; (sectors * SECTOR) as usize])
            }
            Step::Read { sector, sectors } => {
                let (off, len) = ((sector * SECTOR) as usize, (sectors * SECTOR) as usize);
                let c = self.config;
                let stale: Vec<bool> = (0..c.children)
                    .map(|i| !self.in_sync(i, off as u64, len as u64))
                    .collect();
                let answers: Vec<Result<Vec<u8>, ErrorKind>> = (0..c.children)
                    .map(|i| match self.faults[i].read {
                        Some(k) => Err(k),
                        None => Ok(self.mem[i][off..off + len].to_vec()),
                    })
                    .collect();
                let v = model_read(c.threshold, c.fifo, c.rewrite, false, &answers, &stale);
                if let Ok(data) = &v.result {
                    for &i in &v.rewrites {
                        let f = self.faults[i];
                        if f.write.is_some() {
                            self.mark(i, off as u64, len as u64);
                        } else {
                            if !f.lose_writes {
                                self.mem[i][off..off + len].copy_from_slice(data);
                            }
                            self.wrote(i, off as u64, len as u64);
                        }
                    }
                }
                Expect {
                    result: v.result,
                    events: v
                        .events
                        .into_iter()
                        .map(|e| {
                            let io = matches!(e, Ev::Bad { .. }).then_some(IoType::Read);
                            (e, io)
                        })
                        .collect(),
                }
            }
            Step::Flush => {
                // Q41: one child after another; never a FAILURE. D14: a success counts if the
                // child is in sync, after its flush, on what was acknowledged since the last
                // successful flush, or fewer than t children were in sync there.
                let on_acked = |m: &QuorumModel, i: usize| {
                    m.acked.iter().all(|g| !m.out_of_sync[i].contains(g))
                };
                let n = self.config.children;
                let degraded =
                    (0..n).filter(|&i| on_acked(self, i)).count() < self.config.threshold;
                let mut events = Vec::new();
                let mut errors = Vec::new();
                let mut counted = 0;
                for i in 0..n {
                    let unflushed = std::mem::take(&mut self.unflushed[i]);
                    let pending = std::mem::take(&mut self.pending[i]);
                    if let Some(k) = self.faults[i].flush {
                        events.push((
                            Ev::Bad {
                                child: i,
                                error: Some(k),
                            },
                            Some(IoType::Flush),
                        ));
                        errors.push(k);
                        // H7: what the flush should have made durable may be lost.
                        self.out_of_sync[i].extend(unflushed);
                    } else {
                        // H5: covered granules leave O_c with the flush.
                        for g in pending {
                            self.out_of_sync[i].remove(&g);
                        }
                        if degraded || on_acked(self, i) {
                            counted += 1;
                        }
                    }
                }
                let result = if counted >= self.config.threshold {
                    self.acked.clear();
                    Ok(Vec::new())
                } else if errors.is_empty() {
                    Err(ErrorKind::Io)
                } else {
                    Err(model_error_vote(&errors))
                };
                Expect { result, events }
            }
            Step::Fault { child, faults } => {
                self.faults[child] = faults;
                none
            }
            Step::Corrupt { child, at, mask } => {
                self.mem[child][at as usize] ^= mask;
                none
            }
        }
    }
}

/// The real quorum, its children, and the events it emitted.
pub struct QuorumRig {
    /// The quorum.
    pub quorum: Quorum,
    /// Its children.
    pub kids: Vec<Arc<FaultyChild>>,
    rec: Recorder,
    rt: tokio::runtime::Runtime,
    /// The rig's own copy of the model (the state before each step).
    pub model: QuorumModel,
}

impl QuorumRig {
    /// Opens a quorum with `config`.
    ///
    /// # Panics
    /// When the quorum refuses a valid configuration.
    pub fn new(config: Config) -> QuorumRig {
        let rt = crate::rt::runtime();
        let bus = EventBus::new();
        let rec = bus.record(Stream::Internal);
        let (host, _) = Host::recording(bus);
        let kids: Vec<Arc<FaultyChild>> = (0..config.children)
            .map(|_| Arc::new(FaultyChild::new(initial())))
            .collect();
        let mut opts = QuorumOptions::new("q", config.threshold);
        opts.read_pattern = if config.fifo {
            ReadPattern::Fifo
        } else {
            ReadPattern::Quorum
        };
        opts.rewrite_corrupted = config.rewrite;
        // The model has no background resync (HEALING.md H14).
        opts.resync = ballot::drivers::quorum::ResyncMode::Manual;
        let children = kids
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("c{i}"), k.clone() as Device))
            .collect();
        let quorum = Quorum::open(opts, children, host).expect("valid configuration");
        QuorumRig {
            quorum,
            kids,
            rec,
            rt,
            model: QuorumModel::new(config),
        }
    }

    /// Runs `step` on the real quorum and checks it against the model.
    ///
    /// # Panics
    /// On any difference, naming the rule.
    pub fn apply(&mut self, step: &Step) {
        let want = self.model.apply(step);
        let q = &self.quorum;
        self.rec.clear();
        let (got, range): (Result<Vec<u8>, ErrorKind>, (u64, u64)) = self.rt.block_on(async {
            match *step {
                Step::Write {
                    sector,
                    sectors,
                    byte,
                    fua,
                } => {
                    let data = Bytes::from(vec![byte; (sectors * SECTOR) as usize]);
                    let r = q.write(sector * SECTOR, data, WriteFlags { fua }).await;
                    (
                        r.map(|_| Vec::new()).map_err(|e| e.kind()),
                        (sector, sectors),
                    )
                }
                Step::WriteZeroes { sector, sectors } => {
                    let r = q
                        .write_zeroes(sector * SECTOR, sectors * SECTOR, ZeroFlags::default())
                        .await;
                    (
                        r.map(|_| Vec::new()).map_err(|e| e.kind()),
                        (sector, sectors),
                    )
                }
                Step::Read { sector, sectors } => {
                    let r = q.read(sector * SECTOR, (sectors * SECTOR) as usize).await;
                    (
                        r.map(|d| d.to_vec()).map_err(|e| e.kind()),
                        (sector, sectors),
                    )
                }
                Step::Flush => (
                    q.flush().await.map(|_| Vec::new()).map_err(|e| e.kind()),
                    (0, 0),
                ),
                Step::Fault { child, faults } => {
                    self.kids[child].set_faults(faults);
                    (Ok(Vec::new()), (0, 0))
                }
                Step::Corrupt { child, at, mask } => {
                    self.kids[child].flip(at as usize, mask);
                    (Ok(Vec::new()), (0, 0))
                }
            }
        });
        assert_eq!(got, want.result, "{step:?}: result");
        let events = recorded(self.rec.take(), range, &format!("{step:?}"));
        assert_eq!(events, want.events, "{step:?}: events");
        for (i, k) in self.kids.iter().enumerate() {
            assert!(
                k.contents() == self.model.mem[i],
                "{step:?}: child {i} contents"
            );
        }
    }

    /// Q51: the quorum's out-of-sync report equals the model's granules, merged and clipped.
    pub fn check_out_of_sync(&self) {
        let reports = self.rt.block_on(self.quorum.out_of_sync());
        check_out_of_sync(&reports, &self.model.out_of_sync, DISK_BYTES);
    }
}
