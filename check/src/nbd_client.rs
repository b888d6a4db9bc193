//! Fuzz target `nbd_client_replies`: the NBD client's reply reader (NBD.md N35, N40, N42) fed
//! what a server sends after the handshake, with requests in flight.
//!
//! Two modes, chosen by the first byte:
//! - **raw**: a few requests `(command, offset, length)`, then arbitrary bytes. The reader must
//!   not panic or allocate beyond its limits, and what it hands back must be sane: data only to
//!   reads and exactly as long as the request, descriptors only to BLOCK_STATUS, and every
//!   request either answered once or lost when the stream ends or breaks a rule.
//! - **replies**: the harness encodes valid replies — simple replies, READ chunks split into
//!   data and hole pieces in any order, BLOCK_STATUS chunks, error chunks with known and unknown
//!   values, unknown chunk types with bit 15 — in any order across requests, optionally ending
//!   with one protocol violation of N40. A model predicts each request's exact outcome: the
//!   bytes (holes as zeroes), the descriptors, the error kind (N35: unknown values are EINVAL;
//!   an unknown type with bit 15 fails just its request), or lost (after a violation or the
//!   end of the stream).

use arbitrary::{Arbitrary, Unstructured};
use ballot::nbd::client::{replay_replies, Replayed};
use ballot::ErrorKind;

const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const READ: u16 = 0;
const BLOCK_STATUS: u16 = 7;
const KINDS: [u16; 6] = [0, 1, 3, 4, 6, 7];

/// Error values a server may send, and the kind the client must map each to (N35; §6).
const ERRNOS: [(u32, ErrorKind); 9] = [
    (1, ErrorKind::Perm),
    (5, ErrorKind::Io),
    (12, ErrorKind::NoMem),
    (22, ErrorKind::Inval),
    (28, ErrorKind::NoSpc),
    (75, ErrorKind::Overflow),
    (95, ErrorKind::NotSup),
    (108, ErrorKind::Shutdown),
    (4242, ErrorKind::Inval),
];

/// One request in flight.
#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct Req {
    /// Index into the commands the client sends.
    pub kind: u8,
    /// Offset in sectors.
    pub sector: u16,
    /// Length in bytes (1–4096 used for reads, as given otherwise).
    pub length: u16,
}

impl Req {
    fn resolve(self) -> (u16, u64, u32) {
        let kind = KINDS[self.kind as usize % KINDS.len()];
        let length = if kind == READ {
            1 + u32::from(self.length) % 4096
        } else {
            u32::from(self.length)
        };
        (kind, u64::from(self.sector) * 512, length)
    }
}

/// How one request is answered in replies mode.
#[derive(Debug, Arbitrary)]
pub struct Answer {
    /// Index into [`ERRNOS`] for an error answer.
    pub error: Option<u8>,
    /// READ: cut points of the pieces (bytes, wrapped into the request).
    pub cuts: Vec<u16>,
    /// READ: which pieces are holes (bit i for piece i).
    pub holes: u8,
    /// READ: the pieces are sent in rotated order.
    pub rotate: u8,
    /// Fill byte of data pieces.
    pub fill: u8,
    /// A chunk of unknown type with bit 15 set comes first (fails the request with EINVAL).
    pub unknown_error_type: bool,
    /// BLOCK_STATUS descriptors.
    pub descriptors: Vec<(u16, u8)>,
    /// A non-READ reply goes as a NONE chunk with DONE (structured only).
    pub as_chunk: bool,
}

/// A protocol violation ending the stream (N40, N42).
#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum Violation {
    /// A reply for a cookie not in flight.
    UnknownCookie,
    /// A wrong magic.
    BadMagic,
    /// A chunk of unknown type without bit 15.
    UnknownType,
    /// The stream ends inside a header.
    Truncated,
}

/// A replies-mode case.
#[derive(Debug, Arbitrary)]
pub struct Replies {
    /// Structured replies negotiated.
    pub structured: bool,
    /// The requests in flight (at most 12).
    pub reqs: Vec<Req>,
    /// Answers, in sending order: `(request index, answer)`.
    pub answers: Vec<(u8, Answer)>,
    /// Optional violation at the end.
    pub violation: Option<Violation>,
}

