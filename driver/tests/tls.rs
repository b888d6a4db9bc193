//! Issue 20 item 1: NBD over TLS (docs/tls.md K1–K12), both sides, against QEMU's tools,
//! libnbd and nbdkit, with certificates made here by openssl: a CA, server and client
//! certificates, a second CA, and certificates that expired in 2021.
//!
//! Every refusal is checked by its words on the side that refuses, and the server is shown to
//! keep serving the next good client.

mod peers;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use peers::{scratch, start_ballot, wait_for, Qmp};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority in `dir` (ca-cert.pem, ca-key.pem).
fn make_ca(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).expect("ca dir");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &dir.join("ca-key.pem").display().to_string(),
        "-out",
        &dir.join("ca-cert.pem").display().to_string(),
    ]);
}

/// A certificate for `role` ("server" or "client") signed by the CA in `ca`, written as
/// QEMU's file names in `out` with the CA's certificate beside it. `expired`: valid in 2020
/// only.
fn make_cert(ca: &Path, out: &Path, role: &str, expired: bool) {
    std::fs::create_dir_all(out).expect("cert dir");
    let key = out.join(format!("{role}-key.pem"));
    let csr = out.join(format!("{role}.csr"));
    let cert = out.join(format!("{role}-cert.pem"));
    let ext = out.join(format!("{role}.ext"));
    std::fs::write(
        &ext,
        if role == "server" {
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        } else {
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\n"
        },
    )
    .expect("ext");
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={role}"),
        "-keyout",
        &key.display().to_string(),
        "-out",
        &csr.display().to_string(),
    ]);
    if expired {
        // `openssl x509` cannot date a certificate in the past; `openssl ca` can.
        let db = out.join("db");
        std::fs::create_dir_all(db.join("new")).expect("db");
        std::fs::write(db.join("index.txt"), "").expect("index");
        std::fs::write(db.join("serial"), "1000\n").expect("serial");
        let cnf = db.join("ca.cnf");
        std::fs::write(
            &cnf,
            format!(
                "[ca]\ndefault_ca=d\n[d]\ndatabase={0}/index.txt\nnew_certs_dir={0}/new\n\
                 serial={0}/serial\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n",
                db.display()
            ),
        )
        .expect("cnf");
        openssl(&[
            "ca",
            "-batch",
            "-notext",
            "-config",
            &cnf.display().to_string(),
            "-cert",
            &ca.join("ca-cert.pem").display().to_string(),
            "-keyfile",
            &ca.join("ca-key.pem").display().to_string(),
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20210101000000Z",
            "-extfile",
            &ext.display().to_string(),
            "-in",
            &csr.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ]);
    } else {
        openssl(&[
            "x509",
            "-req",
            "-days",
            "365",
            "-CA",
            &ca.join("ca-cert.pem").display().to_string(),
            "-CAkey",
            &ca.join("ca-key.pem").display().to_string(),
            "-CAcreateserial",
            "-extfile",
            &ext.display().to_string(),
            "-in",
            &csr.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ]);
    }
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy ca");
}

/// The credentials directories one test uses.
struct Pki {
    /// Server: ca-cert.pem, server-cert.pem, server-key.pem.
    server: PathBuf,
    /// Client with a certificate.
    client: PathBuf,
    /// Client with the CA only (no certificate to show).
    anonymous: PathBuf,
    /// Client whose certificate another authority signed (it trusts the server's CA).
    stranger: PathBuf,
    /// Client that trusts only another authority (and has its certificate).
    wrong_ca: PathBuf,
    /// Client whose certificate expired.
    expired_client: PathBuf,
    /// Server whose certificate expired.
    expired_server: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca = dir.join("ca");
    let other = dir.join("other-ca");
    make_ca(&ca, "ballot test CA");
    make_ca(&other, "another CA");
    let p = Pki {
        server: dir.join("server"),
        client: dir.join("client"),
        anonymous: dir.join("anonymous"),
        stranger: dir.join("stranger"),
        wrong_ca: dir.join("wrong-ca"),
        expired_client: dir.join("expired-client"),
        expired_server: dir.join("expired-server"),
    };
    make_cert(&ca, &p.server, "server", false);
    make_cert(&ca, &p.client, "client", false);
    make_cert(&other, &p.stranger, "client", false);
    std::fs::copy(ca.join("ca-cert.pem"), p.stranger.join("ca-cert.pem")).expect("copy");
    make_cert(&other, &p.wrong_ca, "client", false);
    make_cert(&ca, &p.expired_client, "client", true);
    make_cert(&ca, &p.expired_server, "server", true);
    std::fs::create_dir_all(&p.anonymous).expect("anonymous");
    std::fs::copy(ca.join("ca-cert.pem"), p.anonymous.join("ca-cert.pem")).expect("copy");
    p
}

