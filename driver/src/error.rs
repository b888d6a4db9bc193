//! One error type for the whole driver graph: a small errno-like [`ErrorKind`] plus context.
//!
//! The kind is what callers decide on (the quorum's error vote, Q20; the NBD error mapping,
//! NBD.md §6). The context is for people. Kinds are turned into strerror text in exactly one
//! place, [`ErrorKind::strerror`] (QUORUM.md Q58, STYLE.md habit 3).

use std::fmt;

/// The errno-like kind of a block-layer error.
///
/// The set is closed on purpose: every kind has a strerror text and an NBD mapping, and a
/// kind that the C library knows but ballot does not is folded into [`ErrorKind::Io`] when it
/// comes from the operating system (with the original text kept in the context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// EPERM: operation not permitted (a write to a read-only node or export).
    Perm,
    /// ENOENT: no such file or directory.
    NoEnt,
    /// EIO: input/output error; also the quorum's verdict when the vote fails.
    Io,
    /// ENOMEM: cannot allocate memory.
    NoMem,
    /// EACCES: permission denied.
    Access,
    /// EBUSY: device or resource busy.
    Busy,
    /// EINVAL: invalid argument (misaligned or out-of-range requests, bad options).
    Inval,
    /// EFBIG: file too large.
    FBig,
    /// ENOSPC: no space left on device (also writes past the end, NBD.md N20).
    NoSpc,
    /// EROFS: read-only file system.
    RoFs,
    /// EDQUOT: disk quota exceeded.
    DQuot,
    /// EOVERFLOW: value too large for defined data type.
    Overflow,
    /// ENOTSUP: operation not supported.
    NotSup,
    /// ESHUTDOWN: cannot send after transport endpoint shutdown.
    Shutdown,
    /// ETIMEDOUT: connection timed out.
    TimedOut,
    /// ECONNREFUSED: connection refused.
    ConnRefused,
    /// ECONNRESET: connection reset by peer.
    ConnReset,
    /// EPIPE: broken pipe.
    Pipe,
}

impl ErrorKind {
    /// Every kind, in declaration order (for tables and tests).
    pub const ALL: [ErrorKind; 18] = [
        ErrorKind::Perm,
        ErrorKind::NoEnt,
        ErrorKind::Io,
        ErrorKind::NoMem,
        ErrorKind::Access,
        ErrorKind::Busy,
        ErrorKind::Inval,
        ErrorKind::FBig,
        ErrorKind::NoSpc,
        ErrorKind::RoFs,
        ErrorKind::DQuot,
        ErrorKind::Overflow,
        ErrorKind::NotSup,
        ErrorKind::Shutdown,
        ErrorKind::TimedOut,
        ErrorKind::ConnRefused,
        ErrorKind::ConnReset,
        ErrorKind::Pipe,
    ];

    /// The C library's strerror text for this kind (glibc wording). This is the only place
    /// where kinds become text; QMP events (Q58) and NBD error chunks (N34) both use it.
    pub fn strerror(self) -> &'static str {
        match self {
            ErrorKind::Perm => "Operation not permitted",
            ErrorKind::NoEnt => "No such file or directory",
            ErrorKind::Io => "Input/output error",
            ErrorKind::NoMem => "Cannot allocate memory",
            ErrorKind::Access => "Permission denied",
            ErrorKind::Busy => "Device or resource busy",
            ErrorKind::Inval => "Invalid argument",
            ErrorKind::FBig => "File too large",
            ErrorKind::NoSpc => "No space left on device",
            ErrorKind::RoFs => "Read-only file system",
            ErrorKind::DQuot => "Disk quota exceeded",
            ErrorKind::Overflow => "Value too large for defined data type",
            ErrorKind::NotSup => "Operation not supported",
            ErrorKind::Shutdown => "Cannot send after transport endpoint shutdown",
            ErrorKind::TimedOut => "Connection timed out",
            ErrorKind::ConnRefused => "Connection refused",
            ErrorKind::ConnReset => "Connection reset by peer",
            ErrorKind::Pipe => "Broken pipe",
        }
    }

    /// The symbolic errno name (`EIO`), used in traces, scenario files and test tables.
    pub fn errno_name(self) -> &'static str {
        match self {
            ErrorKind::Perm => "EPERM",
            ErrorKind::NoEnt => "ENOENT",
            ErrorKind::Io => "EIO",
            ErrorKind::NoMem => "ENOMEM",
            ErrorKind::Access => "EACCES",
            ErrorKind::Busy => "EBUSY",
            ErrorKind::Inval => "EINVAL",
            ErrorKind::FBig => "EFBIG",
            ErrorKind::NoSpc => "ENOSPC",
            ErrorKind::RoFs => "EROFS",
            ErrorKind::DQuot => "EDQUOT",
            ErrorKind::Overflow => "EOVERFLOW",
            ErrorKind::NotSup => "ENOTSUP",
            ErrorKind::Shutdown => "ESHUTDOWN",
            ErrorKind::TimedOut => "ETIMEDOUT",
            ErrorKind::ConnRefused => "ECONNREFUSED",
            ErrorKind::ConnReset => "ECONNRESET",
            ErrorKind::Pipe => "EPIPE",
        }
    }

    /// Parses a symbolic errno name as written by [`ErrorKind::errno_name`].
    pub fn from_errno_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.errno_name() == name)
    }

    /// Maps an OS errno value to a kind; unknown values are `None`.
    pub fn from_raw_os_error(errno: i32) -> Option<ErrorKind> {
        Some(match errno {
            libc::EPERM => ErrorKind::Perm,
            libc::ENOENT => ErrorKind::NoEnt,
            libc::EIO => ErrorKind::Io,
            libc::ENOMEM => ErrorKind::NoMem,
            libc::EACCES => ErrorKind::Access,
            libc::EBUSY => ErrorKind::Busy,
            libc::EINVAL => ErrorKind::Inval,
            libc::EFBIG => ErrorKind::FBig,
            libc::ENOSPC => ErrorKind::NoSpc,
            libc::EROFS => ErrorKind::RoFs,
            libc::EDQUOT => ErrorKind::DQuot,
            libc::EOVERFLOW => ErrorKind::Overflow,
            libc::EOPNOTSUPP => ErrorKind::NotSup,
            libc::ESHUTDOWN => ErrorKind::Shutdown,
            libc::ETIMEDOUT => ErrorKind::TimedOut,
            libc::ECONNREFUSED => ErrorKind::ConnRefused,
            libc::ECONNRESET => ErrorKind::ConnReset,
            libc::EPIPE => ErrorKind::Pipe,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.strerror())
    }
}

