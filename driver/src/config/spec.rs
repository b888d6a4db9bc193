//! Type-level parsing of a `--blockdev` / `blockdev-add` tree into a [`NodeSpec`]
//! (QUORUM.md Q6): missing, ill-typed, unknown and out-of-enum options are rejected here, in
//! QEMU's wording and in QEMU's member order, for the whole tree including inline children,
//! before any semantic check or open runs.
//!
//! Values from the dotted syntax are strings and are converted ("keyval mode"); values from
//! JSON must already have the right type.

use serde_json::{Map, Value};

use crate::drivers::quorum::{ReadPattern, ResyncMode};
use crate::error::ConfigError;

/// A reference to a child node: an existing node's name, or an inline definition.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildRef {
    /// `file=f0`, `children.0=r0`.
    Ref(String),
    /// `file.driver=file,file.filename=a.raw`, or a JSON object.
    Inline(Box<NodeSpec>),
}

/// A node definition after type-level checks.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// `node-name`.
    pub node_name: Option<String>,
    /// `read-only`.
    pub read_only: bool,
    /// `auto-read-only`.
    pub auto_read_only: bool,
    /// `discard`: `unmap` (true) or `ignore` (false, QEMU's default).
    pub discard_unmap: bool,
    /// `cache.direct`; unset means inherited from the parent (QEMU), else off.
    pub cache_direct: Option<bool>,
    /// `cache.no-flush`; unset means inherited from the parent (QEMU), else off.
    pub cache_no_flush: Option<bool>,
    /// The driver and its own options.
    pub driver: DriverSpec,
}

/// Driver-specific options.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverSpec {
    /// `driver=file`.
    File {
        /// `filename`.
        filename: String,
        /// `locking` (HEALING.md H25): QEMU's image locks, `auto` and `on` take them.
        locking: bool,
    },
    /// `driver=raw`.
    Raw {
        /// `file`.
        file: ChildRef,
        /// `offset`.
        offset: u64,
        /// `size`.
        size: Option<u64>,
    },
    /// `driver=null-co`.
    Null {
        /// `size`.
        size: u64,
        /// `read-zeroes`.
        read_zeroes: bool,
        /// `latency-ns`.
        latency_ns: u64,
    },
    /// `driver=quorum`.
    Quorum {
        /// `blkverify`.
        blkverify: bool,
        /// `children`.
        children: Vec<ChildRef>,
        /// `vote-threshold` (range-checked later, Q8).
        vote_threshold: i64,
        /// `rewrite-corrupted`.
        rewrite_corrupted: bool,
        /// `read-pattern`.
        read_pattern: ReadPattern,
        /// `resync` (HEALING.md H14).
        resync: ResyncMode,
        /// `resync-inflight` (H15), checked at open.
        resync_inflight: u64,
        /// `resync-min-speed`, bytes per second (H15).
        resync_min_speed: u64,
        /// `metadata` (HEALING.md H19): the metadata node.
        metadata: Option<ChildRef>,
        /// `metadata-reset` (H23).
        metadata_reset: bool,
        /// `intent-cold`, seconds (H21).
        intent_cold: u64,
        /// `intent-extents` (H21).
        intent_extents: u64,
    },
    /// `driver=nbd` (NBD.md §7).
    Nbd {
        /// `server.*`.
        server: crate::nbd::client::Address,
        /// `export`.
        export: String,
        /// `reconnect-delay`, seconds.
        reconnect_delay: u64,
        /// `open-timeout`, seconds.
        open_timeout: u64,
        /// `request-timeout`, seconds (ballot's extension).
        request_timeout: u64,
        /// `tls-creds`: the id of a `tls-creds-x509` object with endpoint=client (K1).
        tls_creds: Option<String>,
        /// `tls-hostname`: the name the server's certificate must carry (K5).
        tls_hostname: Option<String>,
    },
    /// `driver=overlay` (REPLICATION.md §10).
    Overlay {
        /// `backing`.
        backing: ChildRef,
        /// `file`: where cluster data lives; none keeps it in memory.
        file: Option<ChildRef>,
    },
    /// `driver=qcow2` (issue 19).
    Qcow2 {
        /// `file`: the image file's node.
        file: ChildRef,
        /// `backing`: unset opens the image's own backing file; `null` opens none.
        backing: Option<Option<ChildRef>>,
        /// `l2-cache-size` in bytes.
        l2_cache_size: u64,
        /// `refcount-cache-size` in bytes.
        refcount_cache_size: u64,
    },
    /// `driver=replication` (REPLICATION.md §3).
    Replication {
        /// `mode`.
        mode: crate::drivers::replication::Mode,
        /// `file`.
        file: ChildRef,
        /// `top-id`.
        top_id: Option<String>,
    },
}

