//! HEALING.md end to end against real replicas: three nbdkit servers with the cache filter in
//! writeback mode (acknowledged writes live in the server's memory until a flush), a ballot
//! quorum over them. A replica killed with SIGKILL and restarted has lost its unflushed writes;
//! ballot notices the new connection (H7), marks what that replica had not flushed, and the
//! automatic resync (H14) makes its image byte-identical to the others without any guest read.
//! A hot-added empty replica is then copied in full (H8). The images on disk are compared.

mod peers;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballot::events::{EventBus, Stream};
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::WriteFlags;
use bytes::Bytes;
use peers::{nbdkit, need, scratch, Daemon};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    p
}

/// nbdkit with the cache filter in writeback mode over `img`, on `dir/NAME.sock`.
fn replica(dir: &Path, name: &str, img: &Path) -> Daemon {
    let file = format!("file={}", img.display());
    nbdkit(
        dir,
        name,
        &["--filter=cache", "file", &file, "cache=writeback"],
    )
}

async fn wait_healed(g: &Graph, what: &str) {
    let q = g.quorum("q0").expect("q0");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let oos = q.out_of_sync().await;
        if q.jobs_idle() && oos.iter().all(|c| c.ranges.is_empty()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not healed: {oos:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_and_restarted_and_a_hot_added_empty_one_end_identical() {
    if !need(&["nbdkit"], "nbdkit") {
        return;
    }
    let dir = scratch("healing-peers");
    let imgs: Vec<PathBuf> = (0..4).map(|i| image(&dir, &format!("r{i}.raw"))).collect();
    let mut reps: Vec<Daemon> = (0..3)
        .map(|i| replica(&dir, &format!("r{i}"), &imgs[i]))
        .collect();
    let (host, _cap) = Host::recording(EventBus::new());
    let rec = host.events.record(Stream::Internal);
    let mut g = Graph::new(host);
    for (i, d) in reps.iter().enumerate() {
        g.blockdev_add_arg(&format!(
            "driver=nbd,node-name=n{i},server.type=unix,server.path={},reconnect-delay=5",
            d.socket.display()
        ))
        .await
        .expect("nbd child");
    }
    g.blockdev_add_arg(
        "driver=quorum,node-name=q0,vote-threshold=2,children.0=n0,children.1=n1,children.2=n2",
    )
    .await
    .expect("quorum");
    let q = g.get("q0").expect("q0").dev.clone();
    let flushed = Bytes::from((0..2 * MIB).map(|i| (i / 4096) as u8).collect::<Vec<u8>>());
    q.write(0, flushed.clone(), WriteFlags::NONE)
        .await
        .expect("write");
    q.flush().await.expect("flush");
    // Acknowledged by every replica, flushed by none: r2 loses it when killed.
    let unflushed = Bytes::from(vec![0xc3u8; 3 * MIB as usize]);
    q.write(3 * MIB, unflushed.clone(), WriteFlags::NONE)
        .await
        .expect("write");
    reps[2].kill();
    reps[2] = replica(&dir, "r2", &imgs[2]);
    // The client reconnects by itself (N42); the quorum sees the new connection (H7) and a
    // resync starts 1 s later (H14). Wait for it to complete, then for the record to be clean.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rec
        .events()
        .iter()
        .any(|e| e.name() == "BLOCK_JOB_COMPLETED")
    {
        assert!(Instant::now() < deadline, "no resync after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_healed(&g, "restarted replica").await;
    q.flush().await.expect("flush");
    let r0 = std::fs::read(&imgs[0]).expect("r0");
    assert_eq!(&r0[3 * MIB as usize..6 * MIB as usize], &unflushed[..]);
    assert!(
        std::fs::read(&imgs[2]).expect("r2") == r0,
        "r2 differs from r0 on disk"
    );
    assert!(
        std::fs::read(&imgs[1]).expect("r1") == r0,
        "r1 differs from r0 on disk"
    );
    // A job ran and concluded without error.
    let completed: Vec<serde_json::Value> = rec
        .events()
        .iter()
        .filter(|e| e.name() == "BLOCK_JOB_COMPLETED")
        .map(|e| e.data())
        .collect();
    assert!(!completed.is_empty(), "no resync job ran");
    assert!(
        completed.iter().all(|d| d.get("error").is_none()),
        "{completed:?}"
    );
    // H8: a hot-added empty replica is copied in full.
    let r3 = replica(&dir, "r3", &imgs[3]);
    g.blockdev_add_arg(&format!(
        "driver=nbd,node-name=n3,server.type=unix,server.path={}",
        r3.socket.display()
    ))
    .await
    .expect("n3");
    g.change("q0", None, Some("n3")).await.expect("hot add");
    wait_healed(&g, "hot-added replica").await;
    q.flush().await.expect("flush");
    assert!(
        std::fs::read(&imgs[3]).expect("r3") == r0,
        "r3 differs from r0 on disk"
    );
    drop(g);
    drop(r3);
    drop(reps);
    let _ = std::fs::remove_dir_all(&dir);
}
