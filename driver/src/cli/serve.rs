//! `ballot serve`: builds the graph, exports nodes over NBD, serves until SIGINT/SIGTERM, then
//! drains and flushes (NBD.md N33).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::nbd::server::{Export, Server};
use ballot::qmp::Monitor;
use ballot::serve::{parse_export, parse_nbd_server, serve_each, Listen};

/// Request buffers (up to 32 MiB, typically 64 KiB–2 MiB) come and go thousands of times a
/// second. glibc serves blocks above its mmap threshold with a fresh mapping each time and
/// returns freed heap tops to the kernel, so every buffer would be faulted in page by page
/// again. A fixed 64 MiB threshold and trim threshold keep freed buffers for reuse; peak use
/// stays bounded by the per-connection limits (N28).
fn keep_buffers_mapped() {
    const BYTES: libc::c_int = 64 << 20;
    // SAFETY: mallopt only changes allocator tuning parameters; it is called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, BYTES);
    }
}

/// How long shutdown waits for clients to leave (N33).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ballot: {msg}");
    ExitCode::from(1)
}

/// Entry point; `args` follow `serve`.
pub fn main(args: &[String]) -> ExitCode {
    keep_buffers_mapped();
    let (mut blockdevs, mut servers, mut exports) = (Vec::new(), Vec::new(), Vec::new());
    let (mut chardevs, mut monitors) = (Vec::<String>::new(), Vec::<String>::new());
    let mut metrics = Vec::<String>::new();
    let mut objects = Vec::<String>::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let target = match flag.as_str() {
            "--blockdev" => &mut blockdevs,
            "--nbd-server" => &mut servers,
            "--export" => &mut exports,
            "--chardev" => &mut chardevs,
            "--monitor" => &mut monitors,
            "--metrics" => &mut metrics,
            "--object" => &mut objects,
            _ => {
                eprintln!("ballot: unknown option '{a}'");
                return ExitCode::from(2);
            }
        };
        match inline.or_else(|| it.next().cloned()) {
            Some(v) => target.push(v),
            None => {
                eprintln!("ballot: option '{flag}' requires an argument");
                return ExitCode::from(2);
            }
        }
    }
    if servers.len() > 1 {
        return fail("only one --nbd-server may be given");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let qmp = match monitor_sockets(&chardevs, &monitors) {
        Ok(q) => q,
        Err(m) => return fail(m),
    };
    let mut scrape = Vec::new();
    for m in &metrics {
        match ballot::serve::parse_metrics(m) {
            Ok(l) => scrape.push(l),
            Err(e) => return fail(format!("--metrics: {e}")),
        }
    }
    rt.block_on(run(objects, blockdevs, servers.pop(), exports, qmp, scrape))
}

/// `--chardev socket,id=ID,path=P|host=H,port=N,server=on,wait=off` + `--monitor chardev=ID`.
fn monitor_sockets(chardevs: &[String], monitors: &[String]) -> Result<Vec<Listen>, String> {
    let mut defs = Vec::new();
    for c in chardevs {
        let rest = c.strip_prefix("socket,").ok_or_else(|| {
            format!("--chardev '{c}': only 'socket' character devices are supported")
        })?;
        let v = ballot::config::keyval::parse(rest).map_err(|e| format!("--chardev: {e}"))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
        let id = get("id").ok_or("--chardev: Parameter 'id' is missing")?;
        if get("server")
            .as_deref()
            .is_some_and(|x| x != "on" && x != "true")
        {
            return Err(format!(
                "--chardev {id}: ballot's monitor sockets are servers (server=on)"
            ));
        }
        let listen = match (get("path"), get("host"), get("port")) {
            (Some(path), None, None) => Listen::Unix { path },
            (None, Some(host), Some(port)) => Listen::Inet {
                host,
                port: port.parse().map_err(|_| {
                    format!("--chardev {id}: Parameter 'port' expects a port number")
                })?,
            },
            _ => return Err(format!("--chardev {id}: give path=, or host= and port=")),
        };
        defs.push((id, listen));
    }
    let mut out = Vec::new();
    for m in monitors {
        let v = ballot::config::keyval::parse(m).map_err(|e| format!("--monitor: {e}"))?;
        let id = v
            .get("chardev")
            .and_then(|x| x.as_str())
            .ok_or("--monitor: Parameter 'chardev' is missing")?;
        if let Some(mode) = v.get("mode").and_then(|x| x.as_str()) {
            if mode != "control" {
                return Err(format!(
                    "--monitor: mode '{mode}' is not supported (QMP only)"
                ));
            }
        }
        let (_, l) = defs
            .iter()
            .find(|(i, _)| i == id)
            .ok_or_else(|| format!("--monitor: chardev '{id}' not found"))?;
        out.push(l.clone());
    }
    Ok(out)
}

