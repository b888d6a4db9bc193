//! A smoke run of the driver under madsim: a 3-way quorum over in-memory children, writes,
//! a corrupted child outvoted and repaired, and the event rate limiter's window in virtual
//! time. Prints the virtual time and the events; exits 0 when every check holds.

use std::sync::Arc;
use std::time::Duration;

use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::quorum::{Quorum, QuorumOptions};
use ballot::events::{EventBus, Stream};
use ballot::host::Host;
use ballot::{BlockDevice, Device, WriteFlags};
use bytes::Bytes;

/// Runs the smoke scenario with `seed`; returns the process exit code.
pub fn run(seed: u64) -> i32 {
    let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.block_on(async move {
        let bus = EventBus::new();
        let internal = bus.record(Stream::Internal);
        let qmp = bus.record(Stream::Qmp);
        let (host, _) = Host::recording(bus);
        let kids: Vec<Arc<MemoryDevice>> = (0..3)
            .map(|_| Arc::new(MemoryDevice::new(1 << 20)))
            .collect();
        let q = Quorum::open(
            QuorumOptions {
                rewrite_corrupted: true,
                ..QuorumOptions::new("q0", 2)
            },
            kids.iter()
                .enumerate()
                .map(|(i, k)| (format!("c{i}"), k.clone() as Device))
                .collect(),
            host,
        )
        .expect("open");
        let start = tokio::time::Instant::now();
        q.write(0, Bytes::from(vec![7u8; 4096]), WriteFlags::FUA)
            .await
            .expect("write");
        let mut failures = Vec::new();
        for round in 0..3u8 {
            // Corrupt child 1 behind the quorum's back; the vote must outvote and repair it.
            kids[1]
                .write(0, Bytes::from(vec![round; 512]), WriteFlags::NONE)
                .await
                .expect("corrupt");
            let got = q.read(0, 4096).await.expect("read");
            if got[..] != [7u8; 4096] {
                failures.push(format!("round {round}: wrong data"));
            }
            if kids[1].contents()[..4096] != [7u8; 4096] {
                failures.push(format!("round {round}: child 1 not repaired"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Three mismatch events inside 900 ms: the first goes out at once, the last is held
        // until the 1 s window closes (QUORUM.md Q59), in virtual time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (n_internal, n_qmp) = (internal.events().len(), qmp.events().len());
        println!(
            "smoke seed={seed}: virtual {:?}, internal events {n_internal}, qmp events {n_qmp}",
            start.elapsed()
        );
        if (n_internal, n_qmp) != (3, 2) {
            failures.push(format!(
                "events: internal {n_internal} (want 3), qmp {n_qmp} (want 2)"
            ));
        }
        if failures.is_empty() {
            println!("smoke: ok");
            0
        } else {
            for f in failures {
                println!("smoke: FAIL {f}");
            }
            1
        }
    })
}