impl DriverSpec {
    /// The `driver=` value.
    pub fn name(&self) -> &'static str {
        match self {
            DriverSpec::File { .. } => "file",
            DriverSpec::Raw { .. } => "raw",
            DriverSpec::Null { .. } => "null-co",
            DriverSpec::Quorum { .. } => "quorum",
            DriverSpec::Nbd { .. } => "nbd",
            DriverSpec::Overlay { .. } => "overlay",
            DriverSpec::Qcow2 { .. } => "qcow2",
            DriverSpec::Replication { .. } => "replication",
        }
    }
}

/// Drivers ballot knows, for `Parameter 'driver' does not accept value '<x>'`.
pub const DRIVERS: &[&str] = &[
    "file",
    "raw",
    "null-co",
    "quorum",
    "nbd",
    "overlay",
    "qcow2",
    "replication",
];

/// One level of options being consumed.
struct Opts {
    map: Map<String, Value>,
    prefix: String,
    keyval: bool,
    /// Inline definitions above this level.
    depth: usize,
}

/// Inline child definitions nest at most this deep (a real graph is a few levels; without a
/// limit a hostile definition recursed the parser off its stack, found by the
/// `blockdev_options` fuzz target).
pub const INLINE_DEPTH_MAX: usize = 16;

fn type_err(name: &str, expected: &str) -> ConfigError {
    ConfigError::new(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn parse_int(s: &str) -> Option<i64> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return i64::from_str_radix(hex, 16).ok();
    }
    t.parse::<i64>().ok()
}

impl Opts {
    fn new(map: Map<String, Value>, prefix: String, keyval: bool, depth: usize) -> Opts {
        Opts {
            map,
            prefix,
            keyval,
            depth,
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::new(format!("Parameter '{}' is missing", self.full(key)))
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_err(&self.full(key), "string")),
        }
    }

    fn int(&mut self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) if self.keyval => parse_int(&s).map(Some).ok_or_else(|| {
                ConfigError::new(format!("Parameter '{}' expects integer", self.full(key)))
            }),
            Some(Value::Number(n)) if !self.keyval => match n.as_i64() {
                Some(v) => Ok(Some(v)),
                None => Err(type_err(&self.full(key), "integer")),
            },
            Some(_) => Err(type_err(&self.full(key), "integer")),
        }
    }

    fn uint(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.int(key)? {
            None => Ok(None),
            Some(v) if v < 0 => Err(ConfigError::new(format!(
                "Parameter '{}' expects a value >= 0",
                self.full(key)
            ))),
            Some(v) => Ok(Some(v as u64)),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(ConfigError::new(format!(
                    "Parameter '{}' expects 'on' or 'off'",
                    self.full(key)
                ))),
            },
            Some(Value::Bool(b)) if !self.keyval => Ok(Some(b)),
            Some(_) => Err(type_err(&self.full(key), "boolean")),
        }
    }

    fn enumeration<'v>(
        &mut self,
        key: &str,
        values: &[&'v str],
    ) -> Result<Option<&'v str>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(s) => values
                .iter()
                .find(|v| **v == s)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    ConfigError::new(format!(
                        "Parameter '{}' does not accept value '{s}'",
                        self.full(key)
                    ))
                }),
        }
    }

    fn object(&mut self, key: &str) -> Result<Option<Opts>, ConfigError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Opts::new(
                m,
                format!("{}.", self.full(key)),
                self.keyval,
                self.depth,
            ))),
            Some(_) => Err(type_err(&self.full(key), "object")),
        }
    }

    fn child_value(&self, name: String, v: Value) -> Result<ChildRef, ConfigError> {
        match v {
            Value::String(s) => Ok(ChildRef::Ref(s)),
            Value::Object(_) if self.depth >= INLINE_DEPTH_MAX => Err(ConfigError::new(format!(
                "Parameter '{name}': inline definitions nest deeper than {INLINE_DEPTH_MAX} levels"
            ))),
            Value::Object(m) => Ok(ChildRef::Inline(Box::new(parse_level(Opts::new(
                m,
                format!("{name}."),
                self.keyval,
                self.depth + 1,
            ))?))),
            _ => Err(type_err(&name, "BlockdevRef")),
        }
    }

    fn child(&mut self, key: &str) -> Result<Option<ChildRef>, ConfigError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v) => self.child_value(self.full(key), v).map(Some),
        }
    }

    fn child_list(&mut self, key: &str) -> Result<Option<Vec<ChildRef>>, ConfigError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| self.child_value(format!("{}.{i}", self.full(key)), v))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(type_err(&self.full(key), "array")),
        }
    }

    /// Rejects whatever was not consumed: `Parameter '<key>' is unexpected`.
    fn finish(self) -> Result<(), ConfigError> {
        match self.map.into_iter().next() {
            None => Ok(()),
            Some((k, v)) => {
                // Report the innermost unexpected key of a nested object.
                let name = format!("{}{k}", self.prefix);
                if let Value::Object(m) = v {
                    if let Some((k2, _)) = m.into_iter().next() {
                        return Err(ConfigError::new(format!(
                            "Parameter '{name}.{k2}' is unexpected"
                        )));
                    }
                }
                Err(ConfigError::new(format!(
                    "Parameter '{name}' is unexpected"
                )))
            }
        }
    }
}

