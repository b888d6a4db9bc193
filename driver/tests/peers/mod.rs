//! Helpers for tests that run `ballot serve` against real NBD peers (NBD.md §8): starting and
//! stopping servers by their own PID (N50), scratch directories, sockets, qemu-io, QMP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when every tool runs. A missing one skips the test with a printed reason, unless
/// `BALLOT_REQUIRE_PEERS` is set (CI sets it): then the test fails, so a broken install cannot
/// pass as skipped.
pub fn need(tools: &[&str], package: &str) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            Command::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    self::missing(&format!(
        "{missing:?} not installed (.ci/run installs {package})"
    ));
    false
}

/// Runs the `ballot` binary with `args`: exit code, stdout, stderr.
pub fn ballot(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ballot"))
        .args(args)
        .output()
        .expect("run ballot");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ballot-peer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Waits up to 10 s for every path in `paths` to exist (the sockets `who` creates).
pub fn wait_for(paths: &[&Path], who: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !paths.iter().all(|p| p.exists()) {
        assert!(Instant::now() < deadline, "{who} did not create {paths:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the PID of a process this test started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// A `ballot serve` process, killed on drop if still running.
pub struct Served {
    pub child: Child,
    pub socket: PathBuf,
}

impl Served {
    /// SIGTERM, then the exit code (N33: 0 after draining).
    pub fn terminate(&mut self) -> Option<i32> {
        signal(self.child.id(), libc::SIGTERM);
        self.child.wait().expect("wait for ballot serve").code()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ballot` with `args` and waits for its NBD `socket` and any `extra` sockets.
/// Its stderr goes to `stderr.log` beside the socket.
pub fn start_ballot(args: &[String], socket: &Path, extra: &[&Path]) -> Served {
    let log = socket.with_file_name("ballot-stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_ballot"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("stderr log"))
        .spawn()
        .expect("start ballot serve");
    let served = Served {
        child,
        socket: socket.to_path_buf(),
    };
    let mut all = vec![socket];
    all.extend_from_slice(extra);
    wait_for(&all, "ballot serve");
    served
}

/// `serve` arguments for a quorum `q0` (vote-threshold 2) of `a.raw`, `b.raw` and `c.raw` in
/// `dir`, each created with `size` bytes unless it exists, plus `extra` arguments.
pub fn quorum_args(dir: &Path, size: u64, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec!["serve".into()];
    for (i, f) in ["a.raw", "b.raw", "c.raw"].iter().enumerate() {
        let path = dir.join(f);
        if !path.exists() {
            std::fs::File::create(&path)
                .and_then(|file| file.set_len(size))
                .expect("create child");
        }
        args.push(format!(
            "--blockdev=driver=file,node-name=f{i},filename={}",
            path.display()
        ));
    }
    args.push(r#"--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["f0","f1","f2"]}"#.into());
    args.extend_from_slice(extra);
    args
}

/// `ballot serve` with the quorum of [`quorum_args`] exported writable as `disk0` on
/// `dir/nbd.sock`.
pub fn serve_disk0(dir: &Path, size: u64) -> Served {
    let socket = dir.join("nbd.sock");
    let args = quorum_args(
        dir,
        size,
        &[
            nbd_server_arg(&socket),
            "--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into(),
        ],
    );
    start_ballot(&args, &socket, &[])
}

/// A peer the test needs is missing: fails the test when `BALLOT_REQUIRE_PEERS` is set (CI),
/// otherwise prints why it is skipped.
pub fn missing(msg: &str) {
    assert!(std::env::var_os("BALLOT_REQUIRE_PEERS").is_none(), "{msg}");
    eprintln!("skipped: {msg}");
}

/// `--nbd-server` on a unix socket.
pub fn nbd_server_arg(socket: &Path) -> String {
    format!("--nbd-server=addr.type=unix,addr.path={}", socket.display())
}

/// Runs qemu-io with `cmds` against `export` on a unix socket: (exit code, stdout + stderr).
pub fn qemu_io(socket: &Path, export: &str, cmds: &[&str]) -> (i32, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(format!("nbd+unix:///{export}?socket={}", socket.display()));
    let out = c.output().expect("run qemu-io");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `nbd+unix:///NAME?socket=PATH`.
pub fn uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// A daemon that wrote its PID to a file (nbdkit `-P`, qemu-nbd `--pid-file`), stopped by
/// that PID on drop (N50).
pub struct Daemon {
    pub pidfile: PathBuf,
    pub socket: PathBuf,
    /// Read once at start: daemons remove their pidfile when they exit.
    pid: u32,
}

impl Daemon {
    /// Waits up to 10 s for the daemon's socket and for its PID in `pidfile` (a daemon may
    /// create the file before writing it).
    pub fn started(pidfile: PathBuf, socket: PathBuf, who: &str) -> Daemon {
        wait_for(&[&socket, &pidfile], who);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
            if let Ok(pid) = text.trim().parse() {
                return Daemon {
                    pidfile,
                    socket,
                    pid,
                };
            }
            assert!(Instant::now() < deadline, "no PID in {}", pidfile.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits up to 10 s for the process to go.
    pub fn stop(&self) {
        self.terminate();
        self.wait_gone();
    }

    /// SIGKILL, as a power cut of the server: whatever it held in memory is gone.
    pub fn kill(&self) {
        signal(self.pid, libc::SIGKILL);
        self.wait_gone();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.pid, libc::SIGTERM);
    }

    /// Waits up to 10 s for the process to go.
    pub fn wait_gone(&self) {
        let pid = self.pid;
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: kill(pid, 0) only checks whether the process still exists.
        while unsafe { libc::kill(pid as i32, 0) } == 0 {
            assert!(Instant::now() < deadline, "daemon {pid} did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Once the daemon is gone its pidfile is too (it or `wait_gone` removed it).
        if self.pidfile.exists() {
            // SAFETY: kill(2) on the PID of the daemon this test started, still running.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}

/// Starts nbdkit daemonised on `dir/NAME.sock` with `-P dir/NAME.pid` and `args` (N50), and
/// waits for both files.
pub fn nbdkit(dir: &Path, name: &str, args: &[&str]) -> Daemon {
    let socket = dir.join(format!("{name}.sock"));
    let pidfile = dir.join(format!("{name}.pid"));
    let _ = std::fs::remove_file(&socket);
    let st = Command::new("nbdkit")
        .arg("-U")
        .arg(&socket)
        .arg("-P")
        .arg(&pidfile)
        .args(args)
        .status()
        .expect("start nbdkit");
    assert!(st.success(), "nbdkit {args:?} failed to start");
    Daemon::started(pidfile, socket, "nbdkit")
}

/// A QMP connection (greeting read, capabilities negotiated).
pub struct Qmp {
    stream: UnixStream,
    lines: BufReader<UnixStream>,
    next_id: u64,
    /// Events read while waiting for a command's return.
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connects to ballot's monitor: its greeting offers no capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let (q, greeting) = Qmp::connect_greeted(path);
        assert_eq!(greeting["QMP"]["capabilities"], serde_json::json!([]));
        q
    }

    /// Connects to any QMP monitor (QEMU's offers `oob`); returns the greeting too.
    #[allow(dead_code)]
    pub fn connect_greeted(path: &Path) -> (Qmp, serde_json::Value) {
        let stream = UnixStream::connect(path).expect("connect QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let lines = BufReader::new(stream.try_clone().expect("clone"));
        let mut q = Qmp {
            stream,
            lines,
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = q.read();
        assert!(greeting["QMP"]["capabilities"].is_array(), "{greeting}");
        assert_eq!(
            q.execute("qmp_capabilities", serde_json::json!({})),
            serde_json::json!({})
        );
        (q, greeting)
    }

    /// Reads one message.
    pub fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("QMP line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP JSON {line:?}: {e}"))
    }

    /// Sends a command; its `return` value, or panics with its error.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        match self.try_execute(cmd, args) {
            Ok(v) => v,
            Err(e) => panic!("{cmd}: {e}"),
        }
    }

    /// Sends a command; `Ok(return)` or `Err(error)`.
    pub fn try_execute(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = serde_json::json!({"execute": cmd, "arguments": args, "id": id});
        writeln!(self.stream, "{msg}").expect("send QMP");
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            assert_eq!(v["id"], id, "{v}");
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(v["error"].clone()),
            };
        }
    }

    /// The next event, from those already read or the socket.
    pub fn event(&mut self) -> serde_json::Value {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let v = self.read();
        assert!(v.get("event").is_some(), "expected an event, got {v}");
        v
    }
}
