//! The qcow2 on-disk format: the header, its extensions and the table entries, as pure
//! functions over bytes (no I/O), so the parser can be fuzzed (`fuzz/fuzz_targets/qcow2_header.rs`).
//!
//! Facts come from QEMU's `docs/interop/qcow2.txt` (the format's specification). Every field a
//! peer controls is checked before it sizes an allocation: tables are bounded by
//! [`L1_BYTES_MAX`] and [`REFTABLE_BYTES_MAX`] (QEMU's own limits) and by the file's length.

use std::fmt;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size QEMU accepts (512 bytes).
pub const CLUSTER_BITS_MIN: u32 = 9;
/// Largest cluster size QEMU accepts (2 MiB).
pub const CLUSTER_BITS_MAX: u32 = 21;
/// QEMU's limit on the L1 table (32 MiB).
pub const L1_BYTES_MAX: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const REFTABLE_BYTES_MAX: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots.
pub const SNAPSHOTS_MAX: u32 = 65536;
/// QEMU's limit on the backing file name.
pub const BACKING_NAME_BYTES_MAX: u32 = 1023;
/// The v2 header's length.
pub const V2_HEADER_BYTES: u32 = 72;
/// The v3 header's length with the compression type field.
pub const V3_HEADER_BYTES: u32 = 112;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt (QEMU found an inconsistency).
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: the backing file's format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// L1/L2 entry flag: the cluster's refcount is exactly one (writable in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): the cluster reads as zeroes.
pub const OFLAG_ZERO: u64 = 1;
/// The host offset bits of an L1 or standard L2 entry (bits 9–55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits an L1 entry must not have set (1–8, 56–62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Bits a standard L2 entry must not have set (1–8, 56–61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// The compression method of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU's default).
    Zlib,
    /// Zstandard.
    Zstd,
}

/// A header problem, worded for the user (the caller adds the file name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(msg.into()))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A decoded and validated header (with the extensions ballot reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset in the file.
    pub l1_offset: u64,
    /// Refcount table offset.
    pub reftable_offset: u64,
    /// Refcount table length in clusters.
    pub reftable_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0–6).
    pub refcount_order: u32,
    /// Header length (v2: 72).
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression: Compression,
    /// Backing file name offset and length (0, 0 when none).
    pub backing_offset: u64,
    /// Backing file name length.
    pub backing_len: u32,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format extension, if present.
    pub backing_format: Option<String>,
    /// Feature names from the feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The L1 entries a disk of `size` bytes needs.
    pub fn l1_needed(size: u64, cluster_bits: u32) -> u64 {
        let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(per_l2)
    }

    /// The name of incompatible feature `bit`, from the image's own table when it has one.
    pub fn feature_name(&self, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && *b == bit)
            .map(|(_, _, n)| n.clone())
            .unwrap_or_else(|| format!("bit {bit}"))
    }
}

/// Reads the cluster size from the first bytes of an image, to know how much of the first
/// cluster (header and extensions) to read. `None` when the bytes are not a qcow2 header.
pub fn peek_cluster_bits(first: &[u8]) -> Option<u32> {
    if first.len() < 24 || be32(first, 0) != MAGIC {
        return None;
    }
    let bits = be32(first, 20);
    (CLUSTER_BITS_MIN..=CLUSTER_BITS_MAX)
        .contains(&bits)
        .then_some(bits)
}

