//! The NBD server of `ballot serve` (NBD.md §3–§5): fixed newstyle negotiation, then
//! transmission with concurrent requests whose replies leave in completion order.
//!
//! The server is generic over the stream (TCP, unix socket, madsim TCP, an in-memory duplex
//! in tests). One task reads requests, one task per request drives the device, and one writer
//! task sends whole replies (N30).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};

use super::proto::{self, cflag, cmd, errno, opt, rep, tflag};
use crate::device::{Device, WriteFlags, ZeroFlags};
use crate::error::ErrorKind;

/// Requests in flight per connection (N28).
pub const INFLIGHT_MAX: usize = 64;
/// N28: payload buffered per connection, in units of [`BUFFER_UNIT_BYTES`] (64 MiB).
const BUFFERED_UNITS_MAX: u32 = (64 << 20) / BUFFER_UNIT_BYTES;
/// Granularity of the payload budget.
const BUFFER_UNIT_BYTES: u32 = 4096;

/// The read buffer of a connection.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Replies gathered into one vectored write, at most.
const WRITE_BATCH_PARTS: usize = 64;

/// Writes whole replies, several per vectored write when they are queued together (N30: each
/// reply's parts stay contiguous and in order).
async fn write_parts<W: AsyncWrite + Unpin>(
    wr: &mut W,
    parts: &mut std::collections::VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !parts.is_empty() {
        let n = parts.len().min(WRITE_BATCH_PARTS * 2);
        {
            let mut slices: Vec<std::io::IoSlice<'_>> = parts
                .iter()
                .take(n)
                .map(|b| std::io::IoSlice::new(b))
                .collect();
            proto::write_all_vectored(wr, &mut slices).await?;
        }
        parts.drain(..n);
    }
    Ok(())
}

/// Budget units a payload of `len` bytes takes (at least one, so every request counts).
fn buffer_units(len: u32) -> u32 {
    len.div_ceil(BUFFER_UNIT_BYTES).max(1)
}

/// What one request holds until its reply is written: its in-flight slot and payload units.
struct Permits {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}
/// Options per connection before it is closed (N18).
pub const OPTIONS_MAX: usize = 1024;
/// Time a connection may take to reach transmission (N18).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The only meta context (N14), and the id it gets once selected.
pub const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;
/// Most descriptors in one BLOCK_STATUS reply (N24 allows 2^20; fewer is always correct).
const DESCRIPTORS_MAX: usize = 1024;

/// One export.
#[derive(Debug)]
pub struct Export {
    /// Export name (`name=`; may be empty).
    pub name: String,
    /// `description=`.
    pub description: String,
    /// The node served.
    pub dev: Device,
    /// `writable=on`.
    pub writable: bool,
    /// `multi-conn` on or auto (N27).
    pub multi_conn: bool,
}

impl Export {
    /// Minimum block size (N13): the node's request alignment.
    pub fn minimum(&self) -> u32 {
        self.dev.request_alignment().max(1)
    }

    fn flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
        if self.writable {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
            if self.dev.can_fast_zero() {
                f |= tflag::SEND_FAST_ZERO;
            }
        } else {
            f |= tflag::READ_ONLY;
        }
        if structured {
            f |= tflag::SEND_DF;
        }
        if self.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        f
    }
}

/// The exports of one server and its shutdown state.
#[derive(Debug, Default)]
pub struct Server {
    exports: RwLock<Vec<Arc<Export>>>,
    shutting_down: AtomicBool,
    /// Connections in transmission.
    sessions: std::sync::Mutex<Vec<SessionSlot>>,
    next_session: std::sync::atomic::AtomicU64,
    /// K6: when set, every client must start TLS with these credentials.
    tls: RwLock<Option<Arc<crate::tls::TlsCreds>>>,
    /// TLS handshakes that succeeded.
    tls_sessions: std::sync::atomic::AtomicU64,
}

/// One connection in transmission, as the monitor sees it.
#[derive(Debug)]
struct SessionSlot {
    id: u64,
    export: String,
    /// Stops the connection's reader (`block-export-del` hard mode, or safe mode once the
    /// client has left).
    kill: Arc<tokio::sync::Notify>,
    /// A duplicate of the socket's descriptor, when the stream is a socket: it tells whether
    /// the client has hung up before the connection's own task has run to notice.
    peer: Option<std::os::fd::OwnedFd>,
}

impl SessionSlot {
    /// Whether the client has closed its end (or the socket failed). A stream without a
    /// descriptor (in-memory, simulated) is taken as still connected until its task ends.
    fn peer_gone(&self) -> bool {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.peer else {
            return false;
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; the descriptor is owned by this slot.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1
            && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }
}

/// Unregisters a session when its connection ends.
struct SessionEntry<'a>(&'a Server, u64);

impl Drop for SessionEntry<'_> {
    fn drop(&mut self) {
        self.0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|slot| slot.id != self.1);
    }
}

