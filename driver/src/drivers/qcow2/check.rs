//! A consistency check of a qcow2 image as stored (not through a node's cache): every
//! cluster's refcount against the references the metadata holds, as `qemu-img check` counts
//! them. The simulator runs it after every crash (issue 19: only leaks are allowed), tests run
//! it beside `qemu-img check`.

use std::collections::HashMap;

use super::format::{self, Header, L2Entry};
use super::read_clipped;
use crate::device::Device;
use crate::error::Result;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is above their references (harmless: space is lost).
    pub leaks: u64,
    /// Clusters whose refcount is below their references, entries pointing outside the file,
    /// COPIED flags that disagree with a refcount: real damage.
    pub corruptions: u64,
    /// One line per corruption (at most 100) and a summary of leaks.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// No corruption (leaks allowed).
    pub fn is_consistent(&self) -> bool {
        self.corruptions == 0
    }

    fn corrupt(&mut self, m: String) {
        self.corruptions += 1;
        if self.messages.len() < 100 {
            self.messages.push(m);
        }
    }
}

struct Walk<'a> {
    file: &'a Device,
    h: &'a Header,
    file_len: u64,
    refs: HashMap<u64, u64>,
    report: CheckReport,
}

impl Walk<'_> {
    fn cl(&self) -> u64 {
        self.h.cluster_size()
    }

    /// Counts one reference to each cluster of `[off, off + len)`.
    fn count(&mut self, what: &str, off: u64, len: u64) {
        let cl = self.cl();
        if off
            .checked_add(len)
            .is_none_or(|e| e > self.file_len.div_ceil(cl) * cl)
        {
            self.report.corrupt(format!(
                "{what} at offset {off} ({len} bytes) lies past the end of the file"
            ));
            return;
        }
        for c in off / cl..(off + len.max(1)).div_ceil(cl) {
            *self.refs.entry(c).or_insert(0) += 1;
        }
    }

    async fn table(&mut self, off: u64, len: u64) -> Result<Vec<u64>> {
        let raw = read_clipped(self.file, off, len, self.file_len).await?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Counts an L1 table's L2 tables and their clusters; returns the `(L2 offset, L1 entry,
    /// [(entry, L2 entry raw)])` of the active table for the COPIED check.
    async fn l1(
        &mut self,
        what: &str,
        l1_off: u64,
        l1_size: u64,
    ) -> Result<Vec<(u64, u64, Vec<u64>)>> {
        let cl = self.cl();
        self.count(&format!("{what} L1 table"), l1_off, l1_size * 8);
        let l1 = self.table(l1_off, l1_size * 8).await?;
        let mut out = Vec::new();
        for (i, &e1) in l1.iter().enumerate() {
            let l2off = match format::decode_l1(e1, self.h.cluster_bits) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(e) => {
                    self.report.corrupt(format!("{what} L1 entry {i}: {e}"));
                    continue;
                }
            };
            if l2off + cl > self.file_len.div_ceil(cl) * cl {
                self.report.corrupt(format!(
                    "{what} L1 entry {i}: L2 table at {l2off} lies past the end of the file"
                ));
                continue;
            }
            self.count(&format!("{what} L2 table"), l2off, cl);
            let l2 = self.table(l2off, cl).await?;
            for (j, &e2) in l2.iter().enumerate() {
                match format::decode_l2(e2, self.h.cluster_bits, self.h.version) {
                    Ok(L2Entry::Normal { host, .. })
                    | Ok(L2Entry::Zero {
                        host: Some(host), ..
                    }) => self.count(
                        &format!("{what} data cluster (L2 {l2off} entry {j})"),
                        host,
                        cl,
                    ),
                    Ok(L2Entry::Compressed { host, len }) => self.count(
                        &format!("{what} compressed cluster (L2 {l2off} entry {j})"),
                        host,
                        len,
                    ),
                    Ok(_) => {}
                    Err(e) => self
                        .report
                        .corrupt(format!("{what} L2 table {l2off} entry {j}: {e}")),
                }
            }
            out.push((l2off, e1, l2));
        }
        Ok(out)
    }
}

/// What the metadata references, the refcount structure left out: clusters and their
/// reference counts, the active tables (L2 offset, L1 entry, L2 entries) for the COPIED
/// flags, and the corruptions met on the way.
pub(super) struct References {
    pub refs: HashMap<u64, u64>,
    pub active: Vec<(u64, u64, Vec<u64>)>,
    pub report: CheckReport,
}

