//! `ballot serve`'s NBD options in qemu-storage-daemon's syntax (ARCHITECTURE.md): the
//! `--nbd-server` address and `--export type=nbd,...` (NBD.md N13, N18, N27).

use serde_json::Value;

use crate::config::{keyval, text};

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `addr.type=inet,addr.host=H,addr.port=P`.
    Inet {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// `addr.type=unix,addr.path=P`.
    Unix {
        /// Socket path.
        path: String,
    },
}

/// `--nbd-server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerOpts {
    /// Address.
    pub listen: Listen,
    /// `max-connections` (0: ballot's cap of 1024, N18).
    pub max_connections: u32,
    /// `tls-creds`: the id of a `tls-creds-x509` object with endpoint=server; every client
    /// must then start TLS (docs/tls.md K6).
    pub tls_creds: Option<String>,
}

/// `--export type=nbd,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOpts {
    /// `id`.
    pub id: String,
    /// `node-name`.
    pub node_name: String,
    /// `name` (default: the node name, as in qemu-storage-daemon).
    pub name: String,
    /// `description`.
    pub description: String,
    /// `writable`.
    pub writable: bool,
    /// `multi-conn` on/auto (N27).
    pub multi_conn: bool,
}

fn obj(v: &Value, what: &str) -> Result<serde_json::Map<String, Value>, String> {
    v.as_object()
        .cloned()
        .ok_or_else(|| format!("{what}: expected key=value pairs"))
}

fn onoff(m: &serde_json::Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match m.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "on" || s == "true" => Ok(true),
        Some(Value::String(s)) if s == "off" || s == "false" => Ok(false),
        Some(_) => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

fn parse_arg(arg: &str) -> Result<Value, String> {
    if arg.trim_start().starts_with('{') {
        serde_json::from_str(arg).map_err(|e| format!("JSON: {e}"))
    } else {
        keyval::parse(arg).map_err(|e| e.to_string())
    }
}

fn unknown(m: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), String> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("Parameter '{k}' is unexpected")),
        None => Ok(()),
    }
}

/// Parses `--nbd-server`.
///
/// # Errors
/// A message naming the bad or missing parameter.
pub fn parse_nbd_server(arg: &str) -> Result<NbdServerOpts, String> {
    // QMP's nbd-server-start passes JSON through here too.
    let m = obj(&parse_arg(arg)?, "--nbd-server")?;
    if m.contains_key("tls-authz") {
        return Err(
            "Parameter 'tls-authz' is not supported by ballot: every client whose \
                    certificate the CA signed is admitted (docs/tls.md K3)"
                .into(),
        );
    }
    unknown(&m, &["addr", "max-connections", "tls-creds"])?;
    let tls_creds = text(&m, "tls-creds")?;
    let listen = parse_addr(&m)?;
    let max_connections = match text(&m, "max-connections")? {
        Some(s) => s
            .parse()
            .map_err(|_| format!("Parameter 'max-connections' expects a number, got '{s}'"))?,
        None => 0,
    };
    Ok(NbdServerOpts {
        listen,
        max_connections,
        tls_creds,
    })
}

/// The `addr` of `--nbd-server` or `--metrics`: `addr.type=inet,addr.host=H,addr.port=P` or
/// `addr.type=unix,addr.path=P`.
fn parse_addr(m: &serde_json::Map<String, Value>) -> Result<Listen, String> {
    let addr = obj(m.get("addr").ok_or("Parameter 'addr' is missing")?, "addr")?;
    let listen = match text(&addr, "type")?.as_deref() {
        Some("inet") => {
            unknown(&addr, &["type", "host", "port"])?;
            let host = text(&addr, "host")?.ok_or("Parameter 'addr.host' is missing")?;
            let port = text(&addr, "port")?.ok_or("Parameter 'addr.port' is missing")?;
            let port: u16 = port.parse().map_err(|_| {
                format!("Parameter 'addr.port' expects a port number, got '{port}'")
            })?;
            Listen::Inet { host, port }
        }
        Some("unix") => {
            unknown(&addr, &["type", "path"])?;
            Listen::Unix {
                path: text(&addr, "path")?.ok_or("Parameter 'addr.path' is missing")?,
            }
        }
        Some(other) => {
            return Err(format!(
                "Parameter 'addr.type' does not accept value '{other}'"
            ))
        }
        None => return Err("Parameter 'addr.type' is missing".into()),
    };
    Ok(listen)
}

/// Parses `--metrics` (issue 20): where the Prometheus scrape endpoint listens, `addr.*` as for
/// `--nbd-server`.
///
/// # Errors
/// A message naming the bad or missing parameter.
pub fn parse_metrics(arg: &str) -> Result<Listen, String> {
    let m = obj(&parse_arg(arg)?, "--metrics")?;
    unknown(&m, &["addr"])?;
    parse_addr(&m)
}

