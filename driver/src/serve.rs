//! `ballot serve`'s NBD options in qemu-storage-daemon's syntax (ARCHITECTURE.md): the
//! `--nbd-server` address and `--export type=nbd,...` (NBD.md N13, N18, N27).

use serde_json::Value;

use crate::config::keyval;

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

fn text(m: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(format!(
            "Invalid parameter type for '{key}', expected: string"
        )),
    }
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
    let m = obj(&parse_arg(arg)?, "--nbd-server")?;
    unknown(&m, &["addr", "max-connections", "tls-creds"])?;
    if m.contains_key("tls-creds") {
        return Err("Parameter 'tls-creds': TLS is not supported by ballot (NBD.md N16)".into());
    }
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
                max_connections: 0
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
            Err("Parameter 'tls-creds': TLS is not supported by ballot (NBD.md N16)".into())
        );
    }
}
