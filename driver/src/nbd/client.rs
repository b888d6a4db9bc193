//! The NBD client behind the `nbd` block driver (NBD.md §7): negotiation (N36–N39), requests
//! matched to replies by cookie (N40), feature use (N41), connection loss and reconnection
//! (N42, N44), and closing (N45).
//!
//! Reconnection (N42) runs in a background task that starts when the connection is lost and
//! retries with backoff until it succeeds or the device is dropped; each attempt repeats the
//! whole handshake and must find the same size and read-only state. Requests that were in
//! flight, and new ones, wait for it until `reconnect-delay` seconds after the loss and are then
//! re-sent; with `reconnect-delay` 0, or after the delay, they fail with EIO at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Semaphore};

use super::proto::{self, cflag, cmd, opt, rep, tflag, Info, ReplyHeader, Request};
use crate::device::{check_request, Access, BlockDevice, BlockStatus, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};

/// Requests in flight per connection (N40; NBD.md says 16, as QEMU has: docs/nbd.md says why 64).
pub const INFLIGHT_MAX: usize = 64;
/// Largest TRIM, WRITE_ZEROES or BLOCK_STATUS length sent in one request: 32-bit lengths,
/// kept at half the range and 64 KiB-aligned so every server's alignment divides it.
const UNPAYLOADED_BYTES_MAX: u64 = u32::MAX as u64 / 2 / 65536 * 65536;

/// N42, N44: connection attempts back off from 100 ms, doubling, to 5 s.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// See [`BACKOFF_FIRST`].
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The read buffer of a connection's reply reader.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Largest option reply accepted: a LIST entry is at most a 4 KiB name and its description.
const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;
/// Longest one connection attempt (connect and handshake) may take when `request-timeout` is
/// off; a partitioned host would otherwise hold it for the kernel's TCP timeout.
const DIAL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP.
    Inet {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix socket.
    Unix {
        /// Path.
        path: String,
    },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Inet { host, port } => write!(f, "{host}:{port}"),
            Address::Unix { path } => write!(f, "unix:{path}"),
        }
    }
}

/// Options of the `nbd` driver (NBD.md §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Server address.
    pub server: Address,
    /// Export name.
    pub export: String,
    /// `reconnect-delay`.
    pub reconnect_delay: Duration,
    /// `open-timeout`.
    pub open_timeout: Duration,
    /// `request-timeout` (zero: off).
    pub request_timeout: Duration,
    /// `tls-creds` (docs/tls.md K5): every connection, reconnections included, starts TLS
    /// before anything else.
    pub tls: Option<ClientTls>,
}

/// A client's TLS: the credentials, and the name the server's certificate is checked against.
#[derive(Clone)]
pub struct ClientTls {
    creds: Arc<crate::tls::TlsCreds>,
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    hostname: Option<String>,
}

impl ClientTls {
    /// TLS with `creds` (endpoint=client) to `server`: the certificate must name `hostname`,
    /// else the host of a TCP address; a unix socket's server is checked against the CA
    /// only (K5).
    ///
    /// # Errors
    /// The credentials are a server's, or the name is not a DNS name or an IP address.
    pub fn new(
        creds: Arc<crate::tls::TlsCreds>,
        hostname: Option<&str>,
        server: &Address,
    ) -> std::result::Result<ClientTls, String> {
        let hostname = match (hostname, server) {
            (Some(h), _) => Some(h.to_string()),
            (None, Address::Inet { host, .. }) => Some(host.clone()),
            (None, Address::Unix { .. }) => None,
        };
        let (connector, name) = creds.connector(hostname.as_deref())?;
        Ok(ClientTls {
            creds,
            connector,
            name,
            hostname,
        })
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("creds", &self.creds.id)
            .field("hostname", &self.hostname)
            .finish()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.creds, &other.creds) && self.hostname == other.hostname
    }
}

impl Eq for ClientTls {}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What negotiation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negotiated {
    size: u64,
    flags: u16,
    minimum: u32,
    maximum: u32,
    structured: bool,
    meta: Option<u32>,
}

/// The answer a request gets.
enum Answer {
    Data(Bytes),
    Status(Vec<(u32, u32)>),
    Done,
}

struct Pending {
    kind: u16,
    offset: u64,
    length: u32,
    buf: Option<BytesMut>,
    covered: Vec<(u64, u64)>,
    status: Vec<(u32, u32)>,
    error: Option<ErrorKind>,
    done: Option<oneshot::Sender<Outcome>>,
}

impl Pending {
    /// N40: read chunk `[off, off + len)` lies inside the request and overlaps no earlier one.
    fn cover(&mut self, off: u64, len: u64) -> std::result::Result<(), &'static str> {
        let (start, end) = (self.offset, self.offset + u64::from(self.length));
        let cend = off.checked_add(len).ok_or("chunk overflows")?;
        if off < start || cend > end {
            return Err("read chunk outside the request");
        }
        if self.covered.iter().any(|&(a, b)| off < b && a < cend) {
            return Err("overlapping read chunks");
        }
        self.covered.push((off, cend));
        Ok(())
    }
}

/// How a request sent on one connection ended.
enum Outcome {
    /// The server answered (success or an error reply).
    Answer(Result<Answer>),
    /// The connection was lost before the answer (N42): the request may be re-sent.
    Lost(String),
}

struct Conn {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Unpin + Send>>,
    pending: Mutex<BTreeMap<u64, Pending>>,
    alive: AtomicBool,
    /// Signalled once when the connection is lost, so reconnection starts at once (N42).
    lost: tokio::sync::Notify,
}