/// Decodes and validates the header in `first` (the image's first cluster, or all of the file
/// if it is shorter) of an image file of `file_len` bytes.
///
/// # Errors
/// A sentence naming the problem: not qcow2, an unsupported version or feature, a table that
/// lies outside the file or exceeds QEMU's limits, a malformed extension.
pub fn parse_header(first: &[u8], file_len: u64) -> Result<Header, FormatError> {
    if first.len() < 4 || be32(first, 0) != MAGIC {
        return bad("Image is not in qcow2 format");
    }
    if first.len() < V2_HEADER_BYTES as usize {
        return bad(format!(
            "qcow2 header truncated: the file holds {} bytes, the header needs {V2_HEADER_BYTES}",
            first.len()
        ));
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return bad(format!("Unsupported qcow2 version {version}"));
    }
    let backing_offset = be64(first, 8);
    let backing_len = be32(first, 16);
    let cluster_bits = be32(first, 20);
    if !(CLUSTER_BITS_MIN..=CLUSTER_BITS_MAX).contains(&cluster_bits) {
        return bad(format!(
            "Unsupported cluster size: 2^{cluster_bits} (qcow2 allows 2^{CLUSTER_BITS_MIN} to 2^{CLUSTER_BITS_MAX})"
        ));
    }
    let cluster = 1u64 << cluster_bits;
    let size = be64(first, 24);
    let crypt = be32(first, 32);
    let l1_size = be32(first, 36);
    let l1_offset = be64(first, 40);
    let reftable_offset = be64(first, 48);
    let reftable_clusters = be32(first, 56);
    let nb_snapshots = be32(first, 60);
    let snapshots_offset = be64(first, 64);
    let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
        if first.len() < 104 {
            return bad(format!(
                "qcow2 header truncated: the file holds {} bytes, a version 3 header needs 104",
                first.len()
            ));
        }
        (
            be64(first, 72),
            be64(first, 80),
            be64(first, 88),
            be32(first, 96),
            be32(first, 100),
        )
    } else {
        (0, 0, 0, 4, V2_HEADER_BYTES)
    };
    if version == 3 {
        if header_length < 104 {
            return bad(format!(
                "qcow2 header too short: header_length {header_length} (at least 104)"
            ));
        }
        if u64::from(header_length) > cluster {
            return bad(format!(
                "qcow2 header exceeds cluster size: header_length {header_length}, cluster size {cluster}"
            ));
        }
        if header_length as usize > first.len() {
            return bad(format!(
                "qcow2 header truncated: header_length {header_length} but the file holds {} bytes",
                first.len()
            ));
        }
    }
    let compression = if header_length > 104 {
        match first[104] {
            0 => Compression::Zlib,
            1 => Compression::Zstd,
            t => return bad(format!("Unknown compression type {t}")),
        }
    } else {
        Compression::Zlib
    };
    if (incompatible & INCOMPAT_COMPRESSION != 0) != (compression != Compression::Zlib) {
        return bad(
            "Invalid compression type: the compression type bit and the compression type field disagree",
        );
    }
    if refcount_order > 6 {
        return bad(format!(
            "Reference count entry width too large; may not exceed 64 bits (refcount_order {refcount_order})"
        ));
    }
    if crypt != 0 {
        return bad(format!(
            "Encrypted qcow2 images are not supported by ballot (crypt_method {crypt})"
        ));
    }
    // Extensions: from the end of the header to the end of the first cluster.
    let mut feature_names = Vec::new();
    let mut backing_format = None;
    let mut at = header_length as usize;
    let ext_end = first.len().min(cluster as usize);
    loop {
        if at + 8 > ext_end {
            // No end marker within the cluster: QEMU stops reading too.
            break;
        }
        let ty = be32(first, at);
        let len = be32(first, at + 4) as usize;
        at += 8;
        if ty == EXT_END {
            break;
        }
        if len > ext_end - at {
            return bad(format!(
                "Invalid header extension 0x{ty:08x}: length {len} runs past the first cluster"
            ));
        }
        let data = &first[at..at + len];
        match ty {
            EXT_BACKING_FORMAT => {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name_end = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                    feature_names.push((
                        e[0],
                        e[1],
                        String::from_utf8_lossy(&e[2..2 + name_end]).into_owned(),
                    ));
                }
            }
            _ => {}
        }
        at += len.div_ceil(8) * 8;
    }
    let mut h = Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        reftable_offset,
        reftable_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        header_length,
        compression,
        backing_offset,
        backing_len,
        backing_file: None,
        backing_format,
        feature_names,
    };
    let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
    let unknown = incompatible & !known;
    if unknown != 0 {
        let names: Vec<String> = (0..64u8)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| match b {
                2 => "external data file".to_string(),
                4 => "extended L2 entries".to_string(),
                _ => h.feature_name(b),
            })
            .collect();
        return bad(format!(
            "Unsupported qcow2 feature(s): {}",
            names.join(", ")
        ));
    }
    // The backing file name.
    if backing_offset != 0 {
        if backing_len > BACKING_NAME_BYTES_MAX
            || backing_offset
                .checked_add(u64::from(backing_len))
                .is_none_or(|e| e > cluster)
        {
            return bad("Backing file name too long");
        }
        let end = backing_offset as usize + backing_len as usize;
        if end > first.len() {
            return bad(
                "qcow2 header truncated: the backing file name lies past the end of the file",
            );
        }
        h.backing_file =
            Some(String::from_utf8_lossy(&first[backing_offset as usize..end]).into_owned());
    }
    // Tables: aligned, bounded, inside the file.
    let aligned = |o: u64| o % cluster == 0;
    let needed = Header::l1_needed(size, cluster_bits);
    if u64::from(l1_size) * 8 > L1_BYTES_MAX || needed * 8 > L1_BYTES_MAX {
        return bad(format!(
            "Image is too big: the L1 table would exceed {} MiB (size {size}, cluster size {cluster})",
            L1_BYTES_MAX >> 20
        ));
    }
    if u64::from(l1_size) < needed {
        return bad(format!(
            "L1 table is too small: {l1_size} entries for a {size}-byte disk (needs {needed})"
        ));
    }
    if l1_size > 0 {
        if !aligned(l1_offset) || l1_offset == 0 {
            return bad(format!("Invalid L1 table offset {l1_offset}"));
        }
        check_inside("L1 table", l1_offset, u64::from(l1_size) * 8, file_len)?;
    }
    if reftable_clusters == 0 || !aligned(reftable_offset) || reftable_offset == 0 {
        return bad(format!(
            "Invalid refcount table: offset {reftable_offset}, {reftable_clusters} clusters"
        ));
    }
    let reftable_bytes = u64::from(reftable_clusters) * cluster;
    if reftable_bytes > REFTABLE_BYTES_MAX {
        return bad(format!(
            "Reference count table too large: {reftable_bytes} bytes (limit {} MiB)",
            REFTABLE_BYTES_MAX >> 20
        ));
    }
    check_inside("refcount table", reftable_offset, reftable_bytes, file_len)?;
    if nb_snapshots > SNAPSHOTS_MAX {
        return bad(format!(
            "Too many internal snapshots: {nb_snapshots} (QEMU allows {SNAPSHOTS_MAX})"
        ));
    }
    if nb_snapshots > 0
        && (!aligned(snapshots_offset) || snapshots_offset == 0 || snapshots_offset >= file_len)
    {
        return bad(format!(
            "Invalid snapshot table offset {snapshots_offset} (the file holds {file_len} bytes)"
        ));
    }
    Ok(h)
}

