//! The trace: the ordered record of every simulated event and its SHA-256 (SIMULATION.md M3).
//!
//! Records are canonical (virtual time in nanoseconds, node, kind, op id, offset, length,
//! result and a digest of any data); wall time and addresses never enter them. The last
//! records are kept for failure reports; `replay -v` prints every one as it happens.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};

/// How many records a failure report shows.
const TAIL_RECORDS_MAX: usize = 400;

/// One canonical trace record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Virtual time since the run started, in nanoseconds.
    pub t_ns: u64,
    /// Node or disk the event happened on (`guest`, `c0`, ...).
    pub node: String,
    /// Event kind (`read`, `write`, `fault`, `event`, ...).
    pub kind: &'static str,
    /// Guest op id the event belongs to (0: none).
    pub op: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Result: 0 ok, else an error number or a fault code.
    pub result: i64,
    /// Digest of the data moved, or a detail word.
    pub digest: u64,
    /// Free text for humans; not hashed.
    pub note: String,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>10}.{:06}s {:<6} {:<10} op={:<6} off={:<10} len={:<8} res={:<4} d={:016x}",
            self.t_ns / 1_000_000_000,
            (self.t_ns % 1_000_000_000) / 1000,
            self.node,
            self.kind,
            self.op,
            self.offset,
            self.len,
            self.result,
            self.digest
        )?;
        if !self.note.is_empty() {
            write!(f, " {}", self.note)?;
        }
        Ok(())
    }
}

/// The trace of one run.
pub struct Trace {
    hasher: Sha256,
    records: u64,
    tail: VecDeque<Record>,
    verbose: bool,
    window: (u64, u64),
    all: Option<Vec<String>>,
}

impl Trace {
    /// A trace; with `verbose`, records with op ids inside `window` are printed as they occur.
    pub fn new(verbose: bool, window: (u64, u64)) -> Trace {
        Trace {
            hasher: Sha256::new(),
            records: 0,
            tail: VecDeque::new(),
            verbose,
            window,
            all: None,
        }
    }

    /// Keeps every record as text (saved traces, determinism diffs).
    pub fn keep_all(&mut self) {
        self.all = Some(Vec::new());
    }

    /// Every record as text, if kept.
    pub fn take_all(&mut self) -> Vec<String> {
        self.all.take().unwrap_or_default()
    }

    /// Appends a record.
    pub fn push(&mut self, r: Record) {
        let mut canon = Vec::with_capacity(64 + r.node.len() + r.kind.len());
        canon.extend_from_slice(&r.t_ns.to_le_bytes());
        canon.extend_from_slice(r.node.as_bytes());
        canon.push(0);
        canon.extend_from_slice(r.kind.as_bytes());
        canon.push(0);
        for w in [r.op, r.offset, r.len, r.result as u64, r.digest] {
            canon.extend_from_slice(&w.to_le_bytes());
        }
        self.hasher.update(&canon);
        self.records += 1;
        if self.verbose && (r.op == 0 || (r.op >= self.window.0 && r.op <= self.window.1)) {
            println!("{r}");
        }
        if let Some(all) = &mut self.all {
            all.push(r.to_string());
        }
        if self.tail.len() == TAIL_RECORDS_MAX {
            self.tail.pop_front();
        }
        self.tail.push_back(r);
    }

    /// Number of records so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The trace hash so far, as hex.
    pub fn hash_hex(&self) -> String {
        let d = self.hasher.clone().finalize();
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The last records (oldest first).
    pub fn tail(&self) -> impl Iterator<Item = &Record> {
        self.tail.iter()
    }
}