impl Conn {
    /// A live connection that sends through `writer`, with nothing in flight.
    fn new(writer: Box<dyn AsyncWrite + Unpin + Send>) -> Arc<Conn> {
        Arc::new(Conn {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(BTreeMap::new()),
            alive: AtomicBool::new(true),
            lost: tokio::sync::Notify::new(),
        })
    }

    /// Puts request `cookie` in flight (N40); its outcome arrives on the returned receiver.
    fn register(
        &self,
        cookie: u64,
        kind: u16,
        offset: u64,
        length: u32,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    length,
                    buf: None,
                    covered: Vec::new(),
                    status: Vec::new(),
                    error: None,
                    done: Some(tx),
                },
            );
        rx
    }

    /// Ends the connection: every request in flight on it is lost (N42).
    fn fail_all(&self, why: &str) {
        if self.alive.swap(false, Ordering::SeqCst) {
            self.lost.notify_one();
        }
        // In cookie order, the order the requests were sent: the order their callers learn of
        // the loss (and retry) must not depend on a hasher's seed (ARCHITECTURE.md: no HashMap
        // iteration order in decisions; a sweep's runs share a thread's hash keys).
        let drained: Vec<Pending> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        for mut p in drained {
            if let Some(tx) = p.done.take() {
                let _ = tx.send(Outcome::Lost(why.to_string()));
            }
        }
    }
}

/// The connection slot (N42).
enum Link {
    /// Connected.
    Up(Arc<Conn>),
    /// Lost at `since`; a background task is reconnecting.
    Down { since: tokio::time::Instant },
    /// A reconnect found a different export: the device fails for good.
    Broken,
}

/// Counters of the connection-loss paths (N42, N44), for monitoring and the simulator's
/// recovery-path tally (SIMULATION.md P9–P11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections lost (end of stream, reset, protocol error, request timeout, ESHUTDOWN).
    pub losses: u64,
    /// Reconnections that succeeded.
    pub reconnects: u64,
    /// Requests re-sent on a new connection within `reconnect-delay` (P9).
    pub resent: u64,
    /// Requests failed with EIO because the connection was lost and not back in time (P10).
    pub failed_lost: u64,
    /// Connection attempts that failed while opening, before the one that succeeded (P11).
    pub open_retries: u64,
}

#[derive(Default)]
struct Counters {
    losses: AtomicU64,
    reconnects: AtomicU64,
    resent: AtomicU64,
    failed_lost: AtomicU64,
    open_retries: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the device and its reconnect task share.
struct Shared {
    opts: ClientOptions,
    neg: Negotiated,
    counters: Counters,
    link: Mutex<Link>,
    /// Woken when the link changes.
    changed: tokio::sync::Notify,
}

/// An NBD export as a block device.
pub struct NbdClient {
    shared: Arc<Shared>,
    cookie: AtomicU64,
    gate: Semaphore,
}

impl Drop for NbdClient {
    /// N45: a connection still up gets DISC and a shutdown of the sending side once its
    /// requests are done; the reader then ends when the server closes. Every request holds a
    /// reference to the device, so none is in flight here.
    fn drop(&mut self) {
        let link = std::mem::replace(
            &mut *self.shared.link.lock().unwrap_or_else(|p| p.into_inner()),
            Link::Broken,
        );
        let (Link::Up(conn), Ok(rt)) = (link, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let cookie = self.cookie.load(Ordering::Relaxed);
        rt.spawn(async move { send_disc(&conn, cookie).await });
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nbd {}/{}",
            self.shared.opts.server, self.shared.opts.export
        )
    }
}

fn io_err(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, e.to_string())
}

/// A reply that breaks the protocol: the connection ends (N40).
fn bad(m: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("NBD protocol error: {m}"))
}

fn perr(e: proto::ProtoError) -> Error {
    Error::new(ErrorKind::Io, format!("NBD protocol error: {e}"))
}

async fn connect(addr: &Address) -> Result<Box<dyn Stream>> {
    match addr {
        Address::Inet { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Io, format!("Failed to connect to '{addr}': {e}"))
                })?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        #[cfg(not(madsim))]
        Address::Unix { path } => {
            let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                Error::new(ErrorKind::Io, format!("Failed to connect to '{path}': {e}"))
            })?;
            Ok(Box::new(s))
        }
        #[cfg(madsim)]
        Address::Unix { path } => Err(Error::new(
            ErrorKind::NotSup,
            format!("unix socket '{path}' in the simulator"),
        )),
    }
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(proto::OptionReplyHeader, Vec<u8>)> {
    let mut h = [0u8; proto::OPTION_REPLY_HEADER_BYTES];
    s.read_exact(&mut h).await.map_err(io_err)?;
    let h = proto::decode_option_reply_header(&h).map_err(perr)?;
    // Nothing sized by a peer's length field is allocated before it is checked (N29).
    if h.length > OPTION_REPLY_BYTES_MAX {
        return Err(Error::new(
            ErrorKind::Io,
            format!("NBD protocol error: option reply of {} bytes", h.length),
        ));
    }
    let mut d = vec![0u8; h.length as usize];
    s.read_exact(&mut d).await.map_err(io_err)?;
    Ok((h, d))
}

/// Writes one handshake message and flushes it: the peer answers only what it has received
/// (a buffering stream, such as the simulator's, holds bytes until flushed).
async fn send(s: &mut Box<dyn Stream>, bytes: &[u8]) -> Result<()> {
    s.write_all(bytes).await.map_err(io_err)?;
    s.flush().await.map_err(io_err)
}

