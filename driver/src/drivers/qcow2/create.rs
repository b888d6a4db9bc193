//! Creating a qcow2 image (`ballot create -f qcow2`, QMP `blockdev-create`).
//!
//! The layout is QEMU's: the header cluster (header, extensions, backing file name), then the
//! refcount table, the refcount blocks, and the L1 table, every cluster of them counted once.
//! The image is written and flushed before the call returns.

use bytes::Bytes;

use super::format::{self, Header};
use crate::device::{Device, WriteFlags};
use crate::error::{Error, ErrorKind, Result};

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub size: u64,
    /// log2 of the cluster size (QEMU's default 16: 64 KiB).
    pub cluster_bits: u32,
    /// 2 (QEMU's `compat=0.10`) or 3 (`compat=1.1`, the default).
    pub version: u32,
    /// log2 of the refcount width (default 4: 16 bits).
    pub refcount_order: u32,
    /// Backing file name as stored in the image, and its format (empty: none recorded).
    pub backing: Option<(String, String)>,
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            size: 0,
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            backing: None,
        }
    }
}

fn inval(m: impl Into<String>) -> Error {
    Error::whole(ErrorKind::Inval, m.into())
}

/// The pieces of a new image: `(offset, bytes)`.
pub type Pieces = Vec<(u64, Vec<u8>)>;

/// `cluster_bits` for a cluster size given in bytes (`qemu-img create -o cluster_size`,
/// `blockdev-create`'s `cluster-size`): it must be a power of two; [`layout`] checks the range.
pub fn cluster_bits(bytes: u64) -> std::result::Result<u32, String> {
    if !bytes.is_power_of_two() {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    Ok(bytes.trailing_zeros())
}

/// `refcount_order` for a refcount width in bits (`refcount_bits`, `refcount-bits`).
pub fn refcount_order(bits: u64) -> std::result::Result<u32, String> {
    if !bits.is_power_of_two() || bits > 64 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    Ok(bits.trailing_zeros())
}

/// The bytes of a new image's metadata: `(offset, bytes)` pieces, the image's length.
///
/// # Errors
/// Options QEMU refuses: a cluster size outside 512 B – 2 MiB, a refcount width above 64
/// bits, a size whose L1 table would exceed 32 MiB, a backing name over 1023 bytes, or a
/// version 2 image with refcounts other than 16 bits.
pub fn layout(o: &CreateOptions) -> Result<(Pieces, u64)> {
    if !(format::CLUSTER_BITS_MIN..=format::CLUSTER_BITS_MAX).contains(&o.cluster_bits) {
        return Err(inval(format!(
            "Cluster size must be a power of two between 512 and 2097152 bytes (2^{} given)",
            o.cluster_bits
        )));
    }
    if o.refcount_order > 6 {
        return Err(inval(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if o.version == 2 && o.refcount_order != 4 {
        return Err(inval(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    if o.version != 2 && o.version != 3 {
        return Err(inval(format!(
            "Invalid compatibility level: version {}",
            o.version
        )));
    }
    let cl = 1u64 << o.cluster_bits;
    let l1_entries = Header::l1_needed(o.size, o.cluster_bits);
    if l1_entries * 8 > format::L1_BYTES_MAX || l1_entries > u64::from(u32::MAX) {
        return Err(inval(format!(
            "Image size {} is too large for a cluster size of {cl} bytes",
            o.size
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cl);
    let per_block = cl * 8 / (1u64 << o.refcount_order);
    // The metadata clusters, counted by as many refcount blocks as they need.
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + blocks + l1_clusters;
        let b = total.div_ceil(per_block);
        let r = (b * 8).div_ceil(cl);
        if b == blocks && r == rt_clusters {
            break;
        }
        blocks = b;
        rt_clusters = r;
    }
    let total = 1 + rt_clusters + blocks + l1_clusters;
    let rt_off = cl;
    let blocks_off = rt_off + rt_clusters * cl;
    let l1_off = blocks_off + blocks * cl;

    // The header cluster.
    let header_len = if o.version == 3 {
        format::V3_HEADER_BYTES
    } else {
        format::V2_HEADER_BYTES
    };
    let mut h = vec![0u8; header_len as usize];
    let put32 =
        |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |h: &mut Vec<u8>, at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut h, 0, format::MAGIC);
    put32(&mut h, 4, o.version);
    put32(&mut h, 20, o.cluster_bits);
    put64(&mut h, 24, o.size);
    put32(&mut h, 36, l1_entries as u32);
    put64(&mut h, 40, l1_off);
    put64(&mut h, 48, rt_off);
    put32(&mut h, 56, rt_clusters as u32);
    if o.version == 3 {
        put32(&mut h, 96, o.refcount_order);
        put32(&mut h, 100, header_len);
    }
    if let Some((name, fmt)) = &o.backing {
        if name.len() > format::BACKING_NAME_BYTES_MAX as usize {
            return Err(inval(format!(
                "Backing file name too long ({} bytes, at most {})",
                name.len(),
                format::BACKING_NAME_BYTES_MAX
            )));
        }
        // The backing format extension, then the end of the extensions, then the name.
        // An empty format records none (the opener probes the backing file, as QEMU does).
        if !fmt.is_empty() {
            let mut ext = Vec::new();
            ext.extend_from_slice(&format::EXT_BACKING_FORMAT.to_be_bytes());
            ext.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            ext.extend_from_slice(fmt.as_bytes());
            ext.resize(ext.len().div_ceil(8) * 8, 0);
            h.extend_from_slice(&ext);
        }
        h.extend_from_slice(&[0u8; 8]);
        let name_at = h.len() as u64;
        if name_at + name.len() as u64 > cl {
            return Err(inval(
                "Backing file name does not fit in the header cluster",
            ));
        }
        h.extend_from_slice(name.as_bytes());
        put64(&mut h, 8, name_at);
        put32(&mut h, 16, name.len() as u32);
    } else {
        h.extend_from_slice(&[0u8; 8]);
    }
    h.resize(cl as usize, 0);

    let mut rt = vec![0u8; (rt_clusters * cl) as usize];
    for b in 0..blocks {
        let at = (b * 8) as usize;
        rt[at..at + 8].copy_from_slice(&(blocks_off + b * cl).to_be_bytes());
    }
    let mut rb = vec![0u8; (blocks * cl) as usize];
    for c in 0..total {
        let b = c / per_block;
        let block = &mut rb[(b * cl) as usize..((b + 1) * cl) as usize];
        format::set_refcount(block, o.refcount_order, c % per_block, 1);
    }
    let l1 = vec![0u8; (l1_clusters * cl) as usize];
    Ok((
        vec![(0, h), (rt_off, rt), (blocks_off, rb), (l1_off, l1)],
        total * cl,
    ))
}

/// Writes a new image into `file` (grown as needed) and flushes it.
///
/// # Errors
/// [`layout`]'s, or the file's I/O errors.
pub async fn create(file: &Device, o: &CreateOptions) -> Result<()> {
    let (pieces, len) = layout(o)?;
    if file.length()? < len {
        file.grow(len).await?;
    }
    for (off, data) in pieces {
        file.write(off, Bytes::from(data), WriteFlags::NONE).await?;
    }
    file.flush().await
}
