//! Repair of a dirty image at a writable open, as QEMU repairs one (issue 19).
//!
//! QEMU with `lazy-refcounts=on` sets the dirty bit and lets refcounts fall behind the
//! references until a clean close; after a crash the image keeps the bit, and the next
//! writable open must repair the refcounts before anything is allocated. ballot never writes
//! lazily, but it opens such images as they come: the references are counted from the tables
//! (header, L1 and L2 tables, data and compressed clusters, internal snapshots, the snapshot
//! table), a new refcount table and new refcount blocks that count exactly those (and
//! themselves) are written past the end of the file and flushed, the COPIED flags are set
//! exactly where a cluster's count is one, and only then does one write of the header's
//! first sector switch to the new table and clear the dirty bit. A crash at any point leaves
//! either the old dirty image (repaired again at the next open) or the repaired one; the old
//! refcount clusters become free space.

use bytes::Bytes;

use super::check::references;
use super::format::{self, Header, L2Entry};
use super::read_clipped;
use crate::device::{Device, WriteFlags};
use crate::error::{Error, ErrorKind, Result};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// What a repair did, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Clusters whose stored refcount differed from the references.
    pub refcounts_fixed: u64,
    /// L1 and L2 entries whose COPIED flag was wrong.
    pub copied_fixed: u64,
}

