//! The self-describing sector format (SIMULATION.md V6, V7).
//!
//! Every sector the workload writes carries a header (magic, write id, sector index, writer,
//! epoch), a filler derived from write id and sector, and a checksum. Any 512 bytes therefore
//! decode to exactly one of: a known write for this sector, a write for another sector
//! (misdirected), zeros, or nothing (corrupt or torn). The oracle works on decoded values only.

use std::sync::Arc;

use crate::rng::mix64;

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

/// What a sector of a disk holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A decodable value.
    V(Value),
    /// Bytes that decode to nothing (torn or garbage).
    Raw(Arc<[u8]>),
}

/// The decoding of 512 bytes (V7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A value (zeros, or a write's data for some sector).
    Value(Value),
    /// Corrupt or torn bytes.
    Garbage,
}

/// The filler's per-word keys: word `w` of a sector's filler is `base ^ FILL[w]`, where `base`
/// depends on write id and sector only. One xor a word (the old filler hashed every word, and
/// that was a quarter of a sweep's time, issue 22).
const FILL: [u64; WORDS] = {
    let mut t = [0u64; WORDS];
    let mut w = 0;
    while w < WORDS {
        t[w] = mix64(0x5eed_f111 ^ (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        w += 1;
    }
    t
};

/// Writes the bytes of `v` into `out` (exactly one sector): for data (V6) magic, write id,
/// sector, writer and epoch (quorum runs have one writer, the guest 0, and epoch 0), the
/// filler, and the checksum.
pub fn encode_into(v: Value, out: &mut [u8]) {
    assert_eq!(out.len(), SECTOR, "encode_into needs one sector");
    match v {
        Value::Zero => out.fill(0),
        Value::Data { id, sector } => {
            let head = [u64::from_le_bytes(*MAGIC), id, sector, 0];
            let base = mix64(id ^ mix64(sector));
            let mut sum = 0u64;
            let (head_bytes, rest) = out.split_at_mut(32);
            for (chunk, word) in head_bytes.chunks_exact_mut(8).zip(head) {
                sum = sum.wrapping_add(word);
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            let (fill, tail) = rest.split_at_mut(SECTOR - 40);
            for (chunk, key) in fill.chunks_exact_mut(8).zip(&FILL[4..WORDS - 1]) {
                let word = base ^ key;
                sum = sum.wrapping_add(word);
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            tail.copy_from_slice(&checksum(sum).to_le_bytes());
        }
    }
}

/// The checksum word: the wrapping sum of the other 63 words, mixed. A flipped bit changes
/// its word by a power of two, so it always changes the sum.
fn checksum(sum: u64) -> u64 {
    mix64(sum ^ 0x0c4e_c5a1_5eed_0001)
}

/// Decodes one sector's bytes.
pub fn decode(bytes: &[u8]) -> Decoded {
    assert_eq!(bytes.len(), SECTOR, "decode needs one sector");
    let word = |w: usize| u64::from_le_bytes(bytes[w * 8..w * 8 + 8].try_into().expect("8 bytes"));
    if bytes[0..8] != MAGIC[..] {
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::Value(Value::Zero)
        } else {
            Decoded::Garbage
        };
    }
    let (id, sector) = (word(1), word(2));
    let base = mix64(id ^ mix64(sector));
    let mut sum = 0u64;
    let mut same = word(3) == 0;
    for (w, chunk) in bytes[..SECTOR - 8].chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        sum = sum.wrapping_add(got);
        if w >= 4 {
            same &= got == base ^ FILL[w];
        }
    }
    if same && word(WORDS - 1) == checksum(sum) {
        Decoded::Value(Value::Data { id, sector })
    } else {
        Decoded::Garbage
    }
}

/// A sector's fingerprint for read digests: equal fingerprints mean equal bytes (up to hash
/// collisions). A clean value's is computed from the value, without looking at bytes.
pub fn fingerprint(v: Value) -> u64 {
    match v {
        Value::Zero => 0x7a3e_0000_0000_0001,
        Value::Data { id, sector } => mix64(mix64(id ^ 0xf1_9e4) ^ sector),
    }
}

/// The fingerprint of bytes that may not decode (a corrupt copy).
pub fn fingerprint_bytes(bytes: &[u8]) -> u64 {
    match decode(bytes) {
        Decoded::Value(v) => fingerprint(v),
        Decoded::Garbage => digest(bytes),
    }
}

/// The digest of a read of whole sectors from their fingerprints ([`fingerprint`]).
pub fn digest_fingerprints(fps: impl Iterator<Item = u64>) -> u64 {
    fps.fold(0x243f_6a88_85a3_08d3, |h, f| mix64(h ^ f))
}

/// The digest of data in traces and vote models: of whole sectors, from their fingerprints
/// (so a disk that knows its sectors' values digests a read without hashing its bytes);
/// of anything else, from the bytes.
pub fn data_digest(bytes: &[u8]) -> u64 {
    if bytes.len() % SECTOR == 0 {
        digest_fingerprints(bytes.chunks_exact(SECTOR).map(fingerprint_bytes))
    } else {
        digest(bytes)
    }
}

/// The digest [`data_digest`] gives the bytes guest op `id` writes at `offset` (whole
/// sectors, each encoding `Value::Data { id, sector }`: the oracle's `write_data`), computed
/// from the values without building the bytes.
pub fn write_digest(id: u64, offset: u64, len: u64) -> u64 {
    let first = offset / SECTOR_U64;
    digest_fingerprints(
        (first..first + len / SECTOR_U64).map(|sector| fingerprint(Value::Data { id, sector })),
    )
}

/// A 64-bit digest of a buffer, for traces and vote models (not cryptographic): four
/// independent multiply-rotate lanes over the 8-byte words, so the work pipelines.
pub fn digest(bytes: &[u8]) -> u64 {
    const M: u64 = 0x9fb2_1c65_1e98_df25;
    let mut lanes = [
        0x243f_6a88_85a3_08d3 ^ bytes.len() as u64,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(b[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(M).rotate_left(29);
        }
    }
    let rest = blocks.remainder();
    for (j, c) in rest.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        lanes[j] = (lanes[j] ^ u64::from_le_bytes(w))
            .wrapping_mul(M)
            .rotate_left(29);
    }
    lanes
        .iter()
        .fold(0x4528_21e6_38d0_1377, |h, &l| mix64(h ^ l))
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

    #[test]
    fn v7_every_single_bit_flip_of_a_sector_is_garbage() {
        let v = Value::Data {
            id: 0x1234_5678,
            sector: 4095,
        };
        let mut clean = [0u8; SECTOR];
        encode_into(v, &mut clean);
        for bit in 0..SECTOR * 8 {
            let mut b = clean;
            b[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode(&b), Decoded::Garbage, "bit {bit}");
        }
    }

    #[test]
    fn v7_a_sector_torn_between_two_writes_is_garbage() {
        let (mut a, mut b) = ([0u8; SECTOR], [0u8; SECTOR]);
        encode_into(Value::Data { id: 5, sector: 2 }, &mut a);
        encode_into(Value::Data { id: 6, sector: 2 }, &mut b);
        for cut in (16..SECTOR).step_by(8) {
            let mut t = a;
            t[cut..].copy_from_slice(&b[cut..]);
            assert_eq!(decode(&t), Decoded::Garbage, "torn at byte {cut}");
        }
    }

    #[test]
    fn digest_sees_every_byte_and_the_length() {
        let buf: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let d = digest(&buf);
        for k in [0usize, 31, 32, 500, 991, 999] {
            let mut b = buf.clone();
            b[k] ^= 0x10;
            assert_ne!(digest(&b), d, "byte {k}");
        }
        assert_ne!(digest(&buf[..999]), d);
        assert_ne!(digest(&[0u8; 8]), digest(&[0u8; 16]));
    }
}
