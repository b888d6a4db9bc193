//! `file`: a raw image file or block device (QEMU's file-posix, the parts ballot needs).
//!
//! Positioned I/O (`pread`/`pwrite`) runs on the blocking pool, never on the async worker
//! threads. Flush is `fdatasync`; a FUA write is a write followed by `fdatasync`.
//! `cache.direct=on` opens with `O_DIRECT`, probes the request alignment (512 or 4096) and
//! bounces unaligned buffers. `cache.no-flush=on` makes flush a no-op (QEMU's meaning).
//! `discard=unmap` punches holes, which read back as zeroes (the Q45 guarantee); with the
//! default `discard=ignore` a discard does nothing, as in QEMU.
//! Large buffered writes that cover whole 8 MiB chunks start those chunks' write-back at once
//! (write-behind, [`super::writeback`]), so the flush after a copy does not pay for all of it.
//!
//! Real files are not simulated: ballot-sim uses its own virtual disk (SIMULATION.md §3.4).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};

use crate::device::{check_request, Access, BlockDevice, BlockStatus, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};

/// Options of a `file` node.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// `filename`.
    pub filename: String,
    /// `read-only`.
    pub read_only: bool,
    /// `auto-read-only`: fall back to read-only when read-write is refused.
    pub auto_read_only: bool,
    /// `cache.direct`: `O_DIRECT`.
    pub direct: bool,
    /// `cache.no-flush`: flush does nothing.
    pub no_flush: bool,
    /// `discard=unmap`: discards punch holes.
    pub discard_unmap: bool,
    /// `locking=on|auto` (HEALING.md H25): QEMU's image locks.
    pub locking: bool,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: String,
    /// Cleared the first time the file system answers `RWF_NOWAIT` writes with EOPNOTSUPP
    /// (ext4 buffered writes do), so the attempt is not repeated on every write.
    nowait_writes: AtomicBool,
    /// Held while the file grows (ftruncate never shrinks it).
    growing: std::sync::Mutex<()>,
    /// Turns inline small writes off for a while after a slow one.
    #[cfg(not(madsim))]
    inline_backoff: InlineBackoff,
    /// An inline write is in progress on some async worker.
    #[cfg(not(madsim))]
    inline_busy: AtomicBool,
}

/// An open image file.
#[derive(Debug)]
pub struct FileDevice {
    inner: Arc<Inner>,
    /// The length now (a format driver above may grow the file, [`BlockDevice::grow`]).
    length: AtomicU64,
    align: u32,
    read_only: bool,
    direct: bool,
    no_flush: bool,
    discard_unmap: bool,
    regular: bool,
    /// The thread that runs this file's buffered writes (started on the first one).
    #[cfg(not(madsim))]
    lane: std::sync::OnceLock<Option<FileThread<LaneJob>>>,
    /// Write-behind: the chunks buffered writes have covered since their last write-back, and
    /// the thread that starts write-back (started on the first complete chunk).
    #[cfg(not(madsim))]
    coverage: std::sync::Mutex<super::writeback::Coverage>,
    #[cfg(not(madsim))]
    writeback: std::sync::OnceLock<Option<FileThread<u64>>>,
}

/// A thread that works on one file ([`file_thread`]): its queue and its handle.
#[cfg(not(madsim))]
struct FileThread<T> {
    tx: std::sync::mpsc::Sender<T>,
    handle: std::thread::JoinHandle<()>,
}

#[cfg(not(madsim))]
impl<T> std::fmt::Debug for FileThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileThread")
    }
}

#[cfg(not(madsim))]
impl<T> FileThread<T> {
    /// Ends the thread once it has run what it was sent, and waits for it: after this the
    /// thread holds no reference to the file.
    fn stop(self) {
        drop(self.tx);
        // (Never on the thread itself, should the last reference go there.)
        if self.handle.thread().id() != std::thread::current().id() {
            let _ = self.handle.join();
        }
    }
}

#[cfg(not(madsim))]
impl Drop for FileDevice {
    /// The file closes (and its image locks go, H25) when the node goes, not later when a
    /// write thread notices: a `blockdev-del` then `blockdev-add` of the same file, or a
    /// repair at open followed by another open, must not find the old node's locks.
    fn drop(&mut self) {
        if let Some(Some(t)) = self.lane.take() {
            t.stop();
        }
        if let Some(Some(t)) = self.writeback.take() {
            t.stop();
        }
    }
}

