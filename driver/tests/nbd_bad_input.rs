//! Bad input against a running `ballot serve` (issue 4 item 6, NBD.md N9, N20, N28–N31): raw
//! bytes on a unix socket, one misbehaving client after another. Each gets the error reply or
//! the clean disconnect the table in N31 prescribes; afterwards the same process serves a
//! well-behaved client, is still running, and its peak resident memory stayed bounded.

mod peers;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use peers::{nbd_server_arg, quorum_args, scratch, start_ballot};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_INFO: u32 = 6;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_INVALID: u32 = 0x8000_0003;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const SIZE: u64 = 64 << 20;

struct Conn(UnixStream);

impl Conn {
    /// Connects and reads the greeting (N6).
    fn open(socket: &Path) -> Conn {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut c = Conn(s);
        let g = c.take(18);
        assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            3,
            "FIXED_NEWSTYLE | NO_ZEROES"
        );
        c
    }

    /// Connects, sends client flags 3, and negotiates into transmission on `export`, with
    /// structured replies when asked.
    fn transmission(socket: &Path, export: &str, structured: bool) -> Conn {
        let mut c = Conn::open(socket);
        c.send(&3u32.to_be_bytes());
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.reply(), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        }
        c.option(OPT_GO, &info_data(export));
        loop {
            let (_, t, _) = c.reply();
            if t == REP_ACK {
                return c;
            }
            assert_eq!(t, REP_INFO, "GO {export}");
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("send");
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).expect("read");
        b
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.take(20);
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        assert!(len <= 65536, "option reply of {len} bytes");
        (opt, t, self.take(len as usize))
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.take(16);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE_MAGIC);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// A structured ERROR chunk with DONE: (error, cookie).
    fn error_chunk(&mut self) -> (u32, u64) {
        let h = self.take(20);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_MAGIC
        );
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 1, "DONE");
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), 32768 + 1, "ERROR chunk");
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let p = self.take(len as usize);
        (u32::from_be_bytes(p[..4].try_into().unwrap()), cookie)
    }

    /// True when the server closed the connection: EOF (or a reset) before `within`.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("connection still open: {e}"),
            }
        }
    }
}

