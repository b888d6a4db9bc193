//! NBD wire types, encoding and decoding (NBD.md N2): no I/O, no async. Every decoder takes
//! bytes and returns a typed message or a typed error, with checked arithmetic, and never
//! indexes with an unvalidated length. Error kinds map to NBD error values here and only here
//! (N3, §6).

use crate::error::ErrorKind;

/// Greeting magic (`NBDMAGIC`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle magic, also the option request magic (`IHAVEOPT`).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag FIXED_NEWSTYLE.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag NO_ZEROES.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag C_FIXED_NEWSTYLE.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag C_NO_ZEROES.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option numbers (§2).
pub mod opt {
    /// EXPORT_NAME.
    pub const EXPORT_NAME: u32 = 1;
    /// ABORT.
    pub const ABORT: u32 = 2;
    /// LIST.
    pub const LIST: u32 = 3;
    /// STARTTLS.
    pub const STARTTLS: u32 = 5;
    /// INFO.
    pub const INFO: u32 = 6;
    /// GO.
    pub const GO: u32 = 7;
    /// STRUCTURED_REPLY.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// LIST_META_CONTEXT.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// SET_META_CONTEXT.
    pub const SET_META_CONTEXT: u32 = 10;
    /// EXTENDED_HEADERS (experimental; answered ERR_UNSUP, N15).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (§2).
pub mod rep {
    /// ACK.
    pub const ACK: u32 = 1;
    /// SERVER.
    pub const SERVER: u32 = 2;
    /// INFO.
    pub const INFO: u32 = 3;
    /// META_CONTEXT.
    pub const META_CONTEXT: u32 = 4;
    const E: u32 = 1 << 31;
    /// ERR_UNSUP.
    pub const ERR_UNSUP: u32 = E + 1;
    /// ERR_POLICY.
    pub const ERR_POLICY: u32 = E + 2;
    /// ERR_INVALID.
    pub const ERR_INVALID: u32 = E + 3;
    /// ERR_PLATFORM.
    pub const ERR_PLATFORM: u32 = E + 4;
    /// ERR_TLS_REQD.
    pub const ERR_TLS_REQD: u32 = E + 5;
    /// ERR_UNKNOWN.
    pub const ERR_UNKNOWN: u32 = E + 6;
    /// ERR_SHUTDOWN.
    pub const ERR_SHUTDOWN: u32 = E + 7;
    /// ERR_BLOCK_SIZE_REQD.
    pub const ERR_BLOCK_SIZE_REQD: u32 = E + 8;
    /// ERR_TOO_BIG.
    pub const ERR_TOO_BIG: u32 = E + 9;

