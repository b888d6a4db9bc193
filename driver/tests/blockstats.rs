//! Issue 20 item 2: `query-blockstats` counts exactly the I/O a client did, on the export's
//! node and on every child, with QEMU's field names, and the quorum's own counters (how reads
//! were voted, the events emitted) beside them. The client is nbdsh, which sends nothing but
//! the requests the script names.

mod peers;

use std::process::Command;

use peers::{quorum_args, scratch, start_ballot, Qmp};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn nbdsh(socket: &std::path::Path, script: &str) {
    // nbdsh runs the python3 first on PATH, which must be the one with the nbd module (N49).
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", &peers::uri(socket, "disk0"), "-c", script])
        .output()
        .expect("nbdsh");
    assert!(
        out.status.success(),
        "nbdsh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The counters of `v["stats"]` that a test can know exactly (not times, not idle time).
fn counts(v: &Value) -> Value {
    let s = &v["stats"];
    let keys = [
        "rd_bytes",
        "wr_bytes",
        "unmap_bytes",
        "rd_operations",
        "wr_operations",
        "flush_operations",
        "unmap_operations",
        "failed_rd_operations",
        "failed_wr_operations",
        "failed_flush_operations",
        "failed_unmap_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "invalid_flush_operations",
        "invalid_unmap_operations",
        "wr_highest_offset",
    ];
    let mut m = serde_json::Map::new();
    for k in keys {
        m.insert(k.into(), s[k].clone());
    }
    Value::Object(m)
}

fn expect(
    rd: (u64, u64),
    wr: (u64, u64),
    flush: u64,
    unmap: (u64, u64),
    invalid_rd: u64,
    highest: u64,
) -> Value {
    json!({
        "rd_bytes": rd.1, "wr_bytes": wr.1, "unmap_bytes": unmap.1,
        "rd_operations": rd.0, "wr_operations": wr.0, "flush_operations": flush,
        "unmap_operations": unmap.0,
        "failed_rd_operations": 0, "failed_wr_operations": 0, "failed_flush_operations": 0,
        "failed_unmap_operations": 0,
        "invalid_rd_operations": invalid_rd, "invalid_wr_operations": 0,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
        "wr_highest_offset": highest,
    })
}

#[test]
fn query_blockstats_counts_exactly_what_the_client_did() {
    if !peers::need(&["nbdsh"], "python3-libnbd") {
        return;
    }
    let dir = scratch("blockstats");
    let socket = dir.join("nbd.sock");
    let qmp = dir.join("qmp.sock");
    let args = quorum_args(
        &dir,
        4 * MIB,
        &[
            peers::nbd_server_arg(&socket),
            "--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into(),
            format!(
                "--chardev=socket,path={},server=on,wait=off,id=m0",
                qmp.display()
            ),
            "--monitor=chardev=m0".into(),
        ],
    );
    let mut served = start_ballot(&args, &socket, &[&qmp]);
    let mut q = Qmp::connect(&qmp);
    // Nothing yet: every counter zero, no idle time.
    let before = q.execute("query-blockstats", json!({}));
    assert_eq!(before.as_array().map(Vec::len), Some(1), "{before}");
    assert_eq!(before[0]["device"], "");
    assert_eq!(before[0]["node-name"], "q0");
    assert_eq!(before[0]["x-export"], "e0");
    assert_eq!(counts(&before[0]), expect((0, 0), (0, 0), 0, (0, 0), 0, 0));
    assert_eq!(before[0]["stats"].get("idle_time_ns"), None);

    // Two writes, a write-zeroes, a read, a flush, a trim, and a read past the end that the
    // client sends anyway (strict mode off): the NBD server refuses that one itself (N20), so
    // it never reaches a node and no node counts it.
    nbdsh(
        &socket,
        "h.pwrite(b'\\x11' * 65536, 0)\n\
         h.pwrite(b'\\x22' * 4096, 1048576)\n\
         h.zero(8192, 2097152)\n\
         assert h.pread(8192, 0) == b'\\x11' * 8192\n\
         h.flush()\n\
         h.trim(65536, 3145728)\n\
         h.set_strict_mode(0)\n\
         try:\n    h.pread(512, 4194304)\n    raise SystemExit('read past the end succeeded')\n\
         except nbd.Error:\n    pass\n",
    );
    let after = q.execute("query-blockstats", json!({}));
    let e = &after[0];
    let wr = (3, 65536 + 4096 + 8192);
    assert_eq!(
        counts(e),
        expect((1, 8192), wr, 1, (1, 65536), 0, 2097152 + 8192),
        "{e}"
    );
    assert!(e["stats"]["idle_time_ns"].as_u64().is_some(), "{e}");
    assert!(e["stats"]["rd_total_time_ns"].as_u64() > Some(0), "{e}");
    // The quorum: one voted read, all copies equal; no event.
    let xq = &e["x-quorum"];
    assert_eq!(xq["reads-fast"], 1, "{xq}");
    assert_eq!(xq["reads-hashed"], 0);
    assert_eq!(xq["reads-failed"], 0);
    assert_eq!(xq["report-bad-events"], 0);
    assert_eq!(xq["failure-events"], 0);
    // Each child got every write and the read (read-pattern=quorum reads all), one flush, and
    // no discard (the quorum's default discard=ignore keeps it).
    let children = xq["children"].as_array().expect("children");
    assert_eq!(children.len(), 3);
    for (i, c) in children.iter().enumerate() {
        assert_eq!(c["child"], format!("children.{i}"));
        assert_eq!(c["node-name"], format!("f{i}"));
        assert_eq!(c["out-of-sync-bytes"], 0);
        assert_eq!(
            counts(c),
            expect((1, 8192), wr, 1, (0, 0), 0, 2097152 + 8192),
            "child {i}: {c}"
        );
    }

    // A child's copy goes bad behind ballot's back: the next read is a hashed vote that
    // outvotes it and reports it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("c.raw"))
            .unwrap();
        f.write_all_at(&[0x99; 4096], 0).unwrap();
    }
    nbdsh(&socket, "assert h.pread(4096, 0) == b'\\x11' * 4096\n");
    let e = &q.execute("query-blockstats", json!({}))[0];
    let xq = &e["x-quorum"];
    assert_eq!(xq["reads-fast"], 1, "{xq}");
    assert_eq!(xq["reads-hashed"], 1, "{xq}");
    assert_eq!(xq["report-bad-events"], 1, "{xq}");
    assert_eq!(e["stats"]["rd_operations"], 2);
    assert_eq!(e["stats"]["rd_bytes"], 8192 + 4096);

    // query-nodes: every node, the file nodes included.
    let nodes = q.execute("query-blockstats", json!({"query-nodes": true}));
    let mut names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap_or("?").to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["f0", "f1", "f2", "q0"]);
    let err = q
        .try_execute("query-blockstats", json!({"query-nodes": 1}))
        .expect_err("a number is refused");
    assert_eq!(
        err["desc"],
        "Invalid parameter type for 'query-nodes', expected: boolean"
    );
    drop(q);
    assert_eq!(served.terminate(), Some(0));
}