/// Walks the header, the active L1 and L2 tables and every internal snapshot's, counting the
/// clusters they reference.
///
/// # Errors
/// The file cannot be read.
pub(super) async fn references(file: &Device, h: &Header) -> Result<References> {
    let file_len = file.length()?;
    let cl = h.cluster_size();
    let mut w = Walk {
        file,
        h,
        file_len,
        refs: HashMap::new(),
        report: CheckReport::default(),
    };
    w.count("header", 0, cl);
    let active = w.l1("active", h.l1_offset, u64::from(h.l1_size)).await?;
    // Internal snapshots: their table and their L1 tables (QEMU's snapshot table layout).
    if h.nb_snapshots > 0 {
        let mut at = h.snapshots_offset;
        let start = at;
        for s in 0..h.nb_snapshots {
            if at >= file_len {
                w.report.corrupt(format!(
                    "snapshot {s}: the snapshot table runs past the end of the file"
                ));
                break;
            }
            let fixed = read_clipped(file, at, 40, file_len).await?;
            let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or([0; 8]));
            let l1_size = u64::from(u32::from_be_bytes(
                fixed[8..12].try_into().unwrap_or([0; 4]),
            ));
            let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
            let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let extra = u64::from(u32::from_be_bytes(
                fixed[36..40].try_into().unwrap_or([0; 4]),
            ));
            if l1_size * 8 > format::L1_BYTES_MAX || extra > 1 << 20 {
                w.report
                    .corrupt(format!("snapshot {s}: implausible L1 size or extra data"));
                break;
            }
            w.l1(&format!("snapshot {s}"), l1_off, l1_size).await?;
            at += 40 + extra + id_len + name_len;
            at = at.div_ceil(8) * 8;
        }
        w.count("snapshot table", start, at - start);
    }
    Ok(References {
        refs: w.refs,
        active,
        report: w.report,
    })
}

/// Checks the image in `file` whose header is `h`.
///
/// # Errors
/// The file cannot be read.
pub async fn check(file: &Device, h: &Header) -> Result<CheckReport> {
    let file_len = file.length()?;
    let cl = h.cluster_size();
    let found = references(file, h).await?;
    let active = found.active;
    let mut w = Walk {
        file,
        h,
        file_len,
        refs: found.refs,
        report: found.report,
    };
    // The refcount structure itself.
    let rt_bytes = u64::from(h.reftable_clusters) * cl;
    w.count("refcount table", h.reftable_offset, rt_bytes);
    let reftable = w.table(h.reftable_offset, rt_bytes).await?;
    let per = cl * 8 / u64::from(h.refcount_bits());
    let mut stored: HashMap<u64, u64> = HashMap::new();
    for (bi, &boff) in reftable.iter().enumerate() {
        if boff == 0 {
            continue;
        }
        if boff % cl != 0
            || boff
                .checked_add(cl)
                .is_none_or(|e| e > file_len.div_ceil(cl) * cl)
        {
            w.report.corrupt(format!(
                "refcount table entry {bi}: block at {boff} is invalid"
            ));
            continue;
        }
        w.count("refcount block", boff, cl);
        let block = read_clipped(file, boff, cl, file_len).await?;
        for i in 0..per {
            let r = format::get_refcount(&block, h.refcount_order, i);
            if r != 0 {
                stored.insert(bi as u64 * per + i, r);
            }
        }
    }
    let mut clusters: Vec<u64> = stored.keys().chain(w.refs.keys()).copied().collect();
    clusters.sort_unstable();
    clusters.dedup();
    let mut leaks = 0;
    for c in clusters {
        let want = w.refs.get(&c).copied().unwrap_or(0);
        let have = stored.get(&c).copied().unwrap_or(0);
        if have < want {
            w.report.corrupt(format!(
                "ERROR cluster {c} refcount={have} reference={want}"
            ));
        } else if have > want {
            leaks += 1;
        }
    }
    // COPIED flags of the active tables: set exactly when the refcount is one.
    for (l2off, e1, l2) in &active {
        let r = stored.get(&(l2off / cl)).copied().unwrap_or(0);
        if (e1 & format::OFLAG_COPIED != 0) && r != 1 {
            w.report.corrupt(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_entry={e1:x} refcount={r}"
            ));
        }
        for &e2 in l2 {
            if let Ok(L2Entry::Normal { host, copied }) =
                format::decode_l2(e2, h.cluster_bits, h.version)
            {
                let r = stored.get(&(host / cl)).copied().unwrap_or(0);
                if copied && r != 1 {
                    w.report.corrupt(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={e2:x} refcount={r}"
                    ));
                }
            }
        }
    }
    w.report.leaks = leaks;
    if leaks > 0 {
        w.report.messages.push(format!("{leaks} leaked clusters"));
    }
    Ok(w.report)
}
