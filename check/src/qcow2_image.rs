//! Fuzz target `qcow2_image`: a qcow2 image file is input from anyone (issue 19), so any bytes
//! must open to a node or to an error, never a panic, a hang, or an allocation sized by a
//! field nothing checked. An image that opens is read (a bounded window, whatever size its
//! header claims), its block status walked, then written, flushed and checked: every read
//! after a write returns what was written, and the flushed file has no refcount below its
//! references (leaks, which a hostile image may start with, are allowed).

use std::sync::Arc;

use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::qcow2::check::check;
use ballot::drivers::qcow2::{Qcow2, Qcow2Options};
use ballot::{BlockDevice, Device, WriteFlags};
use bytes::Bytes;

/// Largest window read from a fuzzed image.
const WINDOW_BYTES: u64 = 1 << 20;

/// One input: the bytes of an image file.
pub fn fuzz(data: &[u8]) {
    crate::rt::block_on(async {
        let file: Device = Arc::new(MemoryDevice::with_contents(data.to_vec()));
        let Ok(h) = Qcow2::read_header(&file, "'fuzz'").await else {
            return;
        };
        let opts = Qcow2Options {
            read_only: true,
            ..Qcow2Options::default()
        };
        let Ok(q) = Qcow2::open("q", "'fuzz'", file.clone(), h.clone(), None, opts).await else {
            return;
        };
        let len = q.length().expect("a qcow2 node knows its length");
        let window = len.min(WINDOW_BYTES);
        if let Ok(d) = q.read(0, window as usize).await {
            assert_eq!(d.len() as u64, window, "a read returns what it asked for");
        }
        let mut off = 0;
        while off < window {
            match q.block_status(off, window - off).await {
                Ok(s) => {
                    assert!(
                        s.length > 0 && s.length <= window - off,
                        "status length {}",
                        s.length
                    );
                    off += s.length;
                }
                Err(_) => break,
            }
        }
        drop(q);
        // Writable, over a growable copy: write, read back, flush, check.
        let file: Device = Arc::new(MemoryDevice::growable(0));
        if file.grow(data.len() as u64).await.is_err()
            || file
                .write(0, Bytes::copy_from_slice(data), WriteFlags::NONE)
                .await
                .is_err()
        {
            return;
        }
        let clean_before = check(&file, &h).await.is_ok_and(|r| r.is_consistent());
        let opts = Qcow2Options::default();
        let Ok(q) = Qcow2::open("q", "'fuzz'", file.clone(), h.clone(), None, opts).await else {
            return;
        };
        let n = window.min(3 * 4096);
        if n == 0 {
            return;
        }
        let pattern = Bytes::from(vec![0x5a; n as usize]);
        if q.write(0, pattern.clone(), WriteFlags::NONE).await.is_ok() {
            if let Ok(back) = q.read(0, n as usize).await {
                assert_eq!(back, pattern, "a read after a write returns the write");
            }
        }
        if q.flush().await.is_ok() {
            if let Ok(h) = Qcow2::read_header(&file, "'fuzz'").await {
                if let Ok(report) = check(&file, &h).await {
                    // Damage the input already had is reported, not created: an image that
                    // checked clean before checks clean after.
                    assert!(
                        !clean_before || report.is_consistent(),
                        "ballot's writes damaged a consistent image: {:?}",
                        report.messages
                    );
                }
            }
        }
    });
}
