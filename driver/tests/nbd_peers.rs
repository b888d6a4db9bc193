//! `ballot serve` as the server for real NBD and QMP clients (NBD.md §8 rows 1–7 and 14, issue 4
//! item 4): qemu-io's option order and compliance traces, qemu-img convert and compare, nbdcopy
//! of 1 GiB each way over two connections, an nbdsh script for opt mode, simple replies, plain
//! newstyle and N20's error for each bad request, fio's nbd engine with crc32c verification,
//! and the `qemu.qmp` Python library against the monitor. Every server is stopped by its PID.

mod peers;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use peers::{nbd_server_arg, need, quorum_args, scratch, serve_disk0, start_ballot, uri};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// `len` bytes of a fixed pseudo-random stream (xorshift64*), so copies can be compared.
fn write_random_file(path: &Path, len: u64, seed: u64) -> [u8; 32] {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create source"));
    let mut x = seed | 1;
    let mut block = vec![0u8; MIB as usize];
    let mut h = Sha256::new();
    for _ in 0..len / MIB {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        h.update(&block);
        f.write_all(&block).expect("write source");
    }
    f.flush().expect("flush source");
    h.finalize().into()
}

fn sha256_file(path: &Path) -> [u8; 32] {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize().into();
        }
        h.update(&buf[..n]);
    }
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Row 1: qemu 10 asks for EXTENDED_HEADERS first and falls back (N15); the option order is
/// 11 → unsupported, 8, 10, 7; qemu's compliance trace points stay silent.
#[test]
fn qemu_io_option_order_and_compliance_traces() {
    if !need(&["qemu-io"], "qemu-utils") {
        return;
    }
    let dir = scratch("qemu-trace");
    let mut s = serve_disk0(&dir, 4 * MIB);
    let socket = s.socket.clone();
    let (code, _, err) = run(Command::new("qemu-io")
        .args(["-f", "raw", "-T", "nbd_send_option_request", "-T"])
        .arg("nbd_receive_option_reply")
        .args(["-c", "read 0 4k"])
        .arg(uri(&socket, "disk0")));
    assert_eq!(code, 0, "{err}");
    let options: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("nbd_send_option_request Sending option request "))
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(options, ["11", "8", "10", "7"], "{err}");
    assert!(
        err.contains(
            "Received option reply 11 (extended headers), type 2147483649 (unsupported), len 0"
        ),
        "{err}"
    );
    let (code, out, err) = run(Command::new("qemu-io")
        .args(["-f", "raw", "-T", "nbd_*compliance"])
        .args(["-c", "write -P 0x33 0 64k", "-c", "read -P 0x33 0 64k"])
        .args([
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "flush",
        ])
        .arg(uri(&socket, "disk0")));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(err, "", "compliance trace points fired");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(s.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Row 2: qemu-img convert into the served quorum and back out, compare with the source.
#[test]
fn qemu_img_convert_in_and_out_and_compare() {
    if !need(&["qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch("qemu-img");
    let src = dir.join("src.raw");
    let digest = write_random_file(&src, 32 * MIB, 7);
    let mut s = serve_disk0(&dir, 32 * MIB);
    let socket = s.socket.clone();
    let u = uri(&socket, "disk0");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&u));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&u));
    assert_eq!((code, out.trim()), (0, "Images are identical."), "{err}");
    let back = dir.join("back.qcow2");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&u)
        .arg(&back));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&back)
        .arg(&src));
    assert_eq!((code, out.trim()), (0, "Images are identical."));
    for f in ["a.raw", "b.raw", "c.raw"] {
        assert_eq!(sha256_file(&dir.join(f)), digest, "child {f}");
    }
    assert_eq!(s.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Row 4: nbdcopy 1 GiB in and out over 2 connections × 64 requests, with `--flush`.
#[test]
fn nbdcopy_one_gib_in_and_out_over_two_connections() {
    if !need(&["nbdcopy"], "libnbd-bin") {
        return;
    }
    let dir = scratch("nbdcopy");
    let src = dir.join("src.bin");
    let digest = write_random_file(&src, 1024 * MIB, 11);
    let mut s = serve_disk0(&dir, 1024 * MIB);
    let socket = s.socket.clone();
    let u = uri(&socket, "disk0");
    let (code, out, err) = run(Command::new("nbdcopy")
        .args(["--flush", "--connections=2", "--requests=64"])
        .arg(&src)
        .arg(&u));
    assert_eq!(code, 0, "{out}{err}");
    let out_path = dir.join("out.bin");
    let (code, out, err) = run(Command::new("nbdcopy")
        .args(["--connections=2", "--requests=64"])
        .arg(&u)
        .arg(&out_path));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        sha256_file(&out_path),
        digest,
        "read-out differs from the source"
    );
    // N27, N33: after the flush and SIGTERM every child holds the data.
    assert_eq!(s.terminate(), Some(0));
    for f in ["a.raw", "b.raw", "c.raw"] {
        assert_eq!(sha256_file(&dir.join(f)), digest, "child {f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Row 5: the nbdsh script in tests/peers (opt mode, simple replies, plain newstyle, each bad
/// request's N20 error on a handle that stays usable, a DF read, a read below quorum); and
/// row 3's `--list` with descriptions.
#[test]
fn nbdsh_script_and_list_with_descriptions() {
    if !need(&["nbdsh", "nbdinfo"], "python3-libnbd and libnbd-bin") {
        return;
    }
    let dir = scratch("nbdsh");
    // Three children that disagree on [1 MiB, 1 MiB + 64 KiB): no version has two votes.
    for (f, v) in [("a.raw", 0x11u8), ("b.raw", 0x22), ("c.raw", 0x33)] {
        let mut img = vec![0u8; 64 << 20];
        img[1 << 20..(1 << 20) + 65536].fill(v);
        std::fs::write(dir.join(f), img).expect("child");
    }
    std::fs::File::create(dir.join("d.raw"))
        .and_then(|f| f.set_len(4 * MIB))
        .expect("direct child");
    let socket = dir.join("nbd.sock");
    let args = quorum_args(
        &dir,
        64 * MIB,
        &[
            format!(
                "--blockdev=driver=file,node-name=d0,filename={},cache.direct=on",
                dir.join("d.raw").display()
            ),
            nbd_server_arg(&socket),
            "--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on,description=three-way quorum".into(),
            "--export=type=nbd,id=e1,node-name=q0,name=ro0".into(),
            "--export=type=nbd,id=e2,node-name=d0,name=direct0,writable=on".into(),
        ],
    );
    let mut s = start_ballot(&args, &socket, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/nbdsh_rules.py");
    // N49: nbdsh runs the python3 first on PATH, which must be the one with the nbd module.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let (code, out, err) = run(Command::new("nbdsh")
        .env("PATH", path)
        .env("BALLOT_SOCK", &socket)
        .args(["-n", "-c"])
        .arg(format!("exec(open({script:?}).read())")));
    assert_eq!(
        (code, out.as_str()),
        (0, "nbdsh: 59 checks passed\n"),
        "{err}"
    );
    let (code, out, err) = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", socket.display())));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("export=\"disk0\":\n\tdescription: three-way quorum\n"),
        "{out}"
    );
    assert_eq!(out.matches("export=").count(), 3, "{out}");
    assert_eq!(s.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Row 7: fio's nbd engine: 4k random write QD32 verified with crc32c, 4k random read QD32,
/// 1M sequential write QD8 verified; every job without error.
#[test]
fn fio_nbd_engine_random_and_sequential_with_crc32c_verify() {
    if !need(&["fio"], "fio") {
        return;
    }
    let dir = scratch("fio");
    let mut s = serve_disk0(&dir, 64 * MIB);
    let socket = s.socket.clone();
    let job = dir.join("job.fio");
    std::fs::write(
        &job,
        format!(
            "[global]\nioengine=nbd\nuri={}\nsize=64M\n\
             [randwrite-verify]\nrw=randwrite\nbs=4k\niodepth=32\nverify=crc32c\n\
             [randread]\nstonewall\nrw=randread\nbs=4k\niodepth=32\nruntime=2\ntime_based=1\n\
             [seqwrite-verify]\nstonewall\nrw=write\nbs=1M\niodepth=8\nverify=crc32c\n",
            uri(&socket, "disk0")
        ),
    )
    .expect("job file");
    let report = dir.join("fio.json");
    // fio writes its verify state files to its working directory: the scratch one.
    let (code, out, err) = run(Command::new("fio")
        .current_dir(&dir)
        .arg("--output-format=json")
        .arg(format!("--output={}", report.display()))
        .arg(&job));
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("fio report")).expect("fio JSON");
    let jobs = v["jobs"].as_array().expect("jobs");
    let names: Vec<&str> = jobs.iter().filter_map(|j| j["jobname"].as_str()).collect();
    assert_eq!(names, ["randwrite-verify", "randread", "seqwrite-verify"]);
    for j in jobs {
        assert_eq!(j["error"], 0, "{}", j["jobname"]);
    }
    // Each verify job wrote the whole 64 MiB and read all of it back.
    for i in [0, 2] {
        assert_eq!(
            jobs[i]["write"]["io_bytes"],
            64 * MIB,
            "{}",
            jobs[i]["jobname"]
        );
        assert_eq!(
            jobs[i]["read"]["io_bytes"],
            64 * MIB,
            "{}",
            jobs[i]["jobname"]
        );
    }
    assert!(jobs[1]["read"]["io_bytes"].as_u64().unwrap_or(0) > 0);
    assert_eq!(s.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 4 item 4: the `qemu.qmp` package, unchanged, drives the monitor (script in
/// tests/peers). `.ci/run` installs it into `target/pydeps`.
#[test]
fn qemu_qmp_python_library_against_the_monitor() {
    if !need(&["python3", "qemu-io"], "qemu-utils") {
        return;
    }
    let pydeps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pydeps");
    if !pydeps.join("qemu/qmp").exists() {
        let msg = format!(
            "qemu.qmp not in {} (.ci/run: python3 -m pip install --target target/pydeps qemu.qmp)",
            pydeps.display()
        );
        peers::missing(&msg);
        return;
    }
    let dir = scratch("qemu-qmp");
    for f in ["a.raw", "b.raw", "c.raw", "d.raw"] {
        std::fs::File::create(dir.join(f))
            .and_then(|file| file.set_len(MIB))
            .expect("child");
    }
    let qmp = dir.join("qmp.sock");
    let socket = dir.join("nbd.sock");
    let args = quorum_args(
        &dir,
        MIB,
        &[
            nbd_server_arg(&socket),
            format!(
                "--chardev=socket,path={},server=on,wait=off,id=m0",
                qmp.display()
            ),
            "--monitor=chardev=m0".into(),
        ],
    );
    let mut s = start_ballot(&args, &socket, &[&qmp]);
    let (code, out, err) = run(Command::new("python3")
        .env("PYTHONPATH", &pydeps)
        .env("BALLOT_QMP", &qmp)
        .env("BALLOT_DIR", &dir)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/qemu_qmp_client.py"
        )));
    assert_eq!(
        (code, out.as_str()),
        (0, "qemu.qmp: 15 checks passed\n"),
        "{err}"
    );
    // The script ended with `quit`: the server exits 0 by itself.
    assert_eq!(s.child.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Row 14: ballot in both roles: three `ballot serve` replicas, each exporting one file, and a
/// fourth `ballot serve` whose quorum takes them as `driver=nbd` children; qemu-io writes and
/// reads through the front one, every replica file holds the data, and a replica whose file
/// disagrees is outvoted.
#[test]
fn quorum_over_three_ballot_replicas() {
    if !need(&["qemu-io"], "qemu-utils") {
        return;
    }
    let dir = scratch("ballot-replicas");
    let mut replicas = Vec::new();
    let mut front: Vec<String> = vec!["serve".into()];
    for i in 0..3 {
        let img = dir.join(format!("r{i}.raw"));
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(8 * MIB))
            .expect("replica image");
        let sock = dir.join(format!("r{i}.sock"));
        let args: Vec<String> = vec![
            "serve".into(),
            format!(
                "--blockdev=driver=file,node-name=f0,filename={}",
                img.display()
            ),
            nbd_server_arg(&sock),
            "--export=type=nbd,id=e0,node-name=f0,name=replica,writable=on".into(),
        ];
        replicas.push(start_ballot(&args, &sock, &[]));
        front.push(format!(
            "--blockdev=driver=nbd,node-name=n{i},server.type=unix,server.path={},export=replica,request-timeout=10",
            sock.display()
        ));
    }
    let socket = dir.join("front.sock");
    front.push(r#"--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["n0","n1","n2"]}"#.into());
    front.push(nbd_server_arg(&socket));
    front.push("--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into());
    let mut s = start_ballot(&front, &socket, &[]);
    let (code, out) = peers::qemu_io(
        &socket,
        "disk0",
        &["write -P 0x9c 0 1M", "flush", "read -P 0x9c 0 1M"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    for i in 0..3 {
        let img = std::fs::read(dir.join(format!("r{i}.raw"))).expect("replica");
        assert_eq!(&img[..1 << 20], &vec![0x9cu8; 1 << 20][..], "replica {i}");
    }
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("r2.raw"))
            .expect("open r2");
        f.seek(SeekFrom::Start(512)).expect("seek");
        f.write_all(&[0]).expect("flip");
    }
    let (code, out) = peers::qemu_io(&socket, "disk0", &["read -P 0x9c 0 4k"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(s.terminate(), Some(0));
    for mut r in replicas {
        assert_eq!(r.terminate(), Some(0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Undoes what the nbdfuse test set up, in reverse order, even when it fails half-way.
struct FuseStack {
    fs_mount: Option<std::path::PathBuf>,
    loop_dev: Option<String>,
    fuse_mount: std::path::PathBuf,
    nbdfuse: Option<std::process::Child>,
}

impl Drop for FuseStack {
    fn drop(&mut self) {
        if let Some(m) = self.fs_mount.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(l) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        let _ = Command::new("umount").arg(&self.fuse_mount).status();
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Row 6 (N51): a kernel block device on top of `ballot serve`: nbdfuse exposes the export as
/// a file, a loop device makes it a disk, mkfs.ext4, mount, write, unmount, `fsck -n` clean,
/// mount again and read back. Skipped with the reason where FUSE, loop devices or mounting are
/// not permitted.
#[test]
fn nbdfuse_loop_ext4_round_trip_where_permitted() {
    if !need(&["nbdfuse"], "libnbd-bin") {
        return;
    }
    let skip = |why: &str| eprintln!("skipped (N51): {why}");
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        return skip("no /dev/fuse or /dev/loop-control");
    }
    let dir = scratch("nbdfuse");
    let mut s = serve_disk0(&dir, 64 * MIB);
    let socket = s.socket.clone();
    let fuse_mount = dir.join("fuse");
    let fs_mount = dir.join("fs");
    std::fs::create_dir_all(&fuse_mount).expect("fuse dir");
    std::fs::create_dir_all(&fs_mount).expect("fs dir");
    let mut stack = FuseStack {
        fs_mount: None,
        loop_dev: None,
        fuse_mount: fuse_mount.clone(),
        nbdfuse: None,
    };
    let file = fuse_mount.join("nbd");
    stack.nbdfuse = Command::new("nbdfuse")
        .arg(&file)
        .arg(uri(&socket, "disk0"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != 64 * MIB {
        if std::time::Instant::now() > deadline {
            drop(stack);
            return skip("nbdfuse could not mount (FUSE not permitted?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out, err) = run(Command::new("losetup").arg("-f").arg("--show").arg(&file));
    if code != 0 {
        drop(stack);
        return skip(&format!("losetup refused: {err}"));
    }
    let dev = out.trim().to_string();
    stack.loop_dev = Some(dev.clone());
    let (code, _, err) = run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
    assert_eq!(code, 0, "mkfs.ext4: {err}");
    let (code, _, err) = run(Command::new("mount").arg(&dev).arg(&fs_mount));
    if code != 0 {
        drop(stack);
        return skip(&format!("mount refused: {err}"));
    }
    stack.fs_mount = Some(fs_mount.clone());
    let payload: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    std::fs::write(fs_mount.join("hello.bin"), &payload).expect("write through ext4");
    let (code, _, err) = run(Command::new("umount").arg(&fs_mount));
    assert_eq!(code, 0, "umount: {err}");
    stack.fs_mount = None;
    let (code, out, err) = run(Command::new("fsck.ext4").args(["-n", "-f", &dev]));
    assert_eq!(code, 0, "fsck: {out}{err}");
    let (code, _, err) = run(Command::new("mount").arg(&dev).arg(&fs_mount));
    assert_eq!(code, 0, "mount again: {err}");
    stack.fs_mount = Some(fs_mount.clone());
    assert_eq!(
        std::fs::read(fs_mount.join("hello.bin")).expect("read back"),
        payload
    );
    drop(stack);
    assert_eq!(s.terminate(), Some(0));
    // The filesystem reached every replica: the children agree byte for byte.
    assert_eq!(
        sha256_file(&dir.join("a.raw")),
        sha256_file(&dir.join("b.raw"))
    );
    assert_eq!(
        sha256_file(&dir.join("a.raw")),
        sha256_file(&dir.join("c.raw"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
