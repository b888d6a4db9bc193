//! Fuzz target `qmp_monitor`: the QMP monitor's JSON input (`ballot::qmp`, STYLE.md habit 4).
//! The input is the byte stream a client sends after connecting.
//!
//! Every input must end in replies, never a panic or a hang: the first line out is the
//! greeting, every other line is one JSON object that is a `return`, an `error` with a string
//! `class` and `desc`, or an `event`; there are never more replies than input bytes; and after
//! the session the graph still answers `query-named-block-nodes`.
//!
//! Inputs that would add a node of a driver that touches the file system or the network
//! (anything but null-co, raw, quorum, overlay, replication) are skipped: the decoded JSON is
//! checked first, with the same streaming parser the monitor uses. So are inputs that would
//! open a socket or read a directory (`nbd-server-start`, `object-add`).

use std::sync::Arc;

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::nbd::server::Server;
use ballot::qmp::Monitor;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SAFE_DRIVERS: [&str; 5] = ["null-co", "raw", "quorum", "overlay", "replication"];

/// Whether `v` names a driver outside [`SAFE_DRIVERS`] anywhere.
fn touches_outside(v: &Value) -> bool {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(c)) = m.get("execute") {
                if c == "nbd-server-start" || c == "object-add" {
                    return true;
                }
            }
            if let Some(d) = m.get("driver") {
                match d.as_str() {
                    Some(s) if SAFE_DRIVERS.contains(&s) => {}
                    _ => return true,
                }
            }
            m.values().any(touches_outside)
        }
        Value::Array(a) => a.iter().any(touches_outside),
        _ => false,
    }
}

/// Checks one client byte stream.
pub fn check(data: &[u8]) {
    // Any value the monitor could decode, including after a parse error drops a chunk, is
    // somewhere in the input: scan every suffix start that begins a JSON value.
    for (i, b) in data.iter().enumerate() {
        if *b == b'{' || *b == b'[' {
            let mut it = serde_json::Deserializer::from_slice(&data[i..]).into_iter::<Value>();
            if let Some(Ok(v)) = it.next() {
                if touches_outside(&v) {
                    return;
                }
            }
        }
    }
    let out = crate::rt::block_on(async {
        let bus = EventBus::new();
        let graph = Graph::new(Host::process(bus.clone()));
        let m = Arc::new(Monitor {
            graph: Arc::new(tokio::sync::Mutex::new(graph)),
            nbd: Server::new(),
            bus,
            quit: Arc::new(tokio::sync::Notify::new()),
            exports: tokio::sync::Mutex::new(Vec::new()),
            listener: Default::default(),
        });
        let (client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(m.clone().serve(server));
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        let _ = writer.await;
        serving.await.expect("the monitor task panicked");
        let (r, _) = m.execute("query-named-block-nodes", &Value::Null).await;
        assert!(
            r.get("return").is_some_and(Value::is_array),
            "graph query after the session: {r}"
        );
        out
    });
    let text = String::from_utf8(out).expect("monitor output is UTF-8");
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let greeting: Value = serde_json::from_str(lines.next().expect("a greeting")).expect("JSON");
    assert!(greeting.get("QMP").is_some(), "first line {greeting}");
    let mut replies = 0usize;
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        let m = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {l}"));
        let kinds = ["return", "error", "event"]
            .iter()
            .filter(|k| m.contains_key(**k))
            .count();
        assert_eq!(kinds, 1, "not exactly one of return/error/event: {l}");
        if let Some(e) = m.get("error") {
            assert!(
                e.get("class").is_some_and(Value::is_string)
                    && e.get("desc").is_some_and(Value::is_string),
                "error without class and desc: {l}"
            );
        }
        if !m.contains_key("event") {
            replies += 1;
        }
    }
    assert!(
        replies <= data.len() + 1,
        "{replies} replies to {} bytes",
        data.len()
    );
}

/// The fuzz target.
pub fn fuzz(data: &[u8]) {
    check(data);
}