    /// Whether `t` is an error reply type (bit 31).
    pub fn is_error(t: u32) -> bool {
        t & E != 0
    }
}

/// Info types (§2).
pub mod info {
    /// EXPORT: u64 size, u16 transmission flags.
    pub const EXPORT: u16 = 0;
    /// NAME.
    pub const NAME: u16 = 1;
    /// DESCRIPTION.
    pub const DESCRIPTION: u16 = 2;
    /// BLOCK_SIZE: u32 minimum, preferred, maximum payload.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (bit values).
pub mod tflag {
    /// HAS_FLAGS.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// READ_ONLY.
    pub const READ_ONLY: u16 = 1 << 1;
    /// SEND_FLUSH.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// SEND_FUA.
    pub const SEND_FUA: u16 = 1 << 3;
    /// ROTATIONAL.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// SEND_TRIM.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// SEND_WRITE_ZEROES.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// SEND_DF.
    pub const SEND_DF: u16 = 1 << 7;
    /// CAN_MULTI_CONN.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// SEND_RESIZE.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// SEND_CACHE.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// SEND_FAST_ZERO.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands (§2).
pub mod cmd {
    /// READ.
    pub const READ: u16 = 0;
    /// WRITE.
    pub const WRITE: u16 = 1;
    /// DISC.
    pub const DISC: u16 = 2;
    /// FLUSH.
    pub const FLUSH: u16 = 3;
    /// TRIM.
    pub const TRIM: u16 = 4;
    /// CACHE.
    pub const CACHE: u16 = 5;
    /// WRITE_ZEROES.
    pub const WRITE_ZEROES: u16 = 6;
    /// BLOCK_STATUS.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (bit values).
pub mod cflag {
    /// FUA.
    pub const FUA: u16 = 1 << 0;
    /// NO_HOLE.
    pub const NO_HOLE: u16 = 1 << 1;
    /// DF.
    pub const DF: u16 = 1 << 2;
    /// REQ_ONE.
    pub const REQ_ONE: u16 = 1 << 3;
    /// FAST_ZERO.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// PAYLOAD_LEN (extended headers only).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types (§2).
pub mod chunk {
    /// NONE.
    pub const NONE: u16 = 0;
    /// OFFSET_DATA.
    pub const OFFSET_DATA: u16 = 1;
    /// OFFSET_HOLE.
    pub const OFFSET_HOLE: u16 = 2;
    /// BLOCK_STATUS.
    pub const BLOCK_STATUS: u16 = 5;
    /// ERROR.
    pub const ERROR: u16 = 32769;
    /// ERROR_OFFSET.
    pub const ERROR_OFFSET: u16 = 32770;
    /// The DONE flag of a chunk.
    pub const FLAG_DONE: u16 = 1;
}

/// `base:allocation` flags.
pub mod alloc {
    /// HOLE.
    pub const HOLE: u32 = 1 << 0;
    /// ZERO.
    pub const ZERO: u32 = 1 << 1;
}

/// NBD error values (§6).
pub mod errno {
    /// EPERM.
    pub const EPERM: u32 = 1;
    /// EIO.
    pub const EIO: u32 = 5;
    /// ENOMEM.
    pub const ENOMEM: u32 = 12;
    /// EINVAL.
    pub const EINVAL: u32 = 22;
    /// ENOSPC.
    pub const ENOSPC: u32 = 28;
    /// EOVERFLOW.
    pub const EOVERFLOW: u32 = 75;
    /// ENOTSUP.
    pub const ENOTSUP: u32 = 95;
    /// ESHUTDOWN.
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest option data the server reads (N9).
pub const OPTION_DATA_BYTES_MAX: u32 = 64 * 1024;
/// Largest string in option data (N9).
pub const NAME_BYTES_MAX: u32 = 4096;
/// Largest READ or WRITE payload (N13, N20).
pub const PAYLOAD_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// Bytes of a request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of an option request header.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Bytes of a structured chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;

/// A wire-level error: what was wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number did not match.
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// Option data longer than [`OPTION_DATA_BYTES_MAX`] (N9: close without reading it).
    OptionTooLong(u32),
    /// Option data that does not parse (N31: ERR_INVALID, negotiation continues).
    Malformed(String),
    /// Fewer bytes than the structure needs.
    Short {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadMagic { what, got } => write!(f, "bad {what} magic 0x{got:x}"),
            ProtoError::OptionTooLong(n) => write!(
                f,
                "option data of {n} bytes exceeds the limit of {OPTION_DATA_BYTES_MAX}"
            ),
            ProtoError::Malformed(m) => f.write_str(m),
            ProtoError::Short { what, need, got } => {
                write!(f, "{what}: need {need} bytes, got {got}")
            }
        }
    }
}

impl std::error::Error for ProtoError {}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Malformed(format!(
                "{}: {} bytes left, {n} needed",
                self.what,
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u32-length-prefixed UTF-8 string of at most [`NAME_BYTES_MAX`] bytes.
    fn string(&mut self, field: &str) -> Result<String, ProtoError> {
        let n = self.u32()?;
        if n > NAME_BYTES_MAX {
            return Err(ProtoError::Malformed(format!(
                "{field} of {n} bytes exceeds {NAME_BYTES_MAX}"
            )));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ProtoError::Malformed(format!("{field} is not UTF-8")))
    }

    fn done(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed(format!(
                "{}: {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), ProtoError> {
    if buf.len() < n {
        return Err(ProtoError::Short {
            what,
            need: n,
            got: buf.len(),
        });
    }
    Ok(())
}

/// The server's greeting (N6): NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Decodes an option request header (N9).
///
/// # Errors
/// `BadMagic` (close), `OptionTooLong` (close without reading the data), `Short`.
pub fn decode_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    need("option header", b, OPTION_HEADER_BYTES)?;
    let mut r = Reader::new(b, "option header");
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            got: magic,
        });
    }
    let option = r.u32()?;
    let length = r.u32()?;
    if length > OPTION_DATA_BYTES_MAX {
        return Err(ProtoError::OptionTooLong(length));
    }
    Ok(OptionHeader { option, length })
}

/// Encodes an option request (client side).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Encodes an option reply.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_BYTES + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// An option reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option replied to.
    pub option: u32,
    /// Reply type.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Decodes an option reply header; lengths above [`OPTION_DATA_BYTES_MAX`] are refused.
///
/// # Errors
/// `BadMagic`, `OptionTooLong`, `Short`.
pub fn decode_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
    need("option reply header", b, OPTION_REPLY_HEADER_BYTES)?;
    let mut r = Reader::new(b, "option reply header");
    let magic = r.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: magic,
        });
    }
    let option = r.u32()?;
    let reply_type = r.u32()?;
    let length = r.u32()?;
    if length > OPTION_DATA_BYTES_MAX {
        return Err(ProtoError::OptionTooLong(length));
    }
    Ok(OptionReplyHeader {
        option,
        reply_type,
        length,
    })
}