/// One buffered write (or sync) for a file's write thread.
#[cfg(not(madsim))]
type LaneJob = Box<dyn FnOnce(&Inner) + Send>;

/// Largest read or write tried inline against the page cache (longer copies would hold an
/// async worker).
const INLINE_BYTES_MAX: usize = 4 << 20;

/// Largest buffered write done inline where the file system cannot say whether a write would
/// wait (no `RWF_NOWAIT` for buffered writes, as on ext4): whole pages only, so the kernel
/// never has to read a page in first.
#[cfg(not(madsim))]
const INLINE_WRITE_BYTES_MAX: usize = 64 << 10;

/// The page size inline writes are aligned to.
#[cfg(not(madsim))]
const PAGE_BYTES: u64 = 4096;

/// An inline write that took longer than this (dirty-page throttling, a metadata wait) turns
/// inline writes off for [`INLINE_WRITE_BACKOFF`]: they go to the write thread again.
#[cfg(not(madsim))]
const INLINE_WRITE_STALL: std::time::Duration = std::time::Duration::from_micros(500);

#[cfg(not(madsim))]
const INLINE_WRITE_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// When inline writes are off until: nanoseconds after `base`, 0 for "on". An atomic, not a
/// mutex: every small write asks, from both async workers at once.
#[cfg(not(madsim))]
#[derive(Debug)]
struct InlineBackoff {
    base: std::time::Instant,
    until: AtomicU64,
}