/// Parses `--export`.
///
/// # Errors
/// A message naming the bad or missing parameter.
pub fn parse_export(arg: &str) -> Result<ExportOpts, String> {
    let m = obj(&parse_arg(arg)?, "--export")?;
    unknown(
        &m,
        &[
            "type",
            "id",
            "node-name",
            "name",
            "description",
            "writable",
            "multi-conn",
        ],
    )?;
    match text(&m, "type")?.as_deref() {
        Some("nbd") => {}
        Some(other) => {
            return Err(format!(
                "Parameter 'type' does not accept value '{other}' (ballot serves type=nbd)"
            ))
        }
        None => return Err("Parameter 'type' is missing".into()),
    }
    let id = text(&m, "id")?.ok_or("Parameter 'id' is missing")?;
    let node_name = text(&m, "node-name")?.ok_or("Parameter 'node-name' is missing")?;
    let name = text(&m, "name")?.unwrap_or_else(|| node_name.clone());
    let multi_conn = match text(&m, "multi-conn")?.as_deref() {
        None | Some("auto") | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(format!(
                "Parameter 'multi-conn' does not accept value '{other}'"
            ))
        }
    };
    Ok(ExportOpts {
        id,
        node_name,
        name,
        description: text(&m, "description")?.unwrap_or_default(),
        writable: onoff(&m, "writable", false)?,
        multi_conn,
    })
}

/// QMP `nbd-server-start`'s arguments: `addr` as QEMU's legacy socket address
/// (`{"type": "inet", "data": {"host": H, "port": P}}`) or flat (`{"type": "inet", "host": H,
/// "port": P}`), `tls-creds`, `max-connections`.
///
/// # Errors
/// A message naming the bad or missing parameter.
pub fn parse_nbd_server_start(args: &Value) -> Result<NbdServerOpts, String> {
    let mut m = obj(args, "arguments")?;
    if let Some(Value::Object(addr)) = m.get("addr") {
        if let (Some(t), Some(Value::Object(data))) = (addr.get("type"), addr.get("data")) {
            let mut flat = data.clone();
            flat.insert("type".into(), t.clone());
            m.insert("addr".into(), Value::Object(flat));
        }
    }
    parse_nbd_server(&Value::Object(m).to_string())
}

/// The NBD server's listening socket (`--nbd-server`, QMP `nbd-server-start` and
/// `nbd-server-stop`): at most one runs.
#[derive(Clone, Default)]
pub struct NbdListener {
    running: std::sync::Arc<tokio::sync::Mutex<Option<Running>>>,
}

impl std::fmt::Debug for NbdListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NbdListener")
    }
}

struct Running {
    stop: std::sync::Arc<tokio::sync::Notify>,
    /// The accept loop; it ends once stopped and its connections drained.
    task: tokio::task::JoinHandle<()>,
    /// Whether the drain waits for clients (shutdown, N33) or disconnects them (QMP stop).
    drain: std::sync::Arc<std::sync::Mutex<std::time::Duration>>,
}

/// Cap on simultaneous clients when `max-connections` is 0 (N18).
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;

impl NbdListener {
    /// Whether a server is listening.
    pub async fn is_running(&self) -> bool {
        self.running.lock().await.is_some()
    }

    /// Binds `opts.listen` and serves `nbd`'s exports there, requiring TLS with
    /// `opts.tls_creds` (docs/tls.md K6) from `objects`.
    ///
    /// # Errors
    /// A server is already running, the credentials are missing or a client's, or the address
    /// cannot be bound.
    pub async fn start(
        &self,
        nbd: std::sync::Arc<crate::nbd::server::Server>,
        opts: &NbdServerOpts,
        objects: &crate::tls::Objects,
    ) -> Result<(), String> {
        let mut slot = self.running.lock().await;
        if slot.is_some() {
            return Err("NBD server already running".into());
        }
        let creds = match &opts.tls_creds {
            Some(id) => Some(objects.tls(id, crate::tls::Endpoint::Server)?),
            None => None,
        };
        let listener = listen::bind(&opts.listen).await?;
        nbd.set_tls(creds)?;
        let cap = if opts.max_connections == 0 {
            CONNECTIONS_MAX_DEFAULT
        } else {
            opts.max_connections as usize
        };
        let stop = std::sync::Arc::new(tokio::sync::Notify::new());
        let drain = std::sync::Arc::new(std::sync::Mutex::new(std::time::Duration::ZERO));
        let task = tokio::spawn(listen::accept_loop(
            listener,
            nbd,
            cap,
            stop.clone(),
            drain.clone(),
        ));
        *slot = Some(Running { stop, task, drain });
        Ok(())
    }

    /// Stops listening; clients connected get `drain` to finish and leave (N33), after which
    /// their connections are dropped. Returns once that is done.
    ///
    /// # Errors
    /// No server is running.
    pub async fn stop(&self, drain: std::time::Duration) -> Result<(), String> {
        let Some(r) = self.running.lock().await.take() else {
            return Err("NBD server not running".into());
        };
        *r.drain.lock().unwrap_or_else(|p| p.into_inner()) = drain;
        r.stop.notify_one();
        let _ = r.task.await;
        Ok(())
    }
}