/// The data of INFO and GO (N11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested info types.
    pub infos: Vec<u16>,
}

/// Parses INFO/GO data (N11): the parts must add up to exactly the data.
///
/// # Errors
/// `Malformed` (ERR_INVALID).
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut r = Reader::new(data, "INFO/GO data");
    let name = r.string("export name")?;
    let n = r.u16()?;
    let mut infos = Vec::with_capacity(usize::from(n).min(data.len() / 2));
    for _ in 0..n {
        infos.push(r.u16()?);
    }
    r.done()?;
    Ok(InfoRequest { name, infos })
}

/// Encodes INFO/GO data (client side).
pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The data of LIST_META_CONTEXT and SET_META_CONTEXT (N14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries.
    pub queries: Vec<String>,
}

/// Parses meta context data (N14).
///
/// # Errors
/// `Malformed` (ERR_INVALID).
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut r = Reader::new(data, "meta context data");
    let export = r.string("export name")?;
    let n = r.u32()?;
    // Each query takes at least 4 bytes: bound the allocation by the data.
    let mut queries = Vec::with_capacity((n as usize).min(data.len() / 4));
    for _ in 0..n {
        queries.push(r.string("query")?);
    }
    r.done()?;
    Ok(MetaContextRequest { export, queries })
}

/// Encodes meta context data (client side).
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// INFO(EXPORT) reply data.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// INFO(NAME) or INFO(DESCRIPTION) reply data.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + text.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(text.as_bytes());
    v
}

/// INFO(BLOCK_SIZE) reply data.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    for x in [minimum, preferred, maximum] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// SERVER reply data of LIST (N10).
pub fn server_reply(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// META_CONTEXT reply data.
pub fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// What an INFO reply says (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// INFO(EXPORT).
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// INFO(BLOCK_SIZE).
    BlockSize {
        /// Minimum.
        minimum: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        maximum: u32,
    },
    /// Any other info type (ignored).
    Other(u16),
}

/// Parses INFO reply data.
///
/// # Errors
/// `Malformed`.
pub fn parse_info_reply(data: &[u8]) -> Result<Info, ProtoError> {
    let mut r = Reader::new(data, "INFO reply");
    let t = r.u16()?;
    let i = match t {
        info::EXPORT => {
            let size = r.u64()?;
            let flags = r.u16()?;
            r.done()?;
            Info::Export { size, flags }
        }
        info::BLOCK_SIZE => {
            let minimum = r.u32()?;
            let preferred = r.u32()?;
            let maximum = r.u32()?;
            r.done()?;
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            }
        }
        other => Info::Other(other),
    };
    Ok(i)
}

/// N39: block-size constraints a server advertised, checked as the NBD spec constrains them,
/// and what the client obeys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every request's offset and length is a multiple of this.
    pub minimum: u32,
    /// The largest payload the client sends or asks for in one request: the server's maximum,
    /// at most [`PAYLOAD_BYTES_MAX`], always a multiple of `minimum`.
    pub payload_max: u32,
}

/// The maximum block size that means "no inherent limit" (NBD spec, block size constraints).
pub const BLOCK_SIZE_NO_LIMIT: u32 = 0xffff_ffff;

