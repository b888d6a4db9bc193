//! HEALING.md §5–6 with real processes: `ballot metadata create` makes a metadata node,
//! `ballot serve` uses it; SIGKILL leaves it unclean with the written extents marked (H21),
//! `ballot metadata show` says so, and the next start recovers them (H22: the children end
//! byte-identical although one of them diverged inside an intent extent) before reporting
//! every child in sync; SIGTERM leaves it clean (H23). qemu-img cannot write the metadata
//! file while ballot holds it (H25). The command's bad input is refused with the problem named.

mod peers;

use std::path::Path;
use std::time::{Duration, Instant};

use peers::{ballot, need, qemu_io, scratch, start_ballot, Qmp, Served};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

fn serve(dir: &Path) -> Served {
    let socket = dir.join("nbd.sock");
    let qmp = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let mut args: Vec<String> = vec!["serve".into()];
    for i in 0..3 {
        args.push(format!(
            "--blockdev=driver=file,node-name=f{i},filename={}",
            dir.join(format!("c{i}.raw")).display()
        ));
    }
    args.push(format!(
        "--blockdev=driver=file,node-name=md,filename={}",
        dir.join("q.meta").display()
    ));
    args.push(r#"--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["f0","f1","f2"],"metadata":"md"}"#.into());
    args.push(peers::nbd_server_arg(&socket));
    args.push("--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into());
    args.push(format!(
        "--chardev=socket,path={},server=on,wait=off,id=m0",
        qmp.display()
    ));
    args.push("--monitor=chardev=m0".into());
    start_ballot(&args, &socket, &[&qmp])
}

fn show(dir: &Path) -> String {
    let (code, out, err) = ballot(&[
        "metadata",
        "show",
        &dir.join("q.meta").display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    out
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no '{key}' in {out}"))
}

#[test]
fn sigkill_leaves_intent_extents_that_the_next_start_recovers_and_sigterm_leaves_it_clean() {
    if !need(&["qemu-io", "qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch("crash-recovery");
    for i in 0..3 {
        std::fs::File::create(dir.join(format!("c{i}.raw")))
            .and_then(|f| f.set_len(SIZE))
            .expect("child image");
    }
    let meta = dir.join("q.meta").display().to_string();
    let (code, out, err) = ballot(&[
        "metadata",
        "create",
        &meta,
        "--size",
        "32M",
        "--children",
        "f0,f1,f2",
        "--in-sync",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("created '{meta}': 28672 bytes for a quorum of {SIZE} bytes, children f0,f1,f2 (room for 4), children in sync\n")
    );
    let mut s = serve(&dir);
    // H25: the metadata file is locked like the images.
    let o = std::process::Command::new("qemu-img")
        .args(["info", "-U", &meta])
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &meta])
        .output()
        .expect("qemu-io");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (code, out) = qemu_io(
        &s.socket,
        "disk0",
        &["write -P 0x5a 4M 128k", "write -P 0x77 20M 64k", "flush"],
    );
    assert_eq!(code, 0, "{out}");
    peers::signal(s.child.id(), libc::SIGKILL);
    let _ = s.child.wait();
    drop(s);
    let out = show(&dir);
    assert_eq!(line(&out, "clean:"), "clean: no");
    assert_eq!(
        line(&out, "dirty intent extents:"),
        "dirty intent extents: 2 (4194304 bytes each): 1,5"
    );
    // A write that was in flight at the crash reached one child only.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("c2.raw"))
            .expect("c2");
        f.write_all_at(&[0xee; 4096], 20 * MIB + 8192)
            .expect("diverge c2");
    }
    let mut s = serve(&dir);
    let mut q = Qmp::connect(&dir.join("qmp.sock"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let oos = q.execute(
            "x-query-quorum-out-of-sync",
            serde_json::json!({"node-name": "q0"}),
        );
        let jobs = q.execute("query-jobs", serde_json::json!({}));
        let in_sync = oos
            .as_array()
            .expect("list")
            .iter()
            .all(|c| c["state"] == "in-sync");
        if in_sync && jobs.as_array().is_some_and(|j| j.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recovery did not finish: {oos} {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("ballot-stderr.log")).expect("stderr log");
    assert!(
        log.contains("ballot: quorum 'q0' was not shut down cleanly: 2 write-intent extents out of sync on every child, resync with recover=lowest (docs/healing.md H22)"),
        "{log}"
    );
    assert_eq!(s.terminate(), Some(0));
    let out = show(&dir);
    assert_eq!(line(&out, "clean:"), "clean: yes");
    assert_eq!(
        line(&out, "dirty intent extents:"),
        "dirty intent extents: 0 (4194304 bytes each)"
    );
    for i in 0..3 {
        assert_eq!(
            line(&out, &format!("  {i} ")),
            format!("  {i} f{i}: out-of-sync 0 bytes (0 granules)")
        );
    }
    let images: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(dir.join(format!("c{i}.raw"))).expect("image"))
        .collect();
    assert!(
        images[0] == images[1] && images[1] == images[2],
        "children differ"
    );
    assert_eq!(
        images[2][(20 * MIB + 8192) as usize],
        0x77,
        "the vote's version wins"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metadata_command_bad_input_is_named() {
    let dir = scratch("metadata-cli");
    let meta = dir.join("m").display().to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["metadata", "create", &meta, "--children", "a,b"],
            2,
            "ballot: --size is missing",
        ),
        (
            &[
                "metadata",
                "create",
                &meta,
                "--size",
                "1Q",
                "--children",
                "a",
            ],
            2,
            "ballot: size '1Q': unknown suffix 'Q' (use K, M, G, T)",
        ),
        (
            &[
                "metadata",
                "create",
                &meta,
                "--size",
                "1G",
                "--children",
                "a,,b",
            ],
            2,
            "ballot: --children 'a,,b': an empty node-name",
        ),
        (
            &[
                "metadata",
                "create",
                &meta,
                "--size",
                "1G",
                "--children",
                "a,a",
            ],
            2,
            "ballot: --children names 'a' twice",
        ),
        (
            &[
                "metadata",
                "create",
                &meta,
                "--size",
                "1G",
                "--children",
                "a,b",
                "--max-children",
                "1",
            ],
            2,
            "ballot: --max-children 1 is fewer than the 2 children",
        ),
    ];
    for (args, code, first) in cases {
        let (c, _, err) = ballot(args);
        assert_eq!(
            (c, err.lines().next().unwrap_or("")),
            (*code, *first),
            "{args:?}"
        );
    }
    let (c, _, _) = ballot(&[
        "metadata",
        "create",
        &meta,
        "--size",
        "1G",
        "--children",
        "a,b",
    ]);
    assert_eq!(c, 0);
    let (c, _, err) = ballot(&[
        "metadata",
        "create",
        &meta,
        "--size",
        "1G",
        "--children",
        "a,b",
    ]);
    assert_eq!(
        (c, err.trim_end()),
        (1, format!("ballot: Could not create '{meta}': File exists (os error 17) (--force replaces it)").as_str())
    );
    // Without --in-sync every granule starts out of sync: 16384 granules of 1 GiB.
    let out = {
        let (c, out, err) = ballot(&["metadata", "show", &meta]);
        assert_eq!(c, 0, "{err}");
        out
    };
    assert_eq!(
        line(&out, "  1 "),
        "  1 b: out-of-sync 1073741824 bytes (16384 granules)"
    );
    std::fs::write(&meta, b"not metadata").expect("garbage");
    let (c, _, err) = ballot(&["metadata", "show", &meta]);
    assert_eq!(
        (c, err.trim_end()),
        (
            1,
            format!("ballot: '{meta}': 12 bytes is shorter than the two header slots (8192 bytes)")
                .as_str()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}