/// INFO/GO data for `name` with no info requests.
fn info_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Peak resident memory of `pid`, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn misbehaving_clients_get_n31_reactions_and_the_server_keeps_serving() {
    let dir = scratch("bad-input");
    let socket = dir.join("nbd.sock");
    let args = quorum_args(
        &dir,
        SIZE,
        &[
            nbd_server_arg(&socket),
            "--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into(),
            "--export=type=nbd,id=e1,node-name=q0,name=ro0".into(),
        ],
    );
    let mut s = start_ballot(&args, &socket, &[]);
    let pid = s.child.id();

    // N7: unknown client flags close the connection.
    let mut c = Conn::open(&socket);
    c.send(&(3u32 | 1 << 5).to_be_bytes());
    assert!(c.closed(), "unknown client flags");

    // N9: a wrong option magic closes.
    c = Conn::open(&socket);
    c.send(&3u32.to_be_bytes());
    c.send(&[0xde; 16]);
    assert!(c.closed(), "bad option magic");

    // N9: option data over 64 KiB closes without being read (nothing is sent after the header).
    c = Conn::open(&socket);
    c.send(&3u32.to_be_bytes());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    assert!(c.closed(), "4 GiB option length");

    // N10, N11: an unknown option gets ERR_UNSUP, malformed INFO data ERR_INVALID; negotiation
    // continues and GO still works on the same connection.
    c = Conn::open(&socket);
    c.send(&3u32.to_be_bytes());
    c.option(99, b"xyz");
    let (opt, t, _) = c.reply();
    assert_eq!((opt, t), (99, ERR_UNSUP));
    let mut bad = info_data("disk0");
    bad.push(0); // one byte too many
    c.option(OPT_INFO, &bad);
    let (opt, t, msg) = c.reply();
    assert_eq!(
        (opt, t),
        (OPT_INFO, ERR_INVALID),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    let mut short = 100u32.to_be_bytes().to_vec(); // a name length past the data
    short.extend_from_slice(b"disk0");
    c.option(OPT_INFO, &short);
    assert_eq!(c.reply().1, ERR_INVALID);
    c.option(OPT_GO, &info_data("disk0"));
    let mut types = Vec::new();
    loop {
        let (_, t, _) = c.reply();
        types.push(t);
        if t == REP_ACK {
            break;
        }
    }
    assert_eq!(types.first(), Some(&REP_INFO));
    c.request(CMD_READ, 0, 7, 0, 512);
    assert_eq!(c.simple(), (0, 7));
    assert_eq!(c.take(512), vec![0u8; 512]);

    // N18: 1024 options without reaching transmission close the connection.
    c = Conn::open(&socket);
    c.send(&3u32.to_be_bytes());
    let mut closed_after = None;
    for i in 0..1100u32 {
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&99u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        let mut h = [0u8; 20];
        // After the close, the send may already fail (EPIPE) or the read sees the end.
        match c.0.write_all(&opt).and_then(|()| c.0.read_exact(&mut h)) {
            Ok(()) => assert_eq!(u32::from_be_bytes(h[12..16].try_into().unwrap()), ERR_UNSUP),
            Err(_) => {
                closed_after = Some(i);
                break;
            }
        }
    }
    assert_eq!(
        closed_after,
        Some(1024),
        "options answered before the close"
    );

    // N20 during transmission, with structured replies: each error on a kept connection.
    c = Conn::transmission(&socket, "disk0", true);
    c.request(CMD_READ, 0, 1, 0, 33 << 20);
    assert_eq!(c.error_chunk(), (EOVERFLOW, 1), "READ over 32 MiB");
    c.request(CMD_READ, 0, 2, SIZE, 512);
    assert_eq!(c.error_chunk(), (EINVAL, 2), "READ past the end");
    c.request(CMD_READ, 0, 3, u64::MAX - 100, 512);
    assert_eq!(c.error_chunk(), (EINVAL, 3), "overflowing range");
    c.request(CMD_READ, 1 << 9, 4, 0, 512);
    assert_eq!(c.error_chunk(), (EINVAL, 4), "undefined flag");
    c.request(99, 0, 5, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 5), "unknown command");
    c.request(CMD_WRITE, 0, 6, SIZE - 256, 512);
    c.send(&[0u8; 512]); // N20.3: the payload is read even when refused
    assert_eq!(c.simple(), (ENOSPC, 6), "WRITE past the end");
    c.request(CMD_TRIM, 0, 8, SIZE, 512);
    assert_eq!(c.simple(), (EINVAL, 8), "TRIM past the end");
    // Still in sync: a good read gets its data.
    c.request(CMD_READ, 0, 9, 4096, 512);
    let h = c.take(20);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 9);
    assert_eq!(c.take(8 + 512)[8..], [0u8; 512]);
    // N20.2: a WRITE over 32 MiB closes without its payload being read.
    c.request(CMD_WRITE, 0, 10, 0, u32::MAX);
    assert!(c.closed(), "WRITE over 32 MiB");

    // Simple replies: READ over 32 MiB is EINVAL (N20.9); writes to a read-only export EPERM.
    c = Conn::transmission(&socket, "ro0", false);
    c.request(CMD_READ, 0, 1, 0, 33 << 20);
    assert_eq!(c.simple(), (EINVAL, 1));
    c.request(CMD_WRITE, 0, 2, 0, 512);
    c.send(&[1u8; 512]);
    assert_eq!(c.simple(), (EPERM, 2), "WRITE on a read-only export");
    c.request(CMD_TRIM, 0, 3, 0, 512);
    assert_eq!(c.simple(), (EPERM, 3), "TRIM on a read-only export");
    // N20.1: a wrong request magic closes.
    c.send(&[0x55; 28]);
    assert!(c.closed(), "bad request magic");

    // N31: end of stream inside a header, and inside a WRITE payload (the client vanishes
    // mid-request); and a client that pipelines reads and leaves without reading replies.
    c = Conn::transmission(&socket, "disk0", true);
    c.send(&REQUEST_MAGIC.to_be_bytes()[..3]);
    drop(c);
    c = Conn::transmission(&socket, "disk0", true);
    c.request(CMD_WRITE, 0, 1, 0, 1 << 20);
    c.send(&vec![0xeeu8; 300 << 10]);
    c = Conn::transmission(&socket, "disk0", true);
    for i in 0..200 {
        c.request(CMD_READ, 0, i, 0, 1 << 20);
    }

    // The same process still serves: the torn WRITE was never applied (its payload never
    // arrived), and a well-behaved client reads and writes.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.child.try_wait().expect("try_wait").is_none(),
        "ballot serve exited"
    );
    c = Conn::transmission(&socket, "disk0", false);
    c.request(CMD_READ, 0, 1, 0, 512);
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(c.take(512), vec![0u8; 512], "torn write left nothing");
    c.request(CMD_WRITE, 0, 2, 0, 512);
    c.send(&[0x61; 512]);
    assert_eq!(c.simple(), (0, 2));
    c.request(CMD_READ, 0, 3, 0, 512);
    assert_eq!(c.simple(), (0, 3));
    assert_eq!(c.take(512), vec![0x61u8; 512]);
    drop(c);
    // N28, N29: nothing above allocated from a length field (the lengths asked for 4 GiB). What
    // remains is by design: 64 MiB of reply payload per connection, and each quorum read holding
    // its three children's copies until the vote, so 4 × 64 MiB plus the process's baseline.
    let peak = peak_rss_kib(pid);
    assert!(peak < 320 * 1024, "peak RSS {peak} KiB");
    assert_eq!(s.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
