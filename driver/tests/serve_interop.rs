//! `ballot serve` against real NBD clients from qemu-utils (NBD.md §8 rows 1 and 2): qemu-io
//! writes, reads, zeroes and discards through a quorum of three files; qemu-img reads the size
//! and the block-status map; a flipped byte in one child is outvoted; an unknown export gets
//! ERR_UNKNOWN with its name. Every server is started on a unix socket in a scratch directory
//! and stopped by its own PID; SIGTERM must end it with status 0.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod peers;

use peers::{qemu_io, scratch, start_ballot, wait_for};

#[test]
fn qemu_io_and_qemu_img_through_a_served_quorum() {
    if !peers::need(&["qemu-io", "qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch("qemu");
    let mut s = peers::serve_disk0(&dir, 16 << 20);
    let (code, out) = qemu_io(
        &s.socket,
        "disk0",
        &[
            "write -P 0xab 0 1M",
            "flush",
            "read -P 0xab 0 1M",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "discard 2M 64k",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(
        out.matches("read 1048576/1048576 bytes at offset 0")
            .count(),
        1,
        "{out}"
    );
    // Every child holds the data.
    let a = std::fs::read(dir.join("a.raw")).expect("read a");
    assert_eq!(&a[..1 << 20], &vec![0xab; 1 << 20][..]);
    assert_eq!(a, std::fs::read(dir.join("c.raw")).expect("read c"));
    // Flip one byte in one child: the read returns the majority's data (Q25).
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("b.raw"))
            .expect("open b");
        f.seek(SeekFrom::Start(4096)).expect("seek");
        f.write_all(&[0x00]).expect("flip");
    }
    let (code, out) = qemu_io(&s.socket, "disk0", &["read -P 0xab 0 64k"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    // qemu-img: size and the block-status map through the quorum (N24, Q44).
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(format!("nbd+unix:///disk0?socket={}", s.socket.display()))
        .output()
        .expect("qemu-img info");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(format!("nbd+unix:///disk0?socket={}", s.socket.display()))
        .output()
        .expect("qemu-img map");
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(
        map.contains("\"start\": 0, \"length\": 1114112, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
        "{map}"
    );
    // N11: an unknown export name is refused with a message naming it.
    let (code, out) = qemu_io(&s.socket, "nosuch", &["read 0 512"]);
    assert_ne!(code, 0);
    assert!(out.contains("export 'nosuch' not present"), "{out}");
    // N33: SIGTERM drains, flushes and exits 0.
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = s.child.wait().expect("wait for ballot serve");
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A qemu-nbd replica on a unix socket, stopped by its own PID.
struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn quorum_of_three_qemu_nbd_replicas_through_the_nbd_client() {
    if !peers::need(&["qemu-nbd", "qemu-io"], "qemu-utils") {
        return;
    }
    let dir = scratch("client");
    let mut replicas = Vec::new();
    let mut args: Vec<String> = vec!["serve".into()];
    for i in 0..3 {
        let img = dir.join(format!("r{i}.raw"));
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(8 << 20))
            .expect("replica image");
        let sock = dir.join(format!("r{i}.sock"));
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "--persistent", "-e", "4", "-k"])
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        replicas.push(Replica(child));
        wait_for(&[&sock], "qemu-nbd");
        args.push("--blockdev".into());
        args.push(format!(
            "driver=nbd,node-name=n{i},server.type=unix,server.path={},request-timeout=10",
            sock.display()
        ));
    }
    let socket = dir.join("q.sock");
    args.push("--blockdev".into());
    args.push(
        r#"{"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["n0","n1","n2"]}"#
            .into(),
    );
    args.push("--nbd-server".into());
    args.push(format!("addr.type=unix,addr.path={}", socket.display()));
    args.push("--export".into());
    args.push("type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into());
    let s = start_ballot(&args, &socket, &[]);
    let (code, out) = qemu_io(
        &s.socket,
        "disk0",
        &[
            "write -P 0x5a 0 2M",
            "flush",
            "read -P 0x5a 0 2M",
            "write -z 2M 1M",
            "read -P 0 2M 1M",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(
        out.contains("read 2097152/2097152 bytes at offset 0"),
        "{out}"
    );
    for i in 0..3 {
        let img = std::fs::read(dir.join(format!("r{i}.raw"))).expect("read replica");
        assert_eq!(&img[..2 << 20], &vec![0x5a; 2 << 20][..], "replica {i}");
    }
    // A replica that disagrees is outvoted through the NBD path too.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("r1.raw"))
            .expect("open r1");
        f.seek(SeekFrom::Start(100)).expect("seek");
        f.write_all(&[0]).expect("flip");
    }
    let (code, out) = qemu_io(&s.socket, "disk0", &["read -P 0x5a 0 4k"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("read 4096/4096 bytes at offset 0"), "{out}");
    // N38: a wrong export name is reported by the client with the name.
    let out = Command::new(env!("CARGO_BIN_EXE_ballot"))
        .args(["check", "--blockdev"])
        .arg(format!(
            "driver=nbd,node-name=x,server.type=unix,server.path={},export=nosuch",
            dir.join("r0.sock").display()
        ))
        .output()
        .expect("ballot check");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "ballot: export 'nosuch' not found: No such file or directory\n"
    );
    drop(s);
    drop(replicas);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flipped_byte_is_outvoted_and_reported_on_the_qmp_socket() {
    use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
    use std::os::unix::net::UnixStream;
    if !peers::need(&["qemu-io"], "qemu-utils") {
        return;
    }
    let dir = scratch("qmp");
    for f in ["a.raw", "b.raw", "c.raw"] {
        std::fs::write(dir.join(f), vec![0x6bu8; 1 << 20]).expect("child image");
    }
    let socket = dir.join("nbd.sock");
    let qmp = dir.join("qmp.sock");
    let mut args: Vec<String> = vec!["serve".into()];
    for (i, f) in ["a.raw", "b.raw", "c.raw"].iter().enumerate() {
        args.push(format!(
            "--blockdev=driver=file,node-name=f{i},filename={}",
            dir.join(f).display()
        ));
    }
    args.push(r#"--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["f0","f1","f2"]}"#.into());
    args.push(format!(
        "--nbd-server=addr.type=unix,addr.path={}",
        socket.display()
    ));
    args.push("--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into());
    args.push(format!(
        "--chardev=socket,path={},server=on,wait=off,id=m0",
        qmp.display()
    ));
    args.push("--monitor=chardev=m0".into());
    let mut s = start_ballot(&args, &socket, &[&qmp]);
    let mon = UnixStream::connect(&qmp).expect("connect QMP");
    mon.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut lines = BufReader::new(mon.try_clone().expect("clone"));
    let mut line = String::new();
    let mut next = |lines: &mut BufReader<UnixStream>| -> serde_json::Value {
        line.clear();
        lines.read_line(&mut line).expect("QMP line");
        serde_json::from_str(&line).expect("QMP JSON")
    };
    let greeting = next(&mut lines);
    assert_eq!(greeting["QMP"]["capabilities"], serde_json::json!([]));
    (&mon)
        .write_all(b"{\"execute\": \"qmp_capabilities\", \"id\": 1}\n")
        .expect("send");
    assert_eq!(next(&mut lines), serde_json::json!({"return": {}, "id": 1}));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("b.raw"))
            .expect("open b");
        f.seek(SeekFrom::Start(1000)).expect("seek");
        f.write_all(&[0]).expect("flip");
    }
    let (code, out) = qemu_io(&s.socket, "disk0", &["read -P 0x6b 0 64k"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    let ev = next(&mut lines);
    assert_eq!(ev["event"], "QUORUM_REPORT_BAD");
    assert_eq!(
        ev["data"],
        serde_json::json!({"type": "read", "node-name": "f1", "sector-num": 0, "sectors-count": 128})
    );
    (&mon)
        .write_all(b"{\"execute\": \"quit\", \"id\": 2}\n")
        .expect("send quit");
    assert_eq!(next(&mut lines), serde_json::json!({"return": {}, "id": 2}));
    let status = s.child.wait().expect("wait for ballot serve");
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nbdinfo_sees_the_flags_block_sizes_list_and_map_of_n13_n19_n24() {
    if !peers::need(&["nbdinfo"], "libnbd-bin") {
        return;
    }
    let dir = scratch("nbdinfo");
    let mut s = peers::serve_disk0(&dir, 16 << 20);
    let uri = format!("nbd+unix:///disk0?socket={}", s.socket.display());
    // N19: exit 0 for yes, 2 for no (nbdinfo --can).
    for (cap, want) in [
        ("flush", 0),
        ("fua", 0),
        ("trim", 0),
        ("zero", 0),
        ("fast-zero", 2),
        ("df", 0),
        ("multi-conn", 0),
        ("cache", 0),
        ("write", 0),
    ] {
        let st = Command::new("nbdinfo")
            .args(["--can", cap, &uri])
            .status()
            .expect("nbdinfo --can");
        assert_eq!(st.code(), Some(want), "--can {cap}");
    }
    let json = Command::new("nbdinfo")
        .args(["--json", &uri])
        .output()
        .expect("nbdinfo --json");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(e["export-name"], "disk0");
    assert_eq!(e["export-size"], 16 << 20);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    // N24 through the quorum (Q44): the fresh sparse children read as zero holes.
    let map = Command::new("nbdinfo")
        .args(["--map", &uri])
        .output()
        .expect("nbdinfo --map");
    assert_eq!(
        String::from_utf8_lossy(&map.stdout),
        "         0    16777216    3  hole,zero\n"
    );
    let list = Command::new("nbdinfo")
        .args([
            "--list",
            &format!("nbd+unix://?socket={}", s.socket.display()),
        ])
        .output()
        .expect("nbdinfo --list");
    assert!(String::from_utf8_lossy(&list.stdout).contains("export=\"disk0\":"));
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert_eq!(s.child.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