/// A block-layer error: a kind and a human-readable context
/// (node, operation, offset, length, or a configuration message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    /// The context is the whole message (QEMU's wording has no strerror part there).
    whole: bool,
}

/// Result alias used across the driver graph.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `context` describing where it happened.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            whole: false,
        }
    }

    /// An error of `kind` whose `message` is printed as it is, with no strerror after it.
    pub fn whole(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            context: message.into(),
            whole: true,
        }
    }

    /// The errno-like kind that callers decide on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context text (without the strerror part).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Converts an OS error, keeping its text in the context if its errno has no kind.
    pub fn from_io(err: &std::io::Error, context: impl Into<String>) -> Error {
        let context = context.into();
        match err.raw_os_error().and_then(ErrorKind::from_raw_os_error) {
            Some(kind) => Error::new(kind, context),
            None => {
                let kind = match err.kind() {
                    std::io::ErrorKind::NotFound => ErrorKind::NoEnt,
                    std::io::ErrorKind::PermissionDenied => ErrorKind::Access,
                    std::io::ErrorKind::InvalidInput => ErrorKind::Inval,
                    std::io::ErrorKind::Unsupported => ErrorKind::NotSup,
                    std::io::ErrorKind::TimedOut => ErrorKind::TimedOut,
                    std::io::ErrorKind::OutOfMemory => ErrorKind::NoMem,
                    _ => ErrorKind::Io,
                };
                Error::new(kind, format!("{context} ({err})"))
            }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(self.kind.strerror())
        } else if self.whole {
            f.write_str(&self.context)
        } else {
            write!(f, "{}: {}", self.context, self.kind.strerror())
        }
    }
}

impl std::error::Error for Error {}

/// A configuration or graph error: a message in QEMU's wording where QEMU has one
/// (QUORUM.md Q6–Q15, Q52–Q55). It is shown to users as `ballot: <message>` at startup and as
/// `{"error": {"class": "GenericError", "desc": "<message>"}}` over QMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    /// A configuration error with the exact user-facing `message`.
    pub fn new(message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
        }
    }

    /// The exact user-facing message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_texts_match_glibc_for_event_kinds() {
        // Q58: the texts QMP events carry.
        assert_eq!(ErrorKind::Io.strerror(), "Input/output error");
        assert_eq!(ErrorKind::NoSpc.strerror(), "No space left on device");
    }

    #[test]
    fn every_kind_round_trips_through_errno_name_and_os_errno() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_errno_name(kind.errno_name()), Some(kind));
            let os = std::io::Error::from_raw_os_error(match kind {
                ErrorKind::Perm => libc::EPERM,
                ErrorKind::NoEnt => libc::ENOENT,
                ErrorKind::Io => libc::EIO,
                ErrorKind::NoMem => libc::ENOMEM,
                ErrorKind::Access => libc::EACCES,
                ErrorKind::Busy => libc::EBUSY,
                ErrorKind::Inval => libc::EINVAL,
                ErrorKind::FBig => libc::EFBIG,
                ErrorKind::NoSpc => libc::ENOSPC,
                ErrorKind::RoFs => libc::EROFS,
                ErrorKind::DQuot => libc::EDQUOT,
                ErrorKind::Overflow => libc::EOVERFLOW,
                ErrorKind::NotSup => libc::EOPNOTSUPP,
                ErrorKind::Shutdown => libc::ESHUTDOWN,
                ErrorKind::TimedOut => libc::ETIMEDOUT,
                ErrorKind::ConnRefused => libc::ECONNREFUSED,
                ErrorKind::ConnReset => libc::ECONNRESET,
                ErrorKind::Pipe => libc::EPIPE,
            });
            // The OS's own text for the errno must equal ours: one source of truth, checked.
            let os_text = os.to_string();
            assert!(
                os_text.starts_with(kind.strerror()),
                "{kind:?}: ours {:?}, libc {os_text:?}",
                kind.strerror()
            );
            assert_eq!(Error::from_io(&os, "x").kind(), kind);
        }
    }

    #[test]
    fn unknown_os_errno_becomes_eio_and_keeps_its_text() {
        let os = std::io::Error::from_raw_os_error(libc::ENOTTY);
        let err = Error::from_io(&os, "ctx");
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(err
            .context()
            .starts_with("ctx (Inappropriate ioctl for device"));
    }
}