/// Parses one `--blockdev` / `blockdev-add` definition.
///
/// `keyval` says the values come from the dotted syntax (strings to convert).
///
/// # Errors
/// The first type-level error in QEMU's wording.
pub fn parse_node(value: Value, keyval: bool) -> Result<NodeSpec, ConfigError> {
    match value {
        Value::Object(m) => parse_level(Opts::new(m, String::new(), keyval, 0)),
        _ => Err(ConfigError::new(
            "Invalid parameter type for 'blockdev', expected: object",
        )),
    }
}

fn parse_level(mut o: Opts) -> Result<NodeSpec, ConfigError> {
    // QEMU's member order: the base (driver, node-name, discard, cache, read-only,
    // auto-read-only), then the driver's own members in schema order.
    let driver = o.string("driver")?.ok_or_else(|| o.missing("driver"))?;
    if !DRIVERS.contains(&driver.as_str()) {
        return Err(ConfigError::new(format!(
            "Parameter '{}' does not accept value '{driver}'",
            o.full("driver")
        )));
    }
    let node_name = o.string("node-name")?;
    let discard_unmap = match o.enumeration("discard", &["ignore", "off", "unmap", "on"])? {
        None | Some("ignore") | Some("off") => false,
        Some(_) => true,
    };
    let mut cache = o.object("cache")?;
    let (cache_direct, cache_no_flush) = match &mut cache {
        Some(c) => (c.boolean("direct")?, c.boolean("no-flush")?),
        None => (None, None),
    };
    if let Some(c) = cache {
        c.finish()?;
    }
    let read_only = o.boolean("read-only")?.unwrap_or(false);
    let auto_read_only = o.boolean("auto-read-only")?.unwrap_or(false);
    let spec = match driver.as_str() {
        "file" => {
            let filename = o.string("filename")?.ok_or_else(|| o.missing("filename"))?;
            // ballot has one I/O engine; QEMU's default is threads too.
            if let Some(aio) = o.enumeration("aio", &["threads", "native", "io_uring"])? {
                if aio != "threads" {
                    return Err(ConfigError::new(format!(
                        "Parameter '{}' value '{aio}' is not supported by ballot (use 'threads')",
                        o.full("aio")
                    )));
                }
            }
            // H25: QEMU's OnOffAuto; auto is on (Linux has OFD locks on every file system
            // ballot opens; one that refuses them is reported at open).
            let locking = o.enumeration("locking", &["auto", "on", "off"])? != Some("off");
            DriverSpec::File { filename, locking }
        }
        "raw" => {
            let file = o.child("file")?.ok_or_else(|| o.missing("file"))?;
            let offset = o.uint("offset")?.unwrap_or(0);
            let size = o.uint("size")?;
            DriverSpec::Raw { file, offset, size }
        }
        "null-co" => DriverSpec::Null {
            size: o
                .uint("size")?
                .unwrap_or(crate::drivers::null::NULL_SIZE_DEFAULT_BYTES),
            latency_ns: o.uint("latency-ns")?.unwrap_or(0),
            read_zeroes: o.boolean("read-zeroes")?.unwrap_or(true),
        },
        "quorum" => {
            let blkverify = o.boolean("blkverify")?.unwrap_or(false);
            let children = o
                .child_list("children")?
                .ok_or_else(|| o.missing("children"))?;
            let vote_threshold = o
                .int("vote-threshold")?
                .ok_or_else(|| o.missing("vote-threshold"))?;
            let rewrite_corrupted = o.boolean("rewrite-corrupted")?.unwrap_or(false);
            let read_pattern = match o.enumeration("read-pattern", &["quorum", "fifo"])? {
                Some("fifo") => ReadPattern::Fifo,
                _ => ReadPattern::Quorum,
            };
            let resync = match o.enumeration("resync", &["auto", "manual"])? {
                Some("manual") => ResyncMode::Manual,
                _ => ResyncMode::Auto,
            };
            let resync_inflight = o
                .uint("resync-inflight")?
                .unwrap_or(crate::drivers::quorum::RESYNC_INFLIGHT_DEFAULT as u64);
            let resync_min_speed = o
                .uint("resync-min-speed")?
                .unwrap_or(crate::drivers::quorum::RESYNC_MIN_SPEED_DEFAULT_BYTES_PER_S);
            let metadata = o.child("metadata")?;
            let reset = o.boolean("metadata-reset")?;
            let cold = o.uint("intent-cold")?;
            let extents = o.uint("intent-extents")?;
            if metadata.is_none() {
                // H19: these mean nothing without a metadata node; say so instead of ignoring.
                let given = [
                    ("metadata-reset", reset.is_some()),
                    ("intent-cold", cold.is_some()),
                    ("intent-extents", extents.is_some()),
                ];
                if let Some((k, _)) = given.iter().find(|(_, g)| *g) {
                    return Err(ConfigError::new(format!(
                        "Parameter '{}' needs '{}' (a metadata node)",
                        o.full(k),
                        o.full("metadata")
                    )));
                }
            }
            let metadata_reset = reset.unwrap_or(false);
            let intent_cold =
                cold.unwrap_or(crate::drivers::quorum::durable::INTENT_COLD_DEFAULT.as_secs());
            let intent_extents =
                extents.unwrap_or(crate::drivers::quorum::durable::INTENT_EXTENTS_DEFAULT as u64);
            if intent_extents == 0 {
                return Err(ConfigError::new(format!(
                    "Parameter '{}' expects a value >= 1",
                    o.full("intent-extents")
                )));
            }
            DriverSpec::Quorum {
                blkverify,
                children,
                vote_threshold,
                rewrite_corrupted,
                read_pattern,
                resync,
                resync_inflight,
                resync_min_speed,
                metadata,
                metadata_reset,
                intent_cold,
                intent_extents,
            }
        }
        "nbd" => {
            let mut srv = o.object("server")?.ok_or_else(|| o.missing("server"))?;
            let kind = srv
                .enumeration("type", &["inet", "unix"])?
                .ok_or_else(|| srv.missing("type"))?;
            let server = if kind == "inet" {
                let host = srv.string("host")?.ok_or_else(|| srv.missing("host"))?;
                let port = srv.string("port")?.ok_or_else(|| srv.missing("port"))?;
                let port: u16 = port.parse().map_err(|_| {
                    ConfigError::new(format!(
                        "Parameter '{}' expects a port number, got '{port}'",
                        srv.full("port")
                    ))
                })?;
                crate::nbd::client::Address::Inet { host, port }
            } else {
                crate::nbd::client::Address::Unix {
                    path: srv.string("path")?.ok_or_else(|| srv.missing("path"))?,
                }
            };
            srv.finish()?;
            let export = o.string("export")?.unwrap_or_default();
            let tls_creds = o.string("tls-creds")?;
            let tls_hostname = o.string("tls-hostname")?;
            if tls_hostname.is_some() && tls_creds.is_none() {
                return Err(ConfigError::new(format!(
                    "Parameter '{}' needs '{}'",
                    o.full("tls-hostname"),
                    o.full("tls-creds")
                )));
            }
            for refused in ["x-dirty-bitmap"] {
                if o.map.contains_key(refused) {
                    return Err(ConfigError::new(format!(
                        "Parameter '{}' is not supported by ballot's nbd driver",
                        o.full(refused)
                    )));
                }
            }
            DriverSpec::Nbd {
                server,
                export,
                reconnect_delay: o.uint("reconnect-delay")?.unwrap_or(0),
                open_timeout: o.uint("open-timeout")?.unwrap_or(0),
                request_timeout: o.uint("request-timeout")?.unwrap_or(0),
                tls_creds,
                tls_hostname,
            }
        }
        "overlay" => {
            let backing = o.child("backing")?.ok_or_else(|| o.missing("backing"))?;
            let file = o.child("file")?;
            DriverSpec::Overlay { backing, file }
        }
        "qcow2" => {
            let file = o.child("file")?.ok_or_else(|| o.missing("file"))?;
            // QEMU's BlockdevRefOrNull: JSON null, or (dotted syntax) an empty string.
            let backing = match o.map.get("backing") {
                Some(Value::Null) => {
                    o.map.remove("backing");
                    Some(None)
                }
                Some(Value::String(v)) if v.is_empty() || (o.keyval && v == "null") => {
                    o.map.remove("backing");
                    Some(None)
                }
                _ => o.child("backing")?.map(Some),
            };
            let cache = o.uint("cache-size")?;
            let l2 = o.uint("l2-cache-size")?;
            let rc = o.uint("refcount-cache-size")?;
            // QEMU: cache-size splits into L2 and refcount caches (4:1 here).
            let (l2_cache_size, refcount_cache_size) = match (cache, l2, rc) {
                (Some(c), None, None) => (c - c / 5, (c / 5).max(1)),
                (Some(c), Some(l), None) => (l, c.saturating_sub(l).max(1)),
                (Some(c), None, Some(r)) => (c.saturating_sub(r).max(1), r),
                (Some(c), Some(l), Some(r)) if l.saturating_add(r) != c => {
                    return Err(ConfigError::new(format!(
                        "l2-cache-size ({l}) + refcount-cache-size ({r}) must equal cache-size ({c})"
                    )));
                }
                (_, l, r) => (
                    l.unwrap_or(crate::drivers::qcow2::L2_CACHE_BYTES_DEFAULT),
                    r.unwrap_or(crate::drivers::qcow2::REFCOUNT_CACHE_BYTES_DEFAULT),
                ),
            };
            if let Some(v) = o.boolean("lazy-refcounts")? {
                if v {
                    return Err(ConfigError::new(format!(
                        "Parameter '{}' is not supported by ballot: lazy refcounts trade crash consistency for speed",
                        o.full("lazy-refcounts")
                    )));
                }
            }
            DriverSpec::Qcow2 {
                file,
                backing,
                l2_cache_size,
                refcount_cache_size,
            }
        }
        "replication" => {
            // R6: mode before file, in QEMU's wording.
            use crate::drivers::replication::Mode;
            let mode = match o
                .enumeration("mode", &["primary", "secondary"])?
                .ok_or_else(|| o.missing("mode"))?
            {
                "primary" => Mode::Primary,
                _ => Mode::Secondary,
            };
            let file = o.child("file")?.ok_or_else(|| o.missing("file"))?;
            let top_id = o.string("top-id")?;
            DriverSpec::Replication { mode, file, top_id }
        }
        _ => unreachable!("checked against DRIVERS above"),
    };
    o.finish()?;
    Ok(NodeSpec {
        node_name,
        read_only,
        auto_read_only,
        discard_unmap,
        cache_direct,
        cache_no_flush,
        driver: spec,
    })
}