#[cfg(not(madsim))]
impl InlineBackoff {
    fn new() -> InlineBackoff {
        InlineBackoff {
            base: std::time::Instant::now(),
            until: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether inline writes are on now.
    fn on(&self) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        until == 0 || self.now() >= until
    }

    /// Inline writes go off for [`INLINE_WRITE_BACKOFF`] from now.
    fn back_off(&self) {
        let d = u64::try_from(INLINE_WRITE_BACKOFF.as_nanos()).unwrap_or(u64::MAX);
        self.until
            .store(self.now().saturating_add(d), Ordering::Relaxed);
    }
}

/// Largest request alignment that `cache.direct=on` may need.
const DIRECT_ALIGN_BYTES_MAX: usize = 4096;

impl FileDevice {
    /// Opens `opts.filename`.
    ///
    /// # Errors
    /// `Could not open '<filename>': <strerror>` in QEMU's wording, as an [`Error`] whose
    /// context is that sentence without the strerror part.
    pub fn open(opts: &FileOptions) -> Result<FileDevice> {
        let mut read_only = opts.read_only;
        let try_open = |ro: bool| {
            let mut oo = OpenOptions::new();
            oo.read(true).write(!ro);
            if opts.direct {
                oo.custom_flags(libc::O_DIRECT);
            }
            oo.open(&opts.filename)
        };
        let file = match try_open(read_only) {
            Ok(f) => f,
            Err(e)
                if !read_only
                    && opts.auto_read_only
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::EPERM)
                    ) =>
            {
                read_only = true;
                try_open(true).map_err(|e| open_error(&opts.filename, &e))?
            }
            Err(e) => return Err(open_error(&opts.filename, &e)),
        };
        if opts.locking {
            lock_image(&file, read_only).map_err(|e| {
                Error::whole(
                    e.kind(),
                    format!(
                        "Could not open '{}': {e}\nIs another process using the image [{}]?",
                        opts.filename, opts.filename
                    ),
                )
            })?;
        }
        let meta = file
            .metadata()
            .map_err(|e| open_error(&opts.filename, &e))?;
        let regular = meta.file_type().is_file();
        let length = if regular {
            meta.len()
        } else if meta.file_type().is_block_device() {
            block_device_length(&file).map_err(|e| open_error(&opts.filename, &e))?
        } else {
            return Err(Error::new(
                ErrorKind::Inval,
                format!(
                    "Could not open '{}': not a regular file or block device",
                    opts.filename
                ),
            ));
        };
        let align = if opts.direct {
            probe_direct_alignment(&file, length)
        } else {
            1
        };
        Ok(FileDevice {
            inner: Arc::new(Inner {
                file,
                path: opts.filename.clone(),
                nowait_writes: AtomicBool::new(true),
                growing: std::sync::Mutex::new(()),
                #[cfg(not(madsim))]
                inline_backoff: InlineBackoff::new(),
                #[cfg(not(madsim))]
                inline_busy: AtomicBool::new(false),
            }),
            length: AtomicU64::new(length),
            align,
            read_only,
            #[cfg(not(madsim))]
            lane: std::sync::OnceLock::new(),
            #[cfg(not(madsim))]
            coverage: std::sync::Mutex::default(),
            #[cfg(not(madsim))]
            writeback: std::sync::OnceLock::new(),
            direct: opts.direct,
            no_flush: opts.no_flush,
            discard_unmap: opts.discard_unmap && regular,
            regular,
        })
    }

    fn len(&self) -> u64 {
        self.length.load(Ordering::SeqCst)
    }

    /// The file name this node was opened with.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// Whether the file was opened read-only (explicitly or by `auto-read-only`).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::Perm,
                format!("{op} on read-only file '{}'", self.inner.path),
            ));
        }
        Ok(())
    }

    /// Runs a buffered write on this file's own thread. Buffered writes to one file serialise
    /// on its inode lock anyway; one long-lived thread that takes them in order needs no
    /// wake-up while writes keep coming, where the blocking pool pays two thread switches for
    /// each. Falls back to the blocking pool if the thread cannot be started.
    async fn on_lane<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        #[cfg(not(madsim))]
        {
            let lane = self.lane.get_or_init(|| {
                file_thread(&self.inner, "ballot-file-write", |inner, job: LaneJob| {
                    job(inner)
                })
            });
            if let Some(lane) = lane {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job: LaneJob = Box::new(move |inner| {
                    let _ = tx.send(f(inner));
                });
                if lane.tx.send(job).is_ok() {
                    if let Ok(r) = rx.await {
                        return r;
                    }
                }
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("file '{}': write thread ended", self.inner.path),
                ));
            }
        }
        self.blocking(f).await
    }

    /// Write-behind ([`super::writeback`]): notes a completed buffered write and starts the
    /// write-back of every chunk it completed, on this file's write-back thread, so neither the
    /// caller nor the write thread waits for the block layer. Best effort: if the thread cannot
    /// be started the data is written back at the next flush, as it would be anyway.
    fn wrote(&self, offset: u64, len: u64) {
        #[cfg(not(madsim))]
        {
            // A write shorter than a granule covers none: no lock on the small-write path.
            if len < super::writeback::GRANULE_BYTES {
                return;
            }
            let done = match self.coverage.lock() {
                Ok(mut c) => c.note(offset, len),
                Err(_) => return,
            };
            if done.is_empty() {
                return;
            }
            let tx = self.writeback.get_or_init(|| {
                file_thread(&self.inner, "ballot-file-writeback", |inner, chunk: u64| {
                    start_writeback(inner, chunk * super::writeback::CHUNK_BYTES)
                })
            });
            if let Some(t) = tx {
                for chunk in done {
                    let _ = t.tx.send(chunk);
                }
            }
        }
        #[cfg(madsim)]
        let _ = (offset, len);
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        // Real files are not simulated (SIMULATION.md §3.4) and madsim has no blocking pool:
        // under the simulator the call runs inline.
        #[cfg(madsim)]
        {
            f(&inner)
        }
        #[cfg(not(madsim))]
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) => Err(Error::new(
                ErrorKind::Io,
                format!("file '{}': I/O task failed: {e}", self.inner.path),
            )),
        }
    }
}

/// QEMU's image permissions, by the bit each one's lock bytes are offset by (H25).
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// A process holding permission `i` holds a shared lock on byte `PERM_LOCK_BASE + i`.
const PERM_LOCK_BASE: i64 = 100;
/// A process that does not let others have permission `i` holds byte `SHARED_LOCK_BASE + i`.
const SHARED_LOCK_BASE: i64 = 200;

