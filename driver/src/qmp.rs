//! The QMP monitor of `ballot serve` (ARCHITECTURE.md): greeting, capabilities negotiation,
//! the block commands ballot implements, events streamed to every monitor, and errors in QMP's
//! `{"error": {"class": ..., "desc": ...}}` form. Input is a stream of JSON objects, bounded
//! per command.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex, Notify};

use crate::drivers::replication::Mode;
use crate::events::{EventBus, Stream};
use crate::graph::Graph;
use crate::nbd::server::{Export, Server};

/// Largest command accepted, in bytes.
pub const COMMAND_BYTES_MAX: usize = 1 << 20;

/// What the monitor drives.
pub struct Monitor {
    /// The node graph.
    pub graph: Arc<Mutex<Graph>>,
    /// The NBD server's exports.
    pub nbd: Arc<Server>,
    /// The event bus whose QMP stream monitors receive.
    pub bus: EventBus,
    /// Notified by `quit`.
    pub quit: Arc<Notify>,
    /// Export id → (export name, node name).
    pub exports: Mutex<Vec<(String, String, String)>>,
    /// The NBD server's socket (`nbd-server-start`, `nbd-server-stop`).
    pub listener: crate::serve::NbdListener,
}

fn err(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

fn generic(desc: impl Into<String>) -> Value {
    err("GenericError", desc)
}

impl Monitor {
    /// A monitor over `graph` serving `nbd`'s exports, with its own `quit`, no exports noted
    /// yet and the NBD socket not started.
    pub fn new(graph: Graph, nbd: Arc<Server>, bus: EventBus) -> Monitor {
        Monitor {
            graph: Arc::new(Mutex::new(graph)),
            nbd,
            bus,
            quit: Arc::new(Notify::new()),
            exports: Mutex::new(Vec::new()),
            listener: Default::default(),
        }
    }

    /// Registers an export created on the command line, for `block-export-del`.
    pub async fn note_export(&self, id: &str, name: &str, node: &str) {
        self.exports
            .lock()
            .await
            .push((id.to_string(), name.to_string(), node.to_string()));
    }

    /// Runs one command (`execute` + `arguments`); returns the reply without `id`.
    pub async fn execute(&self, cmd: &str, args: &Value) -> (Value, bool) {
        let s = |k: &str| args.get(k).and_then(Value::as_str).map(String::from);
        let reply = match cmd {
            "qmp_capabilities" => json!({"return": {}}),
            "query-version" => {
                json!({"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": concat!("ballot ", env!("CARGO_PKG_VERSION"))}})
            }
            "query-named-block-nodes" => {
                let g = self.graph.lock().await;
                let list: Vec<Value> = g
                    .nodes()
                    .map(|n| {
                        json!({
                            "node-name": n.name,
                            "drv": n.dev.driver(),
                            "ro": false,
                            "image": {"virtual-size": n.dev.length().unwrap_or(0), "filename": n.name, "format": n.dev.driver()},
                            "children": n.children.iter().map(|(c, node)| json!({"child": c, "node-name": node})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                json!({ "return": list })
            }
            "blockdev-add" => {
                let mut g = self.graph.lock().await;
                match g.blockdev_add(args.clone(), false).await {
                    Ok(_) => json!({"return": {}}),
                    Err(e) => generic(e.to_string()),
                }
            }
            "blockdev-del" => match s("node-name") {
                None => generic("Parameter 'node-name' is missing"),
                Some(n) => match self.graph.lock().await.blockdev_del(&n).await {
                    Ok(()) => json!({"return": {}}),
                    Err(e) => generic(e.to_string()),
                },
            },
            "x-blockdev-change" => match s("parent") {
                None => generic("Parameter 'parent' is missing"),
                Some(p) => {
                    let (c, n) = (s("child"), s("node"));
                    match self
                        .graph
                        .lock()
                        .await
                        .change(&p, c.as_deref(), n.as_deref())
                        .await
                    {
                        Ok(()) => json!({"return": {}}),
                        Err(e) => generic(e.to_string()),
                    }
                }
            },
            "x-query-quorum-out-of-sync" => match s("node-name") {
                None => generic("Parameter 'node-name' is missing"),
                Some(n) => match self.graph.lock().await.query_out_of_sync(&n).await {
                    Ok(v) => json!({ "return": v }),
                    Err(e) => generic(e.to_string()),
                },
            },
            "x-quorum-resync" | "x-quorum-verify" => self.quorum_job(cmd, args).await,
            "blockdev-create" => self.blockdev_create(args).await,
            "query-blockstats" => {
                // Without query-nodes: one entry per export (QEMU's block backends, which
                // qemu-storage-daemon's exports are, with an empty device name); with it: one per
                // node.
                let query_nodes = match args.get("query-nodes") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return (
                            generic("Invalid parameter type for 'query-nodes', expected: boolean"),
                            false,
                        )
                    }
                };
                let names: Vec<(String, Option<String>)> = if query_nodes {
                    let g = self.graph.lock().await;
                    g.nodes().map(|n| (n.name.clone(), None)).collect()
                } else {
                    self.exports
                        .lock()
                        .await
                        .iter()
                        .map(|(id, _, node)| (node.clone(), Some(id.clone())))
                        .collect()
                };
                let g = self.graph.lock().await;
                let mut list = Vec::new();
                for (node, export) in names {
                    if let Some(mut v) = g.blockstats(&node).await {
                        if let (Some(id), Value::Object(m)) = (export, &mut v) {
                            m.insert("device".into(), json!(""));
                            m.insert("x-export".into(), json!(id));
                        }
                        list.push(v);
                    }
                }
                json!({ "return": list })
            }
            "query-jobs" => {
                let jobs = self.graph.lock().await.jobs();
                json!({"return": jobs.list().iter().map(|j| j.to_query_jobs()).collect::<Vec<_>>()})
            }
            "query-block-jobs" => {
                let jobs = self.graph.lock().await.jobs();
                json!({"return": jobs.list().iter().filter(|j| j.job_type != "create").map(|j| j.to_query_block_jobs()).collect::<Vec<_>>()})
            }
            "job-pause" | "job-resume" | "job-cancel" | "job-dismiss" | "block-job-pause"
            | "block-job-resume" | "block-job-cancel" => {
                let key = if cmd.starts_with("job-") {
                    "id"
                } else {
                    "device"
                };
                let Some(id) = s(key) else {
                    return (generic(format!("Parameter '{key}' is missing")), false);
                };
                let jobs = self.graph.lock().await.jobs();
                let verb = cmd.rsplit('-').next().unwrap_or_default();
                let r = match verb {
                    "pause" => jobs.pause(&id),
                    "resume" => jobs.resume(&id),
                    "cancel" => jobs.cancel(&id),
                    _ => jobs.dismiss(&id),
                };
                match r {
                    Ok(()) => json!({"return": {}}),
                    Err(e) => generic(e),
                }
            }
            "block-job-set-speed" => match (s("device"), args.get("speed")) {
                (None, _) => generic("Parameter 'device' is missing"),
                (_, None) => generic("Parameter 'speed' is missing"),
                (Some(d), Some(v)) => match v.as_i64() {
                    None => generic("Invalid parameter type for 'speed', expected: integer"),
                    Some(speed) => match self.graph.lock().await.jobs().set_speed(&d, speed) {
                        Ok(()) => json!({"return": {}}),
                        Err(e) => generic(e),
                    },
                },
            },
            "block-export-add" | "nbd-server-add" => self.export_add(cmd, args).await,
            // docs/tls.md K1: objects, TLS credentials only.
            "object-add" => {
                let Some(t) = s("qom-type") else {
                    return (generic("Parameter 'qom-type' is missing"), false);
                };
                let mut props = args.as_object().cloned().unwrap_or_default();
                props.remove("qom-type");
                // QEMU ≤ 5 nested the properties under "props".
                if let Some(Value::Object(inner)) = props.remove("props") {
                    props.extend(inner);
                }
                let objects = self.graph.lock().await.host().objects.clone();
                match objects.add(&t, &props) {
                    Ok(()) => json!({"return": {}}),
                    Err(e) => generic(e),
                }
            }
            "object-del" => match s("id") {
                None => generic("Parameter 'id' is missing"),
                Some(id) => {
                    let objects = self.graph.lock().await.host().objects.clone();
                    match objects.del(&id) {
                        Ok(()) => json!({"return": {}}),
                        Err(e) => generic(e),
                    }
                }
            },
            "nbd-server-start" => match crate::serve::parse_nbd_server_start(args) {
                Err(e) => generic(e),
                Ok(opts) => {
                    let objects = self.graph.lock().await.host().objects.clone();
                    match self.listener.start(self.nbd.clone(), &opts, &objects).await {
                        Ok(()) => json!({"return": {}}),
                        Err(e) => generic(e),
                    }
                }
            },
            // Stops listening and disconnects every client; the exports stay, for a later
            // nbd-server-start.
            "nbd-server-stop" => match self.listener.stop(std::time::Duration::ZERO).await {
                Ok(()) => {
                    let _ = self.nbd.set_tls(None);
                    json!({"return": {}})
                }
                Err(e) => generic(e),
            },
            "block-export-del" | "nbd-server-remove" => {
                let key = if cmd == "block-export-del" {
                    "id"
                } else {
                    "name"
                };
                match s(key) {
                    None => generic(format!("Parameter '{key}' is missing")),
                    Some(id) => {
                        let hard = match s("mode").as_deref() {
                            None | Some("safe") => false,
                            Some("hard") => true,
                            Some(other) => {
                                return (
                                    generic(format!(
                                        "Parameter 'mode' does not accept value '{other}'"
                                    )),
                                    false,
                                )
                            }
                        };
                        let mut ex = self.exports.lock().await;
                        match ex
                            .iter()
                            .position(|(i, n, _)| if key == "id" { i == &id } else { n == &id })
                        {
                            None => generic(format!("Export '{id}' is not found")),
                            Some(pos) if !hard && self.nbd.clients(&ex[pos].1) > 0 => {
                                // O1: safe mode refuses while clients are connected, as QEMU.
                                generic(format!("export '{}' still in use", ex[pos].0))
                            }
                            Some(pos) => {
                                let (id, name, node) = ex.remove(pos);
                                self.nbd.remove_export(&name);
                                self.nbd.disconnect(&name);
                                self.graph
                                    .lock()
                                    .await
                                    .unclaim(&node, &format!("export '{id}'"));
                                json!({"return": {}})
                            }
                        }
                    }
                }
            }
            "xen-set-replication" => self.set_replication(args).await,
            "query-xen-replication-status" => {
                // R38, plus ballot's `stage` (O2) when a replication node exists.
                let (r, stage) = self.graph.lock().await.replication_status();
                let mut v = match r {
                    Ok(()) => json!({"error": false}),
                    Err(e) => json!({"error": true, "desc": e.to_string()}),
                };
                if let (Some(st), Value::Object(m)) = (stage, &mut v) {
                    m.insert("stage".into(), json!(st.as_str()));
                }
                json!({ "return": v })
            }
            "xen-colo-do-checkpoint" => {
                // R39.
                match self.graph.lock().await.replication_checkpoint_all().await {
                    Ok(()) => json!({"return": {}}),
                    Err(e) => generic(e.to_string()),
                }
            }
            "quit" => return (json!({"return": {}}), true),
            other => err(
                "CommandNotFound",
                format!("The command {other} has not been found"),
            ),
        };
        (reply, false)
    }

    /// H16, H17: `x-quorum-resync` and `x-quorum-verify`.
    async fn quorum_job(&self, cmd: &str, args: &Value) -> Value {
        use crate::drivers::quorum::resync::ResyncRequest;
        use crate::drivers::quorum::verify::VerifyRequest;
        let parsed = (|| -> Result<_, String> {
            let string = |k: &str| -> Result<Option<String>, String> {
                match args.get(k) {
                    None => Ok(None),
                    Some(Value::String(v)) => Ok(Some(v.clone())),
                    Some(_) => Err(format!(
                        "Invalid parameter type for '{k}', expected: string"
                    )),
                }
            };
            let uint = |k: &str| -> Result<Option<u64>, String> {
                match args.get(k) {
                    None => Ok(None),
                    Some(v) => match (v.as_u64(), v.as_i64()) {
                        (Some(n), _) => Ok(Some(n)),
                        (None, Some(_)) => {
                            Err(format!("Parameter '{k}' expects a non-negative value"))
                        }
                        _ => Err(format!(
                            "Invalid parameter type for '{k}', expected: integer"
                        )),
                    },
                }
            };
            let boolean = |k: &str| -> Result<Option<bool>, String> {
                match args.get(k) {
                    None => Ok(None),
                    Some(Value::Bool(b)) => Ok(Some(*b)),
                    Some(_) => Err(format!(
                        "Invalid parameter type for '{k}', expected: boolean"
                    )),
                }
            };
            let node = string("node-name")?.ok_or("Parameter 'node-name' is missing")?;
            let job_id = string("job-id")?;
            let speed = uint("speed")?.unwrap_or(0);
            let auto_dismiss = boolean("auto-dismiss")?.unwrap_or(true);
            let verify = (cmd == "x-quorum-verify").then(|| -> Result<VerifyRequest, String> {
                Ok(VerifyRequest {
                    job_id: job_id.clone(),
                    start: uint("start")?.unwrap_or(0),
                    end: uint("end")?,
                    repair: boolean("repair")?.unwrap_or(true),
                    speed,
                    auto_dismiss,
                })
            });
            let verify = verify.transpose()?;
            Ok((
                node,
                verify,
                ResyncRequest {
                    job_id,
                    speed,
                    recover_lowest: false,
                    auto_dismiss,
                },
            ))
        })();
        let (node, verify, resync) = match parsed {
            Ok(p) => p,
            Err(e) => return generic(e),
        };
        let q = match self.graph.lock().await.quorum(&node) {
            Ok(q) => q,
            Err(e) => return generic(e.to_string()),
        };
        let started = match verify {
            Some(v) => q.start_verify(v),
            None => q.start_resync(resync),
        };
        match started {
            Ok(_) => json!({"return": {}}),
            Err(e) => generic(e),
        }
    }

    /// `blockdev-create` (QEMU's job of type `create`): `driver=file` makes an empty file of
    /// `size` bytes at `filename`, `driver=qcow2` writes a new image into the node `file`.
    /// Argument types are checked at once; the creation itself runs as a job that the caller
    /// follows with `query-jobs` and ends with `job-dismiss`, as in QEMU.
    async fn blockdev_create(&self, args: &Value) -> Value {
        let plan = match create_plan(args) {
            Ok(p) => p,
            Err(e) => return generic(e),
        };
        let (id, plan) = plan;
        let file_dev = match &plan {
            CreatePlan::Qcow2 { node, .. } => match self.graph.lock().await.get(node) {
                // Formatting a node someone reads or writes would pull its data from under
                // them (QEMU's permissions refuse it the same way).
                Some(n) if n.parent.is_some() || !n.exports.is_empty() => {
                    let user = match (&n.parent, n.exports.first()) {
                        (Some((p, c)), _) => format!("node '{p}' (as its '{c}')"),
                        (None, Some((u, _))) => u.clone(),
                        (None, None) => String::new(),
                    };
                    return generic(format!(
                        "Node '{node}' is in use by {user}: blockdev-create needs a node nothing else uses"
                    ));
                }
                Some(n) => Some(n.dev.clone()),
                None => {
                    return generic(format!(
                        "Cannot find device='{node}' nor node-name='{node}'"
                    ))
                }
            },
            CreatePlan::File { .. } => None,
        };
        let jobs = self.graph.lock().await.jobs();
        let job = match jobs.create(&id, "create", 0, false) {
            Ok(j) => j,
            Err(e) => return generic(e),
        };
        tokio::spawn(async move {
            job.start();
            let r: Result<(), String> = match plan {
                CreatePlan::File { filename, size } => create_file(&filename, size),
                CreatePlan::Qcow2 { node, options } => match file_dev {
                    Some(dev) => crate::drivers::qcow2::create::create(&dev, &options)
                        .await
                        .map_err(|e| format!("Could not create a qcow2 image on '{node}': {e}")),
                    None => Err("no file node".into()),
                },
            };
            match r {
                Ok(()) => job.finish(None, Vec::new()),
                Err(m) => job.fail(crate::error::ErrorKind::Io, m),
            }
        });
        json!({"return": {}})
    }

    /// R37: `xen-set-replication`.
    async fn set_replication(&self, args: &Value) -> Value {
        let flag = |k: &str| -> Result<Option<bool>, Value> {
            match args.get(k) {
                None => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(generic(format!(
                    "Invalid parameter type for '{k}', expected: boolean"
                ))),
            }
        };
        let parsed = (|| {
            let enable = flag("enable")?.ok_or_else(|| generic("Parameter 'enable' is missing"))?;
            let primary =
                flag("primary")?.ok_or_else(|| generic("Parameter 'primary' is missing"))?;
            let failover = flag("failover")?;
            if let Some(k) = args.as_object().and_then(|m| {
                m.keys()
                    .find(|k| !["enable", "primary", "failover"].contains(&k.as_str()))
            }) {
                return Err(generic(format!("Parameter '{k}' is unexpected")));
            }
            Ok((enable, primary, failover))
        })();
        let (enable, primary, failover) = match parsed {
            Ok(v) => v,
            Err(e) => return e,
        };
        let g = self.graph.lock().await;
        let r = if enable {
            if failover.is_some() {
                return generic("Parameter 'failover' is only for stopping replication");
            }
            let mode = if primary {
                Mode::Primary
            } else {
                Mode::Secondary
            };
            g.replication_start_all(mode).await
        } else {
            let failover = failover.unwrap_or(false);
            let r = g.replication_stop_all(failover).await;
            if failover {
                Ok(())
            } else {
                r
            }
        };
        match r {
            Ok(()) => json!({"return": {}}),
            Err(e) => generic(e.to_string()),
        }
    }

    async fn export_add(&self, cmd: &str, args: &Value) -> Value {
        let s = |k: &str| args.get(k).and_then(Value::as_str).map(String::from);
        let b = |k: &str| args.get(k).and_then(Value::as_bool);
        if cmd == "block-export-add" && s("type").as_deref() != Some("nbd") {
            return generic("Parameter 'type' must be 'nbd' (ballot serves NBD exports)");
        }
        let node = match s(if cmd == "nbd-server-add" {
            "device"
        } else {
            "node-name"
        }) {
            Some(n) => n,
            None => return generic("Parameter 'node-name' is missing"),
        };
        let id = s("id").unwrap_or_else(|| node.clone());
        let name = s("name").unwrap_or_else(|| node.clone());
        let mut g = self.graph.lock().await;
        if g.get(&node).is_none() {
            return generic(format!("Cannot find device={node} nor node-name={node}"));
        }
        let writable = b("writable").unwrap_or(false);
        let user = format!("export '{id}'");
        let dev = match g.claim(&node, &user, writable) {
            Ok(dev) => dev,
            Err(e) => return generic(e.to_string()),
        };
        let r = self.nbd.add_export(Export {
            name: name.clone(),
            description: s("description").unwrap_or_default(),
            dev,
            writable,
            multi_conn: s("multi-conn").as_deref() != Some("off"),
        });
        match r {
            Ok(()) => {
                drop(g);
                self.note_export(&id, &name, &node).await;
                json!({"return": {}})
            }
            Err(m) => {
                g.unclaim(&node, &user);
                generic(m)
            }
        }
    }

    /// Serves one monitor connection: greeting, then commands; events as they come.
    pub async fn serve<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let writer = tokio::spawn(async move {
            let mut wr = wr;
            while let Some(v) = rx.recv().await {
                let mut line = v.to_string();
                line.push_str("\r\n");
                if wr.write_all(line.as_bytes()).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
            }
        });
        let _ = tx.send(json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": concat!("ballot ", env!("CARGO_PKG_VERSION"))}, "capabilities": []}}));
        let mut negotiated = false;
        let mut quitting = false;
        let mut sub = None;
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        'conn: loop {
            // Take every complete JSON value from the buffer.
            loop {
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                match it.next() {
                    Some(Ok(v)) => {
                        let used = it.byte_offset();
                        buf.drain(..used);
                        let id = v.get("id").cloned();
                        let reply = match (&v, v.get("execute").and_then(Value::as_str)) {
                            (Value::Object(_), Some(cmd)) => {
                                let args = v.get("arguments").cloned().unwrap_or(json!({}));
                                if !negotiated && cmd != "qmp_capabilities" {
                                    err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
                                } else if negotiated && cmd == "qmp_capabilities" {
                                    err("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
                                } else {
                                    let (r, quit) = self.execute(cmd, &args).await;
                                    if cmd == "qmp_capabilities" {
                                        negotiated = true;
                                        let t = tx.clone();
                                        sub = Some(self.bus.subscribe(Stream::Qmp, move |e| {
                                            let _ = t.send(e.to_qmp());
                                        }));
                                    }
                                    if quit {
                                        let mut r = r;
                                        if let (Some(id), Value::Object(m)) = (id.clone(), &mut r) {
                                            m.insert("id".into(), id);
                                        }
                                        let _ = tx.send(r);
                                        quitting = true;
                                        break 'conn;
                                    }
                                    r
                                }
                            }
                            (Value::Object(_), None) => generic("QMP input lacks member 'execute'"),
                            _ => generic("QMP input must be a JSON object"),
                        };
                        let mut reply = reply;
                        if let (Some(id), Value::Object(m)) = (id, &mut reply) {
                            m.insert("id".into(), id);
                        }
                        let _ = tx.send(reply);
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(_)) => {
                        // Unparseable input: report it and drop what was read (QMP resyncs).
                        buf.clear();
                        let _ = tx.send(generic("JSON parse error"));
                        break;
                    }
                    None => {
                        buf.clear();
                        break;
                    }
                }
            }
            if buf.len() > COMMAND_BYTES_MAX {
                let _ = tx.send(generic("command too long"));
                break;
            }
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        if let Some(id) = sub {
            self.bus.unsubscribe(id);
        }
        drop(tx);
        let _ = writer.await;
        // Only once `quit`'s return is on the wire may the process begin to exit.
        if quitting {
            self.quit.notify_one();
        }
    }
}

/// What a `blockdev-create` makes.
enum CreatePlan {
    File {
        filename: String,
        size: u64,
    },
    Qcow2 {
        node: String,
        options: crate::drivers::qcow2::create::CreateOptions,
    },
}

/// `blockdev-create`'s arguments, checked as QEMU's schema checks them: the job id and the
/// plan, or the error to reply with.
fn create_plan(args: &Value) -> Result<(String, CreatePlan), String> {
    use crate::drivers::qcow2::create::CreateOptions;
    let top = args
        .as_object()
        .ok_or("Invalid parameter type, expected: object")?;
    if let Some(k) = top
        .keys()
        .find(|k| !["job-id", "options"].contains(&k.as_str()))
    {
        return Err(format!("Parameter '{k}' is unexpected"));
    }
    let id = match top.get("job-id") {
        None => return Err("Parameter 'job-id' is missing".into()),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("Invalid parameter type for 'job-id', expected: string".into()),
    };
    let o = match top.get("options") {
        None => return Err("Parameter 'options' is missing".into()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("Invalid parameter type for 'options', expected: object".into()),
    };
    let string = |k: &str| -> Result<Option<String>, String> {
        match o.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!(
                "Invalid parameter type for 'options.{k}', expected: string"
            )),
        }
    };
    let uint = |k: &str| -> Result<Option<u64>, String> {
        match o.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                format!("Invalid parameter type for 'options.{k}', expected: integer")
            }),
        }
    };
    let require = |k: &str, v: Option<u64>| -> Result<u64, String> {
        v.ok_or_else(|| format!("Parameter 'options.{k}' is missing"))
    };
    let known = |allowed: &[&str]| -> Result<(), String> {
        match o.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(format!("Parameter 'options.{k}' is unexpected")),
            None => Ok(()),
        }
    };
    let prealloc = |v: Option<String>| -> Result<(), String> {
        match v.as_deref() {
            None | Some("off") => Ok(()),
            Some(m) => Err(format!(
                "Unsupported preallocation mode '{m}' (ballot creates sparse images: use 'off')"
            )),
        }
    };
    let driver = string("driver")?.ok_or("Parameter 'options.driver' is missing")?;
    let plan = match driver.as_str() {
        "file" => {
            known(&[
                "driver",
                "filename",
                "size",
                "preallocation",
                "nocow",
                "extent-size-hint",
            ])?;
            prealloc(string("preallocation")?)?;
            CreatePlan::File {
                filename: string("filename")?.ok_or("Parameter 'options.filename' is missing")?,
                size: require("size", uint("size")?)?,
            }
        }
        "qcow2" => {
            known(&[
                "driver",
                "file",
                "size",
                "version",
                "backing-file",
                "backing-fmt",
                "cluster-size",
                "refcount-bits",
                "preallocation",
                "lazy-refcounts",
                "data-file",
                "data-file-raw",
                "encrypt",
                "compression-type",
                "extended-l2",
            ])?;
            prealloc(string("preallocation")?)?;
            let node = match o.get("file") {
                None => return Err("Parameter 'options.file' is missing".into()),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(_)) => {
                    return Err("options.file: give the node-name of a file node made with blockdev-add (inline definitions are not supported)".into())
                }
                Some(_) => {
                    return Err("Invalid parameter type for 'options.file', expected: string".into())
                }
            };
            for (k, why) in [
                ("data-file", "external data files"),
                ("data-file-raw", "external data files"),
                ("encrypt", "encryption"),
            ] {
                if o.contains_key(k) {
                    return Err(format!(
                        "options.{k}: ballot's qcow2 driver does not support {why}"
                    ));
                }
            }
            if o.get("lazy-refcounts") == Some(&Value::Bool(true)) {
                return Err("options.lazy-refcounts: ballot keeps refcounts up to date (lazy-refcounts=on is not supported)".into());
            }
            if o.get("extended-l2") == Some(&Value::Bool(true)) {
                return Err("options.extended-l2: extended L2 entries are not supported".into());
            }
            match string("compression-type")?.as_deref() {
                None | Some("zlib") => {}
                Some(t) => {
                    return Err(format!(
                        "options.compression-type: '{t}' is not supported (zlib is)"
                    ))
                }
            }
            let size = require("size", uint("size")?)?;
            if size % 512 != 0 {
                return Err("Image size must be a multiple of 512 bytes".into());
            }
            let mut opts = CreateOptions {
                size,
                ..CreateOptions::default()
            };
            match string("version")?.as_deref() {
                None | Some("v3") => {}
                Some("v2") => opts.version = 2,
                Some(v) => {
                    return Err(format!(
                        "Parameter 'options.version' does not accept value '{v}'"
                    ))
                }
            }
            if let Some(cs) = uint("cluster-size")? {
                opts.cluster_bits = crate::drivers::qcow2::create::cluster_bits(cs)?;
            }
            if let Some(rb) = uint("refcount-bits")? {
                opts.refcount_order = crate::drivers::qcow2::create::refcount_order(rb)?;
            }
            let backing = string("backing-file")?;
            let fmt = string("backing-fmt")?;
            opts.backing = match (backing, fmt) {
                (Some(b), f) => Some((b, f.unwrap_or_default())),
                (None, Some(_)) => {
                    return Err("Backing format cannot be used without backing file".into())
                }
                (None, None) => None,
            };
            // The layout's own refusals (cluster size range, v2 refcounts...) come now, as
            // QEMU's option checks do, rather than from a failed job.
            crate::drivers::qcow2::create::layout(&opts).map_err(|e| e.to_string())?;
            CreatePlan::Qcow2 {
                node,
                options: opts,
            }
        }
        other => {
            return Err(format!(
                "Driver '{other}' does not support blockdev-create (ballot creates file and qcow2)"
            ))
        }
    };
    Ok((id, plan))
}

/// `blockdev-create` with `driver=file`: the file, emptied, then `size` bytes long (sparse).
fn create_file(filename: &str, size: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(filename)
        .map_err(|e| format!("Could not create '{filename}': {}", io_text(&e)))?;
    f.set_len(size).map_err(|e| {
        format!(
            "Could not resize '{filename}' to {size} bytes: {}",
            io_text(&e)
        )
    })?;
    f.sync_all()
        .map_err(|e| format!("Could not flush '{filename}': {}", io_text(&e)))
}

/// An I/O error as QEMU words it: the system's message without Rust's "(os error N)".
fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