/// K5: STARTTLS, then the TLS handshake; the stream that carries the rest.
async fn start_tls(
    mut s: Box<dyn Stream>,
    tls: &ClientTls,
    server: &Address,
) -> Result<Box<dyn Stream>> {
    send(&mut s, &proto::encode_option(opt::STARTTLS, &[])).await?;
    let (h, d) = read_option_reply(&mut s).await?;
    if h.reply_type != rep::ACK {
        let why = String::from_utf8_lossy(&d);
        let name = match h.reply_type {
            rep::ERR_UNSUP => "ERR_UNSUP".to_string(),
            rep::ERR_POLICY => "ERR_POLICY".to_string(),
            rep::ERR_INVALID => "ERR_INVALID".to_string(),
            t => format!("reply type 0x{t:x}"),
        };
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(": {why}")
        };
        return Err(Error::whole(
            ErrorKind::Access,
            format!("server {server} does not offer TLS: STARTTLS refused with {name}{why}"),
        ));
    }
    let t = tls
        .connector
        .connect(tls.name.clone(), s)
        .await
        .map_err(|e| {
            Error::whole(
                ErrorKind::Access,
                format!(
                    "TLS handshake with {server} failed: {}",
                    crate::tls::describe(&e)
                ),
            )
        })?;
    Ok(Box::new(t))
}

/// N36–N39: the whole handshake on a fresh stream; with TLS (K5), the stream it continues on.
async fn handshake(
    mut s: Box<dyn Stream>,
    export: &str,
    tls: Option<(&ClientTls, &Address)>,
) -> Result<(Box<dyn Stream>, Negotiated)> {
    let mut secured = false;
    match handshake_on(&mut s, export, tls, &mut secured).await {
        Ok(n) => Ok((s, n)),
        // With TLS 1.3 a server checks the client's certificate after the client's side of
        // the handshake is done: its refusal arrives as the next read failing.
        Err(e) if secured && e.kind() == ErrorKind::Io => Err(Error::whole(
            ErrorKind::Access,
            format!(
                "TLS connection to {} failed after the handshake (the server may have refused \
                 this client's certificate): {}",
                tls.map(|(_, a)| a.to_string()).unwrap_or_default(),
                e
            ),
        )),
        Err(e) => Err(e),
    }
}

async fn handshake_on(
    s: &mut Box<dyn Stream>,
    export: &str,
    tls: Option<(&ClientTls, &Address)>,
    secured: &mut bool,
) -> Result<Negotiated> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g[..16]).await.map_err(io_err)?;
    if g[..8] != proto::NBDMAGIC.to_be_bytes() {
        return Err(Error::new(
            ErrorKind::Io,
            "server did not send NBDMAGIC: not an NBD server",
        ));
    }
    if g[8..16] != proto::IHAVEOPT.to_be_bytes() {
        return Err(Error::new(
            ErrorKind::NotSup,
            "server uses oldstyle negotiation, which ballot does not speak",
        ));
    }
    s.read_exact(&mut g[16..]).await.map_err(io_err)?;
    let hs = u16::from_be_bytes([g[16], g[17]]);
    let fixed = hs & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hs & proto::FLAG_NO_ZEROES != 0;
    let mut cf = 0u32;
    if fixed {
        cf |= proto::CLIENT_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cf |= proto::CLIENT_NO_ZEROES;
    }
    send(s, &cf.to_be_bytes()).await?;
    if let Some((t, server)) = tls {
        if !fixed {
            return Err(Error::whole(
                ErrorKind::Access,
                format!(
                    "server {server} cannot do TLS: it does not speak fixed newstyle negotiation"
                ),
            ));
        }
        let raw = std::mem::replace(s, Box::new(tokio::io::duplex(1).0));
        *s = start_tls(raw, t, server).await?;
        *secured = true;
    }
    let mut structured = false;
    let mut meta = None;
    if fixed {
        send(s, &proto::encode_option(opt::STRUCTURED_REPLY, &[])).await?;
        let (h, _) = read_option_reply(s).await?;
        structured = h.reply_type == rep::ACK;
        if structured {
            let d = proto::encode_meta_context_request(export, &["base:allocation"]);
            send(s, &proto::encode_option(opt::SET_META_CONTEXT, &d)).await?;
            loop {
                let (h, d) = read_option_reply(s).await?;
                match h.reply_type {
                    rep::META_CONTEXT if d.len() >= 4 => {
                        meta = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                    }
                    rep::ACK => break,
                    t if rep::is_error(t) => break,
                    _ => {}
                }
            }
        }
        let d = proto::encode_info_request(export, &[proto::info::BLOCK_SIZE]);
        send(s, &proto::encode_option(opt::GO, &d)).await?;
        let mut export_info = None;
        let mut block_sizes = None;
        loop {
            let (h, d) = read_option_reply(s).await?;
            match h.reply_type {
                rep::INFO => match proto::parse_info_reply(&d).map_err(perr)? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => block_sizes = Some((minimum, preferred, maximum)),
                    Info::Other(_) => {}
                },
                rep::ACK => {
                    let Some((size, flags)) = export_info else {
                        return Err(Error::new(
                            ErrorKind::Io,
                            "server acknowledged GO without INFO(EXPORT)",
                        ));
                    };
                    // N39: checked once both INFO replies are in (the maximum's lower bound
                    // depends on the export size), in whichever order they came.
                    let (minimum, maximum) = match block_sizes {
                        None => (1, proto::PAYLOAD_BYTES_MAX),
                        Some((mi, pr, ma)) => {
                            let b = proto::check_block_sizes(mi, pr, ma, size)
                                .map_err(|m| Error::new(ErrorKind::Io, m))?;
                            (b.minimum, b.payload_max)
                        }
                    };
                    return finish(Negotiated {
                        size,
                        flags,
                        minimum,
                        maximum,
                        structured,
                        meta,
                    });
                }
                rep::ERR_UNSUP => break, // N38: EXPORT_NAME fallback
                rep::ERR_UNKNOWN => {
                    return Err(Error::new(
                        ErrorKind::NoEnt,
                        format!("export '{export}' not found"),
                    ))
                }
                rep::ERR_TLS_REQD => {
                    return Err(Error::whole(
                        ErrorKind::Access,
                        "server requires TLS: give the nbd node tls-creds",
                    ))
                }
                t => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "server refused GO with reply type 0x{t:x}: {}",
                            String::from_utf8_lossy(&d)
                        ),
                    ))
                }
            }
        }
    }
    // EXPORT_NAME (plain newstyle, or GO unsupported).
    send(
        s,
        &proto::encode_option(opt::EXPORT_NAME, export.as_bytes()),
    )
    .await?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.map_err(|_| {
        Error::new(
            ErrorKind::NoEnt,
            format!("server closed the connection on EXPORT_NAME: export '{export}' may not exist"),
        )
    })?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z).await.map_err(io_err)?;
    }
    let size = u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let flags = u16::from_be_bytes([b[8], b[9]]);
    finish(Negotiated {
        size,
        flags,
        minimum: 1,
        maximum: proto::PAYLOAD_BYTES_MAX,
        structured,
        meta,
    })
}