/// A one-byte `flock` of `kind` at byte `at`.
fn one_byte(kind: libc::c_int, at: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    fl
}

/// Whether another open file description holds a lock on byte `at` of `file` that a write
/// lock would conflict with (`F_OFD_GETLK`).
fn byte_locked(file: &File, at: i64) -> std::io::Result<bool> {
    let mut fl = one_byte(libc::F_WRLCK, at);
    // SAFETY: the fd is open for the call's duration and `fl` is a valid flock the kernel
    // reads and overwrites in place.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes a shared lock on byte `at` of `file` (`F_OFD_SETLK`, released when the file closes).
fn lock_byte(file: &File, at: i64) -> std::io::Result<()> {
    let fl = one_byte(libc::F_RDLCK, at);
    // SAFETY: the fd is open for the call's duration and `fl` is a valid flock the kernel
    // only reads.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// H25: QEMU's image locks on an open image. A writer holds "consistent read" and "write" and
/// lets no one else write or resize (what a QEMU guest disk does); a reader holds "consistent
/// read" and lets no one write (what `qemu-img info` without `-U` does). Locks are taken first
/// and then checked against everyone else's, as QEMU does, so two openers racing cannot both
/// pass. The error is QEMU's: `Failed to get "write" lock` when someone else forbids a
/// permission this node holds, `Failed to get shared "write" lock` when someone else holds a
/// permission this node forbids.
fn lock_image(file: &File, read_only: bool) -> Result<()> {
    let held: &[usize] = if read_only { &[0] } else { &[0, 1] };
    let unshared: &[usize] = if read_only { &[1] } else { &[1, 3] };
    let io = |e: std::io::Error| Error::from_io(&e, "Failed to lock the image".to_string());
    for &i in held {
        lock_byte(file, PERM_LOCK_BASE + i as i64).map_err(io)?;
    }
    for &i in unshared {
        lock_byte(file, SHARED_LOCK_BASE + i as i64).map_err(io)?;
    }
    for &i in held {
        if byte_locked(file, SHARED_LOCK_BASE + i as i64).map_err(io)? {
            return Err(Error::whole(
                ErrorKind::Busy,
                format!("Failed to get \"{}\" lock", PERM_NAMES[i]),
            ));
        }
    }
    for &i in unshared {
        if byte_locked(file, PERM_LOCK_BASE + i as i64).map_err(io)? {
            return Err(Error::whole(
                ErrorKind::Busy,
                format!("Failed to get shared \"{}\" lock", PERM_NAMES[i]),
            ));
        }
    }
    Ok(())
}

fn open_error(filename: &str, e: &std::io::Error) -> Error {
    Error::from_io(e, format!("Could not open '{filename}'"))
}

fn block_device_length(file: &File) -> std::io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the fd is open for the call's duration and `size` is a valid u64 the ioctl
    // writes into; BLKGETSIZE64 writes exactly 8 bytes.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// A zeroed buffer of `len` bytes whose start is aligned to `align` bytes (for O_DIRECT).
fn aligned_zeroed(len: usize, align: usize) -> BytesMut {
    let mut buf = BytesMut::zeroed(len + align);
    let misalign = buf.as_ptr() as usize % align;
    let start = if misalign == 0 { 0 } else { align - misalign };
    let _ = buf.split_to(start);
    buf.truncate(len);
    buf
}

fn probe_direct_alignment(file: &File, length: u64) -> u32 {
    // A 512-byte O_DIRECT read succeeds where the logical block size is 512; EINVAL means 4096.
    if length < 512 {
        return DIRECT_ALIGN_BYTES_MAX as u32;
    }
    let mut buf = aligned_zeroed(512, DIRECT_ALIGN_BYTES_MAX);
    match file.read_at(&mut buf[..], 0) {
        Ok(_) => 512,
        Err(_) => DIRECT_ALIGN_BYTES_MAX as u32,
    }
}

/// The error of a failed read or write (`what`) of `len` bytes at `offset`.
fn io_error(inner: &Inner, what: &str, offset: u64, len: usize, e: &std::io::Error) -> Error {
    Error::from_io(
        e,
        format!(
            "{what} of file '{}' at offset {offset} length {len}",
            inner.path
        ),
    )
}

fn read_full(inner: &Inner, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match inner.file.read_at(&mut buf[done..], offset + done as u64) {
            // Past the end of a file that shrank underneath us: zeroes, as QEMU reads them.
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(inner, "read", offset, buf.len(), &e)),
        }
    }
    Ok(())
}