fn check_inside(what: &str, offset: u64, len: u64, file_len: u64) -> Result<(), FormatError> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => bad(format!(
            "The {what} at offset {offset} ({len} bytes) lies past the end of the file ({file_len} bytes): the image is truncated or corrupt"
        )),
    }
}

/// The 8-byte field offsets a writer updates in place.
pub mod field {
    /// `incompatible_features`.
    pub const INCOMPATIBLE: usize = 72;
    /// `autoclear_features`.
    pub const AUTOCLEAR: usize = 88;
    /// `l1_size` (4 bytes) followed by `l1_table_offset`.
    pub const L1_SIZE: usize = 36;
    /// `refcount_table_offset` followed by `refcount_table_clusters` (4 bytes).
    pub const REFTABLE: usize = 48;
}

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing (or zeroes without one).
    Unallocated,
    /// Reads as zeroes; `host` keeps a preallocated cluster (v3 "zero, allocated").
    Zero {
        /// The preallocated host cluster, if any.
        host: Option<u64>,
        /// The COPIED flag.
        copied: bool,
    },
    /// Data at `host`.
    Normal {
        /// Host offset (cluster aligned).
        host: u64,
        /// The COPIED flag: refcount one, writable in place.
        copied: bool,
    },
    /// Compressed data: `len` bytes at byte offset `host` (the length is the stored sector
    /// count's upper bound; the stream may end earlier).
    Compressed {
        /// Host byte offset.
        host: u64,
        /// Bytes the compressed data may span.
        len: u64,
    },
}

/// Decodes an L2 entry of an image with `cluster_bits`.
///
/// # Errors
/// Reserved bits set, a misaligned offset, or a zero flag in a v2 image.
pub fn decode_l2(raw: u64, cluster_bits: u32, version: u32) -> Result<L2Entry, FormatError> {
    let copied = raw & OFLAG_COPIED != 0;
    if raw & OFLAG_COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = raw & ((1u64 << x) - 1);
        let sectors = (raw & !OFLAG_COPIED & !OFLAG_COMPRESSED) >> x;
        let len = (sectors + 1) * 512 - (host & 511);
        if copied {
            return bad(format!(
                "Invalid L2 entry 0x{raw:016x}: a compressed cluster with the COPIED flag"
            ));
        }
        return Ok(L2Entry::Compressed { host, len });
    }
    if raw & L2_RESERVED != 0 {
        return bad(format!("Invalid L2 entry 0x{raw:016x}: reserved bits set"));
    }
    let host = raw & OFFSET_MASK;
    if host & ((1u64 << cluster_bits) - 1) != 0 {
        return bad(format!(
            "Invalid L2 entry 0x{raw:016x}: host offset {host} is not cluster aligned"
        ));
    }
    if raw & OFLAG_ZERO != 0 {
        if version < 3 {
            return bad(format!(
                "Invalid L2 entry 0x{raw:016x}: zero flag in a version 2 image"
            ));
        }
        return Ok(L2Entry::Zero {
            host: (host != 0).then_some(host),
            copied,
        });
    }
    if host == 0 {
        return Ok(L2Entry::Unallocated);
    }
    Ok(L2Entry::Normal { host, copied })
}

