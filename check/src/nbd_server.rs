//! Fuzz target `nbd_server`: the NBD server (NBD.md §3–§5) fed a client byte stream.
//!
//! Three modes, chosen by the first byte (see [`fuzz`]; the third, TLS required, is
//! [`tls_raw`]):
//! - **raw**: the rest of the input is the whole client stream. The server must not panic,
//!   must send the greeting first (N6), must allocate nothing unbounded (N29: the harness runs
//!   under libFuzzer's RSS limit), and must end once the client's stream ends (N31).
//! - **session**: the harness negotiates properly — fixed newstyle, optionally structured
//!   replies and `base:allocation` (N11, N14), then GO — and sends arbitrary requests
//!   (command, flags, offset, length; WRITE payloads included), then closes. An independent
//!   model of N20's checks in order and N21–N24's replies predicts every reply, matched by
//!   cookie: the error value, READ data (simple reply then data, or one OFFSET_DATA chunk with
//!   DONE, or an ERROR chunk), BLOCK_STATUS descriptors (N24), and the export's bytes at the
//!   end. A request after DISC, or after a WRITE over 32 MiB (which closes, N20.2), gets no
//!   reply.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use ballot::nbd::server::{Export, Server};
use ballot::{Device, ErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::child::{Faults, FaultyChild};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const PAYLOAD_MAX: u32 = 32 << 20;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

/// The export: 16 sectors past 64 KiB, so ranges cross a 64 KiB line and end unaligned to it.
pub const EXPORT_BYTES: u64 = 65536 + 16 * 512;

/// One request of a session.
#[derive(Debug, Arbitrary)]
pub struct Req {
    /// Command type (0–7 known; others must get EINVAL).
    pub kind: u8,
    /// Command flags as sent.
    pub flags: u16,
    /// Offset selector: small values land inside the export, large ones test N20.7.
    pub offset: u32,
    /// Length selector.
    pub length: u16,
    /// Far-away offsets: `offset` is shifted into the top of the 64-bit range.
    pub far: bool,
    /// Fill byte of a WRITE payload.
    pub fill: u8,
}

/// A session case.
#[derive(Debug, Arbitrary)]
pub struct Session {
    /// Negotiate structured replies.
    pub structured: bool,
    /// Select `base:allocation`.
    pub meta: bool,
    /// Export writable.
    pub writable: bool,
    /// Minimum block size 512 instead of 1.
    pub aligned: bool,
    /// Reads overlapping this sector fail with EIO (N22).
    pub bad_sector: Option<u8>,
    /// The requests (at most 48 are sent).
    pub reqs: Vec<Req>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Serves `client` on a fresh server with `export`, returning everything the server sent.
/// Panics when the server does not end after the client's stream ended.
async fn serve(export: Export, client: Vec<u8>) -> Vec<u8> {
    let server = Server::new();
    server.add_export(export).expect("export");
    serve_on(server, client).await
}

/// [`serve`] on a server already set up.
async fn serve_on(server: Arc<Server>, client: Vec<u8>) -> Vec<u8> {
    let (mut c, s) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(server.clone().serve(s));
    let (mut rd, mut wr) = tokio::io::split(&mut c);
    let send = async {
        let _ = wr.write_all(&client).await;
        let _ = wr.shutdown().await;
    };
    let mut out = Vec::new();
    let recv = rd.read_to_end(&mut out);
    let both = async { tokio::join!(send, recv) };
    // Paused time: the limit costs nothing unless the server hangs.
    let (_, received) = tokio::time::timeout(Duration::from_secs(3600), both)
        .await
        .expect("N31: the server did not end after the client's stream ended");
    received.expect("reading the server's output");
    tokio::time::timeout(Duration::from_secs(3600), task)
        .await
        .expect("N31: the connection task did not end")
        .expect("the connection task panicked");
    out
}

fn export(dev: Device, writable: bool) -> Export {
    Export {
        name: "e".into(),
        description: String::new(),
        dev,
        writable,
        multi_conn: true,
    }
}

/// Raw mode.
pub fn raw(client: &[u8]) {
    crate::rt::block_on(async {
        let dev: Device = Arc::new(FaultyChild::new(vec![0; 4096]));
        let out = serve(export(dev, true), client.to_vec()).await;
        // N6: the greeting comes first, whatever the client sends.
        assert!(out.len() >= 18, "N6: no greeting");
        assert_eq!(be64(&out[..8]), NBDMAGIC, "N6: NBDMAGIC");
        assert_eq!(be64(&out[8..16]), IHAVEOPT, "N6: IHAVEOPT");
    });
}

/// What the model predicts for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// An error value (simple reply, or an ERROR chunk for READ/BLOCK_STATUS when structured).
    Error(u32),
    /// Success without data.
    Done,
    /// A successful READ.
    Data(Vec<u8>),
    /// A successful BLOCK_STATUS of `length` bytes; `one` with REQ_ONE.
    Status { length: u32, one: bool },
}

/// A reply as parsed from the server's output.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Error(u32),
    Done,
    Data(Vec<u8>),
    Status(Vec<(u32, u32)>),
}

