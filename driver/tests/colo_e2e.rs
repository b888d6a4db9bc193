//! README "COLO with two ballot processes", run exactly on loopback (issue 5, item 4): the
//! primary and secondary command lines of REPLICATION.md §2, the controller's QMP sequences of
//! §2.4, the worked timeline of §12 with qemu-io as the PVM and the SVM, the primary killed,
//! failover on the secondary, and S compared byte for byte with `abay`.

mod peers;

use std::path::Path;

use peers::{need, scratch, start_ballot, Qmp};
use serde_json::json;

const CLUSTER: usize = 64 * 1024;
const DISK: usize = 4 * CLUSTER;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// qemu-io writes `byte` over cluster `c` of the NBD `image`; asserts success.
fn write_cluster(image: &str, c: usize, byte: u8) {
    io(
        image,
        &format!("write -P 0x{byte:02x} {} {CLUSTER}", c * CLUSTER),
    );
}

/// qemu-io reads cluster `c` of the NBD `image` and checks it holds `byte` everywhere.
fn expect_cluster(image: &str, c: usize, byte: u8) {
    io(
        image,
        &format!("read -P 0x{byte:02x} {} {CLUSTER}", c * CLUSTER),
    );
}

fn io(image: &str, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, image])
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io {cmd} on {image}: {text}"
    );
}

fn cluster_bytes(path: &Path) -> Vec<u8> {
    let d = std::fs::read(path).expect("read image");
    assert_eq!(d.len(), DISK);
    d.chunks(CLUSTER)
        .map(|c| {
            assert!(c.iter().all(|&b| b == c[0]), "cluster not uniform");
            c[0]
        })
        .collect()
}

/// The `--blockdev` of COLO's active or hidden disk `name` over `backing`: an in-memory
/// `overlay`, or a `qcow2` file made by qemu-img whose own backing file is what the node's
/// `backing` is (the secondary disk for the hidden disk, the hidden disk for the active one).
fn layer_spec(dir: &Path, layers: &str, name: &str, backing: &str) -> String {
    if layers == "overlay" {
        return format!("driver=overlay,node-name={name},backing={backing}");
    }
    let img = dir.join(format!("{name}.qcow2"));
    let (b, f) = if name == "hidden0" {
        ("secondary.raw", "raw")
    } else {
        ("hidden0.qcow2", "qcow2")
    };
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", b, "-F", f])
        .arg(&img)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "driver=qcow2,node-name={name},file.driver=file,file.filename={},backing={backing}",
        img.display()
    )
}

#[test]
fn colo_with_two_ballot_processes_checkpoint_kill_failover() {
    colo_e2e("overlay");
}

/// The same run with the active and hidden disks as qcow2 files, as seed 003 writes them
/// (issue 19 item 4): the hidden disk's image is backed by the secondary disk, the active
/// disk's by the hidden disk; both are emptied at each checkpoint and committed at failover.
#[test]
fn colo_with_qcow2_active_and_hidden_disks() {
    colo_e2e("qcow2");
}

