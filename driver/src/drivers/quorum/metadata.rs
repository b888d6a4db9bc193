//! The metadata node's on-disk format (HEALING.md H19–H21): what a quorum with `metadata=NODE`
//! keeps durable so that its own crash costs a bounded resync.
//!
//! ```text
//! offset 0      header slot 0 (4 KiB)   } written alternately (sequence number parity), each
//! offset 4096   header slot 1 (4 KiB)   } with a CRC32C: a torn write leaves the other slot
//! offset 8192   child 0's out-of-sync bitmap, 1 bit per 64 KiB granule, 4 KiB aligned
//!               ... one per child, in child order
//!               the write-intent bitmap, 1 bit per 4 MiB extent, 4 KiB aligned
//! ```
//!
//! A header slot, little-endian: magic `BALLOTMD`, format version (u32), header length in
//! bytes including the CRC (u32), sequence number (u64), disk length (u64), granule bytes
//! (u32), intent extent bytes (u32), clean-shutdown flag (u8), three zero bytes, child count
//! (u32), then per child its node-name (u16 length, UTF-8 bytes) and length (u64), then the
//! CRC32C (Castagnoli) of everything before it. Bitmaps: bit `i % 8` of byte `i / 8` is
//! granule (or extent) `i`. Nothing here does I/O: the quorum reads and writes the slots and
//! bitmaps through its metadata child; decoding never trusts a length it has not checked.

use crc::{Crc, CRC_32_ISCSI};

/// The first eight bytes of a header slot.
pub const MAGIC: &[u8; 8] = b"BALLOTMD";
/// This format's version.
pub const VERSION: u32 = 1;
/// Bytes of one header slot; the bitmaps start after two.
pub const SLOT_BYTES: u64 = 4096;
/// Alignment of every bitmap.
pub const ALIGN_BYTES: u64 = 4096;
/// H21: the write-intent bitmap's unit.
pub const INTENT_EXTENT_BYTES: u64 = 4 << 20;
/// The longest node-name a header stores (QEMU's limit is 31 characters).
pub const NODE_NAME_MAX: usize = 255;

/// Everything in a header slot before the per-child entries and the CRC.
const FIXED_BYTES: usize = 48;
const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// A child as the header records it (H23 checks these against the quorum at open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    /// The child's node-name.
    pub node_name: String,
    /// Its length in bytes.
    pub length: u64,
}

/// A decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Incremented by every header write; the slot is `seq % 2`.
    pub seq: u64,
    /// The quorum's length in bytes.
    pub disk_len: u64,
    /// Out-of-sync granule bytes (64 KiB).
    pub granule: u32,
    /// Write-intent extent bytes (4 MiB).
    pub extent: u32,
    /// H23: set by a clean shutdown, cleared before the first write after open.
    pub clean: bool,
    /// The children, in child order.
    pub children: Vec<ChildInfo>,
}

impl Header {
    /// The slot this header goes to.
    pub fn slot(&self) -> u64 {
        self.seq % 2
    }