/// N20 in order, then N21–N24, for one request on the model's bytes.
#[allow(clippy::too_many_arguments)]
fn model(
    mem: &mut [u8],
    s: &Session,
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
    bad: Option<(u64, u64)>,
) -> Want {
    const FUA: u16 = 1;
    const NO_HOLE: u16 = 2;
    const DF: u16 = 4;
    const REQ_ONE: u16 = 8;
    // 4: unknown command; 5: flags defined for the command and negotiated. FAST_ZERO is never
    // offered (the device cannot zero without writing).
    let allowed = match kind {
        0 => FUA | if s.structured { DF } else { 0 },
        1 | 3 | 4 | 5 => FUA,
        6 => FUA | NO_HOLE,
        7 => FUA | REQ_ONE,
        _ => return Want::Error(EINVAL),
    };
    if flags & !allowed != 0 {
        return Want::Error(EINVAL);
    }
    if !s.writable && matches!(kind, 1 | 4 | 6) {
        return Want::Error(EPERM);
    }
    if kind != 3 {
        // FLUSH's offset and length carry nothing (the NBD spec has clients send zeroes).
        let Some(end) = offset.checked_add(u64::from(length)) else {
            return Want::Error(EINVAL);
        };
        if end > EXPORT_BYTES {
            return Want::Error(if matches!(kind, 1 | 6) {
                ENOSPC
            } else {
                EINVAL
            });
        }
        let min = if s.aligned { 512 } else { 1 };
        if offset % min != 0 || u64::from(length) % min != 0 {
            return Want::Error(EINVAL);
        }
    }
    if kind == 0 && length > PAYLOAD_MAX {
        return Want::Error(if s.structured { EOVERFLOW } else { EINVAL });
    }
    // SET_META_CONTEXT before structured replies is refused (N14), so nothing is selected.
    if kind == 7 && (!s.structured || !s.meta || length == 0) {
        return Want::Error(EINVAL);
    }
    // Past N20.7 every command but FLUSH lies inside the export.
    let range = || (offset as usize, (offset + u64::from(length)) as usize);
    match kind {
        0 => {
            let (a, b) = range();
            if length > 0 && bad.is_some_and(|(x, y)| offset < y && x < b as u64) {
                return Want::Error(EIO);
            }
            Want::Data(mem[a..b].to_vec())
        }
        1 => {
            let (a, b) = range();
            mem[a..b].copy_from_slice(payload);
            Want::Done
        }
        6 => {
            let (a, b) = range();
            mem[a..b].fill(0);
            Want::Done
        }
        7 => Want::Status {
            length,
            one: flags & REQ_ONE != 0,
        },
        _ => Want::Done,
    }
}

