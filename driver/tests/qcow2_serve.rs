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

/// Issue 19: QMP `blockdev-create`, as libvirt drives QEMU: a `file` job makes the file, a
/// `qcow2` job formats the file node, the image is then added, exported and written; QEMU's
/// tools accept it. Bad options are refused at once with QEMU's wording, and a job that fails
/// concludes with its reason in `query-jobs`.
#[test]
fn blockdev_create_over_qmp_makes_an_image_qemu_accepts() {
    use peers::Qmp;
    use serde_json::json;
    if !peers::need(&["qemu-io", "qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch("qcow2-blockdev-create");
    let img = dir.join("vm.qcow2");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x33u8; 1 << 20]).expect("base");
    let socket = dir.join("nbd.sock");
    let qmp = dir.join("qmp.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        peers::nbd_server_arg(&socket),
        format!(
            "--chardev=socket,path={},server=on,wait=off,id=m0",
            qmp.display()
        ),
        "--monitor=chardev=m0".into(),
    ];
    let mut served = start_ballot(&args, &socket, &[&qmp]);
    let mut q = Qmp::connect(&qmp);
    // Runs a create job to its end; returns its query-jobs entry and dismisses it.
    let run_job = |q: &mut Qmp, id: &str, options: serde_json::Value| {
        q.execute("blockdev-create", json!({"job-id": id, "options": options}));
        let mut entry = json!(null);
        for _ in 0..200 {
            let jobs = q.execute("query-jobs", json!({}));
            entry = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["id"] == id).cloned())
                .expect("the job is listed until dismissed");
            if entry["status"] == "concluded" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(q.execute("job-dismiss", json!({"id": id})), json!({}));
        entry
    };
    let done = run_job(
        &mut q,
        "c-file",
        json!({"driver": "file", "filename": img.display().to_string(), "size": 0}),
    );
    assert_eq!(done["status"], "concluded");
    assert_eq!(done["type"], "create");
    assert_eq!(done.get("error"), None, "{done}");
    assert_eq!(std::fs::metadata(&img).expect("made").len(), 0);
    q.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f0", "filename": img.display().to_string()}),
    );
    let done = run_job(
        &mut q,
        "c-fmt",
        json!({"driver": "qcow2", "file": "f0", "size": 64 << 20, "version": "v3",
               "cluster-size": 65536, "refcount-bits": 16,
               "backing-file": "base.raw", "backing-fmt": "raw"}),
    );
    assert_eq!(done.get("error"), None, "{done}");
    // A generic job: query-block-jobs never lists it; its events are JOB_STATUS_CHANGE.
    assert_eq!(q.execute("query-block-jobs", json!({})), json!([]));
    let statuses: Vec<String> = q
        .events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == "c-fmt")
        .map(|e| e["data"]["status"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(statuses, ["created", "running", "concluded", "null"]);
    assert!(
        !q.events.iter().any(|e| e["event"] == "BLOCK_JOB_COMPLETED"),
        "{:?}",
        q.events
    );
    // The new image opens with its backing file (named relative to the image) and serves.
    q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "d0", "file": "f0"}),
    );
    q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "d0", "name": "d0", "writable": true}),
    );
    let (code, text) = qemu_io(
        &socket,
        "d0",
        &["read -P 0x33 0 1M", "write -P 0x77 4M 1M", "flush"],
    );
    assert_eq!(code, 0, "{text}");
    // Bad options: refused at once, in QEMU's words, and no job is left behind.
    let refuse = |q: &mut Qmp, options: serde_json::Value| -> String {
        let e = q
            .try_execute(
                "blockdev-create",
                json!({"job-id": "bad", "options": options}),
            )
            .expect_err("refused");
        assert_eq!(e["class"], "GenericError");
        e["desc"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(
        refuse(
            &mut q,
            json!({"driver": "qcow2", "file": "f0", "size": 1 << 20, "cluster-size": 3000})
        ),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(
        refuse(
            &mut q,
            json!({"driver": "qcow2", "file": "zz", "size": 1 << 20})
        ),
        "Cannot find device='zz' nor node-name='zz'"
    );
    assert_eq!(
        refuse(&mut q, json!({"driver": "qcow2", "file": "f0"})),
        "Parameter 'options.size' is missing"
    );
    assert_eq!(
        refuse(
            &mut q,
            json!({"driver": "qcow2", "file": "f0", "size": 1000})
        ),
        "Image size must be a multiple of 512 bytes"
    );
    assert_eq!(
        refuse(
            &mut q,
            json!({"driver": "vmdk", "file": "f0", "size": 1 << 20})
        ),
        "Driver 'vmdk' does not support blockdev-create (ballot creates file and qcow2)"
    );
    // The image's own file node is in use now (d0 reads it): formatting it again is refused.
    assert_eq!(
        refuse(&mut q, json!({"driver": "qcow2", "file": "f0", "size": 1 << 20})),
        "Node 'f0' is in use by node 'd0' (as its 'file'): blockdev-create needs a node nothing else uses"
    );
    assert_eq!(q.execute("query-jobs", json!({})), json!([]));
    // A job that fails concludes with the reason.
    let done = run_job(
        &mut q,
        "c-missing",
        json!({"driver": "file", "filename": dir.join("no/such/dir.img").display().to_string(), "size": 0}),
    );
    assert_eq!(
        done["error"],
        format!(
            "Could not create '{}': No such file or directory",
            dir.join("no/such/dir.img").display()
        )
    );
    drop(q);
    assert_eq!(served.terminate(), Some(0));
    // QEMU's tools agree: the image checks clean, names its backing file, holds the writes.
    let out = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&img)
        .output()
        .expect("qemu-img check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x77 4M 1M",
            "-c",
            "read -P 0x33 0 1M",
        ])
        .arg(&img)
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