fn simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk(out: &mut Vec<u8>, done: bool, typ: u16, cookie: u64, payload: &[u8]) {
    out.extend_from_slice(&STRUCTURED_MAGIC.to_be_bytes());
    out.extend_from_slice(&u16::from(done).to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn error_payload(value: u32) -> Vec<u8> {
    let msg = b"injected";
    let mut p = value.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    p
}

/// Encodes one answer to request `cookie` and returns the outcome the client must report.
fn encode(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    q: (u16, u64, u32),
    a: &Answer,
) -> Replayed {
    let (kind, offset, length) = q;
    let err = a.error.map(|e| ERRNOS[e as usize % ERRNOS.len()]);
    let chunked = structured && (kind == READ || kind == BLOCK_STATUS || a.as_chunk);
    if !chunked {
        match err {
            Some((v, k)) => {
                simple(out, v, cookie);
                return Replayed::Failed(k);
            }
            None => {
                simple(out, 0, cookie);
                if kind == READ {
                    let data = vec![a.fill; length as usize];
                    out.extend_from_slice(&data);
                    return Replayed::Data(data.into());
                }
                return Replayed::Done;
            }
        }
    }
    let mut chunks: Vec<(u16, Vec<u8>)> = Vec::new();
    if a.unknown_error_type {
        chunks.push((0x8000 | 0x7777, Vec::new()));
    }
    let mut outcome = if a.unknown_error_type {
        Replayed::Failed(ErrorKind::Inval)
    } else {
        Replayed::Done
    };
    if let Some((v, k)) = err {
        if !a.unknown_error_type {
            chunks.push((0x8001, error_payload(v)));
            outcome = Replayed::Failed(k);
        }
    } else if kind == READ {
        let mut cuts: Vec<u32> = a
            .cuts
            .iter()
            .take(3)
            .map(|&c| u32::from(c) % length)
            .filter(|&c| c > 0)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(length);
        let mut data = vec![0u8; length as usize];
        let mut pieces = Vec::new();
        for (i, w) in bounds.windows(2).enumerate() {
            let (s, e) = (w[0], w[1]);
            let at = offset + u64::from(s);
            if a.holes & (1 << i) != 0 {
                let mut p = at.to_be_bytes().to_vec();
                p.extend_from_slice(&(e - s).to_be_bytes());
                pieces.push((2u16, p));
            } else {
                let fill = a.fill.wrapping_add(i as u8);
                data[s as usize..e as usize].fill(fill);
                let mut p = at.to_be_bytes().to_vec();
                p.extend(std::iter::repeat_n(fill, (e - s) as usize));
                pieces.push((1u16, p));
            }
        }
        let r = a.rotate as usize % pieces.len();
        pieces.rotate_left(r);
        chunks.extend(pieces);
        if !a.unknown_error_type {
            outcome = Replayed::Data(data.into());
        }
    } else if kind == BLOCK_STATUS {
        let descs: Vec<(u32, u32)> = a
            .descriptors
            .iter()
            .take(8)
            .map(|&(l, f)| (u32::from(l) * 512 + 512, u32::from(f & 3)))
            .collect();
        let mut p = 1u32.to_be_bytes().to_vec();
        for (l, f) in &descs {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        chunks.push((5, p));
        if !a.unknown_error_type {
            outcome = Replayed::Status(descs);
        }
    } else if kind == READ || chunks.is_empty() {
        chunks.push((0, Vec::new()));
    }
    if chunks.is_empty() {
        chunks.push((0, Vec::new()));
    }
    let n = chunks.len();
    for (i, (typ, p)) in chunks.into_iter().enumerate() {
        chunk(out, i + 1 == n, typ, cookie, &p);
    }
    outcome
}

/// Replies mode.
pub fn replies(c: &Replies) {
    let reqs: Vec<(u16, u64, u32)> = c.reqs.iter().take(12).map(|r| r.resolve()).collect();
    if reqs.is_empty() {
        return;
    }
    let mut want = vec![Replayed::Lost; reqs.len()];
    let mut answered = vec![false; reqs.len()];
    let mut stream = Vec::new();
    for (i, a) in &c.answers {
        let i = *i as usize % reqs.len();
        if answered[i] {
            continue;
        }
        answered[i] = true;
        want[i] = encode(&mut stream, c.structured, i as u64, reqs[i], a);
    }
    match c.violation {
        Some(Violation::UnknownCookie) => simple(&mut stream, 0, 1 << 40),
        Some(Violation::BadMagic) => {
            stream.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])
        }
        Some(Violation::UnknownType) => {
            if let Some(i) = answered.iter().position(|a| !a) {
                chunk(&mut stream, true, 0x0777, i as u64, &[]);
            }
        }
        Some(Violation::Truncated) => {
            if let Some(i) = answered.iter().position(|a| !a) {
                let mut tail = Vec::new();
                simple(&mut tail, 0, i as u64);
                stream.extend_from_slice(&tail[..10]);
            }
        }
        None => {}
    }
    let (got, why) = crate::rt::block_on(replay_replies(c.structured, &reqs, &stream));
    assert!(!why.is_empty(), "the reader stopped without a reason");
    assert_eq!(got, want, "N35, N40, N42: outcomes (reader stopped: {why})");
}

/// Raw mode.
pub fn raw(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(structured) = bool::arbitrary(&mut u) else {
        return;
    };
    let Ok(n) = u.int_in_range(0..=6u8) else {
        return;
    };
    let mut reqs = Vec::new();
    for _ in 0..n {
        match Req::arbitrary(&mut u) {
            Ok(r) => reqs.push(r.resolve()),
            Err(_) => return,
        }
    }
    let stream = u.take_rest();
    let (got, why) = crate::rt::block_on(replay_replies(structured, &reqs, stream));
    assert!(!why.is_empty(), "the reader stopped without a reason");
    assert_eq!(got.len(), reqs.len());
    for (g, (kind, _, length)) in got.iter().zip(&reqs) {
        match g {
            Replayed::Data(d) => {
                assert_eq!(*kind, READ, "data handed to a non-read");
                assert_eq!(
                    d.len(),
                    *length as usize,
                    "a read buffer not the request's length"
                );
            }
            Replayed::Status(_) => assert_eq!(*kind, BLOCK_STATUS, "descriptors to a non-status"),
            Replayed::Done => assert_ne!(*kind, READ, "a read answered without data"),
            Replayed::Failed(_) | Replayed::Lost => {}
        }
    }
}

/// The fuzz target.
pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(rest);
    } else if let Ok(c) = Replies::arbitrary_take_rest(Unstructured::new(rest)) {
        replies(&c);
    }
}