    /// The slot's bytes (exactly [`SLOT_BYTES`]).
    ///
    /// # Errors
    /// A node-name longer than [`NODE_NAME_MAX`] bytes, or more children than fit in a slot.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut b = Vec::with_capacity(SLOT_BYTES as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // header length, set below
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.disk_len.to_le_bytes());
        b.extend_from_slice(&self.granule.to_le_bytes());
        b.extend_from_slice(&self.extent.to_le_bytes());
        b.push(u8::from(self.clean));
        b.extend_from_slice(&[0; 3]);
        let count = u32::try_from(self.children.len()).map_err(|_| "too many children")?;
        b.extend_from_slice(&count.to_le_bytes());
        for c in &self.children {
            if c.node_name.len() > NODE_NAME_MAX {
                return Err(format!(
                    "node-name '{}' is longer than {NODE_NAME_MAX} bytes",
                    c.node_name
                ));
            }
            b.extend_from_slice(&(c.node_name.len() as u16).to_le_bytes());
            b.extend_from_slice(c.node_name.as_bytes());
            b.extend_from_slice(&c.length.to_le_bytes());
        }
        let len = b.len() + 4;
        if len as u64 > SLOT_BYTES {
            return Err(format!(
                "{} children do not fit in a {SLOT_BYTES}-byte metadata header",
                self.children.len()
            ));
        }
        b[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = CRC32C.checksum(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SLOT_BYTES as usize, 0);
        Ok(b)
    }

    /// Decodes a slot.
    ///
    /// # Errors
    /// What is wrong with it, in words: not a metadata header, another version, a bad CRC (a
    /// torn or damaged slot), a length or count that does not fit.
    pub fn decode(slot: &[u8]) -> Result<Header, String> {
        if slot.len() < FIXED_BYTES + 4 || &slot[..8] != MAGIC {
            return Err("not a ballot metadata header".into());
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([slot[o], slot[o + 1], slot[o + 2], slot[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&slot[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "metadata format version {version}, this ballot reads {VERSION}"
            ));
        }
        let len = u32_at(12) as usize;
        if len < FIXED_BYTES + 4 || len > slot.len().min(SLOT_BYTES as usize) {
            return Err(format!("header length {len} is out of range"));
        }
        let stored = u32_at(len - 4);
        if CRC32C.checksum(&slot[..len - 4]) != stored {
            return Err("header checksum mismatch (a torn or damaged slot)".into());
        }
        let count = u32_at(44) as usize;
        let mut children = Vec::new();
        let mut at = FIXED_BYTES;
        let body_end = len - 4;
        for i in 0..count {
            if at + 2 > body_end {
                return Err(format!("child {i} runs past the header's end"));
            }
            let n = u16::from_le_bytes([slot[at], slot[at + 1]]) as usize;
            at += 2;
            if n > NODE_NAME_MAX || at + n + 8 > body_end {
                return Err(format!("child {i} runs past the header's end"));
            }
            let node_name = std::str::from_utf8(&slot[at..at + n])
                .map_err(|_| format!("child {i}'s node-name is not UTF-8"))?
                .to_string();
            at += n;
            let length = u64_at(at);
            at += 8;
            children.push(ChildInfo { node_name, length });
        }
        if at != body_end {
            return Err("header has bytes after its last child".into());
        }
        Ok(Header {
            seq: u64_at(16),
            disk_len: u64_at(24),
            granule: u32_at(32),
            extent: u32_at(36),
            clean: slot[40] != 0,
            children,
        })
    }
}

/// H20: decodes the two header slots at the start of `bytes` (at least `2 * SLOT_BYTES`)
/// and returns the newest valid header, or why neither slot is valid
/// (`slot 0: <why>; slot 1: <why>`).
///
/// # Errors
/// Neither slot holds a valid header.
pub fn read_slots(bytes: &[u8]) -> Result<Header, String> {
    let (s0, s1) = bytes[..(2 * SLOT_BYTES) as usize].split_at(SLOT_BYTES as usize);
    let (d0, d1) = (Header::decode(s0), Header::decode(s1));
    let why = format!(
        "slot 0: {}; slot 1: {}",
        d0.as_ref().err().map_or("valid", |e| e.as_str()),
        d1.as_ref().err().map_or("valid", |e| e.as_str())
    );
    newest(d0, d1).ok_or(why)
}

/// H20: of the two slots' decodings, the valid one with the higher sequence number (a torn
/// write of one slot leaves the other's state); `None` when neither is valid.
pub fn newest(slot0: Result<Header, String>, slot1: Result<Header, String>) -> Option<Header> {
    match (slot0, slot1) {
        (Ok(a), Ok(b)) => Some(if b.seq > a.seq { b } else { a }),
        (Ok(a), Err(_)) => Some(a),
        (Err(_), Ok(b)) => Some(b),
        (Err(_), Err(_)) => None,
    }
}

/// Where everything sits in a metadata node for a quorum of `children` children over a disk
/// of `disk_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The quorum's length in bytes.
    pub disk_len: u64,
    /// The number of children.
    pub children: u64,
    /// Out-of-sync granule bytes.
    pub granule: u64,
}

impl Layout {
    /// Granules of the disk (bits per out-of-sync bitmap).
    pub fn granules(&self) -> u64 {
        self.disk_len.div_ceil(self.granule)
    }

    /// Write-intent extents of the disk (bits of the intent bitmap).
    pub fn extents(&self) -> u64 {
        self.disk_len.div_ceil(INTENT_EXTENT_BYTES)
    }

    /// Bytes of one out-of-sync bitmap, aligned.
    pub fn oos_bytes(&self) -> u64 {
        self.granules().div_ceil(8).div_ceil(ALIGN_BYTES) * ALIGN_BYTES
    }

    /// Offset of child `i`'s out-of-sync bitmap.
    pub fn oos_offset(&self, i: u64) -> u64 {
        2 * SLOT_BYTES + i * self.oos_bytes()
    }

    /// Offset of the write-intent bitmap.
    pub fn intent_offset(&self) -> u64 {
        self.oos_offset(self.children)
    }

    /// Bytes of the write-intent bitmap, aligned.
    pub fn intent_bytes(&self) -> u64 {
        self.extents().div_ceil(8).div_ceil(ALIGN_BYTES) * ALIGN_BYTES
    }

