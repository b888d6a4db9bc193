//! The self-describing sector format (SIMULATION.md V6, V7).
//!
//! Every sector the workload writes carries a header (magic, write id, sector index, writer,
//! epoch), a filler derived from write id and sector, and a checksum. Any 512 bytes therefore
//! decode to exactly one of: a known write for this sector, a write for another sector
//! (misdirected), zeros, or nothing (corrupt or torn). The oracle works on decoded values only.

use crate::rng::{hash_words, mix64};

/// The oracle's unit (SIMULATION.md §2).
pub const SECTOR: usize = 512;
/// Bytes per sector as u64.
pub const SECTOR_U64: u64 = SECTOR as u64;
const MAGIC: &[u8; 8] = b"BALLOTv1";
const WORDS: usize = SECTOR / 8;

/// What one sector's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// All zero bytes.
    Zero,
    /// The data of write `id` for sector `sector` (write 0 is the initial image).
    Data {
        /// Write id.
        id: u64,
        /// The sector the data was generated for.
        sector: u64,
    },
}

/// The decoding of 512 bytes (V7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A value (zeros, or a write's data for some sector).
    Value(Value),
    /// Corrupt or torn bytes.
    Garbage,
}

/// Writes the bytes of `v` into `out` (exactly one sector).
pub fn encode_into(v: Value, out: &mut [u8]) {
    assert_eq!(out.len(), SECTOR, "encode_into needs one sector");
    match v {
        Value::Zero => out.fill(0),
        Value::Data { id, sector } => {
            out[0..8].copy_from_slice(MAGIC);
            out[8..16].copy_from_slice(&id.to_le_bytes());
            out[16..24].copy_from_slice(&sector.to_le_bytes());
            // Writer and epoch: quorum runs have one writer (the guest, 0) and epoch 0.
            out[24..32].fill(0);
            let base = mix64(id ^ mix64(sector));
            for w in 4..WORDS - 1 {
                let word = mix64(base ^ w as u64);
                out[w * 8..w * 8 + 8].copy_from_slice(&word.to_le_bytes());
            }
            let sum = checksum(&out[..SECTOR - 8]);
            out[SECTOR - 8..].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect();
    hash_words(&words)
}

/// Decodes one sector's bytes.
pub fn decode(bytes: &[u8]) -> Decoded {
    assert_eq!(bytes.len(), SECTOR, "decode needs one sector");
    if bytes[0..8] != MAGIC[..] {
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::Value(Value::Zero)
        } else {
            Decoded::Garbage
        };
    }
    let id = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let sector = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let v = Value::Data { id, sector };
    let mut expect = [0u8; SECTOR];
    encode_into(v, &mut expect);
    if expect[..] == bytes[..] {
        Decoded::Value(v)
    } else {
        Decoded::Garbage
    }
}

/// A 64-bit digest of a buffer, for traces and vote models (not cryptographic).
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64 ^ bytes.len() as u64;
    for c in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = mix64(h ^ u64::from_le_bytes(w));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_every_sector_decodes_to_exactly_what_was_encoded() {
        let mut buf = [0u8; SECTOR];
        let v = Value::Data { id: 77, sector: 9 };
        encode_into(v, &mut buf);
        assert_eq!(decode(&buf), Decoded::Value(v));
        encode_into(Value::Zero, &mut buf);
        assert_eq!(decode(&buf), Decoded::Value(Value::Zero));
    }

    #[test]
    fn v7_one_flipped_bit_anywhere_is_garbage() {
        let v = Value::Data { id: 3, sector: 1 };
        let mut clean = [0u8; SECTOR];
        encode_into(v, &mut clean);
        for bit in [0usize, 70, 200, 2000, 4095] {
            let mut b = clean;
            b[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode(&b), Decoded::Garbage, "bit {bit}");
        }
        let mut z = [0u8; SECTOR];
        z[511] = 1;
        assert_eq!(decode(&z), Decoded::Garbage);
    }
}