async fn run(
    objects: Vec<String>,
    blockdevs: Vec<String>,
    server: Option<String>,
    exports: Vec<String>,
    qmp: Vec<Listen>,
    scrape: Vec<Listen>,
) -> ExitCode {
    let bus = EventBus::new();
    let host = Host::process(bus.clone());
    // K1: objects exist before the nodes and the server that name them.
    for o in &objects {
        if let Err(e) = host.objects.add_arg(o) {
            return fail(format!("--object: {e}"));
        }
    }
    let objects = host.objects.clone();
    let mut graph = Graph::new(host);
    for b in &blockdevs {
        if let Err(e) = graph.blockdev_add_arg(b).await {
            return fail(e);
        }
    }
    let mut noted = Vec::new();
    let nbd = Server::new();
    let mut devs = Vec::new();
    for e in &exports {
        let o = match parse_export(e) {
            Ok(o) => o,
            Err(m) => return fail(format!("--export: {m}")),
        };
        if graph.get(&o.node_name).is_none() {
            return fail(format!(
                "Cannot find device={} nor node-name={}",
                o.node_name, o.node_name
            ));
        }
        let dev = match graph.claim(&o.node_name, &format!("export '{}'", o.id), o.writable) {
            Ok(dev) => dev,
            Err(err) => return fail(err),
        };
        devs.push(dev.clone());
        noted.push((o.id.clone(), o.name.clone(), o.node_name.clone()));
        if let Err(m) = nbd.add_export(Export {
            name: o.name,
            description: o.description,
            dev,
            writable: o.writable,
            multi_conn: o.multi_conn,
        }) {
            return fail(m);
        }
    }
    let monitor = Monitor {
        exports: tokio::sync::Mutex::new(noted),
        ..Monitor::new(graph, nbd.clone(), bus)
    };
    let quit = monitor.quit.clone();
    let monitor = Arc::new(monitor);
    for l in &qmp {
        let m = monitor.clone();
        if let Err(e) = serve_each(l, move |s| m.clone().serve(s)).await {
            return fail(e);
        }
    }
    for l in &scrape {
        let graph = monitor.graph.clone();
        if let Err(e) = serve_each(l, move |s| ballot::metrics::serve_one(s, graph.clone())).await {
            return fail(format!("--metrics: {e}"));
        }
    }
    let opts = match &server {
        Some(server) => match parse_nbd_server(server) {
            Ok(o) => Some(o),
            Err(m) => return fail(format!("--nbd-server: {m}")),
        },
        None if !exports.is_empty() => {
            return fail("--export needs an --nbd-server to serve it");
        }
        // Nothing to serve and no monitor to be told what to serve: a dry run.
        None if qmp.is_empty() => return close_quorums(&monitor, ExitCode::SUCCESS).await,
        // A monitor-only daemon (QMP may start an NBD server later).
        None => None,
    };
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install SIGTERM handler: {e}")),
    };
    if let Some(opts) = &opts {
        if let Err(e) = monitor.listener.start(nbd.clone(), opts, &objects).await {
            return fail(format!("--nbd-server: {e}"));
        }
    }
    tokio::select! {
        biased;
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
        _ = quit.notified() => {}
    }
    // N33: stop accepting, answer new work with ESHUTDOWN, let requests in flight finish,
    // wait for clients to leave, flush, exit. (A server stopped over QMP is not running.)
    nbd.begin_shutdown();
    let _ = monitor.listener.stop(DRAIN_TIMEOUT).await;
    let mut code = ExitCode::SUCCESS;
    for d in devs {
        if let Err(e) = d.flush().await {
            eprintln!("ballot: flush at shutdown failed: {e}");
            code = ExitCode::from(1);
        }
    }
    close_quorums(&monitor, code).await
}

/// H23: every quorum with a metadata node shuts down cleanly (children flushed, intent
/// cleared, clean flag set); a failure is printed and makes the exit status 1.
async fn close_quorums(monitor: &Monitor, code: ExitCode) -> ExitCode {
    let errors = monitor.graph.lock().await.close_quorums().await;
    for e in &errors {
        eprintln!("ballot: {e}");
    }
    if errors.is_empty() {
        code
    } else {
        ExitCode::from(1)
    }
}