/// Checks INFO(BLOCK_SIZE) `minimum`/`preferred`/`maximum` against an export of `size` bytes
/// (N39): minimum and preferred are powers of two, minimum is at most 64 KiB and at most
/// preferred; maximum is 0xffffffff or a non-zero multiple of minimum (not necessarily a power
/// of two), and at least the smaller of preferred and the export size.
///
/// # Errors
/// A sentence naming the constraint that the three values break.
pub fn check_block_sizes(
    minimum: u32,
    preferred: u32,
    maximum: u32,
    size: u64,
) -> Result<BlockSizes, String> {
    let what = |why: &str| {
        format!("server sent invalid block sizes {minimum}/{preferred}/{maximum}: {why}")
    };
    if !minimum.is_power_of_two() || minimum > 65536 {
        return Err(what(
            "the minimum must be a power of two no larger than 64 KiB",
        ));
    }
    if !preferred.is_power_of_two() || preferred < minimum {
        return Err(what(
            "the preferred size must be a power of two no smaller than the minimum",
        ));
    }
    if maximum != BLOCK_SIZE_NO_LIMIT {
        if maximum == 0 || maximum % minimum != 0 {
            return Err(what(
                "the maximum must be 0xffffffff or a multiple of the minimum",
            ));
        }
        if u64::from(maximum) < u64::from(preferred).min(size) {
            return Err(what(
                "the maximum must be at least the smaller of the preferred size and the export size",
            ));
        }
    }
    // PAYLOAD_BYTES_MAX is a power of two of at least 64 KiB, so a multiple of any minimum.
    let payload_max = maximum.min(PAYLOAD_BYTES_MAX);
    assert_eq!(
        payload_max % minimum,
        0,
        "payload cap not a multiple of the minimum"
    );
    Ok(BlockSizes {
        minimum,
        payload_max,
    })
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

/// Decodes a request header (N20 step 1; the other checks need the export and belong to the
/// server).
///
/// # Errors
/// `BadMagic` (close), `Short`.
pub fn decode_request(b: &[u8]) -> Result<Request, ProtoError> {
    need("request", b, REQUEST_BYTES)?;
    let mut r = Reader::new(b, "request");
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            got: u64::from(magic),
        });
    }
    Ok(Request {
        flags: r.u16()?,
        kind: r.u16()?,
        cookie: r.u64()?,
        offset: r.u64()?,
        length: r.u32()?,
    })
}