/// N39's checks on what negotiation found; no context without structured replies.
fn finish(n: Negotiated) -> Result<Negotiated> {
    if n.flags & tflag::HAS_FLAGS == 0 {
        return Err(Error::new(
            ErrorKind::Io,
            "server's transmission flags lack HAS_FLAGS",
        ));
    }
    if n.size > i64::MAX as u64 {
        return Err(Error::new(
            ErrorKind::Io,
            format!("export size {} is too large", n.size),
        ));
    }
    Ok(Negotiated {
        meta: if n.structured { n.meta } else { None },
        ..n
    })
}

/// The reader task: matches replies to requests by cookie (N40). Any protocol error ends
/// the connection.
async fn reader<R: AsyncRead + Unpin>(conn: Arc<Conn>, mut rd: R, structured: bool) {
    let mut disconnecting = false;
    let why = loop {
        match read_one(&conn, &mut rd, structured).await {
            Ok(()) => {}
            Err(e) => break e.to_string(),
        }
        // N42: after an ESHUTDOWN reply no request is sent here; once the last one is answered
        // the client disconnects softly (DISC, then its sending side closes), and the server,
        // which waits for that, can exit.
        let idle = conn
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if !disconnecting && idle && !conn.alive.load(Ordering::SeqCst) {
            disconnecting = true;
            send_disc(&conn, 0).await;
        }
    };
    conn.fail_all(&why);
}

async fn read_one<R: AsyncRead + Unpin>(conn: &Conn, rd: &mut R, structured: bool) -> Result<()> {
    let mut h = [0u8; proto::CHUNK_HEADER_BYTES];
    rd.read_exact(&mut h[..4]).await.map_err(io_err)?;
    let n = proto::reply_header_len(&h[..4]).map_err(perr)?;
    rd.read_exact(&mut h[4..n]).await.map_err(io_err)?;
    let hdr = proto::decode_reply_header(&h[..n]).map_err(perr)?;
    match hdr {
        ReplyHeader::Simple { error, cookie } => {
            let mut p = conn
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&cookie)
                .ok_or_else(|| bad(format!("reply to unknown cookie {cookie}")))?;
            if p.kind == cmd::READ && structured {
                return Err(bad("simple reply to a READ with structured replies on"));
            }
            let answer = if error != 0 {
                if error == proto::errno::ESHUTDOWN {
                    // N42: the server is going away; send nothing more on this connection.
                    conn.alive.store(false, Ordering::SeqCst);
                }
                Err(Error::new(proto::error_kind(error), "server error reply"))
            } else if p.kind == cmd::READ {
                Ok(Answer::Data(
                    read_fresh(rd, p.length as usize).await?.freeze(),
                ))
            } else {
                Ok(Answer::Done)
            };
            if let Some(tx) = p.done.take() {
                let _ = tx.send(Outcome::Answer(answer));
            }
        }
        ReplyHeader::Chunk {
            flags,
            kind,
            cookie,
            length,
        } => {
            if length > proto::PAYLOAD_BYTES_MAX + 64 {
                return Err(bad(format!("chunk of {length} bytes")));
            }
            if kind == proto::chunk::OFFSET_DATA && length >= 8 {
                return read_data_chunk(conn, rd, cookie, flags, length - 8).await;
            }
            let mut payload = vec![0u8; length as usize];
            rd.read_exact(&mut payload).await.map_err(io_err)?;
            let mut table = conn.pending.lock().unwrap_or_else(|p| p.into_inner());
            let p = table
                .get_mut(&cookie)
                .ok_or_else(|| bad(format!("chunk for unknown cookie {cookie}")))?;
            let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]));
            match kind {
                proto::chunk::NONE => {}
                proto::chunk::OFFSET_DATA | proto::chunk::OFFSET_HOLE => {
                    if p.kind != cmd::READ || payload.len() < 8 {
                        return Err(bad("data chunk for a non-read or too short"));
                    }
                    let off = be64(&payload);
                    let len = if kind == proto::chunk::OFFSET_DATA {
                        (payload.len() - 8) as u64
                    } else if payload.len() == 12 {
                        u64::from(u32::from_be_bytes([
                            payload[8],
                            payload[9],
                            payload[10],
                            payload[11],
                        ]))
                    } else {
                        return Err(bad("OFFSET_HOLE of the wrong size"));
                    };
                    p.cover(off, len).map_err(bad)?;
                }
                proto::chunk::BLOCK_STATUS => {
                    if payload.len() < 4 || (payload.len() - 4) % 8 != 0 {
                        return Err(bad("malformed BLOCK_STATUS chunk"));
                    }
                    for d in payload[4..].chunks_exact(8) {
                        p.status.push((
                            u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                            u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                        ));
                    }
                }
                proto::chunk::ERROR | proto::chunk::ERROR_OFFSET => {
                    if payload.len() < 6 {
                        return Err(bad("short error chunk"));
                    }
                    let e = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if e == proto::errno::ESHUTDOWN {
                        conn.alive.store(false, Ordering::SeqCst);
                    }
                    p.error = Some(proto::error_kind(e));
                }
                k if k & 0x8000 != 0 => p.error = Some(ErrorKind::Inval),
                k => return Err(bad(format!("unknown chunk type {k}"))),
            }
            if flags & proto::chunk::FLAG_DONE != 0 {
                drop(table);
                finish_chunks(conn, cookie)?;
            }
        }
    }
    Ok(())
}