/// Fills `buf` up to `len` bytes from `offset + buf.len()` without zero-filling it first (the
/// read overwrites it); bytes past the end of a file that shrank read as zeroes, as in
/// [`read_full`]. With `nowait`, stops early, without error, where the data is not in the
/// page cache (`RWF_NOWAIT`), so the caller can finish on the blocking pool.
fn read_fresh(
    inner: &Inner,
    buf: &mut BytesMut,
    len: usize,
    offset: u64,
    nowait: bool,
) -> Result<()> {
    buf.reserve(len - buf.len());
    while buf.len() < len {
        let done = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..len - done];
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast::<libc::c_void>(),
            iov_len: spare.len(),
        };
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        // SAFETY: preadv2(2) writes at most `iov_len` bytes into `spare`, memory this buffer
        // owns and that stays alive for the call; the fd stays open for the call.
        let n = unsafe {
            libc::preadv2(
                inner.file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                flags,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) if nowait => return Ok(()),
                _ => {}
            }
            return Err(io_error(inner, "read", offset, len, &e));
        }
        if n == 0 {
            buf.resize(len, 0);
            break;
        }
        // SAFETY: preadv2 initialised the first `n` bytes of the spare capacity (n > 0, and
        // n <= iov_len = len - done).
        unsafe { buf.set_len(done + n as usize) };
    }
    Ok(())
}

/// Writes what can be written at `offset` without waiting (`RWF_NOWAIT`); returns how many
/// bytes that was, 0 where the kernel or file system would have to wait or cannot say.
fn write_nowait(inner: &Inner, data: &[u8], offset: u64) -> Result<usize> {
    let mut done = 0usize;
    while done < data.len() {
        let iov = libc::iovec {
            iov_base: data[done..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        // SAFETY: pwritev2(2) only reads `iov_len` bytes from `data`, which outlives the call;
        // the fd stays open for the call.
        let n = unsafe {
            libc::pwritev2(
                inner.file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(done),
                Some(libc::EOPNOTSUPP) => {
                    inner.nowait_writes.store(false, Ordering::Relaxed);
                    return Ok(done);
                }
                _ => return Err(io_error(inner, "write", offset, data.len(), &e)),
            }
        }
        if n == 0 {
            return Ok(done);
        }
        done += n as usize;
    }
    Ok(done)
}

fn write_full(inner: &Inner, data: &[u8], offset: u64) -> Result<()> {
    inner
        .file
        .write_all_at(data, offset)
        .map_err(|e| io_error(inner, "write", offset, data.len(), &e))
}

/// Starts a thread `name` that runs `each` on the file for every message sent to it, in
/// order, until its sender is dropped ([`FileThread::stop`]); `None` if the thread cannot be
/// started.
#[cfg(not(madsim))]
fn file_thread<T: Send + 'static>(
    inner: &Arc<Inner>,
    name: &str,
    each: impl Fn(&Inner, T) + Send + 'static,
) -> Option<FileThread<T>> {
    let (tx, rx) = std::sync::mpsc::channel::<T>();
    let inner = inner.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(m) = rx.recv() {
                each(&inner, m);
            }
        })
        .ok()
        .map(|handle| FileThread { tx, handle })
}