/// Encodes a request header.
pub fn encode_request(q: &Request) -> [u8; REQUEST_BYTES] {
    let mut b = [0u8; REQUEST_BYTES];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&q.flags.to_be_bytes());
    b[6..8].copy_from_slice(&q.kind.to_be_bytes());
    b[8..16].copy_from_slice(&q.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&q.offset.to_be_bytes());
    b[24..28].copy_from_slice(&q.length.to_be_bytes());
    b
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured chunk header.
pub fn encode_chunk_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; CHUNK_HEADER_BYTES] {
    let mut b = [0u8; CHUNK_HEADER_BYTES];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A whole ERROR chunk with DONE: error value, message (N22, N34).
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let len = 6 + msg.len() as u32;
    let mut v = Vec::with_capacity(CHUNK_HEADER_BYTES + len as usize);
    v.extend_from_slice(&encode_chunk_header(
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        len,
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A whole BLOCK_STATUS chunk with DONE for context `id` (N24).
pub fn encode_block_status_chunk(cookie: u64, id: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len() as u32;
    let mut v = Vec::with_capacity(CHUNK_HEADER_BYTES + len as usize);
    v.extend_from_slice(&encode_chunk_header(
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        cookie,
        len,
    ));
    v.extend_from_slice(&id.to_be_bytes());
    for (l, f) in descriptors {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

/// A reply header as the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes).
    Simple {
        /// Error value.
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// A structured chunk header (20 bytes).
    Chunk {
        /// Flags (DONE).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

/// Decodes the first 4 bytes of a reply to know which header follows: 16 (simple) or 20
/// (chunk) bytes in all.
///
/// # Errors
/// `BadMagic`, `Short`.
pub fn reply_header_len(first4: &[u8]) -> Result<usize, ProtoError> {
    need("reply magic", first4, 4)?;
    let magic = u32::from_be_bytes([first4[0], first4[1], first4[2], first4[3]]);
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_BYTES),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_BYTES),
        other => Err(ProtoError::BadMagic {
            what: "reply",
            got: u64::from(other),
        }),
    }
}

/// Decodes a whole reply header (16 or 20 bytes per [`reply_header_len`]).
///
/// # Errors
/// `BadMagic`, `Short`.
pub fn decode_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let n = reply_header_len(b)?;
    need("reply header", b, n)?;
    let mut r = Reader::new(&b[4..n], "reply header");
    if n == SIMPLE_REPLY_BYTES {
        Ok(ReplyHeader::Simple {
            error: r.u32()?,
            cookie: r.u64()?,
        })
    } else {
        Ok(ReplyHeader::Chunk {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        })
    }
}

/// §6: the NBD error value for a kind, at the server boundary.
pub fn error_value(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::Perm | ErrorKind::RoFs | ErrorKind::Access => errno::EPERM,
        ErrorKind::Inval => errno::EINVAL,
        ErrorKind::NoSpc | ErrorKind::DQuot | ErrorKind::FBig => errno::ENOSPC,
        ErrorKind::Overflow => errno::EOVERFLOW,
        ErrorKind::NotSup => errno::ENOTSUP,
        ErrorKind::Shutdown => errno::ESHUTDOWN,
        // N28: ENOMEM is never sent; everything else is a device failure.
        _ => errno::EIO,
    }
}

/// N35: the kind for an NBD error value received by the client; unknown values are EINVAL.
pub fn error_kind(value: u32) -> ErrorKind {
    match value {
        errno::EPERM => ErrorKind::Perm,
        errno::EIO => ErrorKind::Io,
        errno::ENOMEM => ErrorKind::NoMem,
        errno::EINVAL => ErrorKind::Inval,
        errno::ENOSPC => ErrorKind::NoSpc,
        errno::EOVERFLOW => ErrorKind::Overflow,
        errno::ENOTSUP => ErrorKind::NotSup,
        errno::ESHUTDOWN => ErrorKind::Shutdown,
        _ => ErrorKind::Inval,
    }
}

/// Writes every slice in order, as many per vectored write as the stream takes.
pub async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    wr: &mut W,
    mut parts: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    std::io::IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let n = wr.write_vectored(parts).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n6_greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn n9_option_header_magic_and_length_limit() {
        let ok = encode_option(opt::GO, &[0; 10]);
        assert_eq!(
            decode_option_header(&ok[..16]),
            Ok(OptionHeader {
                option: 7,
                length: 10
            })
        );
        let mut bad = ok.clone();
        bad[0] = b'X';
        assert_eq!(
            decode_option_header(&bad[..16]),
            Err(ProtoError::BadMagic {
                what: "option",
                got: u64::from_be_bytes(*b"XHAVEOPT")
            })
        );
        let mut long = ok.clone();
        long[12..16].copy_from_slice(&(64 * 1024 + 1u32).to_be_bytes());
        assert_eq!(
            decode_option_header(&long[..16]),
            Err(ProtoError::OptionTooLong(65537))
        );
        assert_eq!(
            decode_option_header(&ok[..15]),
            Err(ProtoError::Short {
                what: "option header",
                need: 16,
                got: 15
            })
        );
    }

    #[test]
    fn n11_info_request_must_add_up_exactly() {
        let d = encode_info_request("disk0", &[info::NAME, info::BLOCK_SIZE]);
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: "disk0".into(),
                infos: vec![1, 3]
            })
        );
        let mut extra = d.clone();
        extra.push(0);
        assert_eq!(
            parse_info_request(&extra),
            Err(ProtoError::Malformed(
                "INFO/GO data: 1 trailing bytes".into()
            ))
        );
        assert_eq!(
            parse_info_request(&d[..d.len() - 1]),
            Err(ProtoError::Malformed(
                "INFO/GO data: 1 bytes left, 2 needed".into()
            ))
        );
        // A name length far beyond the data never allocates it.
        let mut huge = vec![0xff, 0xff, 0xff, 0xff];
        huge.extend_from_slice(b"x");
        assert_eq!(
            parse_info_request(&huge),
            Err(ProtoError::Malformed(
                "export name of 4294967295 bytes exceeds 4096".into()
            ))
        );
    }

    #[test]
    fn n14_meta_context_request_round_trips_and_bounds_its_count() {
        let d = encode_meta_context_request("", &["base:allocation"]);
        assert_eq!(
            parse_meta_context_request(&d),
            Ok(MetaContextRequest {
                export: String::new(),
                queries: vec!["base:allocation".into()]
            })
        );
        // A count of 2^32-1 with no queries behind it fails without a huge allocation.
        let mut bogus = encode_meta_context_request("", &[]);
        bogus[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_meta_context_request(&bogus),
            Err(ProtoError::Malformed(
                "meta context data: 0 bytes left, 4 needed".into()
            ))
        );
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let q = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(decode_request(&encode_request(&q)), Ok(q));
        let s = encode_simple_reply(errno::EIO, 9);
        assert_eq!(
            decode_reply_header(&s),
            Ok(ReplyHeader::Simple {
                error: 5,
                cookie: 9
            })
        );
        let c = encode_error_chunk(7, errno::EIO, "Input/output error");
        assert_eq!(
            decode_reply_header(&c[..20]),
            Ok(ReplyHeader::Chunk {
                flags: 1,
                kind: chunk::ERROR,
                cookie: 7,
                length: 6 + 18
            })
        );
        assert_eq!(&c[20..24], &5u32.to_be_bytes());
        assert_eq!(&c[26..], b"Input/output error");
        let mut bad = encode_request(&q);
        bad[0] = 0;
        assert_eq!(
            decode_request(&bad),
            Err(ProtoError::BadMagic {
                what: "request",
                got: 0x0060_9513
            })
        );
    }

    #[test]
    fn section6_error_mapping_both_ways() {
        assert_eq!(error_value(ErrorKind::Io), 5);
        assert_eq!(error_value(ErrorKind::NoMem), 5);
        assert_eq!(error_value(ErrorKind::DQuot), 28);
        assert_eq!(error_value(ErrorKind::Shutdown), 108);
        assert_eq!(error_kind(108), ErrorKind::Shutdown);
        assert_eq!(error_kind(12345), ErrorKind::Inval);
        for v in [1, 5, 22, 28, 75, 95, 108] {
            assert_eq!(error_value(error_kind(v)), v);
        }
    }

    #[test]
    fn info_replies_parse() {
        let e = info_export(1 << 30, 0x05ed);
        assert_eq!(
            parse_info_reply(&e),
            Ok(Info::Export {
                size: 1 << 30,
                flags: 0x05ed
            })
        );
        let b = info_block_size(1, 4096, 32 << 20);
        assert_eq!(
            parse_info_reply(&b),
            Ok(Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20
            })
        );
        assert_eq!(
            parse_info_reply(&info_text(info::NAME, "x")),
            Ok(Info::Other(1))
        );
    }

    #[test]
    fn n39_block_sizes_allow_no_limit_and_multiples_of_the_minimum() {
        // nbdkit's cache filter and qemu-nbd, as each advertises them.
        assert_eq!(
            check_block_sizes(1, 65536, 0xffff_ffff, 1 << 30),
            Ok(BlockSizes {
                minimum: 1,
                payload_max: PAYLOAD_BYTES_MAX
            })
        );
        assert_eq!(
            check_block_sizes(1, 4096, 32 << 20, 1 << 30),
            Ok(BlockSizes {
                minimum: 1,
                payload_max: 32 << 20
            })
        );
        // A maximum that is a multiple of the minimum but no power of two.
        assert_eq!(
            check_block_sizes(4096, 4096, 3 * 4096, 1 << 30),
            Ok(BlockSizes {
                minimum: 4096,
                payload_max: 3 * 4096
            })
        );
        // Above the client's own payload cap: capped.
        assert_eq!(
            check_block_sizes(512, 4096, 64 << 20, 1 << 30),
            Ok(BlockSizes {
                minimum: 512,
                payload_max: PAYLOAD_BYTES_MAX
            })
        );
        // A maximum below preferred is allowed when the export is smaller still.
        assert_eq!(
            check_block_sizes(512, 65536, 1024, 1024),
            Ok(BlockSizes {
                minimum: 512,
                payload_max: 1024
            })
        );
    }

    #[test]
    fn n39_block_sizes_refuse_what_the_spec_forbids() {
        let err = |mi, pr, ma, size| check_block_sizes(mi, pr, ma, size).unwrap_err();
        assert_eq!(
            err(3, 4096, 4096, 1 << 20),
            "server sent invalid block sizes 3/4096/4096: the minimum must be a power of two no larger than 64 KiB"
        );
        assert!(err(1 << 17, 1 << 17, 1 << 17, 1 << 20).ends_with("no larger than 64 KiB"));
        assert!(err(4096, 512, 4096, 1 << 20).ends_with("no smaller than the minimum"));
        assert!(err(512, 3000, 4096, 1 << 20).ends_with("no smaller than the minimum"));
        assert!(err(4096, 4096, 6000, 1 << 20).ends_with("a multiple of the minimum"));
        assert!(err(1, 4096, 0, 1 << 20).ends_with("a multiple of the minimum"));
        assert!(err(512, 4096, 1024, 1 << 20).ends_with("the export size"));
    }
}
