//! Issue 20 item 4: logs (docs/serve.md L1–L4). A TLS-only server refuses clients that do not
//! start TLS; each refusal is a warning a peer causes, so it shows the filter, the JSON form and
//! the rate limit with exact counts.

mod peers;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peers::{scratch, wait_for};

/// Connects, asks for the export list in clear text (answered ERR_TLS_REQD), and leaves.
fn plain_client(socket: &Path) {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes()); // LIST
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut hdr = [0u8; 20];
    s.read_exact(&mut hdr).expect("reply");
    assert_eq!(
        u32::from_be_bytes(hdr[12..16].try_into().unwrap()),
        0x8000_0005,
        "ERR_TLS_REQD"
    );
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap()) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).unwrap();
    assert_eq!(msg, b"TLS is required: send STARTTLS first");
}

/// A server credentials directory (openssl, as in tests/tls.rs, but one self-signed
/// certificate is enough here: no client gets as far as a handshake).
fn server_creds(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("pki");
    std::fs::create_dir_all(&d).unwrap();
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .args(["-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(d.join("server-key.pem"))
        .arg("-out")
        .arg(d.join("server-cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    std::fs::copy(d.join("server-cert.pem"), d.join("ca-cert.pem")).unwrap();
    d
}

/// `ballot serve` (with `log_args` before `serve`) requiring TLS on `dir/nbd.sock`; stderr to
/// `dir/err.log`.
fn serve(dir: &Path, log_args: &[&str]) -> std::process::Child {
    let creds = server_creds(dir);
    let socket = dir.join("nbd.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_ballot"))
        .args(log_args)
        .arg("serve")
        .arg(format!(
            "--object=tls-creds-x509,id=t,dir={},endpoint=server",
            creds.display()
        ))
        .arg("--blockdev=driver=null-co,node-name=n0,size=1048576")
        .arg(format!(
            "--nbd-server=addr.type=unix,addr.path={},tls-creds=t",
            socket.display()
        ))
        .arg("--export=type=nbd,id=e0,node-name=n0,name=disk")
        .stderr(std::fs::File::create(dir.join("err.log")).unwrap())
        .spawn()
        .expect("ballot serve");
    wait_for(&[&socket], "ballot serve");
    child
}

/// Stops `child` with SIGTERM and returns its stderr.
fn stop(mut child: std::process::Child, dir: &Path) -> String {
    peers::signal(child.id(), libc::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::fs::read_to_string(dir.join("err.log")).unwrap()
}

/// Waits until `dir/err.log` has `n` lines containing `needle`, or 5 s.
fn settle(dir: &Path, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(dir.join("err.log"))
        .unwrap_or_default()
        .matches(needle)
        .count()
        < n
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

const REFUSED: &str = "refused: TLS is required and the client did not start it";

#[test]
fn l3_a_peer_makes_at_most_five_warnings_of_a_kind_per_window() {
    if !peers::need(&["openssl"], "openssl") {
        return;
    }
    let dir = scratch("logs-rate");
    let child = serve(&dir, &[]);
    for _ in 0..12 {
        plain_client(&dir.join("nbd.sock"));
    }
    settle(&dir, REFUSED, 5);
    std::thread::sleep(Duration::from_millis(300));
    let err = stop(child, &dir);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(REFUSED)).collect();
    assert_eq!(lines.len(), 5, "{err}");
    for l in &lines {
        assert!(l.starts_with("ballot: warning: NBD client on "), "{l}");
        assert!(l.ends_with(REFUSED), "{l}");
    }
}

#[test]
fn l1_json_lines_carry_level_target_kind_and_message() {
    if !peers::need(&["openssl"], "openssl") {
        return;
    }
    let dir = scratch("logs-json");
    let child = serve(
        &dir,
        &["--log-format", "json", "--log", "info,ballot::nbd=debug"],
    );
    plain_client(&dir.join("nbd.sock"));
    settle(&dir, REFUSED, 1);
    let err = stop(child, &dir);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refused: Vec<&serde_json::Value> = events
        .iter()
        .filter(|v| v["message"].as_str().is_some_and(|m| m.ends_with(REFUSED)))
        .collect();
    assert_eq!(refused.len(), 1, "{err}");
    assert_eq!(refused[0]["level"], "WARN");
    assert_eq!(refused[0]["target"], "ballot::peer");
    assert_eq!(refused[0]["kind"], "nbd-tls-required");
    assert!(refused[0]["timestamp"].is_string(), "{}", refused[0]);
    // L2: ballot::nbd=debug shows the server's connection events.
    let debug: Vec<&str> = events
        .iter()
        .filter(|v| v["level"] == "DEBUG" && v["target"] == "ballot::nbd::server")
        .filter_map(|v| v["message"].as_str())
        .collect();
    assert!(
        debug
            .iter()
            .any(|m| m.starts_with("NBD client on ") && m.ends_with(": connected")),
        "{err}"
    );
}

#[test]
fn l2_the_filter_silences_a_target_and_bad_filters_are_refused() {
    if !peers::need(&["openssl"], "openssl") {
        return;
    }
    let dir = scratch("logs-filter");
    let child = serve(&dir, &["--log=info,ballot::peer=off"]);
    plain_client(&dir.join("nbd.sock"));
    std::thread::sleep(Duration::from_millis(300));
    let err = stop(child, &dir);
    assert!(!err.contains(REFUSED), "{err}");

    // With no filter, the same refusal is a text warning (L1).
    let dir = scratch("logs-text");
    let child = serve(&dir, &[]);
    plain_client(&dir.join("nbd.sock"));
    settle(&dir, REFUSED, 1);
    let err = stop(child, &dir);
    assert_eq!(err.matches(REFUSED).count(), 1, "{err}");

    let (rc, _, err) = peers::ballot(&[
        "--log",
        "ballot::nbd=loud",
        "check",
        "--blockdev=driver=null-co,node-name=n0",
    ]);
    assert_eq!(
        (rc, err.as_str()),
        (
            2,
            "ballot: --log: 'ballot::nbd=loud' is not TARGET=LEVEL or LEVEL (levels: off, error, \
             warn, info, debug, trace)\n"
        )
    );
    // L4: a startup error is a plain line whatever the format.
    let (rc, _, err) = peers::ballot(&["--log-format=json", "serve", "--nbd-server=addr.type=tcp"]);
    assert_eq!(
        (rc, err.as_str()),
        (
            1,
            "ballot: --nbd-server: Parameter 'addr.type' does not accept value 'tcp'\n"
        )
    );
}