/// Session mode.
pub fn session(s: &Session) {
    let mut stream = Vec::new();
    stream.extend_from_slice(&1u32.to_be_bytes()); // FIXED_NEWSTYLE
    if s.structured {
        option(&mut stream, 8, &[]);
    }
    let mut go = Vec::new();
    go.extend_from_slice(&1u32.to_be_bytes());
    go.extend_from_slice(b"e");
    go.extend_from_slice(&0u16.to_be_bytes());
    if s.meta {
        let q = b"base:allocation";
        let mut m = go[..5].to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&(q.len() as u32).to_be_bytes());
        m.extend_from_slice(q);
        option(&mut stream, 10, &m);
    }
    option(&mut stream, 7, &go);
    let initial: Vec<u8> = (0..EXPORT_BYTES).map(|i| (i / 512 % 251) as u8).collect();
    let mut mem = initial.clone();
    let bad = s
        .bad_sector
        .map(|k| (u64::from(k) % (EXPORT_BYTES / 512)) * 512)
        .map(|a| (a, a + 512));
    let mut wants: BTreeMap<u64, (u16, u64, Want)> = BTreeMap::new();
    for (cookie, r) in (0u64..).zip(s.reqs.iter().take(48)) {
        let kind = u16::from(r.kind % 10);
        let mut offset = u64::from(r.offset % (EXPORT_BYTES as u32 * 2));
        if r.far {
            offset = u64::MAX - u64::from(r.offset);
        }
        let length = match r.length {
            0xFFFF => PAYLOAD_MAX + 1,
            0xFFFE => u32::MAX,
            l => u32::from(l) % (EXPORT_BYTES as u32 + 1024),
        };
        // cookie, with the top bits set to check they are echoed unchanged (N30).
        let cookie = cookie | 0xA5A5_0000_0000_0000;
        stream.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        stream.extend_from_slice(&r.flags.to_be_bytes());
        stream.extend_from_slice(&kind.to_be_bytes());
        stream.extend_from_slice(&cookie.to_be_bytes());
        stream.extend_from_slice(&offset.to_be_bytes());
        stream.extend_from_slice(&length.to_be_bytes());
        if kind == 2 {
            break; // DISC: nothing after it is read (N21).
        }
        if kind == 1 {
            if length > PAYLOAD_MAX {
                break; // N20.2: the server closes without reading the payload.
            }
            let payload = vec![r.fill; length as usize];
            stream.extend_from_slice(&payload);
            let w = model(&mut mem, s, kind, r.flags, offset, length, &payload, bad);
            wants.insert(cookie, (kind, offset, w));
            continue;
        }
        let w = model(&mut mem, s, kind, r.flags, offset, length, &[], bad);
        wants.insert(cookie, (kind, offset, w));
    }
    crate::rt::block_on(async {
        let align = if s.aligned { 512 } else { 1 };
        let child = Arc::new(FaultyChild::aligned(initial, align));
        if let Some(range) = bad {
            child.set_faults(Faults {
                read: Some(ErrorKind::Io),
                read_range: Some(range),
                ..Faults::default()
            });
        }
        let out = serve(export(child.clone(), s.writable), stream).await;
        let got = parse_session(&out, s, &wants);
        let want_keys: Vec<&u64> = wants.keys().collect();
        let got_keys: Vec<&u64> = got.keys().collect();
        assert_eq!(got_keys, want_keys, "N26: one reply per request, by cookie");
        for (cookie, (kind, _, w)) in &wants {
            let g = &got[cookie];
            let ok = match (w, g) {
                (Want::Status { length, one }, Got::Status(d)) => {
                    // N24: status 0 (the device cannot tell), no empty descriptor, covering
                    // the request; REQ_ONE: exactly one, no longer than the request.
                    let total: u64 = d.iter().map(|x| u64::from(x.0)).sum();
                    !d.is_empty()
                        && d.iter().all(|x| x.0 > 0 && x.1 == 0 && x.0 % align == 0)
                        && if *one {
                            d.len() == 1 && d[0].0 <= *length
                        } else {
                            total >= u64::from(*length)
                        }
                }
                (w, g) => match (w, g) {
                    (Want::Error(a), Got::Error(b)) => a == b,
                    (Want::Done, Got::Done) => true,
                    (Want::Data(a), Got::Data(b)) => a == b,
                    _ => false,
                },
            };
            assert!(
                ok,
                "cookie {cookie:#x} command {kind}: model {w:?}, server {g:?}"
            );
        }
        assert!(
            child.contents() == mem,
            "N21: the export's bytes after the session"
        );
    });
}

