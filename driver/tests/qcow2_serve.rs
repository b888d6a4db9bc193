//! Issue 19 with real processes: `ballot serve` exports a qcow2 image; qemu-io writes through
//! NBD; the server is killed with SIGKILL in the middle of unflushed allocating writes, and
//! the image then passes `qemu-img check` with no errors (exit 0, or 3 when the kill left only
//! leaked clusters), holds every write flushed before the kill, and serves again.

mod peers;

use std::process::{Command, Stdio};
use std::time::Duration;

use peers::{qemu_io, scratch, start_ballot};

#[test]
fn a_killed_server_leaves_a_qcow2_image_that_checks_and_keeps_flushed_writes() {
    if !peers::need(&["qemu-io", "qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch("qcow2-serve");
    let img = dir.join("vm.qcow2");
    let base = dir.join("base.raw");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&base)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_ballot"))
        .args(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw"])
        .arg(&img)
        .output()
        .expect("ballot create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = dir.join("d0.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", img.display()),
        "--blockdev".into(),
        "driver=qcow2,node-name=d0,file=f0".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", socket.display()),
        "--export".into(),
        "type=nbd,id=e0,node-name=d0,name=d0,writable=on".into(),
    ];
    let mut served = start_ballot(&args, &socket, &[]);
    // Flushed: 8 MiB of 0x5a at 1 MiB.
    let (code, text) = qemu_io(&socket, "d0", &["write -P 0x5a 1M 8M", "flush"]);
    assert_eq!(code, 0, "{text}");
    // Unflushed allocating writes all over the disk, killed part way.
    let uri = format!("nbd+unix:///d0?socket={}", socket.display());
    let mut cmds = Vec::new();
    for i in 0..400u64 {
        cmds.push("-c".to_string());
        cmds.push(format!(
            "write -P 0x{:02x} {} 4k",
            0x10 + i % 0x40,
            16 * 1024 * 1024 + i * 97 * 1024
        ));
    }
    let writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(&cmds)
        .arg(&uri)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(150));
    served.child.kill().expect("SIGKILL");
    let _ = served.child.wait();
    let mut writer = writer;
    let _ = writer.wait();
    let _ = std::fs::remove_file(&socket);
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .expect("qemu-img");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
        "qemu-img check after SIGKILL: {text}"
    );
    // The flushed write survived; ballot serves the image again.
    let mut served = start_ballot(&args, &socket, &[]);
    let (code, text) = qemu_io(&socket, "d0", &["read -P 0x5a 1M 8M", "read -P 0 0 1M"]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(served.terminate(), Some(0));
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .expect("qemu-img");
    assert!(matches!(out.status.code(), Some(0) | Some(3)));
    let _ = std::fs::remove_dir_all(&dir);
}