/// Where a connection's negotiation stands; it outlives STARTTLS (K6–K8).
#[derive(Debug, Default)]
struct NegState {
    greeted: bool,
    fixed: bool,
    no_zeroes: bool,
    /// Options read so far, before and after STARTTLS (N18).
    options: usize,
    tls_required: bool,
    tls_active: bool,
    /// Options refused with ERR_TLS_REQD (or EXPORT_NAME closed) before TLS.
    refused_plain: u32,
}

/// How one negotiation pass ended.
enum Negotiated {
    /// Transmission starts.
    Session(Session),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
    /// The client left, or was closed.
    Closed,
}

/// What negotiation agreed.
struct Session {
    export: Arc<Export>,
    structured: bool,
    meta: bool,
}

impl Server {
    /// An empty server.
    pub fn new() -> Arc<Server> {
        Arc::new(Server::default())
    }

    /// Adds an export.
    ///
    /// # Errors
    /// A message naming the export: a duplicate name, or a size that is not a multiple of the
    /// minimum block size (N13).
    pub fn add_export(&self, e: Export) -> Result<(), String> {
        let len = e
            .dev
            .length()
            .map_err(|err| format!("export '{}': {err}", e.name))?;
        if len % u64::from(e.minimum()) != 0 {
            return Err(format!(
                "export '{}': size {len} is not a multiple of its block size {}",
                e.name,
                e.minimum()
            ));
        }
        let mut ex = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if ex.iter().any(|x| x.name == e.name) {
            return Err(format!("export '{}' already exists", e.name));
        }
        ex.push(Arc::new(e));
        Ok(())
    }

