//! `ballot libvirt` end to end (issue 8): the proposal's quorum disk XML is imported, the
//! printed `ballot serve` command is run as printed (through `sh`), and `--run` starts the same
//! server; qemu-io writes and reads the export and every replica holds the data. The printed
//! `<disk type='network'>` element is validated against libvirt's schema (virt-xml-validate).

mod peers;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ballot::libvirt::{import, parse_xml};
use peers::{ballot, qemu_io, scratch, start_ballot, wait_for, Served};

const MIB: u64 = 1 << 20;

/// The proposal's element exactly as the seed document writes it (a copy under
/// `tests/data/`): unquoted threshold, unclosed backingStores and disk, qcow2 images under
/// /var/lib/libvirt/images.
fn proposal() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libvirt-proposal.xml");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The proposal's element unchanged but for the image directory (relative to the XML, in
/// `dir`), with three qcow2 images made by qemu-img; the second is an overlay of a raw base,
/// so its chain is followed.
fn proposal_qcow2(dir: &Path) -> PathBuf {
    let xml = proposal().replace("/var/lib/libvirt/images/", "images/");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let img = |n: &str| images.join(n).display().to_string();
    let run = |args: &[&str]| {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["create", "-q", "-f", "raw", &img("base.raw"), "8M"]);
    run(&["create", "-q", "-f", "qcow2", &img("file1.qcow2"), "8M"]);
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &img("file2.qcow2"),
    ]);
    run(&["create", "-q", "-f", "qcow2", &img("file3.qcow2"), "8M"]);
    let path = dir.join("disk.xml");
    std::fs::write(&path, xml).expect("write xml");
    path
}

/// The proposal's element with raw images at paths relative to the XML, written to `dir`.
fn proposal_xml(dir: &Path) -> PathBuf {
    let xml = proposal()
        .replace("qcow2", "raw")
        .replace("/var/lib/libvirt/images/", "images/");
    std::fs::create_dir_all(dir.join("images")).expect("images dir");
    for f in ["file1.raw", "file2.raw", "file3.raw"] {
        std::fs::File::create(dir.join("images").join(f))
            .and_then(|file| file.set_len(8 * MIB))
            .expect("replica");
    }
    let path = dir.join("disk.xml");
    std::fs::write(&path, xml).expect("write xml");
    path
}