/// `len` bytes from the stream into a new buffer, without zero-filling it first.
async fn read_fresh<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> Result<BytesMut> {
    let mut b = BytesMut::with_capacity(len);
    let mut src = (&mut *rd).take(len as u64);
    while b.len() < len {
        if src.read_buf(&mut b).await.map_err(io_err)? == 0 {
            return Err(io_err(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(b)
}

/// An OFFSET_DATA chunk of `len` data bytes (after its 8-byte offset) for read `cookie`: the
/// data goes straight from the stream into the request's buffer (N40). A chunk that covers the
/// whole request, the usual answer, fills a fresh buffer; otherwise the buffer starts zeroed
/// (holes read as zeroes).
async fn read_data_chunk<R: AsyncRead + Unpin>(
    conn: &Conn,
    rd: &mut R,
    cookie: u64,
    flags: u16,
    len: u32,
) -> Result<()> {
    let mut o = [0u8; 8];
    rd.read_exact(&mut o).await.map_err(io_err)?;
    let off = u64::from_be_bytes(o);
    // `None`: the chunk covers the whole request and fills a fresh buffer.
    let (buf, at) = {
        let mut table = conn.pending.lock().unwrap_or_else(|p| p.into_inner());
        let p = table
            .get_mut(&cookie)
            .ok_or_else(|| bad(format!("chunk for unknown cookie {cookie}")))?;
        if p.kind != cmd::READ {
            return Err(bad("data chunk for a non-read or too short"));
        }
        p.cover(off, u64::from(len)).map_err(bad)?;
        let whole = p.buf.is_none() && off == p.offset && len == p.length;
        let buf = (!whole).then(|| {
            p.buf
                .take()
                .unwrap_or_else(|| BytesMut::zeroed(p.length as usize))
        });
        (buf, (off - p.offset) as usize)
    };
    let filled = match buf {
        None => read_fresh(rd, len as usize).await?,
        Some(mut b) => {
            rd.read_exact(&mut b[at..at + len as usize])
                .await
                .map_err(io_err)?;
            b
        }
    };
    {
        let mut table = conn.pending.lock().unwrap_or_else(|p| p.into_inner());
        match table.get_mut(&cookie) {
            Some(p) => p.buf = Some(filled),
            // Failed meanwhile (a request timeout): the connection is going down.
            None => return Ok(()),
        }
    }
    if flags & proto::chunk::FLAG_DONE != 0 {
        finish_chunks(conn, cookie)?;
    }
    Ok(())
}

/// The last chunk of request `cookie` arrived: its answer goes to the caller.
fn finish_chunks(conn: &Conn, cookie: u64) -> Result<()> {
    let Some(mut p) = conn
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&cookie)
    else {
        return Err(bad("vanished cookie"));
    };
    let answer = match p.error {
        Some(k) => Err(Error::new(k, "server error chunk")),
        None if p.kind == cmd::READ => {
            let total: u64 = p.covered.iter().map(|(a, b)| b - a).sum();
            if total != u64::from(p.length) {
                return Err(bad("successful read does not cover the request"));
            }
            let b = p
                .buf
                .take()
                .unwrap_or_else(|| BytesMut::zeroed(p.length as usize));
            Ok(Answer::Data(b.freeze()))
        }
        None if p.kind == cmd::BLOCK_STATUS => Ok(Answer::Status(std::mem::take(&mut p.status))),
        None => Ok(Answer::Done),
    };
    if let Some(tx) = p.done.take() {
        let _ = tx.send(Outcome::Answer(answer));
    }
    Ok(())
}

/// How one request's reply ended, as [`replay_replies`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// A successful read: the request's bytes.
    Data(Bytes),
    /// A successful BLOCK_STATUS: its descriptors.
    Status(Vec<(u32, u32)>),
    /// Any other success.
    Done,
    /// An error reply or error chunk.
    Failed(ErrorKind),
    /// No answer before the reader stopped (N42: the request would be re-sent).
    Lost,
}

/// Runs the reply reader of one connection over `stream` — the bytes a server sends after the
/// handshake — with `requests` `(command, offset, length)` in flight under cookies `0..n`,
/// until the stream ends or breaks a rule (N40, N41). Returns each request's outcome and why
/// the reader stopped. The reader, its limits and its protocol checks are exactly those a live
/// connection runs; nothing is sent. For the fuzz targets and tests of the reply parser.
pub async fn replay_replies(
    structured: bool,
    requests: &[(u16, u64, u32)],
    stream: &[u8],
) -> (Vec<Replayed>, String) {
    let conn = Conn::new(Box::new(tokio::io::sink()));
    let waits: Vec<oneshot::Receiver<Outcome>> = (0u64..)
        .zip(requests)
        .map(|(cookie, &(kind, offset, length))| conn.register(cookie, kind, offset, length))
        .collect();
    let mut rd = stream;
    let reason = loop {
        if let Err(e) = read_one(&conn, &mut rd, structured).await {
            break e.to_string();
        }
    };
    conn.fail_all(&reason);
    let mut out = Vec::with_capacity(waits.len());
    for rx in waits {
        out.push(match rx.await {
            Ok(Outcome::Answer(Ok(Answer::Data(b)))) => Replayed::Data(b),
            Ok(Outcome::Answer(Ok(Answer::Status(s)))) => Replayed::Status(s),
            Ok(Outcome::Answer(Ok(Answer::Done))) => Replayed::Done,
            Ok(Outcome::Answer(Err(e))) => Replayed::Failed(e.kind()),
            Ok(Outcome::Lost(_)) | Err(_) => Replayed::Lost,
        });
    }
    (out, reason)
}

/// N45: DISC, then the sending side is shut down; the reader ends when the server closes.
async fn send_disc(conn: &Conn, cookie: u64) {
    let disc = proto::encode_request(&Request {
        flags: 0,
        kind: cmd::DISC,
        cookie,
        offset: 0,
        length: 0,
    });
    let mut w = conn.writer.lock().await;
    let _ = w.write_all(&disc).await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// One connection attempt: connect and handshake, bounded in time.
async fn dial(opts: &ClientOptions) -> Result<(Arc<Conn>, Negotiated)> {
    let limit = if opts.request_timeout.is_zero() {
        DIAL_TIMEOUT_DEFAULT
    } else {
        opts.request_timeout
    };
    let attempt = async {
        let s = connect(&opts.server).await?;
        handshake(
            s,
            &opts.export,
            opts.tls.as_ref().map(|t| (t, &opts.server)),
        )
        .await
    };
    let (s, neg) = tokio::time::timeout(limit, attempt).await.map_err(|_| {
        Error::new(
            ErrorKind::Io,
            format!("connecting to {} timed out", opts.server),
        )
    })??;
    let (rd, wr) = tokio::io::split(s);
    let conn = Conn::new(Box::new(wr));
    // Reply headers are small: a buffer reads several per system call; payloads larger than
    // the buffer bypass it.
    let rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    tokio::spawn(reader(conn.clone(), rd, neg.structured));
    Ok((conn, neg))
}

/// N44: dial, retrying with backoff from 100 ms, doubling to 5 s, while the next attempt
/// still starts within `window`; the last error otherwise.
/// Returns the connection and how many attempts failed before it.
async fn dial_retrying(
    opts: &ClientOptions,
    window: Duration,
) -> Result<(Arc<Conn>, Negotiated, u64)> {
    let deadline = tokio::time::Instant::now() + window;
    let mut backoff = BACKOFF_FIRST;
    let mut failed = 0;
    loop {
        match dial(opts).await {
            Err(_) if tokio::time::Instant::now() + backoff <= deadline => {
                failed += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            r => return r.map(|(c, n)| (c, n, failed)),
        }
    }
}

/// N42: the connection is lost: the link goes down now and the background reconnect starts.
/// Returns when the loss was taken.
fn go_down(sh: &Arc<Shared>, link: &mut Link) -> tokio::time::Instant {
    bump(&sh.counters.losses);
    crate::log::peer_warning(
        "nbd-client-lost",
        &format!(
            "nbd connection to {} (export '{}') lost; reconnecting",
            sh.opts.server, sh.opts.export
        ),
    );
    let since = tokio::time::Instant::now();
    *link = Link::Down { since };
    tokio::spawn(reconnect(Arc::downgrade(sh)));
    since
}

/// N42: reconnection starts when the connection is lost, not when the next request finds
/// it lost: with `reconnect-delay` 0 the device is back as soon as the server is.
fn watch(
    shared: std::sync::Weak<Shared>,
    conn: Arc<Conn>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // Boxed with a named type: `reconnect` spawns `watch` in turn.
    Box::pin(async move {
        conn.lost.notified().await;
        let Some(sh) = shared.upgrade() else { return };
        let mut link = sh.link.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(&*link, Link::Up(c) if Arc::ptr_eq(c, &conn)) {
            go_down(&sh, &mut link);
        }
    })
}

/// N42: the background reconnect, from 100 ms doubling to 5 s, until it succeeds or the device
/// is gone. A new connection must show the same size and read-only state.
async fn reconnect(shared: std::sync::Weak<Shared>) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let Some(sh) = shared.upgrade() else { return };
        let opts = sh.opts.clone();
        let first = sh.neg;
        drop(sh);
        let attempt = dial(&opts).await;
        let Some(sh) = shared.upgrade() else { return };
        if let Err(e) = &attempt {
            tracing::debug!(target: "ballot::nbd::client", "reconnecting to {}: {e}", opts.server);
        }
        if let Ok((conn, neg)) = attempt {
            let ro = |f: u16| f & tflag::READ_ONLY != 0;
            let same = neg.size == first.size && ro(neg.flags) == ro(first.flags);
            if same {
                tracing::info!(target: "ballot::nbd::client", "nbd connection to {} is back", opts.server);
            } else {
                tracing::warn!(
                    target: "ballot::nbd::client",
                    "nbd connection to {} is back, but the export changed (size or read-only): the node fails every request from now on",
                    opts.server
                );
            }
            if same {
                // H7: SeqCst, and before the link is up, so a request on the new connection
                // always sees the new epoch.
                sh.counters.reconnects.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(watch(Arc::downgrade(&sh), conn.clone()));
            }
            *sh.link.lock().unwrap_or_else(|p| p.into_inner()) =
                if same { Link::Up(conn) } else { Link::Broken };
            sh.changed.notify_waiters();
            return;
        }
        drop(sh);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl NbdClient {
    /// Connects and negotiates (N44: retried with backoff until `open-timeout`).
    ///
    /// # Errors
    /// The last connection or negotiation error.
    pub async fn open(opts: ClientOptions) -> Result<NbdClient> {
        let (conn, neg, failed) = dial_retrying(&opts, opts.open_timeout).await?;
        let counters = Counters::default();
        counters.open_retries.store(failed, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            opts,
            neg,
            counters,
            link: Mutex::new(Link::Up(conn.clone())),
            changed: tokio::sync::Notify::new(),
        });
        tokio::spawn(watch(Arc::downgrade(&shared), conn));
        Ok(NbdClient {
            shared,
            cookie: AtomicU64::new(1),
            gate: Semaphore::new(INFLIGHT_MAX),
        })
    }

    /// The live connection (N42). When it is lost, starts the background reconnect and waits
    /// for it until `reconnect-delay` after the loss; EIO after that, or at once with 0.
    async fn live(&self) -> Result<Arc<Conn>> {
        loop {
            let changed = self.shared.changed.notified();
            let since = {
                let mut link = self.shared.link.lock().unwrap_or_else(|p| p.into_inner());
                match &*link {
                    Link::Up(c) if c.alive.load(Ordering::SeqCst) => return Ok(c.clone()),
                    Link::Up(_) => go_down(&self.shared, &mut link),
                    Link::Down { since } => *since,
                    Link::Broken => {
                        return Err(Error::new(ErrorKind::Io, "export changed on reconnect"))
                    }
                }
            };
            let deadline = since + self.shared.opts.reconnect_delay;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "nbd connection to {} lost; reconnecting",
                        self.shared.opts.server
                    ),
                ));
            }
            let _ = tokio::time::timeout(deadline - now, changed).await;
        }
    }

    /// Sends one request, re-sending it on a new connection while `reconnect-delay` allows
    /// (N42), and waits for its answer.
    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Answer> {
        let _permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Io, "client closed"))?;
        let mut lost = false;
        loop {
            let conn = match self.live().await {
                Ok(c) => c,
                Err(e) => {
                    bump(&self.shared.counters.failed_lost);
                    return Err(e);
                }
            };
            if lost {
                bump(&self.shared.counters.resent);
            }
            match self
                .send_once(&conn, kind, flags, offset, length, payload.as_ref())
                .await
            {
                Outcome::Answer(a) => return a,
                Outcome::Lost(why) => {
                    lost = true;
                    if self.shared.opts.reconnect_delay.is_zero() {
                        bump(&self.shared.counters.failed_lost);
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!("nbd connection lost: {why}"),
                        ));
                    }
                    // live() decides whether the delay still allows a re-send.
                }
            }
        }
    }

    async fn send_once(
        &self,
        conn: &Arc<Conn>,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&Bytes>,
    ) -> Outcome {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let rx = conn.register(cookie, kind, offset, length);
        let hdr = proto::encode_request(&Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        });
        {
            let mut w = conn.writer.lock().await;
            let sent = async {
                // Header and payload in one vectored write: one system call, and the server
                // never sees a header without its payload.
                let mut parts = [
                    std::io::IoSlice::new(&hdr),
                    std::io::IoSlice::new(payload.map_or(&[][..], |p| &p[..])),
                ];
                proto::write_all_vectored(&mut *w, &mut parts).await?;
                w.flush().await
            }
            .await;
            if let Err(e) = sent {
                drop(w);
                conn.fail_all(&e.to_string());
            }
        }
        let lost = || Outcome::Lost("reader ended".into());
        if self.shared.opts.request_timeout.is_zero() {
            return rx.await.unwrap_or_else(|_| lost());
        }
        match tokio::time::timeout(self.shared.opts.request_timeout, rx).await {
            Ok(r) => r.unwrap_or_else(|_| lost()),
            Err(_) => {
                // N42: request-timeout declares the connection lost.
                conn.fail_all("request timeout");
                let _ = conn.writer.lock().await.shutdown().await;
                Outcome::Lost("request timeout".into())
            }
        }
    }

    /// Whether a live connection is up. A connection found lost starts the background
    /// reconnect (N42) as a request would, so polling this brings the device back.
    pub fn is_connected(&self) -> bool {
        let mut link = self.shared.link.lock().unwrap_or_else(|p| p.into_inner());
        match &*link {
            Link::Up(c) if c.alive.load(Ordering::SeqCst) => true,
            Link::Up(_) => {
                go_down(&self.shared, &mut link);
                false
            }
            Link::Down { .. } | Link::Broken => false,
        }
    }

    /// The connection-loss counters so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            losses: get(&c.losses),
            reconnects: get(&c.reconnects),
            resent: get(&c.resent),
            failed_lost: get(&c.failed_lost),
            open_retries: get(&c.open_retries),
        }
    }

    /// The server's CAN_MULTI_CONN flag as negotiated (N19, N27).
    pub fn can_multi_conn(&self) -> bool {
        self.has(tflag::CAN_MULTI_CONN)
    }

    /// Whether structured replies were agreed (N37).
    pub fn structured_replies(&self) -> bool {
        self.shared.neg.structured
    }

    /// Whether the `base:allocation` context was selected, so block status is asked (N37, N41).
    pub fn has_block_status(&self) -> bool {
        self.shared.neg.meta.is_some()
    }

    fn has(&self, f: u16) -> bool {
        self.shared.neg.flags & f != 0
    }

    fn check(&self, offset: u64, len: u64, access: Access) -> Result<()> {
        check_request(
            self.shared.neg.size,
            self.shared.neg.minimum,
            offset,
            len,
            access,
        )
    }

    fn read_only_err(&self) -> Result<()> {
        if self.has(tflag::READ_ONLY) {
            return Err(Error::new(
                ErrorKind::Perm,
                format!("nbd export '{}' is read-only", self.shared.opts.export),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for NbdClient {
    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.shared.neg.size)
    }

    fn request_alignment(&self) -> u32 {
        self.shared.neg.minimum
    }

    /// HEALING.md H7: every successful reconnection may be a restarted server.
    fn cache_epoch(&self) -> u64 {
        self.shared.counters.reconnects.load(Ordering::SeqCst)
    }

    fn reachable(&self) -> bool {
        matches!(
            &*self.shared.link.lock().unwrap_or_else(|p| p.into_inner()),
            Link::Up(c) if c.alive.load(Ordering::SeqCst)
        )
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(offset, len as u64, Access::Read)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let max = self.shared.neg.maximum as usize;
        if len <= max {
            return match self.request(cmd::READ, 0, offset, len as u32, None).await? {
                Answer::Data(b) => Ok(b),
                _ => Err(Error::new(ErrorKind::Io, "read answered without data")),
            };
        }
        // N39: split above the maximum payload.
        let mut out = BytesMut::with_capacity(len);
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(max);
            match self
                .request(cmd::READ, 0, offset + done as u64, n as u32, None)
                .await?
            {
                Answer::Data(b) => out.extend_from_slice(&b),
                _ => return Err(Error::new(ErrorKind::Io, "read answered without data")),
            }
            done += n;
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.read_only_err()?;
        self.check(offset, data.len() as u64, Access::Write)?;
        let max = self.shared.neg.maximum as usize;
        let fua_native = flags.fua && self.has(tflag::SEND_FUA);
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(max);
            let f = if fua_native { cflag::FUA } else { 0 };
            self.request(
                cmd::WRITE,
                f,
                offset + done as u64,
                n as u32,
                Some(data.slice(done..done + n)),
            )
            .await?;
            done += n;
        }
        if flags.fua && !fua_native {
            // N41: FUA without SEND_FUA is write then flush.
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(tflag::SEND_FLUSH) {
            return Ok(()); // N41: such a server promises no durability
        }
        self.request(cmd::FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.read_only_err()?;
        self.check(offset, len, Access::Write)?;
        if !self.has(tflag::SEND_WRITE_ZEROES) {
            return crate::device::write_zeroes_by_writing(self, offset, len, flags).await;
        }
        let mut f = if flags.fua && self.has(tflag::SEND_FUA) {
            cflag::FUA
        } else {
            0
        };
        if !flags.may_unmap {
            f |= cflag::NO_HOLE;
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(UNPAYLOADED_BYTES_MAX);
            self.request(cmd::WRITE_ZEROES, f, offset + done, n as u32, None)
                .await?;
            done += n;
        }
        if flags.fua && !self.has(tflag::SEND_FUA) {
            self.flush().await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, Access::Read)?;
        if !self.has(tflag::SEND_TRIM) || self.has(tflag::READ_ONLY) || len == 0 {
            return Ok(()); // a hint
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(UNPAYLOADED_BYTES_MAX);
            self.request(cmd::TRIM, 0, offset + done, n as u32, None)
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check(offset, len, Access::Read)?;
        if self.shared.neg.meta.is_none() || len == 0 {
            return Ok(BlockStatus::data(len));
        }
        let n = len.clamp(1, UNPAYLOADED_BYTES_MAX) as u32;
        match self
            .request(cmd::BLOCK_STATUS, cflag::REQ_ONE, offset, n, None)
            .await?
        {
            Answer::Status(d) => match d.first() {
                Some(&(l, f)) if l > 0 => {
                    let length = u64::from(l).min(len);
                    Ok(BlockStatus {
                        length,
                        zero: f & proto::alloc::ZERO != 0,
                        data: f & proto::alloc::HOLE == 0,
                        allocated: true,
                    })
                }
                _ => Ok(BlockStatus::data(len)),
            },
            _ => Ok(BlockStatus::data(len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost connection fails its requests in cookie order (the order they were sent), so
    /// the order their callers retry in never depends on a hasher's keys (ARCHITECTURE.md).
    #[test]
    fn a_lost_connection_fails_requests_in_cookie_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let conn = Conn::new(Box::new(tokio::io::sink()));
            let order = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for cookie in [40u64, 7, 93, 12, 55, 3, 71, 28] {
                let rx = conn.register(cookie, cmd::WRITE, 0, 512);
                let order = order.clone();
                tasks.push(tokio::spawn(async move {
                    if let Ok(Outcome::Lost(_)) = rx.await {
                        order.lock().unwrap_or_else(|p| p.into_inner()).push(cookie);
                    }
                }));
            }
            // Let every waiter park on its receiver before the loss.
            tokio::task::yield_now().await;
            conn.fail_all("test");
            for t in tasks {
                t.await.expect("waiter");
            }
            assert_eq!(
                *order.lock().unwrap_or_else(|p| p.into_inner()),
                vec![3, 7, 12, 28, 40, 55, 71, 93]
            );
        });
    }
}