/// Parses the server's side of a session: greeting, option replies up to GO's ACK, then
/// replies. Panics on anything malformed (N30: whole replies, cookies echoed).
fn parse_session(
    out: &[u8],
    s: &Session,
    wants: &BTreeMap<u64, (u16, u64, Want)>,
) -> BTreeMap<u64, Got> {
    assert!(out.len() >= 18 && be64(out) == NBDMAGIC, "N6: greeting");
    let mut at = 18;
    loop {
        assert!(out.len() >= at + 20, "GO was never acknowledged");
        let h = &out[at..at + 20];
        assert_eq!(be64(h), OPTION_REPLY_MAGIC, "option reply magic");
        let (opt, typ, len) = (be32(&h[8..]), be32(&h[12..]), be32(&h[16..]) as usize);
        at += 20 + len;
        if opt == 10 && !s.structured {
            // N14: SET_META_CONTEXT needs structured replies first; negotiation goes on.
            assert_eq!(
                typ, 0x8000_0003,
                "SET_META_CONTEXT before structured replies"
            );
            continue;
        }
        assert!(typ < 1 << 31, "option {opt} refused with {typ:#x}");
        if opt == 7 && typ == 1 {
            break;
        }
    }
    let mut got = BTreeMap::new();
    while at < out.len() {
        let magic = be32(&out[at..]);
        if magic == SIMPLE_MAGIC {
            let h = &out[at..at + 16];
            let (error, cookie) = (be32(&h[4..]), be64(&h[8..]));
            at += 16;
            let (kind, _, _) = wants
                .get(&cookie)
                .unwrap_or_else(|| panic!("N30: reply to unknown cookie {cookie:#x}"));
            let g = if error != 0 {
                Got::Error(error)
            } else if *kind == 0 {
                assert!(!s.structured, "N23: simple reply to a structured READ");
                let Want::Data(d) = &wants[&cookie].2 else {
                    panic!("cookie {cookie:#x}: read succeeded where the model failed it");
                };
                let data = out[at..at + d.len()].to_vec();
                at += d.len();
                Got::Data(data)
            } else {
                Got::Done
            };
            assert!(
                got.insert(cookie, g).is_none(),
                "N30: two replies to {cookie:#x}"
            );
        } else {
            assert_eq!(magic, STRUCTURED_MAGIC, "reply magic");
            assert!(s.structured, "N23: structured reply not negotiated");
            let h = &out[at..at + 20];
            let (flags, typ, cookie, len) = (
                be16(&h[4..]),
                be16(&h[6..]),
                be64(&h[8..]),
                be32(&h[16..]) as usize,
            );
            let p = &out[at + 20..at + 20 + len];
            at += 20 + len;
            assert_eq!(flags, 1, "N21, N24: one chunk with DONE per reply");
            let g = match typ {
                0 => Got::Data(Vec::new()),
                1 => {
                    let (kind, offset, _) = wants
                        .get(&cookie)
                        .unwrap_or_else(|| panic!("N30: chunk for unknown cookie {cookie:#x}"));
                    assert_eq!(*kind, 0, "OFFSET_DATA for a non-read");
                    assert_eq!(be64(p), *offset, "N21: one chunk covering the whole read");
                    Got::Data(p[8..].to_vec())
                }
                5 => {
                    assert_eq!(be32(p), 1, "N24: the selected context's id");
                    Got::Status(
                        p[4..]
                            .chunks_exact(8)
                            .map(|d| (be32(d), be32(&d[4..])))
                            .collect(),
                    )
                }
                0x8001 => {
                    let mlen = be16(&p[4..]) as usize;
                    assert_eq!(p.len(), 6 + mlen, "N34: error chunk length");
                    Got::Error(be32(p))
                }
                t => panic!("unexpected chunk type {t}"),
            };
            assert!(
                got.insert(cookie, g).is_none(),
                "N30: two replies to {cookie:#x}"
            );
        }
    }
    got
}