/// Repairs the dirty image in `file` whose header is `h`; returns its new header and what
/// changed.
///
/// # Errors
/// Tables damaged beyond a refcount rebuild (an entry pointing past the end of the file, a
/// reserved bit), a reference count the image's refcount width cannot hold, or I/O errors.
pub(super) async fn repair_dirty(
    file: &Device,
    h: &Header,
    label: &str,
) -> Result<(Header, Repaired)> {
    let fail = |m: String| Error::whole(ErrorKind::Inval, format!("Image {label}: {m}"));
    let cl = h.cluster_size();
    let found = references(file, h).await?;
    if found.report.corruptions > 0 {
        return Err(fail(format!(
            "the image is marked dirty and its tables are damaged ({}); repair it with 'qemu-img check -r all'",
            found.report.messages.first().cloned().unwrap_or_default()
        )));
    }
    let mut refs = found.refs;
    let max = format::refcount_max(h.refcount_order);
    if let Some((c, n)) = refs.iter().find(|(_, n)| **n > max) {
        return Err(fail(format!(
            "cluster {c} has {n} references, more than {}-bit refcounts hold",
            1u32 << h.refcount_order
        )));
    }
    let mut done = Repaired::default();
    // What the old structure says, to count the fixes.
    let old = stored_refcounts(file, h).await?;

    // COPIED flags: exactly where the count is one (QEMU's check sets and clears them).
    let file_len = file.length()?;
    let l1_bytes = u64::from(h.l1_size) * 8;
    let mut l1_raw = read_clipped(file, h.l1_offset, l1_bytes, file_len)
        .await?
        .to_vec();
    let mut l1_changed = false;
    for i in 0..h.l1_size as usize {
        let e1 = be64(&l1_raw, i * 8);
        let Some(l2off) = format::decode_l1(e1, h.cluster_bits).map_err(|e| fail(e.to_string()))?
        else {
            continue;
        };
        let want = refs.get(&(l2off / cl)).copied() == Some(1);
        let e1_new = if want {
            e1 | format::OFLAG_COPIED
        } else {
            e1 & !format::OFLAG_COPIED
        };
        if e1_new != e1 {
            l1_raw[i * 8..i * 8 + 8].copy_from_slice(&e1_new.to_be_bytes());
            l1_changed = true;
            done.copied_fixed += 1;
        }
        let mut l2 = read_clipped(file, l2off, cl, file_len).await?.to_vec();
        let mut l2_changed = false;
        for j in 0..(cl / 8) as usize {
            let raw = be64(&l2, j * 8);
            let e = format::decode_l2(raw, h.cluster_bits, h.version)
                .map_err(|e| fail(e.to_string()))?;
            let fixed = match e {
                L2Entry::Normal { host, copied } => {
                    let want = refs.get(&(host / cl)).copied() == Some(1);
                    (want != copied).then_some(L2Entry::Normal { host, copied: want })
                }
                L2Entry::Zero {
                    host: Some(host),
                    copied,
                } => {
                    let want = refs.get(&(host / cl)).copied() == Some(1);
                    (want != copied).then_some(L2Entry::Zero {
                        host: Some(host),
                        copied: want,
                    })
                }
                _ => None,
            };
            if let Some(f) = fixed {
                l2[j * 8..j * 8 + 8].copy_from_slice(&format::encode_l2(f).to_be_bytes());
                l2_changed = true;
                done.copied_fixed += 1;
            }
        }
        if l2_changed {
            file.write(l2off, Bytes::from(l2), WriteFlags::NONE).await?;
        }
    }
    if l1_changed {
        file.write(h.l1_offset, Bytes::from(l1_raw), WriteFlags::NONE)
            .await?;
    }

    // The new refcount structure, past every cluster in use and the end of the file: as
    // many blocks as the clusters up to its own end need, and a table for them.
    let used_end = refs.keys().max().map_or(0, |c| c + 1);
    let start = used_end.max(file_len.div_ceil(cl));
    let per_block = cl * 8 / (1u64 << h.refcount_order);
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let end = start + rt_clusters + blocks;
        let b = end.div_ceil(per_block);
        let r = (b * 8).div_ceil(cl);
        if b == blocks && r == rt_clusters {
            break;
        }
        blocks = b;
        rt_clusters = r;
    }
    if rt_clusters > u64::from(u32::MAX) || rt_clusters * cl > format::REFTABLE_BYTES_MAX {
        return Err(fail(
            "the refcount table a repair needs is too large".into(),
        ));
    }
    let rt_off = start * cl;
    let blocks_off = rt_off + rt_clusters * cl;
    for c in start..start + rt_clusters + blocks {
        refs.insert(c, 1);
    }
    let end = (start + rt_clusters + blocks) * cl;
    if file.length()? < end {
        file.grow(end).await?;
    }
    let mut rt = vec![0u8; (rt_clusters * cl) as usize];
    for b in 0..blocks {
        let mut block = vec![0u8; cl as usize];
        for i in 0..per_block {
            if let Some(&n) = refs.get(&(b * per_block + i)) {
                format::set_refcount(&mut block, h.refcount_order, i, n);
            }
        }
        let at = blocks_off + b * cl;
        file.write(at, Bytes::from(block), WriteFlags::NONE).await?;
        rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
    }
    file.write(rt_off, Bytes::from(rt), WriteFlags::NONE)
        .await?;
    file.flush().await?;

    // The switch: the header's first sector, in one write.
    let sector = u64::from(file.request_alignment().max(512));
    let mut head = read_clipped(file, 0, sector, file.length()?)
        .await?
        .to_vec();
    head[48..56].copy_from_slice(&rt_off.to_be_bytes());
    head[56..60].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
    let incompatible = h.incompatible & !format::INCOMPAT_DIRTY;
    head[72..80].copy_from_slice(&incompatible.to_be_bytes());
    file.write(0, Bytes::from(head), WriteFlags::NONE).await?;
    file.flush().await?;

    let mut clusters: Vec<u64> = refs.keys().chain(old.keys()).copied().collect();
    clusters.sort_unstable();
    clusters.dedup();
    let own = start..start + rt_clusters + blocks;
    done.refcounts_fixed = clusters
        .iter()
        .filter(|c| {
            // The new structure's own clusters are not fixes.
            !own.contains(c)
                && refs.get(c).copied().unwrap_or(0) != old.get(c).copied().unwrap_or(0)
        })
        .count() as u64;
    let mut nh = h.clone();
    nh.reftable_offset = rt_off;
    nh.reftable_clusters = rt_clusters as u32;
    nh.incompatible = incompatible;
    Ok((nh, done))
}

/// The refcounts the image stores, by cluster (non-zero ones; unreadable blocks skipped).
async fn stored_refcounts(
    file: &Device,
    h: &Header,
) -> Result<std::collections::HashMap<u64, u64>> {
    let cl = h.cluster_size();
    let file_len = file.length()?;
    let mut out = std::collections::HashMap::new();
    let rt_bytes = u64::from(h.reftable_clusters) * cl;
    let rt = read_clipped(file, h.reftable_offset, rt_bytes, file_len).await?;
    let per = cl * 8 / (1u64 << h.refcount_order);
    for bi in 0..(rt_bytes / 8) as usize {
        let boff = be64(&rt, bi * 8);
        if boff == 0 || boff % cl != 0 || boff.saturating_add(cl) > file_len.div_ceil(cl) * cl {
            continue;
        }
        let block = read_clipped(file, boff, cl, file_len).await?;
        for i in 0..per {
            let n = format::get_refcount(&block, h.refcount_order, i);
            if n != 0 {
                out.insert(bi as u64 * per + i, n);
            }
        }
    }
    Ok(out)
}
