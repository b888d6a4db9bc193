//! Fuzz target `metadata_header`: a metadata node's header slot (HEALING.md H20) is read from a
//! file anything may have written, so decoding any bytes must end in a header or an error,
//! never a panic or an allocation sized by a field it has not checked; and whatever decodes
//! must encode back to a slot that decodes to the same header (the format has one spelling).

use ballot::drivers::quorum::metadata::{Header, SLOT_BYTES};

/// One input: the bytes of a slot (short or long inputs are tried as they are).
pub fn fuzz(data: &[u8]) {
    let Ok(h) = Header::decode(data) else {
        return;
    };
    let again = h
        .encode()
        .expect("a header that decoded fits in a slot when encoded");
    assert_eq!(again.len(), SLOT_BYTES as usize);
    assert_eq!(Header::decode(&again), Ok(h), "decode(encode(h)) != h");
}
