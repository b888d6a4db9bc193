//! HEALING.md H25: `file` nodes take QEMU's image locks, so ballot is the only writer of its
//! images: QEMU's tools refuse an image ballot has open for writing, and ballot refuses one
//! QEMU holds, each with QEMU's wording. Tried against the real qemu-io and
//! qemu-storage-daemon on the same files.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;

fn graph() -> Graph {
    let (host, _) = Host::recording(EventBus::new());
    Graph::new(host)
}

async fn add(g: &mut Graph, arg: &str) -> String {
    match g.blockdev_add_arg(arg).await {
        Ok(_) => String::new(),
        Err(e) => e.message().to_string(),
    }
}

fn refused(img: &str, what: &str) -> String {
    format!("Could not open '{img}': Failed to get {what} lock\nIs another process using the image [{img}]?")
}

/// qemu-io's answer to writing 512 bytes at 0 of `img`: exit code and stderr.
fn qemu_io_write(img: &str) -> (i32, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", img])
        .output()
        .expect("qemu-io (qemu-utils) is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A qemu-storage-daemon exporting `img` writable over NBD, killed on drop.
struct Qsd(Child);

impl Qsd {
    fn start(img: &str, sock: &str) -> Qsd {
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=file,node-name=f0,filename={img}"),
                "--nbd-server",
                &format!("addr.type=unix,addr.path={sock}"),
                "--export",
                "type=nbd,id=e0,node-name=f0,writable=on",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils) is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(sock).exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd(child)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 1 MiB image in `dir` and a graph holding it open for writing as node `w0`.
async fn writer(dir: &common::Scratch) -> (String, Graph) {
    let img = dir.image("a.raw", 1 << 20);
    let mut g = graph();
    assert_eq!(
        add(&mut g, &format!("driver=file,node-name=w0,filename={img}")).await,
        ""
    );
    (img, g)
}

#[tokio::test]
async fn h25_a_second_writer_of_an_image_is_refused_and_locking_off_lets_it_in() {
    let dir = common::Scratch::new("locks");
    let (img, mut g) = writer(&dir).await;
    // Another writer, a reader that would not let the writer write, and a bad value.
    assert_eq!(
        add(&mut g, &format!("driver=file,node-name=w1,filename={img}")).await,
        refused(&img, "\"write\"")
    );
    assert_eq!(
        add(
            &mut g,
            &format!("driver=file,node-name=r1,filename={img},read-only=on")
        )
        .await,
        refused(&img, "shared \"write\"")
    );
    assert_eq!(
        add(
            &mut g,
            &format!("driver=file,node-name=x,filename={img},locking=maybe")
        )
        .await,
        "Parameter 'locking' does not accept value 'maybe'"
    );
    // locking=off takes no lock and checks none (QEMU's meaning).
    assert_eq!(
        add(
            &mut g,
            &format!("driver=file,node-name=w2,filename={img},locking=off")
        )
        .await,
        ""
    );
    // Closing the writer releases its locks.
    g.blockdev_del("w0").await.expect("blockdev-del");
    assert_eq!(
        add(
            &mut g,
            &format!("driver=file,node-name=w3,filename={img},locking=on")
        )
        .await,
        ""
    );
}

#[tokio::test]
async fn h25_qemu_io_and_qemu_img_cannot_write_an_image_ballot_has_open() {
    let dir = common::Scratch::new("locks");
    let (img, mut g) = writer(&dir).await;
    assert_eq!(
        qemu_io_write(&img),
        (
            1,
            format!("qemu-io: can't open device {img}: Failed to get \"write\" lock\nIs another process using the image [{img}]?\n")
        )
    );
    // qemu-img writing into it (a convert onto the existing image) is refused the same way.
    let src = dir.image("src.raw", 1 << 20);
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", &src, &img])
        .output()
        .expect("qemu-img (qemu-utils) is installed");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("qemu-img: {}\n", refused(&img, "\"write\""))
    );
    g.blockdev_del("w0").await.expect("blockdev-del");
    assert_eq!(
        qemu_io_write(&img).0,
        0,
        "qemu-io writes once ballot has let go"
    );
}

#[tokio::test]
async fn h25_ballot_refuses_an_image_qemu_storage_daemon_holds() {
    let dir = common::Scratch::new("locks");
    let img = dir.image("a.raw", 1 << 20);
    let sock = dir.0.join("qsd.sock").display().to_string();
    let qsd = Qsd::start(&img, &sock);
    let mut g = graph();
    // qemu-storage-daemon's NBD export writes and lets others write (it forbids only resize):
    // ballot, which forbids other writers, is refused for the daemon's write.
    assert_eq!(
        add(&mut g, &format!("driver=file,node-name=w0,filename={img}")).await,
        refused(&img, "shared \"write\"")
    );
    drop(qsd);
    assert_eq!(
        add(&mut g, &format!("driver=file,node-name=w0,filename={img}")).await,
        ""
    );
}

/// How many of this process's file descriptors refer to `path`.
fn open_fds(path: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_str() == Some(path))
        .count()
}

/// H25: a node's locks go with the node. A writable file node that wrote through its write
/// and write-back threads, then was dropped (or deleted), has closed its file by the time the
/// drop returns (the threads are joined, not left to close it later), so the same file opens
/// for writing again at once. Before the fix a `blockdev-del` + `blockdev-add` of one file, or
/// a dirty qcow2 image's repair followed by another open, could meet the old node's locks.
#[tokio::test]
async fn h25_a_dropped_writer_releases_its_locks_before_the_next_open() {
    use ballot::device::WriteFlags;
    let dir = common::Scratch::new("locks-reopen");
    let img = dir.0.join("d.raw").display().to_string();
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    for round in 0..20u8 {
        let mut g = graph();
        let arg = format!("driver=file,node-name=f,filename={img}");
        assert_eq!(add(&mut g, &arg).await, "", "round {round}");
        let dev = g.get("f").unwrap().dev.clone();
        // Buffered writes, small and large (the small ones run on the node's write thread,
        // the large ones start write-back), then a flush.
        for k in 0..16u64 {
            let len = if k % 4 == 0 { 1 << 20 } else { 4096 };
            dev.write(
                k << 18,
                bytes::Bytes::from(vec![round; len]),
                WriteFlags::NONE,
            )
            .await
            .unwrap();
        }
        dev.flush().await.unwrap();
        if round % 2 == 0 {
            drop(dev);
            g.blockdev_del("f").await.unwrap();
        } else {
            drop((dev, g));
        }
        // The file is closed when the node goes (its locks with it).
        assert_eq!(open_fds(&img), 0, "round {round}: the file is still open");
    }
    let data = std::fs::read(&img).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 19));
}