/// Starts write-back of one chunk's dirty pages without waiting for it
/// (`SYNC_FILE_RANGE_WRITE`); errors are left to the next flush, which reports them.
#[cfg(not(madsim))]
fn start_writeback(inner: &Inner, offset: u64) {
    // SAFETY: plain syscall on an fd that stays open for the call; no memory is passed.
    let _ = unsafe {
        libc::sync_file_range(
            inner.file.as_raw_fd(),
            offset as libc::off64_t,
            super::writeback::CHUNK_BYTES as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

fn datasync(inner: &Inner) -> Result<()> {
    inner
        .file
        .sync_data()
        .map_err(|e| Error::from_io(&e, format!("flush of file '{}'", inner.path)))
}

fn fallocate(inner: &Inner, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an fd that stays open for the call; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            inner.file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write_zero_buffers(inner: &Inner, offset: u64, len: u64, align: usize) -> Result<()> {
    let chunk = len.min(1 << 20) as usize;
    let buf = aligned_zeroed(chunk, align.max(1));
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk as u64) as usize;
        write_full(inner, &buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn seek(inner: &Inner, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: plain syscall on an fd that stays open for the call; no memory is passed.
    let r = unsafe { libc::lseek(inner.file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn driver(&self) -> &'static str {
        "file"
    }

    /// Reads from the page cache and small writes complete inline (RWF_NOWAIT, see `read` and
    /// `write`); the rest waits for a thread, and the NBD server then gives it a task.
    fn completes_inline(&self) -> bool {
        !self.direct
    }

    fn length(&self) -> Result<u64> {
        Ok(self.len())
    }

    fn request_alignment(&self) -> u32 {
        self.align
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.len(), self.align, offset, len as u64, Access::Read)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if !self.direct {
            // Data in the page cache is copied right here (RWF_NOWAIT never waits for the
            // disk); only what is not cached goes to the blocking pool. This saves two thread
            // switches per cached request.
            let mut buf = BytesMut::new();
            if len <= INLINE_BYTES_MAX {
                read_fresh(&self.inner, &mut buf, len, offset, true)?;
                if buf.len() == len {
                    return Ok(buf.freeze());
                }
            }
            return self
                .blocking(move |inner| {
                    read_fresh(inner, &mut buf, len, offset, false)?;
                    Ok(buf.freeze())
                })
                .await;
        }
        let align = self.align as usize;
        self.blocking(move |inner| {
            let mut buf = aligned_zeroed(len, align);
            read_full(inner, &mut buf[..], offset)?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check_writable("write")?;
        check_request(
            self.len(),
            self.align,
            offset,
            data.len() as u64,
            Access::Write,
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let align = self.align as usize;
        let bounce = self.direct && data.as_ptr() as usize % align != 0;
        let fua = flags.fua;
        let (start, total) = (offset, data.len() as u64);
        let mut data = data;
        let mut offset = offset;
        // As for reads: a buffered write that completes without waiting (RWF_NOWAIT: page
        // cache, no block allocation to wait for) is done here; the rest goes to the blocking
        // pool, and so does the sync of a FUA write.
        if !self.direct
            && data.len() <= INLINE_BYTES_MAX
            && self.inner.nowait_writes.load(Ordering::Relaxed)
        {
            let n = write_nowait(&self.inner, &data, offset)?;
            if n == data.len() && !fua {
                self.wrote(start, total);
                return Ok(());
            }
            data.advance(n);
            offset += n as u64;
        }
        // Where the file system has no RWF_NOWAIT for buffered writes (ext4), a small write of
        // whole pages is copied into the page cache right here: handing it to the write thread
        // costs two thread wake-ups, which is most of a small write's latency. Such a write
        // waits only under dirty-page throttling or for metadata; one that took long turns
        // inline writes off for a while, so a throttled disk never holds the async workers.
        #[cfg(not(madsim))]
        if !self.direct
            && !fua
            && data.len() <= INLINE_WRITE_BYTES_MAX
            && offset % PAGE_BYTES == 0
            && data.len() as u64 % PAGE_BYTES == 0
            && !self.inner.nowait_writes.load(Ordering::Relaxed)
            && self.inner.inline_backoff.on()
            && !self.inner.inline_busy.swap(true, Ordering::Acquire)
        {
            // One inline write at a time: a second would only wait for the inode lock on the
            // other async worker, and then no worker reads the sockets; it goes to the write
            // thread instead, which takes writes in a row without wake-ups while they come.
            let t = std::time::Instant::now();
            let r = write_full(&self.inner, &data, offset);
            self.inner.inline_busy.store(false, Ordering::Release);
            r?;
            if t.elapsed() > INLINE_WRITE_STALL {
                self.inner.inline_backoff.back_off();
            }
            self.wrote(start, total);
            return Ok(());
        }
        let run = move |inner: &Inner| {
            if bounce {
                let mut buf = aligned_zeroed(data.len(), align);
                buf.copy_from_slice(&data);
                write_full(inner, &buf, offset)
            } else {
                write_full(inner, &data, offset)
            }
        };
        if self.direct {
            self.blocking(run).await?;
        } else {
            self.on_lane(run).await?;
            if !fua {
                self.wrote(start, total);
            }
        }
        if fua {
            // On the blocking pool, so a sync never holds up the write thread.
            self.blocking(datasync).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if self.no_flush || self.read_only {
            return Ok(());
        }
        self.blocking(datasync).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable("write-zeroes")?;
        check_request(self.len(), self.align, offset, len, Access::Write)?;
        if len == 0 {
            return Ok(());
        }
        let regular = self.regular;
        let punch = flags.may_unmap && self.discard_unmap;
        let align = self.align as usize;
        self.blocking(move |inner| {
            let mode = if punch {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            let fast = regular && fallocate(inner, mode, offset, len).is_ok();
            if !fast {
                write_zero_buffers(inner, offset, len, align)?;
            }
            if flags.fua {
                datasync(inner)?;
            }
            Ok(())
        })
        .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.len(), self.align, offset, len, Access::Read)?;
        if !self.discard_unmap || len == 0 {
            return Ok(());
        }
        self.check_writable("discard")?;
        let align = self.align as usize;
        self.blocking(move |inner| {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if fallocate(inner, mode, offset, len).is_err() {
                // Keep the zeroing guarantee (Q45) where holes cannot be punched.
                write_zero_buffers(inner, offset, len, align)?;
            }
            Ok(())
        })
        .await
    }

    fn discard_zeroes(&self) -> bool {
        self.discard_unmap
    }

    async fn grow(&self, length: u64) -> Result<()> {
        if length <= self.len() {
            return Ok(());
        }
        self.check_writable("grow")?;
        if !self.regular {
            return Err(Error::new(
                ErrorKind::NoSpc,
                format!(
                    "file '{}': a block device cannot grow to {length} bytes",
                    self.inner.path
                ),
            ));
        }
        let to = i64::try_from(length).map_err(|_| {
            Error::new(
                ErrorKind::FBig,
                format!("file '{}': {length} bytes", self.inner.path),
            )
        })?;
        self.blocking(move |inner| {
            // Never shrink: two grows may race, the larger one wins.
            let _one = inner.growing.lock().unwrap_or_else(|p| p.into_inner());
            let now = inner
                .file
                .metadata()
                .map_err(|e| io_error(inner, "fstat", 0, 0, &e))?
                .len();
            if now < to as u64 {
                inner
                    .file
                    .set_len(to as u64)
                    .map_err(|e| io_error(inner, "ftruncate", to as u64, 0, &e))?;
            }
            Ok(())
        })
        .await?;
        self.length.fetch_max(length, Ordering::SeqCst);
        Ok(())
    }

    fn grows_with_zeroes(&self) -> bool {
        self.regular
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_request(self.len(), self.align, offset, len, Access::Read)?;
        if !self.regular || len == 0 {
            return Ok(BlockStatus::data(len));
        }
        let align = u64::from(self.align);
        self.blocking(move |inner| {
            let ctx = |e: std::io::Error| {
                Error::from_io(&e, format!("block status of file '{}'", inner.path))
            };
            let data_at = seek(inner, offset, libc::SEEK_DATA).map_err(ctx)?;
            let status = match data_at {
                // Hole up to the end of the file.
                None => BlockStatus::zero(len),
                Some(d) if d > offset => BlockStatus::zero((d - offset).min(len)),
                Some(_) => {
                    let hole = seek(inner, offset, libc::SEEK_HOLE)
                        .map_err(ctx)?
                        .unwrap_or(offset + len);
                    BlockStatus::data((hole.max(offset + 1) - offset).min(len))
                }
            };
            // Keep answers aligned to the request alignment; round a short run up (DATA is
            // always a correct answer for the extra bytes).
            let mut s = status;
            if s.length % align != 0 {
                s = BlockStatus::data((s.length.div_ceil(align) * align).min(len));
            }
            Ok(s)
        })
        .await
    }
}
