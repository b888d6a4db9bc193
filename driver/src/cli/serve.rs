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
use ballot::serve::{parse_export, parse_nbd_server, Listen};

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

/// Cap on simultaneous clients when `max-connections` is 0 (N18).
const CONNECTIONS_MAX_DEFAULT: usize = 1024;
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
    rt.block_on(run(blockdevs, servers.pop(), exports, qmp, scrape))
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
    blockdevs: Vec<String>,
    server: Option<String>,
    exports: Vec<String>,
    qmp: Vec<Listen>,
    scrape: Vec<Listen>,
) -> ExitCode {
    let bus = EventBus::new();
    let mut graph = Graph::new(Host::process(bus.clone()));
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
    let quit = Arc::new(tokio::sync::Notify::new());
    let monitor = Arc::new(Monitor {
        graph: Arc::new(tokio::sync::Mutex::new(graph)),
        nbd: nbd.clone(),
        bus,
        quit: quit.clone(),
        exports: tokio::sync::Mutex::new(noted),
    });
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
    let Some(server) = server else {
        if !exports.is_empty() {
            return fail("--export needs an --nbd-server to serve it");
        }
        if qmp.is_empty() {
            return close_quorums(&monitor, ExitCode::SUCCESS).await;
        }
        // A monitor-only daemon: wait for quit or a signal.
        let mut sigterm =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => return fail(format!("cannot install SIGTERM handler: {e}")),
            };
        tokio::select! {
            biased;
            _ = quit.notified() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
        return close_quorums(&monitor, ExitCode::SUCCESS).await;
    };
    let opts = match parse_nbd_server(&server) {
        Ok(o) => o,
        Err(m) => return fail(format!("--nbd-server: {m}")),
    };
    let cap = if opts.max_connections == 0 {
        CONNECTIONS_MAX_DEFAULT
    } else {
        opts.max_connections as usize
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let mut conns = tokio::task::JoinSet::new();
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install SIGTERM handler: {e}")),
    };
    let listener = match bind(&opts.listen).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    loop {
        // N18: at the cap, new connections wait in the listen queue.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => None,
            _ = sigterm.recv() => None,
            _ = quit.notified() => None,
            r = accept_socket(&listener) => Some(r),
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                let nbd = nbd.clone();
                conns.spawn(async move {
                    nbd.serve_socket(stream, peer).await;
                    drop(slot);
                });
            }
            Some(Err(_)) => continue,
        }
        while conns.try_join_next().is_some() {}
    }
    // N33: stop accepting, answer new work with ESHUTDOWN, let requests in flight finish,
    // wait for clients to leave, flush, exit.
    nbd.begin_shutdown();
    if let L::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
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

enum L {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, String),
}

async fn bind(l: &Listen) -> Result<L, String> {
    match l {
        Listen::Inet { host, port } => tokio::net::TcpListener::bind((host.as_str(), *port))
            .await
            .map(L::Tcp)
            .map_err(|e| format!("Failed to bind socket to {host}:{port}: {e}")),
        Listen::Unix { path } => {
            let _ = std::fs::remove_file(path);
            tokio::net::UnixListener::bind(path)
                .map(|x| L::Unix(x, path.clone()))
                .map_err(|e| format!("Failed to bind socket to {path}: {e}"))
        }
    }
}

/// Binds `l` and serves every connection on it with `each`, each in a task of its own.
async fn serve_each<F, Fut>(l: &Listen, each: F) -> Result<(), String>
where
    F: Fn(Box<dyn Conn>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = bind(l).await?;
    tokio::spawn(async move {
        loop {
            let Ok(stream) = accept(&listener).await else {
                continue;
            };
            tokio::spawn(each(stream));
        }
    });
    Ok(())
}

async fn accept(l: &L) -> std::io::Result<Box<dyn Conn>> {
    Ok(accept_socket(l).await?.0)
}

/// Accepts a connection and duplicates its descriptor, with which the NBD server sees a
/// client that has hung up (`block-export-del` safe mode, `Server::clients`). A failed `dup`
/// leaves the connection served without it.
async fn accept_socket(l: &L) -> std::io::Result<(Box<dyn Conn>, Option<std::os::fd::OwnedFd>)> {
    fn watched<S: Conn + std::os::fd::AsFd>(s: S) -> (Box<dyn Conn>, Option<std::os::fd::OwnedFd>) {
        let fd = s.as_fd().try_clone_to_owned().ok();
        (Box::new(s), fd)
    }
    match l {
        L::Tcp(l) => l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            watched(s)
        }),
        L::Unix(l, _) => l.accept().await.map(|(s, _)| watched(s)),
    }
}

trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Conn for T {}