fn tools() -> bool {
    peers::need(&["openssl"], "openssl")
        && peers::need(&["qemu-io", "qemu-img", "qemu-nbd"], "qemu-utils")
        && peers::need(&["nbdinfo", "nbdcopy"], "libnbd-bin")
        && peers::need(&["nbdkit"], "nbdkit")
}

fn run(cmd: &str, args: &[String]) -> (i32, String) {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new(cmd)
        .env("PATH", path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// qemu-io over TLS to `export` on a unix socket, with credentials from `creds`.
fn qemu_io_tls(socket: &Path, export: &str, creds: &Path, cmds: &[&str]) -> (i32, String) {
    let mut a = vec![
        "--object".to_string(),
        format!(
            "tls-creds-x509,id=tc,dir={},endpoint=client",
            creds.display()
        ),
        "--image-opts".into(),
        // QEMU checks the server's name even on a unix socket: it must be given.
        format!(
            "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tc,\
             tls-hostname=localhost",
            socket.display()
        ),
    ];
    for c in cmds {
        a.push("-c".into());
        a.push((*c).into());
    }
    run("qemu-io", &a)
}

fn server_args(dir: &Path, socket: &Path, creds: &Path, extra: &[String]) -> Vec<String> {
    let img = dir.join("disk.raw");
    if !img.exists() {
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(16 * MIB))
            .expect("image");
    }
    let mut a = vec![
        "serve".to_string(),
        format!(
            "--object=tls-creds-x509,id=tls0,dir={},endpoint=server",
            creds.display()
        ),
        format!(
            "--blockdev=driver=file,node-name=f0,filename={}",
            img.display()
        ),
        format!(
            "--nbd-server=addr.type=unix,addr.path={},tls-creds=tls0",
            socket.display()
        ),
        "--export=type=nbd,id=e0,node-name=f0,name=disk,writable=on".into(),
    ];
    a.extend_from_slice(extra);
    a
}

fn stderr_of(socket: &Path) -> String {
    std::fs::read_to_string(socket.with_file_name("ballot-stderr.log")).unwrap_or_default()
}

/// Waits up to 5 s for `needle` in the server's stderr.
fn wait_log(socket: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = stderr_of(socket);
        if s.contains(needle) || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn k6_ballot_server_serves_qemu_and_libnbd_over_tls_and_refuses_everyone_else() {
    if !tools() {
        return;
    }
    let dir = scratch("tls-server");
    let p = pki(&dir);
    let socket = dir.join("nbd.sock");
    let mut served = start_ballot(&server_args(&dir, &socket, &p.server, &[]), &socket, &[]);

    // qemu-io writes and reads back through TLS with a client certificate.
    let (rc, out) = qemu_io_tls(
        &socket,
        "disk",
        &p.client,
        &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );

    // qemu-img sees the export's size.
    let (rc, out) = run(
        "qemu-img",
        &[
            "info".into(),
            "--object".into(),
            format!(
                "tls-creds-x509,id=tc,dir={},endpoint=client",
                p.client.display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tc,\
                 tls-hostname=localhost",
                socket.display()
            ),
        ],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("virtual size: 16 MiB (16777216 bytes)"),
        "{out}"
    );

    // libnbd: nbdinfo reports TLS; nbdcopy copies the export out byte for byte.
    let uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        socket.display(),
        p.client.display()
    );
    let (rc, out) = run("nbdinfo", std::slice::from_ref(&uri));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("protocol: newstyle-fixed with TLS"), "{out}");
    assert!(out.contains("export-size: 16777216"), "{out}");
    let copy = dir.join("copy.raw");
    let (rc, out) = run("nbdcopy", &[uri, copy.display().to_string()]);
    assert_eq!(rc, 0, "{out}");
    let got = std::fs::read(&copy).expect("copy");
    assert_eq!(got.len() as u64, 16 * MIB);
    assert!(got[..MIB as usize].iter().all(|b| *b == 0x5a));
    assert!(got[MIB as usize..].iter().all(|b| *b == 0));

    // K6: a client that does not start TLS gets ERR_TLS_REQD and no export.
    let (rc, out) = peers::qemu_io(&socket, "disk", &["read 0 512"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("server reported: TLS is required: send STARTTLS first"),
        "{out}"
    );
    let log = wait_log(&socket, "did not start it");
    assert!(
        log.contains("ballot: warning: NBD client on ")
            && log.contains(": refused: TLS is required and the client did not start it"),
        "{log}"
    );

    // K3: no client certificate (qemu-io), a certificate another CA signed and an expired one
    // (ballot's own client: qemu-io refuses to present either): each refused in the
    // handshake, and the server says why.
    let (rc, out) = qemu_io_tls(&socket, "disk", &p.anonymous, &["read 0 512"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("can't open"), "{out}");
    let log = wait_log(&socket, "peer sent no certificates");
    assert!(
        log.contains("TLS handshake failed: peer sent no certificates"),
        "{log}"
    );
    for (creds, why) in [
        (&p.stranger, "invalid peer certificate: UnknownIssuer"),
        (
            &p.expired_client,
            "invalid peer certificate: certificate expired",
        ),
    ] {
        let (rc, out, err) = check_nbd(
            Some(creds),
            &format!(
                "server.type=unix,server.path={},export=disk,tls-creds=tc",
                socket.display()
            ),
        );
        assert_eq!((rc, out.as_str()), (1, ""), "{err}");
        assert!(
            err.starts_with(&format!(
                "ballot: TLS connection to unix:{} failed",
                socket.display()
            )),
            "{err}"
        );
        let log = wait_log(&socket, why);
        assert!(
            log.contains(&format!("TLS handshake failed: {why}")),
            "{}: wanted '{why}' in:\n{log}",
            creds.display()
        );
    }

    // K7: garbage instead of a TLS record after STARTTLS: the server answers with an alert
    // and closes; nothing is served.
    let mut s = UnixStream::connect(&socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&1u32.to_be_bytes()).expect("flags");
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&5u32.to_be_bytes()); // STARTTLS
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).expect("STARTTLS");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("reply");
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        1,
        "ACK"
    );
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("garbage");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest.first(), Some(&0x15), "a TLS alert record: {rest:?}");
    let log = wait_log(&socket, "received corrupt message");
    assert!(
        log.contains("TLS handshake failed: received corrupt message of type InvalidContentType"),
        "{log}"
    );

    // The server kept serving: the good client still reads what it wrote.
    let (rc, out) = qemu_io_tls(&socket, "disk", &p.client, &["read -P 0x5a 0 1M"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(served.terminate(), Some(0));
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_port(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The options of an nbd node on unix socket `socket` using the credentials `tc`, plus `extra`.
fn tls_node(socket: &Path, extra: &str) -> String {
    format!(
        "server.type=unix,server.path={},tls-creds=tc{extra}",
        socket.display()
    )
}

/// `ballot check` of an nbd node with `extra` options and client credentials `creds`.
fn check_nbd(creds: Option<&Path>, node: &str) -> (i32, String, String) {
    let mut a = vec!["check".to_string()];
    if let Some(c) = creds {
        a.push(format!(
            "--object=tls-creds-x509,id=tc,dir={},endpoint=client",
            c.display()
        ));
    }
    a.push(format!("--blockdev=driver=nbd,node-name=n0,{node}"));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    peers::ballot(&refs)
}

#[test]
fn k5_ballot_client_reaches_qemu_nbd_and_nbdkit_over_tls_and_checks_who_they_are() {
    if !tools() {
        return;
    }
    let dir = scratch("tls-client");
    let p = pki(&dir);
    let img = dir.join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 * MIB))
        .expect("image");

    // qemu-nbd over TCP, TLS required, client certificates required (its default).
    let qport = free_port();
    let qpid = dir.join("qemu-nbd.pid");
    let mut qemu_nbd = Command::new("qemu-nbd")
        .args([
            "--object".to_string(),
            format!(
                "tls-creds-x509,id=ts,dir={},endpoint=server",
                p.server.display()
            ),
            "--tls-creds=ts".into(),
            "-f".into(),
            "raw".into(),
            "-x".into(),
            "disk".into(),
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            qport.to_string(),
            "-t".into(),
            "--pid-file".into(),
            qpid.display().to_string(),
            img.display().to_string(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    wait_port(qport);
    let node = |host: &str, extra: &str| {
        format!("server.type=inet,server.host={host},server.port={qport},export=disk,tls-creds=tc{extra}")
    };
    let (rc, out, err) = check_nbd(Some(&p.client), &node("127.0.0.1", ""));
    assert_eq!(
        (rc, out.as_str()),
        (0, "n0 driver=nbd length=8388608 align=1\n"),
        "{err}"
    );
    // By name: the certificate names localhost.
    let (rc, out, err) = check_nbd(Some(&p.client), &node("localhost", ""));
    assert_eq!(
        (rc, out.as_str()),
        (0, "n0 driver=nbd length=8388608 align=1\n"),
        "{err}"
    );
    // K5: a name the certificate does not carry.
    let (rc, _, err) = check_nbd(
        Some(&p.client),
        &node("127.0.0.1", ",tls-hostname=other.example"),
    );
    assert_eq!(rc, 1);
    assert!(
        err.contains(&format!(
            "TLS handshake with 127.0.0.1:{qport} failed: invalid peer certificate: certificate \
             not valid for name \"other.example\""
        )),
        "{err}"
    );
    // A CA that did not sign the server's certificate.
    let (rc, _, err) = check_nbd(Some(&p.wrong_ca), &node("127.0.0.1", ""));
    assert_eq!(rc, 1);
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    // No tls-creds against a server that requires TLS.
    let (rc, _, err) = check_nbd(
        None,
        &format!("server.type=inet,server.host=127.0.0.1,server.port={qport},export=disk"),
    );
    assert_eq!(rc, 1);
    assert_eq!(
        err,
        "ballot: server requires TLS: give the nbd node tls-creds\n"
    );
    let _ = qemu_nbd.kill();
    let _ = qemu_nbd.wait();

    // nbdkit --tls=require with client certificates verified (--tls-verify-peer).
    let nbdkit = peers::nbdkit(
        &dir,
        "kit",
        &[
            "--tls=require",
            &format!("--tls-certificates={}", p.server.display()),
            "--tls-verify-peer",
            "memory",
            "4M",
        ],
    );
    let unix = |extra: &str| tls_node(&nbdkit.socket, extra);
    let (rc, out, err) = check_nbd(Some(&p.client), &unix(""));
    assert_eq!(
        (rc, out.as_str()),
        (0, "n0 driver=nbd length=4194304 align=1\n"),
        "{err}"
    );
    let (rc, out, err) = check_nbd(Some(&p.client), &unix(",tls-hostname=localhost"));
    assert_eq!(
        (rc, out.as_str()),
        (0, "n0 driver=nbd length=4194304 align=1\n"),
        "{err}"
    );
    // Without a client certificate nbdkit refuses, once the client's side of the handshake
    // is done (TLS 1.3).
    let (rc, _, err) = check_nbd(Some(&p.anonymous), &unix(""));
    assert_eq!(rc, 1);
    assert!(
        err.starts_with(&format!(
            "ballot: TLS connection to unix:{} failed after the handshake (the server may have \
             refused this client's certificate): ",
            nbdkit.socket.display()
        )),
        "{err}"
    );
    nbdkit.stop();

    // An expired server certificate (nbdkit serving it).
    let old = peers::nbdkit(
        &dir,
        "old",
        &[
            "--tls=require",
            &format!("--tls-certificates={}", p.expired_server.display()),
            "memory",
            "4M",
        ],
    );
    let (rc, _, err) = check_nbd(Some(&p.client), &tls_node(&old.socket, ""));
    assert_eq!(rc, 1);
    assert!(
        err.contains("invalid peer certificate: certificate expired"),
        "{err}"
    );
    old.stop();

    // K5: tls-creds against a server without TLS: STARTTLS refused, nothing read in clear.
    let plain = peers::nbdkit(&dir, "plain", &["memory", "4M"]);
    let (rc, _, err) = check_nbd(Some(&p.client), &tls_node(&plain.socket, ""));
    assert_eq!(rc, 1);
    assert_eq!(
        err,
        format!(
            "ballot: server unix:{} does not offer TLS: STARTTLS refused with ERR_POLICY\n",
            plain.socket.display()
        )
    );
    plain.stop();
}

#[test]
fn k1_objects_are_checked_when_created() {
    if !peers::need(&["openssl"], "openssl") {
        return;
    }
    let dir = scratch("tls-objects");
    let p = pki(&dir);
    let obj = |spec: String| {
        let (rc, _, err) = peers::ballot(&[
            "check",
            &format!("--object={spec}"),
            "--blockdev=driver=null-co,node-name=n0",
        ]);
        (rc, err)
    };
    assert_eq!(
        obj(format!(
            "tls-creds-x509,id=t,dir={},endpoint=client",
            p.client.display()
        )),
        (0, String::new())
    );
    let missing = dir.join("nowhere");
    assert_eq!(
        obj(format!(
            "tls-creds-x509,id=t,dir={},endpoint=server",
            missing.display()
        )),
        (
            1,
            format!(
                "ballot: --object: tls-creds-x509 't': dir '{}' is not a directory\n",
                missing.display()
            )
        )
    );
    // A server directory needs its certificate and key: the client's will not do.
    assert_eq!(
        obj(format!(
            "tls-creds-x509,id=t,dir={},endpoint=server",
            p.client.display()
        )),
        (
            1,
            format!(
                "ballot: --object: tls-creds-x509 't': cannot read '{}': No such file or \
                 directory (os error 2)\n",
                p.client.join("server-cert.pem").display()
            )
        )
    );
    // A key that is not the certificate's.
    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for (from, to) in [
        (p.server.join("ca-cert.pem"), "ca-cert.pem"),
        (p.server.join("server-cert.pem"), "server-cert.pem"),
        (p.expired_server.join("server-key.pem"), "server-key.pem"),
    ] {
        std::fs::copy(from, mixed.join(to)).unwrap();
    }
    assert_eq!(
        obj(format!(
            "tls-creds-x509,id=t,dir={},endpoint=server",
            mixed.display()
        )),
        (
            1,
            format!(
                "ballot: --object: tls-creds-x509 't': the private key does not match the \
                 certificate in '{}'\n",
                mixed.join("server-cert.pem").display()
            )
        )
    );
    // K12: PSK and anonymous credentials are refused with the reason.
    assert_eq!(
        obj(format!(
            "tls-creds-psk,id=k,dir={},endpoint=server",
            dir.display()
        )),
        (
            1,
            "ballot: --object: tls-creds-psk 'k': TLS pre-shared keys are not supported: \
             ballot's TLS stack (rustls) has no external PSK; use tls-creds-x509\n"
                .into()
        )
    );
    assert_eq!(
        obj("tls-creds-anon,id=a,endpoint=server".into()),
        (
            1,
            "ballot: --object: tls-creds-anon 'a': anonymous TLS is not supported (it \
             authenticates no one); use tls-creds-x509\n"
                .into()
        )
    );
    // K1: a server needs server credentials.
    let socket = dir.join("x.sock");
    let (rc, _, err) = peers::ballot(&[
        "serve",
        &format!(
            "--object=tls-creds-x509,id=t,dir={},endpoint=client",
            p.client.display()
        ),
        "--blockdev=driver=null-co,node-name=n0",
        &format!(
            "--nbd-server=addr.type=unix,addr.path={},tls-creds=t",
            socket.display()
        ),
    ]);
    assert_eq!(
        (rc, err.as_str()),
        (
            1,
            "ballot: --nbd-server: Expecting TLS credentials with a server endpoint: 't' has \
             endpoint=client\n"
        )
    );
    let (rc, _, err) = peers::ballot(&[
        "serve",
        "--blockdev=driver=null-co,node-name=n0",
        &format!(
            "--nbd-server=addr.type=unix,addr.path={},tls-creds=nope",
            socket.display()
        ),
    ]);
    assert_eq!(
        (rc, err.as_str()),
        (
            1,
            "ballot: --nbd-server: No TLS credentials with id 'nope'\n"
        )
    );
}

/// Issue 20's done-when: a quorum of three NBD replicas, each a `ballot serve` that requires
/// TLS and client certificates, serves qemu-io through a TLS export of its own; a replica
/// without TLS is refused.
#[test]
fn k6_quorum_of_three_tls_replicas_serves_qemu_io_over_tls() {
    if !tools() {
        return;
    }
    let dir = scratch("tls-quorum");
    let p = pki(&dir);
    let mut replicas = Vec::new();
    for i in 0..3 {
        let rdir = dir.join(format!("r{i}"));
        std::fs::create_dir_all(&rdir).unwrap();
        let socket = rdir.join("nbd.sock");
        replicas.push((
            start_ballot(&server_args(&rdir, &socket, &p.server, &[]), &socket, &[]),
            rdir,
        ));
    }
    // The front: client credentials for the replicas, server credentials for its own export.
    let front = dir.join("front.sock");
    let qmp = dir.join("qmp.sock");
    let mut args = vec![
        "serve".to_string(),
        format!(
            "--object=tls-creds-x509,id=up,dir={},endpoint=client",
            p.client.display()
        ),
        format!(
            "--object=tls-creds-x509,id=down,dir={},endpoint=server",
            p.server.display()
        ),
    ];
    for (i, (r, _)) in replicas.iter().enumerate() {
        args.push(format!(
            "--blockdev=driver=nbd,node-name=r{i},server.type=unix,server.path={},export=disk,\
             tls-creds=up,tls-hostname=localhost",
            r.socket.display()
        ));
    }
    args.push(
        r#"--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["r0","r1","r2"]}"#
            .into(),
    );
    args.push(format!(
        "--nbd-server=addr.type=unix,addr.path={},tls-creds=down",
        front.display()
    ));
    args.push("--export=type=nbd,id=e0,node-name=q0,name=disk,writable=on".into());
    args.push(format!(
        "--chardev=socket,path={},server=on,wait=off,id=m0",
        qmp.display()
    ));
    args.push("--monitor=chardev=m0".into());
    let mut served = start_ballot(&args, &front, &[&qmp]);

    let (rc, out) = qemu_io_tls(
        &front,
        "disk",
        &p.client,
        &[
            "write -P 0xc3 1M 2M",
            "read -P 0xc3 1M 2M",
            "read -P 0 0 1M",
            "flush",
        ],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("wrote 2097152/2097152 bytes at offset 1048576"),
        "{out}"
    );
    assert!(
        out.contains("read 2097152/2097152 bytes at offset 1048576"),
        "{out}"
    );
    // Every replica holds the data.
    for (_, rdir) in &replicas {
        let bytes = std::fs::read(rdir.join("disk.raw")).unwrap();
        assert!(bytes[MIB as usize..3 * MIB as usize]
            .iter()
            .all(|b| *b == 0xc3));
        assert!(bytes[..MIB as usize].iter().all(|b| *b == 0));
    }

    // A replica without TLS: blockdev-add of a node that must use TLS is refused, and so is a
    // node without tls-creds against a replica that requires it.
    let plain_dir = dir.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = peers::nbdkit(&plain_dir, "plain", &["memory", "16M"]);
    let mut q = Qmp::connect(&qmp);
    let e = q.try_execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "r3",
               "server": {"type": "unix", "path": plain.socket.display().to_string()},
               "tls-creds": "up"}),
    );
    let desc = e.expect_err("a replica without TLS").to_string();
    assert!(
        desc.contains(&format!(
            "server unix:{} does not offer TLS: STARTTLS refused with ERR_POLICY",
            plain.socket.display()
        )),
        "{desc}"
    );
    let e = q.try_execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "r4",
               "server": {"type": "unix", "path": replicas[0].0.socket.display().to_string()},
               "export": "disk"}),
    );
    let desc = e.expect_err("TLS required by the replica").to_string();
    assert!(
        desc.contains("server requires TLS: give the nbd node tls-creds"),
        "{desc}"
    );
    plain.stop();
    drop(q);
    assert_eq!(served.terminate(), Some(0));
    for (mut r, _) in replicas {
        assert_eq!(r.terminate(), Some(0));
    }
}