fn colo_e2e(layers: &str) {
    if !need(&["qemu-io", "qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch(&format!("colo-e2e-{layers}"));
    let (pimg, simg) = (dir.join("primary.raw"), dir.join("secondary.raw"));
    // R1: P and S identical before replication starts: `a` everywhere.
    std::fs::write(&pimg, vec![b'a'; DISK]).unwrap();
    std::fs::write(&simg, vec![b'a'; DISK]).unwrap();
    let port = free_port();
    let (pvm_sock, pqmp, sqmp) = (
        dir.join("pvm.sock"),
        dir.join("primary-qmp.sock"),
        dir.join("secondary-qmp.sock"),
    );

    // §2.2: the secondary.
    let secondary_args: Vec<String> = vec![
        "serve".into(),
        "--blockdev".into(),
        format!("driver=file,node-name=sfile,filename={}", simg.display()),
        "--blockdev".into(),
        "driver=raw,node-name=parent0,file=sfile".into(),
        "--blockdev".into(),
        layer_spec(&dir, layers, "hidden0", "parent0"),
        "--blockdev".into(),
        layer_spec(&dir, layers, "active0", "hidden0"),
        "--blockdev".into(),
        "driver=replication,node-name=childs0,mode=secondary,top-id=colo-disk0,file=active0".into(),
        "--blockdev".into(),
        r#"{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["childs0"]}"#.into(),
        "--nbd-server".into(),
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export".into(),
        "type=nbd,id=fwd,node-name=parent0,name=parent0,writable=on".into(),
        "--export".into(),
        "type=nbd,id=svm,node-name=colo-disk0,name=colo-disk0,writable=on".into(),
        "--chardev".into(),
        format!("socket,path={},server=on,wait=off,id=m0", sqmp.display()),
        "--monitor".into(),
        "chardev=m0".into(),
    ];
    let mut secondary = start_ballot(&secondary_args, &sqmp, &[]);
    let mut sq = Qmp::connect(&sqmp);
    // §2.4 start (1): the secondary first.
    sq.execute(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );

    // §2.1: the primary.
    let primary_args: Vec<String> = vec![
        "serve".into(),
        "--blockdev".into(),
        format!("driver=file,node-name=pfile,filename={}", pimg.display()),
        "--blockdev".into(),
        "driver=raw,node-name=plocal,file=pfile".into(),
        "--blockdev".into(),
        r#"{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["plocal"]}"#.into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", pvm_sock.display()),
        "--export".into(),
        "type=nbd,id=pvm,node-name=colo-disk0,name=colo-disk0,writable=on".into(),
        "--chardev".into(),
        format!("socket,path={},server=on,wait=off,id=m0", pqmp.display()),
        "--monitor".into(),
        "chardev=m0".into(),
    ];
    let mut primary = start_ballot(&primary_args, &pqmp, &[&pvm_sock]);
    let mut pq = Qmp::connect(&pqmp);
    // §2.4 start (2).
    pq.execute(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "replication0", "mode": "primary",
               "file": {"driver": "nbd", "export": "parent0",
                        "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}}),
    );
    pq.execute(
        "x-blockdev-change",
        json!({"parent": "colo-disk0", "node": "replication0"}),
    );
    pq.execute(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    );

    let pvm = &peers::uri(&pvm_sock, "colo-disk0");
    let svm = &format!("nbd://127.0.0.1:{port}/colo-disk0");

    // §12 steps 3–4: the PVM writes `b` to c1 (forwarded), the SVM writes `x` to c2.
    write_cluster(pvm, 1, b'b');
    write_cluster(svm, 2, b'x');
    expect_cluster(svm, 1, b'a'); // the forwarded write is hidden from the SVM (R23)
    assert_eq!(cluster_bytes(&simg), b"abaa", "S follows P (R4)");

    // Step 5: checkpoint (§2.4), both statuses clean, then S == P and the view is S.
    pq.execute("xen-colo-do-checkpoint", json!({}));
    assert_eq!(
        pq.execute("query-xen-replication-status", json!({})),
        json!({"error": false, "stage": "running"})
    );
    assert_eq!(
        sq.execute("query-xen-replication-status", json!({})),
        json!({"error": false, "stage": "running"})
    );
    sq.execute("xen-colo-do-checkpoint", json!({}));
    assert_eq!(cluster_bytes(&pimg), cluster_bytes(&simg), "R53: S == P");
    for (c, b) in b"abaa".iter().enumerate() {
        expect_cluster(svm, c, *b);
    }

    // Steps 6–7: the PVM writes `c`, `d` to c2, c3; the SVM writes `y` to c3.
    write_cluster(pvm, 2, b'c');
    write_cluster(pvm, 3, b'd');
    write_cluster(svm, 3, b'y');

    // Step 8: the primary host dies.
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    drop(pq);

    // Step 9: failover (§2.4): fence the old primary, then stop with failover.
    assert_eq!(
        sq.execute("block-export-del", json!({"id": "fwd", "mode": "hard"})),
        json!({})
    );
    sq.execute(
        "xen-set-replication",
        json!({"enable": false, "primary": false, "failover": true}),
    );
    // O2: the commit job's event (A's c3 and H's c2 and c3: two clusters).
    let ev = loop {
        let e = sq.event();
        if e["event"] == "BLOCK_JOB_COMPLETED" {
            break e;
        }
    };
    assert_eq!(
        ev["data"],
        json!({"type": "commit", "device": "childs0", "len": 2 * CLUSTER, "offset": 2 * CLUSTER, "speed": 0})
    );
    assert_eq!(
        sq.execute("query-xen-replication-status", json!({})),
        json!({"error": false, "stage": "done"})
    );
    // Step 10: S is `abay`, byte for byte; the SVM carries on, straight on S.
    let want: Vec<u8> = [b'a', b'b', b'a', b'y']
        .iter()
        .flat_map(|&b| vec![b; CLUSTER])
        .collect();
    assert_eq!(std::fs::read(&simg).unwrap(), want);
    write_cluster(svm, 0, b'z');
    assert_eq!(cluster_bytes(&simg), b"zbay");
    // Step 11: the promoted host ignores a later start as primary for childs0 (R34).
    sq.execute(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    );
    assert_eq!(
        sq.execute("query-xen-replication-status", json!({})),
        json!({"error": false, "stage": "done"})
    );
    assert_eq!(secondary.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