/// Encodes an L2 entry (compressed entries are never written by ballot).
pub fn encode_l2(e: L2Entry) -> u64 {
    let copied = |c: bool| if c { OFLAG_COPIED } else { 0 };
    match e {
        L2Entry::Unallocated => 0,
        L2Entry::Zero { host, copied: c } => host.unwrap_or(0) | OFLAG_ZERO | copied(c),
        L2Entry::Normal { host, copied: c } => host | copied(c),
        L2Entry::Compressed { .. } => unreachable!("ballot does not write compressed clusters"),
    }
}

/// Decodes an L1 entry: the L2 table's offset (None when unallocated).
///
/// # Errors
/// Reserved bits set or a misaligned offset.
pub fn decode_l1(raw: u64, cluster_bits: u32) -> Result<Option<u64>, FormatError> {
    if raw & L1_RESERVED != 0 {
        return bad(format!("Invalid L1 entry 0x{raw:016x}: reserved bits set"));
    }
    let off = raw & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return bad(format!(
            "Invalid L1 entry 0x{raw:016x}: L2 table offset {off} is not cluster aligned"
        ));
    }
    Ok((off != 0).then_some(off))
}

/// Reads refcount entry `i` of a refcount block with `order` (width `1 << order` bits).
pub fn get_refcount(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    match order {
        6 => be64(block, i as usize * 8),
        5 => u64::from(be32(block, i as usize * 4)),
        4 => u64::from(u16::from_be_bytes([
            block[i as usize * 2],
            block[i as usize * 2 + 1],
        ])),
        3 => u64::from(block[i as usize]),
        _ => {
            // Sub-byte widths: entries fill each byte from the least significant bit.
            let bit = i * bits;
            let byte = block[(bit / 8) as usize];
            u64::from(byte >> (bit % 8)) & ((1 << bits) - 1)
        }
    }
}

/// Writes refcount entry `i` (the caller checked that `v` fits the width).
pub fn set_refcount(block: &mut [u8], order: u32, i: u64, v: u64) {
    let i = i as usize;
    match order {
        6 => block[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes()),
        5 => block[i * 4..i * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        4 => block[i * 2..i * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        3 => block[i] = v as u8,
        _ => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
    }
}

/// Largest refcount an entry of `order` holds.
pub fn refcount_max(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_round_trip_at_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / (1u64 << order);
            let max = refcount_max(order);
            for i in 0..entries {
                set_refcount(&mut block, order, i, (i * 7 + 1) % (max.min(1000) + 1));
            }
            for i in 0..entries {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i * 7 + 1) % (max.min(1000) + 1),
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn compressed_entry_decodes_offset_and_length() {
        // 64 KiB clusters: x = 62 - 8 = 54 offset bits; 3 extra sectors at byte 0x10_0200.
        let raw = OFLAG_COMPRESSED | (3u64 << 54) | 0x10_0200;
        assert_eq!(
            decode_l2(raw, 16, 3),
            Ok(L2Entry::Compressed {
                host: 0x10_0200,
                len: 4 * 512
            })
        );
    }

    #[test]
    fn reserved_bits_and_misalignment_are_refused() {
        assert!(decode_l2(0x0000_0000_0001_0002, 16, 3).is_err());
        assert!(decode_l2(0x0000_0000_0000_8000, 16, 3).is_err());
        assert!(decode_l2(OFLAG_ZERO, 16, 2).is_err());
        assert_eq!(
            decode_l2(OFLAG_ZERO | 0x3_0000, 16, 3),
            Ok(L2Entry::Zero {
                host: Some(0x3_0000),
                copied: false
            })
        );
        assert!(decode_l1(0x100, 16).is_err());
    }

    #[test]
    fn short_and_foreign_headers_are_refused_with_a_sentence() {
        assert_eq!(
            parse_header(b"QFI", 3).unwrap_err().0,
            "Image is not in qcow2 format"
        );
        let mut h = vec![0u8; 72];
        h[..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            parse_header(&h, 72).unwrap_err().0,
            "Unsupported qcow2 version 4"
        );
    }
}