fn write_and_check(served: &Served, dir: &Path, byte: u8, off: u64) {
    let (code, out) = qemu_io(
        &served.socket,
        "vda",
        &[
            &format!("write -P {byte:#x} {off} 1M"),
            "flush",
            &format!("read -P {byte:#x} {off} 1M"),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(
        out.contains(&format!("read 1048576/1048576 bytes at offset {off}")),
        "{out}"
    );
    for f in ["file1.raw", "file2.raw", "file3.raw"] {
        let data = std::fs::read(dir.join("images").join(f)).expect("replica");
        let r = off as usize..(off + MIB) as usize;
        assert!(data[r].iter().all(|b| *b == byte), "{f} lacks the write");
    }
}

#[test]
fn the_proposals_xml_gives_three_qcow2_children() {
    let xml = proposal();
    let roots = parse_xml(&xml).expect("tolerant parse");
    let disk = &roots[0];
    assert_eq!(disk.name, "disk");
    assert_eq!(disk.all("backingStore").count(), 3, "siblings, not a chain");
    assert_eq!(
        disk.first("threshold").and_then(|t| t.attr("value")),
        Some("2")
    );
    assert_eq!(
        disk.first("target").and_then(|t| t.attr("dev")),
        Some("vda"),
        "the <target> after the last unclosed backingStore belongs to the disk"
    );
    assert!(disk.all("backingStore").all(|b| b
        .children
        .iter()
        .map(|c| c.name.as_str())
        .eq(["format", "source"])));
    let d = import(&xml, Path::new("/x"), None).expect("qcow2 children");
    assert_eq!(
        d.replicas
            .iter()
            .map(|r| r.format.as_str())
            .collect::<Vec<_>>(),
        ["qcow2", "qcow2", "qcow2"]
    );
    let raw = xml.replace("qcow2", "raw");
    let d = import(&raw, Path::new("/x"), None).expect("raw children");
    assert_eq!(d.threshold, 2);
    assert_eq!(d.target.as_deref(), Some("vda"));
    let paths: Vec<String> = d
        .replicas
        .iter()
        .map(|r| r.path.display().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "/var/lib/libvirt/images/file1.raw",
            "/var/lib/libvirt/images/file2.raw",
            "/var/lib/libvirt/images/file3.raw"
        ]
    );
}

#[test]
fn the_proposals_disk_is_served_as_printed_and_with_run() {
    if !peers::need(&["qemu-io"], "qemu-utils") {
        return;
    }
    let dir = scratch("libvirt");
    let xml = proposal_xml(&dir);
    let socket = dir.join("vda.sock");
    // 1. The printed command line, run by a shell exactly as printed.
    let (code, printed, note) = ballot(&["libvirt", "import", xml.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{note}");
    assert!(printed.starts_with("ballot serve \\\n"), "{printed}");
    assert!(
        printed.contains(&format!(
            "--nbd-server=addr.type=unix,addr.path={}",
            socket.display()
        )),
        "the default socket sits beside the XML: {printed}"
    );
    assert_eq!(
        note.trim(),
        format!(
            "# attach it to a domain with: ballot libvirt disk-xml --export vda --target vda --socket {}",
            socket.display()
        )
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_ballot"));
    let script = format!("exec {}{}", bin.display(), &printed["ballot".len()..]);
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sh-stderr.log")).expect("log"))
        .spawn()
        .expect("sh");
    let mut served = Served {
        child,
        socket: socket.clone(),
    };
    wait_for(&[&socket], "the printed ballot serve");
    write_and_check(&served, &dir, 0xab, 0);
    assert_eq!(served.terminate(), Some(0), "SIGTERM drains and exits 0");
    let _ = std::fs::remove_file(&socket);
    // 2. --run starts the same server itself; the data written before is still there.
    let args: Vec<String> = ["libvirt", "import", xml.to_str().expect("utf-8"), "--run"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut served = start_ballot(&args, &socket, &[]);
    let (code, out) = qemu_io(&socket, "vda", &["read -P 0xab 0 1M"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    write_and_check(&served, &dir, 0x5c, 2 * MIB);
    assert_eq!(served.terminate(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_proposals_qcow2_disk_is_served_and_every_image_takes_the_writes() {
    if !peers::need(&["qemu-io", "qemu-img"], "qemu-utils") {
        return;
    }
    let dir = scratch("libvirt-qcow2");
    let xml = proposal_qcow2(&dir);
    let socket = dir.join("vda.sock");
    let args: Vec<String> = ["libvirt", "import", xml.to_str().expect("utf-8"), "--run"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut served = start_ballot(&args, &socket, &[]);
    let (code, out) = qemu_io(
        &socket,
        "vda",
        &[
            "write -P 0x5e 1M 2M",
            "write -P 0x6f 7M 64k",
            "flush",
            "read -P 0x5e 1M 2M",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(served.terminate(), Some(0), "SIGTERM drains and exits 0");
    for f in ["file1.qcow2", "file2.qcow2", "file3.qcow2"] {
        let img = dir.join("images").join(f).display().to_string();
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "read -P 0x5e 1M 2M",
                "-c",
                "read -P 0x6f 7M 64k",
                "-c",
                "read -P 0 0 1M",
                &img,
            ])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("verification failed"),
            "{f}: {text}"
        );
        let out = Command::new("qemu-img")
            .args(["check", &img])
            .output()
            .expect("qemu-img");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{f}: {text}");
        assert!(
            text.contains("No errors were found on the image."),
            "{f}: {text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn import_refuses_other_formats_with_the_convert_command_and_exits_1() {
    let dir = scratch("libvirt-vmdk");
    let xml = proposal_xml(&dir);
    let text = std::fs::read_to_string(&xml)
        .expect("xml")
        .replacen("type='raw'", "type='vmdk'", 2);
    std::fs::write(&xml, text).expect("rewrite");
    let (code, out, err) = ballot(&["libvirt", "import", xml.to_str().expect("utf-8")]);
    assert_eq!((code, out.as_str()), (1, ""));
    let img = dir.join("images/file1.raw");
    assert_eq!(
        err.trim(),
        format!(
            "ballot: {}: child 1 ({}): format 'vmdk' is not served by ballot, which serves raw and qcow2 images; convert it with: qemu-img convert -f vmdk -O qcow2 {} {}",
            xml.display(),
            img.display(),
            img.display(),
            dir.join("images/file1.qcow2").display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    for (args, want) in [
        (&["libvirt"][..], "ballot: libvirt needs a command"),
        (&["libvirt", "import"][..], "ballot: import needs DISK.xml"),
        (
            &["libvirt", "disk-xml", "--export", "vda", "--target", "vda"][..],
            "ballot: give --socket PATH or --addr HOST:PORT",
        ),
        (
            &[
                "libvirt", "disk-xml", "--export", "e", "--addr", "h:1", "--socket", "/s",
                "--target", "vda",
            ][..],
            "ballot: give --socket or --addr, not both",
        ),
        (
            &[
                "libvirt", "disk-xml", "--export", "e", "--addr", "h:1", "--target", "xvda",
            ][..],
            "ballot: --target 'xvda': no bus follows from the name (vd*, sd*, hd*); give --bus",
        ),
        (
            &["libvirt", "import", "x.xml", "--frob"][..],
            "ballot: unknown option '--frob'",
        ),
    ] {
        let (code, _, err) = ballot(args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(err.lines().next(), Some(want), "{args:?}");
    }
    let (code, _, err) = ballot(&["libvirt", "import", "/nonexistent/disk.xml"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "ballot: /nonexistent/disk.xml: No such file or directory (os error 2)"
    );
}

/// The printed element in a minimal domain, checked against libvirt's own schema.
#[test]
fn disk_xml_validates_against_libvirts_domain_schema() {
    if !peers::need(
        &["virt-xml-validate", "xmllint"],
        "libvirt-clients libxml2-utils",
    ) {
        return;
    }
    let dir = scratch("libvirt-schema");
    for (ep, flag, target) in [
        ("--socket", "/run/ballot/vda.sock", "vda"),
        ("--addr", "127.0.0.1:10809", "sdb"),
    ] {
        let (code, disk, err) = ballot(&[
            "libvirt", "disk-xml", "--export", "vda", ep, flag, "--target", target,
        ]);
        assert_eq!(code, 0, "{err}");
        let domain = format!(
            "<domain type='kvm'>\n<name>ballot-test</name>\n<memory unit='MiB'>64</memory>\n<os><type>hvm</type></os>\n<devices>\n{disk}</devices>\n</domain>\n"
        );
        let path = dir.join(format!("domain-{target}.xml"));
        std::fs::write(&path, domain).expect("write domain");
        let out = Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .expect("virt-xml-validate");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