    /// The smallest metadata node that holds everything.
    pub fn total_bytes(&self) -> u64 {
        self.intent_offset() + self.intent_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u64, clean: bool) -> Header {
        Header {
            seq,
            disk_len: 3 << 30,
            granule: 65536,
            extent: INTENT_EXTENT_BYTES as u32,
            clean,
            children: vec![
                ChildInfo {
                    node_name: "r0".into(),
                    length: 3 << 30,
                },
                ChildInfo {
                    node_name: "replica-é".into(),
                    length: 3 << 30,
                },
            ],
        }
    }

    #[test]
    fn h20_a_header_round_trips_and_fills_its_slot() {
        let h = header(7, true);
        let b = h.encode().unwrap();
        assert_eq!(b.len(), SLOT_BYTES as usize);
        assert_eq!(&b[..8], b"BALLOTMD");
        // 48 fixed bytes, two children (2 + 2 + 8 and 2 + 10 + 8 bytes), the CRC.
        assert_eq!(
            u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            48 + 12 + 20 + 4
        );
        assert_eq!(Header::decode(&b), Ok(h.clone()));
        assert_eq!(h.slot(), 1);
    }

    #[test]
    fn h20_a_torn_slot_is_refused_and_the_other_slot_wins() {
        let old = header(4, false).encode().unwrap();
        let mut torn = header(5, true).encode().unwrap();
        torn[30] ^= 0x10;
        assert_eq!(
            Header::decode(&torn),
            Err("header checksum mismatch (a torn or damaged slot)".into())
        );
        assert_eq!(
            newest(Header::decode(&old), Header::decode(&torn)),
            Some(header(4, false))
        );
        let new = header(5, true).encode().unwrap();
        assert_eq!(
            newest(Header::decode(&old), Header::decode(&new)),
            Some(header(5, true))
        );
        assert_eq!(
            newest(Header::decode(&[0; 4096]), Header::decode(&torn)),
            None
        );
    }

    #[test]
    fn bad_slots_are_named_not_trusted() {
        assert_eq!(
            Header::decode(&[0; 4096]),
            Err("not a ballot metadata header".into())
        );
        let mut b = header(1, false).encode().unwrap();
        b[8] = 2;
        assert_eq!(
            Header::decode(&b),
            Err("metadata format version 2, this ballot reads 1".into())
        );
        let mut b = header(1, false).encode().unwrap();
        b[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        assert_eq!(
            Header::decode(&b),
            Err("header length 100000 is out of range".into())
        );
        // A child count the bytes cannot hold, with a valid CRC: refused, not allocated.
        let mut b = header(1, false).encode().unwrap();
        b[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
        let crc = CRC32C.checksum(&b[..len - 4]);
        b[len - 4..len].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Header::decode(&b),
            Err("child 2 runs past the header's end".into())
        );
        assert_eq!(
            Header::decode(&b[..20]),
            Err("not a ballot metadata header".into())
        );
    }

    #[test]
    fn what_does_not_fit_is_refused_at_encode() {
        let mut h = header(1, false);
        h.children[0].node_name = "x".repeat(256);
        assert_eq!(
            h.encode(),
            Err(format!(
                "node-name '{}' is longer than 255 bytes",
                "x".repeat(256)
            ))
        );
        let mut h = header(1, false);
        h.children = (0..300)
            .map(|i| ChildInfo {
                node_name: format!("child-{i:04}"),
                length: 1,
            })
            .collect();
        assert_eq!(
            h.encode(),
            Err("300 children do not fit in a 4096-byte metadata header".into())
        );
    }

    #[test]
    fn h20_layout_is_2_mib_per_tib_per_child_plus_the_intent_bitmap() {
        let l = Layout {
            disk_len: 1 << 40,
            children: 3,
            granule: 65536,
        };
        assert_eq!(l.granules(), 1 << 24);
        assert_eq!(l.oos_bytes(), 2 << 20);
        assert_eq!(l.oos_offset(0), 8192);
        assert_eq!(l.oos_offset(2), 8192 + (4 << 20));
        assert_eq!(l.extents(), 1 << 18);
        assert_eq!(l.intent_bytes(), 32 << 10);
        assert_eq!(l.intent_offset(), 8192 + (6 << 20));
        assert_eq!(l.total_bytes(), 8192 + (6 << 20) + (32 << 10));
        // A small, unaligned disk still gets whole 4 KiB bitmaps.
        let s = Layout {
            disk_len: 135_168,
            children: 2,
            granule: 65536,
        };
        assert_eq!(
            (s.granules(), s.oos_bytes(), s.extents(), s.intent_bytes()),
            (3, 4096, 1, 4096)
        );
        assert_eq!(s.total_bytes(), 8192 + 2 * 4096 + 4096);
    }
}