#[cfg(not(madsim))]
pub use listen::{serve_each, Conn};

#[cfg(not(madsim))]
mod listen {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Listen;
    use crate::nbd::server::Server;

    pub(super) enum L {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, String),
    }

    pub(super) async fn bind(l: &Listen) -> Result<L, String> {
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

    /// A connected stream.
    pub trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Conn for T {}

    /// An accepted client: its stream, a duplicate of its descriptor, and its address for logs.
    type Accepted = (Box<dyn Conn>, Option<std::os::fd::OwnedFd>, String);

    async fn accept(l: &L) -> std::io::Result<Accepted> {
        fn watched<S: Conn + std::os::fd::AsFd>(s: S, who: String) -> Accepted {
            let fd = s.as_fd().try_clone_to_owned().ok();
            (Box::new(s), fd, who)
        }
        match l {
            L::Tcp(l) => l.accept().await.map(|(s, a)| {
                let _ = s.set_nodelay(true);
                watched(s, a.to_string())
            }),
            L::Unix(l, path) => l
                .accept()
                .await
                .map(|(s, _)| watched(s, format!("on {path}"))),
        }
    }

    /// Binds `l` and serves every connection on it with `each`, each in a task of its own
    /// (the QMP and metrics sockets).
    pub async fn serve_each<F, Fut>(l: &Listen, each: F) -> Result<(), String>
    where
        F: Fn(Box<dyn Conn>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = bind(l).await?;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _, _)) = accept(&listener).await else {
                    continue;
                };
                tokio::spawn(each(stream));
            }
        });
        Ok(())
    }

    pub(super) async fn accept_loop(
        listener: L,
        nbd: Arc<Server>,
        cap: usize,
        stop: Arc<tokio::sync::Notify>,
        drain: Arc<std::sync::Mutex<Duration>>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(cap));
        let mut conns = tokio::task::JoinSet::new();
        loop {
            // N18: at the cap, new connections wait in the listen queue.
            let slot = tokio::select! {
                biased;
                _ = stop.notified() => break,
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = stop.notified() => break,
                r = accept(&listener) => r,
            };
            match accepted {
                Ok((stream, peer, who)) => {
                    let nbd = nbd.clone();
                    conns.spawn(async move {
                        nbd.serve_client(stream, peer, &who).await;
                        drop(slot);
                    });
                }
                // A failed accept (a client that left at once, descriptors exhausted) ends
                // neither the server nor its clients.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            while conns.try_join_next().is_some() {}
        }
        if let L::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
        drop(listener);
        let wait = *drain.lock().unwrap_or_else(|p| p.into_inner());
        if wait.is_zero() {
            nbd.disconnect_all();
        }
        let _ = tokio::time::timeout(wait.max(Duration::from_secs(1)), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        conns.abort_all();
    }
}

#[cfg(madsim)]
mod listen {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Listen;
    use crate::nbd::server::Server;

    pub(super) enum L {}

    pub(super) async fn bind(_: &Listen) -> Result<L, String> {
        Err("nbd-server-start is not available in the simulator".into())
    }

    pub(super) async fn accept_loop(
        listener: L,
        _: Arc<Server>,
        _: usize,
        _: Arc<tokio::sync::Notify>,
        _: Arc<std::sync::Mutex<Duration>>,
    ) {
        match listener {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_syntax_parses() {
        assert_eq!(
            parse_nbd_server("addr.type=inet,addr.host=127.0.0.1,addr.port=10809"),
            Ok(NbdServerOpts {
                listen: Listen::Inet {
                    host: "127.0.0.1".into(),
                    port: 10809
                },
                max_connections: 0,
                tls_creds: None,
            })
        );
        assert_eq!(
            parse_export("type=nbd,id=e0,node-name=q0,name=disk0,writable=on"),
            Ok(ExportOpts {
                id: "e0".into(),
                node_name: "q0".into(),
                name: "disk0".into(),
                description: String::new(),
                writable: true,
                multi_conn: true
            })
        );
        assert_eq!(
            parse_export("type=nbd,id=e0,node-name=q0,bogus=1"),
            Err("Parameter 'bogus' is unexpected".into())
        );
        assert_eq!(
            parse_nbd_server("addr.type=inet,addr.host=h,addr.port=x"),
            Err("Parameter 'addr.port' expects a port number, got 'x'".into())
        );
        assert_eq!(
            parse_nbd_server("addr.type=unix,addr.path=/tmp/s,tls-creds=t"),
            Ok(NbdServerOpts {
                listen: Listen::Unix {
                    path: "/tmp/s".into()
                },
                max_connections: 0,
                tls_creds: Some("t".into()),
            })
        );
        assert_eq!(
            parse_nbd_server("addr.type=unix,addr.path=/tmp/s,tls-creds=t,tls-authz=a"),
            Err(
                "Parameter 'tls-authz' is not supported by ballot: every client whose \
                 certificate the CA signed is admitted (docs/tls.md K3)"
                    .into()
            )
        );
    }
}