/// K1, K6 over QMP: `object-add`, `nbd-server-start` with `tls-creds`, `block-export-add`;
/// `object-del` is refused while the server uses the credentials; `nbd-server-stop`.
#[test]
fn k1_qmp_object_add_and_nbd_server_start_with_tls() {
    if !tools() {
        return;
    }
    let dir = scratch("tls-qmp");
    let p = pki(&dir);
    let qmp = dir.join("qmp.sock");
    let img = dir.join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 * MIB))
        .expect("image");
    let args = vec![
        "serve".to_string(),
        format!(
            "--blockdev=driver=file,node-name=f0,filename={}",
            img.display()
        ),
        format!(
            "--chardev=socket,path={},server=on,wait=off,id=m0",
            qmp.display()
        ),
        "--monitor=chardev=m0".into(),
    ];
    let mut served = start_ballot(&args, &qmp, &[]);
    let mut q = Qmp::connect(&qmp);
    let socket = dir.join("nbd.sock");
    assert_eq!(
        q.execute(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0",
                   "dir": p.server.display().to_string(), "endpoint": "server"})
        ),
        json!({})
    );
    let e = q
        .try_execute(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0",
                   "dir": p.server.display().to_string(), "endpoint": "server"}),
        )
        .expect_err("duplicate");
    assert!(e.to_string().contains("duplicate"), "{e}");
    assert_eq!(
        q.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}},
                   "tls-creds": "tls0"})
        ),
        json!({})
    );
    let e = q
        .try_execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}}),
        )
        .expect_err("second server");
    assert!(e.to_string().contains("NBD server already running"), "{e}");
    assert_eq!(
        q.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "f0", "name": "disk", "writable": true})
        ),
        json!({})
    );
    wait_for(&[&socket], "nbd-server-start");
    let (rc, out) = qemu_io_tls(
        &socket,
        "disk",
        &p.client,
        &["write -P 7 0 64k", "read -P 7 0 64k"],
    );
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = peers::qemu_io(&socket, "disk", &["read 0 512"]);
    assert_eq!(rc, 1, "{out}");
    let e = q
        .try_execute("object-del", json!({"id": "tls0"}))
        .expect_err("in use");
    assert!(e.to_string().contains("object 'tls0' is in use"), "{e}");
    assert_eq!(q.execute("nbd-server-stop", json!({})), json!({}));
    assert!(!socket.exists(), "the socket is removed");
    assert_eq!(q.execute("object-del", json!({"id": "tls0"})), json!({}));
    // Started again without TLS, the same export is served in clear.
    assert_eq!(
        q.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}})
        ),
        json!({})
    );
    wait_for(&[&socket], "nbd-server-start");
    let (rc, out) = peers::qemu_io(&socket, "disk", &["read -P 7 0 64k"]);
    assert_eq!(rc, 0, "{out}");
    drop(q);
    assert_eq!(served.terminate(), Some(0));
}