/// TLS-required mode (docs/tls.md K6–K8): the server requires TLS, and the rest of the input
/// is the client's stream. Before the server acknowledges STARTTLS it sends nothing but the
/// greeting and option replies, and each reply is ERR_TLS_REQD, ERR_INVALID (to a STARTTLS
/// with data), ERR_SHUTDOWN, or the ACK of ABORT or STARTTLS: never an export's name, size or
/// list. After the ACK of STARTTLS only TLS records follow, which this harness does not parse.
pub fn tls_raw(client: &[u8]) {
    tls_replies(client);
}

/// [`tls_raw`]'s checks; returns the (option, reply type) of each option reply before TLS.
fn tls_replies(client: &[u8]) -> Vec<(u32, u32)> {
    crate::rt::block_on(async {
        let dev: Device = Arc::new(FaultyChild::new(vec![0; 4096]));
        let server = Server::new();
        server.add_export(export(dev, true)).expect("export");
        let creds = ballot::tls::TlsCreds::from_pem(
            "fuzz",
            ballot::tls::Endpoint::Server,
            true,
            ballot::tls::PemSet {
                ca: Some(include_bytes!("../../sim/data/tls/ca-cert.pem")),
                cert: Some(include_bytes!("../../sim/data/tls/server-cert.pem")),
                key: Some(include_bytes!("../../sim/data/tls/server-key.pem")),
            },
        )
        .expect("the simulator's credentials");
        server
            .set_tls(Some(Arc::new(creds)))
            .expect("server credentials");
        let out = serve_on(server, client.to_vec()).await;
        assert!(out.len() >= 18, "N6: no greeting");
        assert_eq!(be64(&out[..8]), NBDMAGIC, "N6: NBDMAGIC");
        assert_eq!(be64(&out[8..16]), IHAVEOPT, "N6: IHAVEOPT");
        let mut at = 18;
        let mut replies = Vec::new();
        while at < out.len() {
            assert!(
                out.len() - at >= 20 && be64(&out[at..]) == OPTION_REPLY_MAGIC,
                "K6: before TLS the server sent something other than an option reply: {:?}",
                &out[at..out.len().min(at + 32)]
            );
            let option = be32(&out[at + 8..]);
            let kind = be32(&out[at + 12..]);
            let len = be32(&out[at + 16..]) as usize;
            assert!(out.len() - at - 20 >= len, "a truncated option reply");
            at += 20 + len;
            replies.push((option, kind));
            match (option, kind) {
                // STARTTLS acknowledged: TLS records follow.
                (5, 1) => return replies,
                (2, 1) => {}
                (5, 0x8000_0003) | (_, 0x8000_0005) | (_, 0x8000_0007) => {}
                _ => panic!("K6: option {option} got reply type {kind:#x} before TLS"),
            }
        }
        replies
    })
}

/// The fuzz target.
pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode & 3 {
        0 | 2 => raw(rest),
        1 => {
            if let Ok(s) = Session::arbitrary_take_rest(Unstructured::new(rest)) {
                session(&s);
            }
        }
        _ => tls_raw(rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn k6_before_tls_every_option_but_starttls_and_abort_gets_tls_reqd() {
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(opt(3, &[])); // LIST
        c.extend(opt(7, &[0, 0, 0, 1, b'e', 0, 0])); // GO "e"
        c.extend(opt(8, &[])); // STRUCTURED_REPLY
        c.extend(opt(5, b"x")); // STARTTLS with data
        c.extend(opt(5, &[])); // STARTTLS
        c.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            tls_replies(&c),
            vec![
                (3, 0x8000_0005),
                (7, 0x8000_0005),
                (8, 0x8000_0005),
                (5, 0x8000_0003),
                (5, 1)
            ]
        );
        // EXPORT_NAME cannot be refused with an error: the connection closes, nothing sent.
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(opt(1, b"e"));
        assert_eq!(tls_replies(&c), vec![]);
        // ABORT is acknowledged.
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(opt(2, &[]));
        assert_eq!(tls_replies(&c), vec![(2, 1)]);
    }
}