    /// Removes an export by name; returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        let mut ex = self.exports.write().unwrap_or_else(|p| p.into_inner());
        let before = ex.len();
        ex.retain(|x| x.name != name);
        ex.len() != before
    }

    /// Clients connected to export `name` now (`block-export-del` in safe mode refuses while
    /// there are any, REPLICATION.md O1). A client that has already hung up is not counted,
    /// even if its connection's task has not yet run to notice: `qemu-io` exiting and then
    /// `block-export-del` must not race (QEMU's count includes such a client until its
    /// coroutine runs).
    pub fn clients(&self, name: &str) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|slot| slot.export == name && !slot.peer_gone())
            .count()
    }

    /// Disconnects every client of export `name` (`block-export-del` in hard mode): each stops
    /// reading requests at once; requests already read finish and are answered.
    pub fn disconnect(&self, name: &str) {
        for slot in self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if slot.export == name {
                slot.kill.notify_one();
            }
        }
    }

    /// Disconnects every client of every export (QMP `nbd-server-stop`).
    pub fn disconnect_all(&self) {
        for slot in self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            slot.kill.notify_one();
        }
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|x| x.name == name)
            .cloned()
    }

    /// Starts shutdown (N33): options get ERR_SHUTDOWN, new requests ESHUTDOWN.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Serves one connection to its end. Errors are the connection's end, not the server's.
    pub async fn serve<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_socket(stream, None).await;
    }

    /// [`Server::serve`] for a socket: `peer` is a duplicate of its descriptor, with which
    /// [`Server::clients`] sees a client that has hung up before this connection's task has.
    pub async fn serve_socket<S>(self: Arc<Self>, stream: S, peer: Option<std::os::fd::OwnedFd>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_client(stream, peer, "client").await;
    }

    /// Requires TLS of every client from now on (docs/tls.md K6), or no longer with `None`.
    /// Connections already past negotiation keep what they agreed.
    ///
    /// # Errors
    /// The credentials are a client's (endpoint=client).
    pub fn set_tls(&self, creds: Option<Arc<crate::tls::TlsCreds>>) -> Result<(), String> {
        if let Some(c) = &creds {
            c.acceptor()?;
        }
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = creds;
        Ok(())
    }

    /// TLS handshakes this server completed (K6).
    pub fn tls_sessions(&self) -> u64 {
        self.tls_sessions.load(Ordering::SeqCst)
    }

    /// The credentials clients must use, if any.
    pub fn tls_creds(&self) -> Option<Arc<crate::tls::TlsCreds>> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// [`Server::serve_socket`] naming the client (`who`, its address) in the warnings a
    /// refused connection leaves (K9).
    pub async fn serve_client<S>(
        self: Arc<Self>,
        stream: S,
        peer: Option<std::os::fd::OwnedFd>,
        who: &str,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let acceptor = self
            .tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|c| c.acceptor().ok());
        let started = tokio::time::Instant::now();
        let (rd, mut wr) = tokio::io::split(stream);
        // Headers are small: a buffer turns two reads per request into fewer; payloads larger
        // than the buffer bypass it.
        let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
        let mut st = NegState {
            tls_required: acceptor.is_some(),
            ..NegState::default()
        };
        let first =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, self.negotiate(&mut rd, &mut wr, &mut st))
                .await;
        tracing::debug!(target: "ballot::nbd::server", "NBD client {who}: connected");
        let session = match first {
            Ok(Ok(Negotiated::Session(s))) => s,
            Ok(Ok(Negotiated::StartTls)) => {
                let Some(acceptor) = acceptor else {
                    return;
                };
                // K7: a client sends nothing after STARTTLS until the server's ACK; bytes
                // already buffered would be plain text spliced into the TLS stream.
                if !rd.buffer().is_empty() {
                    crate::log::peer_warning(
                        "nbd-tls-pipelined",
                        &format!("NBD client {who}: refused: it sent data after STARTTLS before the server's reply"),
                    );
                    let _ = wr.shutdown().await;
                    return;
                }
                let stream = rd.into_inner().unsplit(wr);
                let left = HANDSHAKE_TIMEOUT.saturating_sub(started.elapsed());
                let secured = tokio::time::timeout(left, async {
                    let t = acceptor.accept(stream).await.map_err(|e| {
                        crate::log::peer_warning(
                            "nbd-tls-handshake",
                            &format!(
                                "NBD client {who}: TLS handshake failed: {}",
                                crate::tls::describe(&e)
                            ),
                        );
                    })?;
                    self.tls_sessions.fetch_add(1, Ordering::SeqCst);
                    let (rd, mut wr) = tokio::io::split(t);
                    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
                    st.tls_active = true;
                    match self.negotiate(&mut rd, &mut wr, &mut st).await {
                        Ok(Negotiated::Session(s)) => Ok((s, rd, wr)),
                        _ => {
                            let _ = wr.shutdown().await;
                            Err(())
                        }
                    }
                })
                .await;
                match secured {
                    Ok(Ok((s, rd, wr))) => {
                        tracing::debug!(
                            target: "ballot::nbd::server",
                            "NBD client {who}: export '{}' over TLS, structured replies {}",
                            s.export.name,
                            s.structured
                        );
                        self.transmission(s, rd, wr, peer).await;
                        tracing::debug!(target: "ballot::nbd::server", "NBD client {who}: disconnected");
                    }
                    Ok(Err(())) => {}
                    Err(_) => crate::log::peer_warning(
                        "nbd-handshake-timeout",
                        &format!(
                            "NBD client {who}: negotiation did not finish within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                    ),
                }
                return;
            }
            _ => {
                if st.refused_plain > 0 {
                    // K6: a client that would not start TLS was served nothing.
                    crate::log::peer_warning(
                        "nbd-tls-required",
                        &format!("NBD client {who}: refused: TLS is required and the client did not start it"),
                    );
                }
                let _ = wr.shutdown().await;
                return;
            }
        };
        tracing::debug!(
            target: "ballot::nbd::server",
            "NBD client {who}: export '{}', structured replies {}",
            session.export.name,
            session.structured
        );
        self.transmission(session, rd, wr, peer).await;
        tracing::debug!(target: "ballot::nbd::server", "NBD client {who}: disconnected");
    }

    /// Fixed newstyle negotiation (N6–N18). `Ok(None)`: the client left or was closed.
    /// With TLS (K6, K7) negotiation runs twice: in plain text until STARTTLS, whose ACK ends
    /// it with [`Negotiated::StartTls`], then again inside TLS, where `st` carries on.
    async fn negotiate<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        st: &mut NegState,
    ) -> std::io::Result<Negotiated>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if !st.greeted {
            wr.write_all(&proto::encode_greeting()).await?;
            wr.flush().await?;
            let client = rd.read_u32().await?;
            if client & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
                return Ok(Negotiated::Closed); // N7
            }
            st.greeted = true;
            st.fixed = client & proto::CLIENT_FIXED_NEWSTYLE != 0;
            st.no_zeroes = client & proto::CLIENT_NO_ZEROES != 0;
        }
        let (fixed, no_zeroes) = (st.fixed, st.no_zeroes);
        // K8: nothing agreed in plain text survives STARTTLS.
        let mut structured = false;
        let mut meta_export: Option<String> = None;
        while st.options < OPTIONS_MAX {
            st.options += 1;
            let mut hdr = [0u8; proto::OPTION_HEADER_BYTES];
            rd.read_exact(&mut hdr).await?;
            let h = match proto::decode_option_header(&hdr) {
                Ok(h) => h,
                Err(_) => return Ok(Negotiated::Closed), // N9: bad magic or too long: close unread
            };
            let mut data = vec![0u8; h.length as usize];
            rd.read_exact(&mut data).await?;
            if !fixed && h.option != opt::EXPORT_NAME {
                return Ok(Negotiated::Closed); // N8
            }
            let reply = |t: u32, d: &[u8]| proto::encode_option_reply(h.option, t, d);
            let err = |t: u32, msg: &str| proto::encode_option_reply(h.option, t, msg.as_bytes());
            if self.shutting_down() && h.option != opt::ABORT {
                wr.write_all(&err(rep::ERR_SHUTDOWN, "server is shutting down"))
                    .await?;
                wr.flush().await?;
                continue;
            }
            // K6: until TLS is up, a server that requires it answers every option but
            // STARTTLS and ABORT with ERR_TLS_REQD, and closes on EXPORT_NAME (which cannot be
            // refused any other way).
            if st.tls_required && !st.tls_active {
                match h.option {
                    opt::STARTTLS if data.is_empty() => {
                        wr.write_all(&reply(rep::ACK, &[])).await?;
                        wr.flush().await?;
                        return Ok(Negotiated::StartTls);
                    }
                    opt::STARTTLS => {
                        wr.write_all(&err(rep::ERR_INVALID, "STARTTLS takes no data"))
                            .await?;
                        wr.flush().await?;
                        continue;
                    }
                    opt::ABORT => {}
                    opt::EXPORT_NAME => {
                        st.refused_plain += 1;
                        return Ok(Negotiated::Closed);
                    }
                    _ => {
                        st.refused_plain += 1;
                        wr.write_all(&err(
                            rep::ERR_TLS_REQD,
                            "TLS is required: send STARTTLS first",
                        ))
                        .await?;
                        wr.flush().await?;
                        continue;
                    }
                }
            }
            match h.option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = self.find(&name) else {
                        return Ok(Negotiated::Closed); // N10: the only way to refuse
                    };
                    let size = export.dev.length().map_err(std::io::Error::other)?;
                    let mut v = size.to_be_bytes().to_vec();
                    v.extend_from_slice(&export.flags(structured).to_be_bytes());
                    if !no_zeroes {
                        v.extend_from_slice(&[0u8; 124]);
                    }
                    wr.write_all(&v).await?;
                    wr.flush().await?;
                    let meta = meta_export.as_deref() == Some(export.name.as_str());
                    return Ok(Negotiated::Session(Session {
                        export,
                        structured,
                        meta,
                    }));
                }
                opt::ABORT => {
                    wr.write_all(&reply(rep::ACK, &[])).await?;
                    wr.flush().await?;
                    let mut sink = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(1), rd.read(&mut sink)).await;
                    return Ok(Negotiated::Closed);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        wr.write_all(&err(rep::ERR_INVALID, "LIST takes no data"))
                            .await?;
                    } else {
                        let list: Vec<Arc<Export>> = self
                            .exports
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        for e in list {
                            let d = proto::server_reply(&e.name, &e.description);
                            wr.write_all(&reply(rep::SERVER, &d)).await?;
                        }
                        wr.write_all(&reply(rep::ACK, &[])).await?;
                    }
                }
                opt::INFO | opt::GO => {
                    let req = match proto::parse_info_request(&data) {
                        Ok(r) => r,
                        Err(e) => {
                            wr.write_all(&err(rep::ERR_INVALID, &e.to_string())).await?;
                            wr.flush().await?;
                            continue;
                        }
                    };
                    let Some(export) = self.find(&req.name) else {
                        let msg = format!("export '{}' not present", req.name);
                        wr.write_all(&err(rep::ERR_UNKNOWN, &msg)).await?;
                        wr.flush().await?;
                        continue;
                    };
                    let size = export.dev.length().map_err(std::io::Error::other)?;
                    let mut out = reply(
                        rep::INFO,
                        &proto::info_export(size, export.flags(structured)),
                    );
                    if req.infos.contains(&proto::info::NAME) {
                        out.extend(reply(
                            rep::INFO,
                            &proto::info_text(proto::info::NAME, &export.name),
                        ));
                    }
                    if req.infos.contains(&proto::info::DESCRIPTION)
                        && !export.description.is_empty()
                    {
                        out.extend(reply(
                            rep::INFO,
                            &proto::info_text(proto::info::DESCRIPTION, &export.description),
                        ));
                    }
                    let min = export.minimum();
                    if req.infos.contains(&proto::info::BLOCK_SIZE) || min != 1 {
                        out.extend(reply(
                            rep::INFO,
                            &proto::info_block_size(min, min.max(4096), proto::PAYLOAD_BYTES_MAX),
                        ));
                    }
                    out.extend(reply(rep::ACK, &[]));
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    if h.option == opt::GO {
                        let meta = meta_export.as_deref() == Some(export.name.as_str());
                        return Ok(Negotiated::Session(Session {
                            export,
                            structured,
                            meta,
                        }));
                    }
                    continue;
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        wr.write_all(&err(rep::ERR_INVALID, "STRUCTURED_REPLY takes no data"))
                            .await?;
                    } else {
                        structured = true;
                        wr.write_all(&reply(rep::ACK, &[])).await?;
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    let set = h.option == opt::SET_META_CONTEXT;
                    if set {
                        meta_export = None; // N14: SET replaces, even when it fails
                    }
                    let out = match proto::parse_meta_context_request(&data) {
                        Err(e) => err(rep::ERR_INVALID, &e.to_string()),
                        Ok(_) if set && !structured => err(
                            rep::ERR_INVALID,
                            "SET_META_CONTEXT needs structured replies",
                        ),
                        Ok(q) => match self.find(&q.export) {
                            None => err(
                                rep::ERR_UNKNOWN,
                                &format!("export '{}' not present", q.export),
                            ),
                            Some(_) => {
                                let wanted = if set {
                                    q.queries.iter().any(|s| s == BASE_ALLOCATION)
                                } else {
                                    q.queries.is_empty()
                                        || q.queries
                                            .iter()
                                            .any(|s| s == "base:" || s == BASE_ALLOCATION)
                                };
                                let mut out = Vec::new();
                                if wanted {
                                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                                    out.extend(reply(
                                        rep::META_CONTEXT,
                                        &proto::meta_context_reply(id, BASE_ALLOCATION),
                                    ));
                                    if set {
                                        meta_export = Some(q.export.clone());
                                    }
                                }
                                out.extend(reply(rep::ACK, &[]));
                                out
                            }
                        },
                    };
                    wr.write_all(&out).await?;
                }
                opt::STARTTLS if st.tls_active => {
                    wr.write_all(&err(rep::ERR_INVALID, "TLS is already active"))
                        .await?;
                }
                opt::STARTTLS => {
                    wr.write_all(&err(
                        rep::ERR_UNSUP,
                        "TLS is not configured on this server (no tls-creds)",
                    ))
                    .await?;
                }
                // N15: EXTENDED_HEADERS and every unknown option: ERR_UNSUP, go on.
                _ => {
                    wr.write_all(&proto::encode_option_reply(h.option, rep::ERR_UNSUP, &[]))
                        .await?;
                }
            }
            wr.flush().await?;
        }
        Ok(Negotiated::Closed) // N18: too many options
    }

    async fn transmission<R, W>(
        self: Arc<Self>,
        s: Session,
        mut rd: R,
        mut wr: W,
        peer: Option<std::os::fd::OwnedFd>,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // N30: one writer sends whole replies. Each reply carries the permits its request
        // took, released only once it is written, so a client that stops reading replies
        // stops the server reading requests (N28).
        let (tx, mut rx) = mpsc::channel::<(Vec<Bytes>, Permits)>(INFLIGHT_MAX);
        let writer = tokio::spawn(async move {
            let mut parts = std::collections::VecDeque::new();
            let mut held = Vec::new();
            while let Some((reply, permits)) = rx.recv().await {
                parts.extend(reply);
                held.push(permits);
                // Whatever else is already queued goes out in the same vectored write.
                while held.len() < WRITE_BATCH_PARTS {
                    match rx.try_recv() {
                        Ok((reply, permits)) => {
                            parts.extend(reply);
                            held.push(permits);
                        }
                        Err(_) => break,
                    }
                }
                if write_parts(&mut wr, &mut parts).await.is_err() {
                    return;
                }
                if rx.is_empty() && wr.flush().await.is_err() {
                    return;
                }
                held.clear();
            }
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
        });
        let gate = Arc::new(Semaphore::new(INFLIGHT_MAX));
        let budget = Arc::new(Semaphore::new(BUFFERED_UNITS_MAX as usize));
        let export = s.export.clone();
        let kill = Arc::new(tokio::sync::Notify::new());
        let id = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(SessionSlot {
                id,
                export: export.name.clone(),
                kill: kill.clone(),
                peer,
            });
        let _entry = SessionEntry(&self, id);
        let s = Arc::new(s);
        let inline = export.dev.completes_inline();
        loop {
            let mut hdr = [0u8; proto::REQUEST_BYTES];
            let got = tokio::select! {
                biased;
                _ = kill.notified() => break,
                r = rd.read_exact(&mut hdr) => r,
            };
            if got.is_err() {
                break;
            }
            let Ok(q) = proto::decode_request(&hdr) else {
                break; // N20.1
            };
            if q.kind == cmd::WRITE && q.length > proto::PAYLOAD_BYTES_MAX {
                break; // N20.2: close, payload not read
            }
            // N28: at most 64 requests in flight and 64 MiB of payload (written data, or read
            // data to be sent), counted before anything is allocated.
            let Ok(slot) = gate.clone().acquire_owned().await else {
                break;
            };
            let bytes = match q.kind {
                cmd::WRITE => q.length,
                cmd::READ if q.length <= proto::PAYLOAD_BYTES_MAX => q.length,
                _ => 0,
            };
            let Ok(bytes) = budget.clone().acquire_many_owned(buffer_units(bytes)).await else {
                break;
            };
            let payload = if q.kind == cmd::WRITE && q.length > 0 {
                // Read into uninitialised capacity: no zero-fill of what is overwritten anyway.
                let len = q.length as usize;
                let mut b = BytesMut::with_capacity(len);
                let mut src = (&mut rd).take(u64::from(q.length));
                while b.len() < len {
                    match src.read_buf(&mut b).await {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
                if b.len() < len {
                    break; // N31: end of stream inside a payload
                }
                b.freeze()
            } else {
                Bytes::new()
            };
            if q.kind == cmd::DISC {
                break;
            }
            let (server, s, tx) = (self.clone(), s.clone(), tx.clone());
            let request = async move {
                let reply = server.handle(&s, q, payload).await;
                let _ = tx
                    .send((
                        reply,
                        Permits {
                            _slot: slot,
                            _bytes: bytes,
                        },
                    ))
                    .await;
            };
            // A request the device answers at once (null-co, a read from the page cache) is
            // done here and costs no task; one that has to wait becomes a task, whose first
            // poll registers the wakers this one did not keep. Devices that fan out (a quorum)
            // get a task at once: their sends then overlap this reader's next receive.
            if inline {
                let mut request = Box::pin(request);
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if std::future::Future::poll(request.as_mut(), &mut cx).is_pending() {
                    tokio::spawn(request);
                }
            } else {
                tokio::spawn(request);
            }
        }
        // N21 DISC / end of stream: requests in flight finish and send their replies.
        let _ = gate.acquire_many(INFLIGHT_MAX as u32).await;
        drop(tx);
        let _ = writer.await;
        let _ = export;
    }

    /// One request: N20's checks in order, then the device, then the whole reply.
    async fn handle(&self, s: &Session, q: proto::Request, payload: Bytes) -> Vec<Bytes> {
        let e = &s.export;
        let simple = |error: u32| {
            vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
                error, q.cookie,
            ))]
        };
        let fail = |kind: ErrorKind, msg: &str| -> Vec<Bytes> {
            let v = proto::error_value(kind);
            if s.structured && matches!(q.kind, cmd::READ | cmd::BLOCK_STATUS) {
                vec![Bytes::from(proto::encode_error_chunk(q.cookie, v, msg))]
            } else {
                simple(v)
            }
        };
        if self.shutting_down() {
            return fail(ErrorKind::Shutdown, "server is shutting down");
        }
        // N20.4: unknown command.
        let allowed: u16 = match q.kind {
            cmd::READ => cflag::FUA | if s.structured { cflag::DF } else { 0 },
            cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflag::FUA,
            cmd::WRITE_ZEROES => {
                cflag::FUA
                    | cflag::NO_HOLE
                    | if e.writable && e.dev.can_fast_zero() {
                        cflag::FAST_ZERO
                    } else {
                        0
                    }
            }
            cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
            _ => return simple(errno::EINVAL),
        };
        // N20.5: undefined or not negotiated flags.
        if q.flags & !allowed != 0 {
            return fail(ErrorKind::Inval, "flag not valid for this command");
        }
        // N20.6: writes to a read-only export.
        if !e.writable && matches!(q.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
            return fail(ErrorKind::Perm, "export is read-only");
        }
        // N20.7, N20.8: range and alignment.
        let size = match e.dev.length() {
            Ok(n) => n,
            Err(err) => return fail(err.kind(), err.kind().strerror()),
        };
        let len = u64::from(q.length);
        // FLUSH has no range: its offset and length are ignored, even overflowing ones (the
        // `nbd_server` fuzz target found an overflowing FLUSH refused while a past-the-end one
        // was served).
        let end = match q.offset.checked_add(len) {
            Some(end) => end,
            None if q.kind == cmd::FLUSH => 0,
            None => return fail(ErrorKind::Inval, "request overflows"),
        };
        if end > size && q.kind != cmd::FLUSH {
            let k = if matches!(q.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
                ErrorKind::NoSpc
            } else {
                ErrorKind::Inval
            };
            return fail(k, "request past the end of the export");
        }
        let min = u64::from(e.minimum());
        if q.kind != cmd::FLUSH && (q.offset % min != 0 || len % min != 0) {
            return fail(
                ErrorKind::Inval,
                "request not aligned to the minimum block size",
            );
        }
        // N20.9.
        if q.kind == cmd::READ && q.length > proto::PAYLOAD_BYTES_MAX {
            let k = if s.structured {
                ErrorKind::Overflow
            } else {
                ErrorKind::Inval
            };
            return fail(k, "read larger than the maximum payload");
        }
        // N20.10.
        if q.kind == cmd::BLOCK_STATUS && (!s.structured || !s.meta || q.length == 0) {
            return fail(
                ErrorKind::Inval,
                "block status needs structured replies and base:allocation",
            );
        }
        let fua = q.flags & cflag::FUA != 0;
        match q.kind {
            cmd::READ => {
                if q.length == 0 {
                    // A successful READ never gets a simple reply once structured replies are
                    // on: an empty one is a NONE chunk with DONE.
                    if s.structured {
                        let h = proto::encode_chunk_header(
                            proto::chunk::FLAG_DONE,
                            proto::chunk::NONE,
                            q.cookie,
                            0,
                        );
                        return vec![Bytes::copy_from_slice(&h)];
                    }
                    return simple(0);
                }
                match e.dev.read(q.offset, q.length as usize).await {
                    Ok(data) => {
                        if s.structured {
                            let h = proto::encode_chunk_header(
                                proto::chunk::FLAG_DONE,
                                proto::chunk::OFFSET_DATA,
                                q.cookie,
                                8 + q.length,
                            );
                            let mut head = h.to_vec();
                            head.extend_from_slice(&q.offset.to_be_bytes());
                            vec![Bytes::from(head), data]
                        } else {
                            vec![
                                Bytes::copy_from_slice(&proto::encode_simple_reply(0, q.cookie)),
                                data,
                            ]
                        }
                    }
                    Err(err) => fail(err.kind(), err.kind().strerror()),
                }
            }
            cmd::WRITE => {
                if q.length == 0 {
                    return simple(0);
                }
                match e.dev.write(q.offset, payload, WriteFlags { fua }).await {
                    Ok(()) => simple(0),
                    Err(err) => simple(proto::error_value(err.kind())),
                }
            }
            cmd::FLUSH => match e.dev.flush().await {
                Ok(()) => simple(0),
                Err(err) => simple(proto::error_value(err.kind())),
            },
            cmd::TRIM => {
                if q.length == 0 {
                    return simple(0);
                }
                let r = e.dev.discard(q.offset, len).await;
                let r = match (r, fua) {
                    (Ok(()), true) => e.dev.flush().await,
                    (r, _) => r,
                };
                match r {
                    Ok(()) => simple(0),
                    Err(err) => simple(proto::error_value(err.kind())),
                }
            }
            cmd::WRITE_ZEROES => {
                if q.length == 0 {
                    return simple(0);
                }
                if q.flags & cflag::FAST_ZERO != 0 && !e.dev.can_fast_zero() {
                    return simple(errno::ENOTSUP);
                }
                let flags = ZeroFlags {
                    fua,
                    may_unmap: q.flags & cflag::NO_HOLE == 0,
                };
                match e.dev.write_zeroes(q.offset, len, flags).await {
                    Ok(()) => simple(0),
                    Err(err) => simple(proto::error_value(err.kind())),
                }
            }
            cmd::CACHE => simple(0),
            cmd::BLOCK_STATUS => {
                let one = q.flags & cflag::REQ_ONE != 0;
                let mut descs: Vec<(u32, u32)> = Vec::new();
                let mut off = q.offset;
                let end = q.offset + len;
                while off < end && descs.len() < DESCRIPTORS_MAX {
                    let st = match e.dev.block_status(off, end - off).await {
                        Ok(st) => st,
                        Err(err) => return fail(err.kind(), err.kind().strerror()),
                    };
                    let mut l = st.length.clamp(1, end - off);
                    // Descriptors stay aligned to the minimum block size (N24).
                    if l % min != 0 {
                        l = (l / min * min).max(min).min(end - off);
                    }
                    let mut flags = 0;
                    if st.zero {
                        flags |= proto::alloc::ZERO;
                    }
                    if !st.data {
                        flags |= proto::alloc::HOLE;
                    }
                    let l32 = l.min(u64::from(u32::MAX) / min * min) as u32;
                    match descs.last_mut() {
                        Some(last)
                            if last.1 == flags
                                && u64::from(last.0) + u64::from(l32) <= u64::from(u32::MAX) =>
                        {
                            last.0 += l32
                        }
                        _ => descs.push((l32, flags)),
                    }
                    off += u64::from(l32);
                    if one {
                        break;
                    }
                }
                vec![Bytes::from(proto::encode_block_status_chunk(
                    q.cookie,
                    BASE_ALLOCATION_ID,
                    &descs,
                ))]
            }
            _ => simple(errno::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::memory::MemoryDevice;
    use proto::{encode_info_request, encode_option, encode_request, Request};
    use tokio::io::DuplexStream;

    async fn go<C: AsyncRead + AsyncWrite + Unpin>(client: &mut C, structured: bool) -> u16 {
        let mut greet = [0u8; 18];
        client.read_exact(&mut greet).await.expect("greeting");
        assert_eq!(greet, proto::encode_greeting());
        client.write_all(&3u32.to_be_bytes()).await.expect("flags");
        if structured {
            client
                .write_all(&encode_option(opt::STRUCTURED_REPLY, &[]))
                .await
                .expect("sr");
            let mut r = [0u8; 20];
            client.read_exact(&mut r).await.expect("sr reply");
            assert_eq!(&r[12..16], &rep::ACK.to_be_bytes());
        }
        client
            .write_all(&encode_option(opt::GO, &encode_info_request("d", &[])))
            .await
            .expect("go");
        // INFO(EXPORT): 20-byte header + 12 bytes, then ACK: 20 bytes.
        let mut r = [0u8; 52];
        client.read_exact(&mut r).await.expect("go replies");
        assert_eq!(&r[12..16], &rep::INFO.to_be_bytes());
        assert_eq!(&r[44..48], &rep::ACK.to_be_bytes());
        u16::from_be_bytes([r[30], r[31]])
    }

    fn server(writable: bool) -> Arc<Server> {
        let s = Server::new();
        s.add_export(Export {
            name: "d".into(),
            description: String::new(),
            dev: Arc::new(MemoryDevice::new(1 << 20)),
            writable,
            multi_conn: true,
        })
        .expect("export");
        s
    }

    async fn simple_reply(c: &mut DuplexStream) -> (u32, u64) {
        let mut r = [0u8; 16];
        c.read_exact(&mut r).await.expect("reply");
        match proto::decode_reply_header(&r).expect("header") {
            proto::ReplyHeader::Simple { error, cookie } => (error, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// O1 and `block-export-del`: a client that has hung up is not "in use", even before its
    /// connection's task has run to notice. The test's runtime has one thread, so nothing
    /// runs between the client's close and the count.
    #[tokio::test]
    async fn o1_a_client_that_hung_up_is_not_counted_before_its_task_notices() {
        use std::os::fd::AsFd;
        async fn connected(watch: bool) -> (Arc<Server>, tokio::net::UnixStream) {
            let (mut c, srv) = tokio::net::UnixStream::pair().expect("socketpair");
            let s = server(false);
            let peer = watch.then(|| srv.as_fd().try_clone_to_owned().expect("dup"));
            tokio::spawn(s.clone().serve_socket(srv, peer));
            go(&mut c, true).await;
            for _ in 0..1000 {
                if s.clients("d") == 1 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(s.clients("d"), 1, "a connected client counts");
            (s, c)
        }
        let (watched, c) = connected(true).await;
        drop(c);
        assert_eq!(watched.clients("d"), 0, "seen through the descriptor");
        // Without a descriptor (in-memory and simulated streams) the client counts until its
        // connection's task ends: what QEMU does, and the race this closes.
        let (blind, c) = connected(false).await;
        drop(c);
        assert_eq!(blind.clients("d"), 1, "not yet noticed by the task");
        for _ in 0..1000 {
            if blind.clients("d") == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(blind.clients("d"), 0, "the task noticed");
    }

    #[tokio::test]
    async fn n19_flags_and_n20_errors_keep_the_connection() {
        let (mut c, srv) = tokio::io::duplex(1 << 20);
        tokio::spawn(server(false).serve(srv));
        let flags = go(&mut c, true).await;
        // Read-only, structured: HAS_FLAGS|READ_ONLY|FLUSH|FUA|DF|MULTI_CONN|CACHE.
        assert_eq!(flags, 0x058f);
        let req = |kind, flags, cookie, offset, length| {
            encode_request(&Request {
                flags,
                kind,
                cookie,
                offset,
                length,
            })
        };
        // Unknown command → EINVAL (N20.4); write to a read-only export → EPERM (N20.6) with
        // its payload consumed (N20.3); past-the-end read → EINVAL as an error chunk.
        c.write_all(&req(42, 0, 1, 0, 0)).await.expect("send");
        assert_eq!(simple_reply(&mut c).await, (errno::EINVAL, 1));
        c.write_all(&req(cmd::WRITE, 0, 2, 0, 4))
            .await
            .expect("send");
        c.write_all(&[1, 2, 3, 4]).await.expect("payload");
        assert_eq!(simple_reply(&mut c).await, (errno::EPERM, 2));
        c.write_all(&req(cmd::FLUSH, cflag::REQ_ONE, 3, 0, 0))
            .await
            .expect("send");
        assert_eq!(simple_reply(&mut c).await, (errno::EINVAL, 3));
        // FLUSH has no range: past the end and overflowing both succeed.
        c.write_all(&req(cmd::FLUSH, 0, 5, 1 << 40, 512))
            .await
            .expect("send");
        assert_eq!(simple_reply(&mut c).await, (0, 5));
        c.write_all(&req(cmd::FLUSH, 0, 6, u64::MAX, 512))
            .await
            .expect("send");
        assert_eq!(simple_reply(&mut c).await, (0, 6));
        // The connection still serves a read: one OFFSET_DATA chunk with DONE.
        c.write_all(&req(cmd::READ, 0, 4, 512, 512))
            .await
            .expect("send");
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.expect("chunk");
        assert_eq!(
            proto::decode_reply_header(&h),
            Ok(proto::ReplyHeader::Chunk {
                flags: proto::chunk::FLAG_DONE,
                kind: proto::chunk::OFFSET_DATA,
                cookie: 4,
                length: 8 + 512
            })
        );
        let mut body = vec![0u8; 520];
        c.read_exact(&mut body).await.expect("data");
        assert_eq!(&body[..8], &512u64.to_be_bytes());
        assert_eq!(&body[8..], &[0u8; 512][..]);
    }

    #[tokio::test]
    async fn n31_bad_request_magic_and_oversized_write_close_the_connection() {
        for bad in [
            {
                let mut b = encode_request(&Request {
                    flags: 0,
                    kind: cmd::READ,
                    cookie: 1,
                    offset: 0,
                    length: 512,
                });
                b[0] ^= 0xff;
                b
            },
            encode_request(&Request {
                flags: 0,
                kind: cmd::WRITE,
                cookie: 2,
                offset: 0,
                length: proto::PAYLOAD_BYTES_MAX + 1,
            }),
        ] {
            let (mut c, srv) = tokio::io::duplex(1 << 16);
            let task = tokio::spawn(server(true).serve(srv));
            go(&mut c, false).await;
            c.write_all(&bad).await.expect("send");
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.expect("closed cleanly");
            assert_eq!(rest, Vec::<u8>::new());
            task.await.expect("server task ends");
        }
    }
}
