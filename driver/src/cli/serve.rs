//! `ballot serve`: builds the graph, exports nodes over NBD, serves until SIGINT/SIGTERM, then
//! drains and flushes (NBD.md N33).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;
use ballot::nbd::server::{Export, Server};
use ballot::serve::{parse_export, parse_nbd_server, Listen};

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
    let (mut blockdevs, mut servers, mut exports) = (Vec::new(), Vec::new(), Vec::new());
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
            "--chardev" | "--monitor" => {
                return fail(format!(
                    "option '{flag}': the QMP monitor is not part of this build yet"
                ))
            }
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
    rt.block_on(run(blockdevs, servers.pop(), exports))
}

async fn run(blockdevs: Vec<String>, server: Option<String>, exports: Vec<String>) -> ExitCode {
    let mut graph = Graph::new(Host::process(EventBus::new()));
    for b in &blockdevs {
        if let Err(e) = graph.blockdev_add_arg(b).await {
            return fail(e);
        }
    }
    let nbd = Server::new();
    let mut devs = Vec::new();
    for e in &exports {
        let o = match parse_export(e) {
            Ok(o) => o,
            Err(m) => return fail(format!("--export: {m}")),
        };
        let Some(node) = graph.get(&o.node_name) else {
            return fail(format!(
                "Cannot find device={} nor node-name={}",
                o.node_name, o.node_name
            ));
        };
        let dev = node.dev.clone();
        if let Err(err) = graph.claim(&o.node_name, &format!("export '{}'", o.id), "root") {
            return fail(err);
        }
        devs.push(dev.clone());
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
    let Some(server) = server else {
        if exports.is_empty() {
            return ExitCode::SUCCESS;
        }
        return fail("--export needs an --nbd-server to serve it");
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
    enum L {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, String),
    }
    let listener = match &opts.listen {
        Listen::Inet { host, port } => {
            match tokio::net::TcpListener::bind((host.as_str(), *port)).await {
                Ok(l) => L::Tcp(l),
                Err(e) => return fail(format!("Failed to bind socket to {host}:{port}: {e}")),
            }
        }
        Listen::Unix { path } => {
            let _ = std::fs::remove_file(path);
            match tokio::net::UnixListener::bind(path) {
                Ok(l) => L::Unix(l, path.clone()),
                Err(e) => return fail(format!("Failed to bind socket to {path}: {e}")),
            }
        }
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
            r = async {
                match &listener {
                    L::Tcp(l) => l.accept().await.map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Box::new(s) as Box<dyn Conn>
                    }),
                    L::Unix(l, _) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Conn>),
                }
            } => Some(r),
        };
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let nbd = nbd.clone();
                conns.spawn(async move {
                    nbd.serve(stream).await;
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
    code
}

trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Conn for T {}