/// `GET path` on 127.0.0.1:`port`: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = None;
    for _ in 0..200 {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s = Some(c);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut s = s.expect("the metrics endpoint listens");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The samples of an exposition, by `name{labels}`.
fn samples(body: &str) -> std::collections::BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Issue 20 item 3: a Prometheus scrape during a fio run shows counters that only rise, and
/// that rise in all by exactly what fio reports it did.
#[test]
fn a_scrape_during_fio_shows_counters_that_rise_by_what_fio_did() {
    if !peers::need(&["fio"], "fio") {
        return;
    }
    let dir = scratch("metrics");
    let socket = dir.join("nbd.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = quorum_args(
        &dir,
        64 * MIB,
        &[
            peers::nbd_server_arg(&socket),
            "--export=type=nbd,id=e0,node-name=q0,name=disk0,writable=on".into(),
            format!("--metrics=addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        ],
    );
    let mut served = start_ballot(&args, &socket, &[]);
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let before = samples(&body);
    let key = |name: &str, labels: &str| format!("{name}{{{labels}}}");
    let written = key("ballot_node_written_bytes_total", "node=\"q0\"");
    let read = key("ballot_node_read_bytes_total", "node=\"q0\"");
    let writes = key("ballot_node_requests_total", "node=\"q0\",op=\"write\"");
    let reads = key("ballot_node_requests_total", "node=\"q0\",op=\"read\"");
    assert_eq!(before.get(&written), Some(&0.0), "{body}");
    // Help, type and unit lines as Prometheus expects them.
    assert!(
        body.contains("# TYPE ballot_node_written_bytes_total counter"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE ballot_node_request_duration_seconds histogram"),
        "{body}"
    );
    assert_eq!(http_get(port, "/nope").0, "HTTP/1.1 404 Not Found");

    let fio = std::process::Command::new("fio")
        .args([
            "--name=mix",
            "--ioengine=nbd",
            &format!("--uri={}", peers::uri(&socket, "disk0")),
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=16k",
            "--size=32M",
            "--iodepth=8",
            "--io_size=96M",
            "--randrepeat=1",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("fio");
    // Scrapes while fio runs: every counter only rises.
    let mut last = before.clone();
    let mut scrapes = 0;
    let fio = {
        let mut fio = fio;
        loop {
            let now = samples(&http_get(port, "/metrics").1);
            for k in [&written, &read, &writes, &reads] {
                assert!(
                    now[k] >= last[k],
                    "{k} went down: {} -> {}",
                    last[k],
                    now[k]
                );
            }
            last = now;
            scrapes += 1;
            if fio.try_wait().unwrap().is_some() {
                break fio;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let out = fio.wait_with_output().unwrap();
    assert!(out.status.success());
    // fio may print notes before its JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value =
        serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).expect("fio json");
    let job = &report["jobs"][0];
    let after = samples(&http_get(port, "/metrics").1);
    let delta = |k: &str| after[k] - before[k];
    assert_eq!(delta(&written), job["write"]["io_bytes"].as_f64().unwrap());
    assert_eq!(delta(&read), job["read"]["io_bytes"].as_f64().unwrap());
    assert_eq!(delta(&writes), job["write"]["total_ios"].as_f64().unwrap());
    assert_eq!(delta(&reads), job["read"]["total_ios"].as_f64().unwrap());
    // The histogram counts every successful write once: its count, and its cumulative
    // buckets, which rise to the count at +Inf.
    let bucket = |le: &str| {
        after[&key(
            "ballot_node_request_duration_seconds_bucket",
            &format!("node=\"q0\",op=\"write\",le=\"{le}\""),
        )]
    };
    assert_eq!(bucket("+Inf"), after[&writes]);
    assert!(bucket("1e-05") <= bucket("0.001") && bucket("0.001") <= bucket("+Inf"));
    assert_eq!(
        after[&key(
            "ballot_node_request_duration_seconds_count",
            "node=\"q0\",op=\"write\""
        )],
        after[&writes]
    );
    assert!(scrapes >= 2, "{scrapes} scrapes");
    assert_eq!(served.terminate(), Some(0));
}
