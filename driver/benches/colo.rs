//! COLO checkpoint and failover time on a 1 TiB secondary disk (issue 5 item 7).
//!
//! The secondary graph of REPLICATION.md §2.2 in process: S is a 1 TiB node (`null-co`, which
//! stores nothing, or a sparse 1 TiB raw file), A and H in-memory overlays. Each case dirties
//! N clusters spread over the whole disk, half by SVM writes into A and half by forwarded
//! writes through S's export port (preserved into H with data), then times a secondary
//! checkpoint (both overlays emptied, R27/R51) and, after dirtying again, a failover (stop
//! with failover until the commit has written every cluster into S, R31). The point is that
//! both cost what is dirty, never the disk size.
//!
//! Prints one JSON object per line; `scripts/bench-colo.py` turns them into
//! reports/bench-colo.md. Usage: `cargo bench -p ballot --bench colo -- [DIRTY...]`.

use std::time::Instant;

use ballot::drivers::replication::{Mode, Stage};
use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::{Device, WriteFlags};
use bytes::Bytes;

const TIB: u64 = 1 << 40;
const CLUSTER: u64 = 64 * 1024;

struct Setup {
    g: Graph,
    view: Device,
    fwd: Device,
}

async fn setup(s_def: &str) -> Setup {
    let bus = EventBus::new();
    let (h, _) = Host::recording(bus);
    let mut g = Graph::new(h);
    for def in [
        s_def,
        "driver=overlay,node-name=hidden0,backing=parent0",
        "driver=overlay,node-name=active0,backing=hidden0",
        "driver=replication,node-name=childs0,mode=secondary,top-id=colo-disk0,file=active0",
        r#"{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["childs0"]}"#,
    ] {
        g.blockdev_add_arg(def).await.expect("open");
    }
    let fwd = g.claim("parent0", "export 'fwd'", true).expect("export");
    let view = g.get("colo-disk0").expect("top").dev.clone();
    Setup { g, view, fwd }
}

/// Dirties `n` clusters spread over the disk: even ones by the SVM, odd ones forwarded.
async fn dirty(s: &Setup, n: u64, round: u8) {
    let stride = (TIB / CLUSTER / n.max(1)).max(2);
    let data = Bytes::from(vec![round; CLUSTER as usize]);
    let mut tasks = Vec::new();
    for i in 0..n {
        let off = i * stride * CLUSTER;
        let dev = if i % 2 == 0 {
            s.view.clone()
        } else {
            s.fwd.clone()
        };
        let d = data.clone();
        tasks.push(tokio::spawn(async move {
            dev.write(off, d, WriteFlags::NONE)
                .await
                .expect("dirty write")
        }));
        if tasks.len() >= 64 {
            for t in tasks.drain(..) {
                t.await.expect("join");
            }
        }
    }
    for t in tasks {
        t.await.expect("join");
    }
}

fn allocated(s: &Setup) -> (u64, u64) {
    let get = |n: &str| {
        s.g.get(n)
            .and_then(|x| x.overlay.clone())
            .map(|o| o.stats().allocated)
            .unwrap_or(0)
    };
    (get("active0"), get("hidden0"))
}

async fn case(label: &str, s_def: &str, n: u64, prefill: bool) {
    let s = setup(s_def).await;
    if prefill {
        // The clusters the primary will overwrite hold data in S, so that preserve copies
        // real data into H (a hole would become a zero cluster).
        let disk = s.g.get("parent0").expect("S").dev.clone();
        let stride = (TIB / CLUSTER / n.max(1)).max(2);
        let data = Bytes::from(vec![0x5a; CLUSTER as usize]);
        for i in (1..n).step_by(2) {
            disk.write(i * stride * CLUSTER, data.clone(), WriteFlags::NONE)
                .await
                .expect("prefill");
        }
    }
    s.g.replication_start_all(Mode::Secondary)
        .await
        .expect("start");
    dirty(&s, n, 1).await;
    let (a, h) = allocated(&s);
    let t = Instant::now();
    s.g.replication_checkpoint_all().await.expect("checkpoint");
    let checkpoint_s = t.elapsed().as_secs_f64();
    assert_eq!(allocated(&s), (0, 0));
    dirty(&s, n, 2).await;
    let t = Instant::now();
    s.g.replication_stop_all(true).await.expect("failover");
    let r = s.g.replication_nodes()[0].clone();
    r.wait_commit().await;
    let failover_s = t.elapsed().as_secs_f64();
    assert_eq!(r.stage(), Stage::Done);
    assert_eq!(allocated(&s), (0, 0));
    println!(
        "{{\"disk\": \"{label}\", \"disk_bytes\": {TIB}, \"dirty\": {n}, \"in_active\": {a}, \"in_hidden\": {h}, \"checkpoint_s\": {checkpoint_s:.6}, \"failover_s\": {failover_s:.6}}}"
    );
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if args.is_empty() {
        vec![1_000, 100_000]
    } else {
        args
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("ballot-bench-colo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let img = dir.join("secondary.raw");
    rt.block_on(async {
        for &n in &sizes {
            case(
                "null-co 1 TiB",
                &format!("driver=null-co,node-name=parent0,size={TIB},read-zeroes=on"),
                n,
                false,
            )
            .await;
            let f = std::fs::File::create(&img).expect("image");
            f.set_len(TIB).expect("sparse 1 TiB");
            drop(f);
            case(
                "sparse raw file 1 TiB",
                &format!(
                    "{{\"driver\":\"raw\",\"node-name\":\"parent0\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
                    img.display()
                ),
                n,
                true,
            )
            .await;
            let _ = std::fs::remove_file(&img);
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
