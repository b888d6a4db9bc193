//! The driver graph: named nodes, who is whose child, and the operations that change it —
//! `--blockdev` / `blockdev-add` (open a definition, QUORUM.md §3) and `x-blockdev-change`
//! (hot add and remove, Q52–Q56).
//!
//! Opening is transactional: a definition's inline children are opened in order into a staging
//! area and enter the graph only when the whole definition opened; on any error they are
//! released (Q13). A node has at most one parent (Q5, Q54 step 3): a second user that could
//! write is refused with QEMU's permission-conflict wording.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::parse_blockdev_arg;
use crate::config::spec::{parse_node, ChildRef, DriverSpec, NodeSpec};
use crate::device::Device;
use crate::drivers::cow::Layer;
use crate::drivers::file::{FileDevice, FileOptions};
use crate::drivers::null::NullDevice;
use crate::drivers::overlay::Overlay;
use crate::drivers::qcow2::{Qcow2, Qcow2Options};
use crate::drivers::quorum::{self, Quorum, QuorumOptions};
use crate::drivers::raw::RawDevice;
use crate::drivers::replication::{Mode, Replication, SecondaryChain, Stage};
use crate::error::ConfigError;
use crate::host::Host;
use crate::port::{Port, PortHooks};

/// Longest node-name QEMU accepts.
const NODE_NAME_BYTES_MAX: usize = 31;

/// One node of the graph.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node-name.
    pub name: String,
    /// The device (requests through it are counted in `stats`).
    pub dev: Device,
    /// The node's I/O counters (`query-blockstats`, issue 20).
    pub stats: Arc<crate::stats::IoStats>,
    /// The same node as a quorum, for quorum-only operations.
    pub quorum: Option<Arc<Quorum>>,
    /// The same node as an overlay (REPLICATION.md §10).
    pub overlay: Option<Arc<Overlay>>,
    /// The same node as a qcow2 image (issue 19).
    pub qcow2: Option<Arc<Qcow2>>,
    /// The file this node's data lives in: a `file` node's `filename`, and a format node's
    /// file child's (the base for relative backing file names).
    pub filename: Option<String>,
    /// The same node as a replication node (REPLICATION.md §3).
    pub replication: Option<Arc<Replication>>,
    /// What exports of this node write through (copy-before-write, the O1 fence).
    pub hooks: Arc<PortHooks>,
    /// `(child name, child node-name)`, in child order.
    pub children: Vec<(String, String)>,
    /// `(parent node-name, child name)` when the node is some node's child.
    pub parent: Option<(String, String)>,
    /// Created inline inside another definition (it goes away with its parent's edge).
    pub implicit: bool,
    /// Users outside the graph (exports): `(user, writable)`. Several may share a node; a
    /// writable one and a parent exclude each other (Q5).
    pub exports: Vec<(String, bool)>,
}

impl Node {
    /// The node as a copy-on-write layer (COLO's active or hidden disk): an `overlay`, or a
    /// `qcow2` node with a backing node.
    pub fn layer(&self) -> Option<Layer> {
        match (&self.overlay, &self.qcow2) {
            (Some(o), _) => Some(o.clone()),
            (None, Some(q)) if q.backing().is_some() => Some(q.clone()),
            _ => None,
        }
    }

    /// Q5: refuses a parent while a writable export uses the node.
    fn check_no_writer(&self) -> Result<(), ConfigError> {
        match self.exports.iter().find(|(_, w)| *w) {
            Some((user, _)) => Err(ConfigError::new(format!(
                "Conflicts with use by {user} as 'root', which does not allow 'write' on {}",
                self.name
            ))),
            None => Ok(()),
        }
    }
}

/// The graph of one process.
#[derive(Debug)]
pub struct Graph {
    host: Host,
    nodes: BTreeMap<String, Node>,
    generated_names: u64,
    /// R35: the replication nodes, newest opened first.
    replication: Vec<Arc<Replication>>,
}

/// Checks QEMU's node-name rules.
///
/// # Errors
/// `Invalid node-name: '<n>'` or `Node name too long`.
pub fn check_node_name(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_') {
        return Err(ConfigError::new(format!("Invalid node-name: '{name}'")));
    }
    if name.len() > NODE_NAME_BYTES_MAX {
        return Err(ConfigError::new("Node name too long"));
    }
    Ok(())
}

fn not_found(name: &str) -> ConfigError {
    ConfigError::new(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// Nodes opened for one definition but not yet in the graph.
#[derive(Default)]
struct Staging {
    nodes: Vec<Node>,
    /// Existing nodes this definition takes as children: node → (parent, child name).
    claimed: BTreeMap<String, (String, String)>,
    names: BTreeSet<String>,
    /// The images of the backing chain being opened (canonical paths), to refuse loops.
    chain: Vec<std::path::PathBuf>,
}

type OpenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(String, Device), ConfigError>> + Send + 'a>>;

/// Options a parent passes down to inline children (QEMU's inheritance of cache options).
#[derive(Clone, Copy, Default)]
struct Inherit {
    direct: bool,
    no_flush: bool,
}

impl Graph {
    /// An empty graph whose drivers use `host`.
    pub fn new(host: Host) -> Graph {
        Graph {
            host,
            nodes: BTreeMap::new(),
            generated_names: 0,
            replication: Vec::new(),
        }
    }

    /// Adds an existing device as a root node named `name` (embedders: tests, the simulator's
    /// virtual disks).
    ///
    /// # Errors
    /// An invalid or duplicate node-name.
    pub fn insert_device(&mut self, name: &str, dev: Device) -> Result<(), ConfigError> {
        check_node_name(name)?;
        if self.nodes.contains_key(name) {
            return Err(ConfigError::new(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        let (dev, stats) = crate::stats::Counted::wrap(dev);
        self.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                dev,
                stats,
                quorum: None,
                overlay: None,
                qcow2: None,
                filename: None,
                replication: None,
                hooks: PortHooks::new(name),
                children: Vec::new(),
                parent: None,
                implicit: false,
                exports: Vec::new(),
            },
        );
        Ok(())
    }

    /// Adds an existing quorum as a root node named `name`, its jobs and out-of-sync record
    /// reachable over QMP like a `blockdev-add`ed one's (embedders: the simulator).
    ///
    /// # Errors
    /// An invalid or duplicate node-name.
    pub fn insert_quorum(&mut self, name: &str, q: Arc<Quorum>) -> Result<(), ConfigError> {
        self.insert_device(name, q.clone())?;
        if let Some(n) = self.nodes.get_mut(name) {
            n.quorum = Some(q);
        }
        Ok(())
    }

    /// The process services drivers use.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// A node by name.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Every node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Opens a `--blockdev` argument: JSON when it starts with `{`, else the dotted syntax.
    /// Returns the new node's name.
    ///
    /// # Errors
    /// The first error, in QEMU's wording where QEMU has one.
    pub async fn blockdev_add_arg(&mut self, arg: &str) -> Result<String, ConfigError> {
        let (value, keyval_mode) = parse_blockdev_arg(arg)?;
        self.blockdev_add(value, keyval_mode).await
    }

    /// Opens one definition (QMP `blockdev-add` passes JSON with `keyval = false`).
    ///
    /// # Errors
    /// The first error, in QEMU's wording where QEMU has one.
    pub async fn blockdev_add(
        &mut self,
        value: Value,
        keyval: bool,
    ) -> Result<String, ConfigError> {
        let spec = parse_node(value, keyval)?;
        if spec.node_name.is_none() {
            return Err(ConfigError::new(
                "'node-name' must be specified for the root node",
            ));
        }
        let mut staging = Staging::default();
        let (name, _) = self
            .open_spec(&spec, &mut staging, Inherit::default())
            .await?;
        // Commit: claimed existing nodes get their parent, staged nodes enter the graph.
        for (node, parent) in staging.claimed {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.parent = Some(parent);
            }
        }
        for mut node in staging.nodes {
            node.implicit = node.name != name;
            if let Some(r) = &node.replication {
                // R35, R7: the newest opened node first.
                self.replication.insert(0, r.clone());
            }
            self.nodes.insert(node.name.clone(), node);
        }
        Ok(name)
    }

    fn open_spec<'a>(
        &'a mut self,
        spec: &'a NodeSpec,
        staging: &'a mut Staging,
        inherit: Inherit,
    ) -> OpenFuture<'a> {
        Box::pin(async move {
            let name = match &spec.node_name {
                Some(n) => {
                    check_node_name(n)?;
                    n.clone()
                }
                None => loop {
                    // Q2: generated names start with '#', which user names cannot.
                    let n = format!("#block{:03}", self.generated_names);
                    self.generated_names += 1;
                    if !self.nodes.contains_key(&n) && !staging.names.contains(&n) {
                        break n;
                    }
                },
            };
            if self.nodes.contains_key(&name) || staging.names.contains(&name) {
                return Err(ConfigError::new(format!(
                    "Duplicate nodes with node-name='{name}'"
                )));
            }
            staging.names.insert(name.clone());
            let inherit = Inherit {
                direct: spec.cache_direct.unwrap_or(inherit.direct),
                no_flush: spec.cache_no_flush.unwrap_or(inherit.no_flush),
            };
            let mut children = Vec::new();
            let mut quorum_node = None;
            let mut overlay_node = None;
            let mut qcow2_node = None;
            let mut filename = None;
            let mut replication_node = None;
            let dev: Device = match &spec.driver {
                DriverSpec::File {
                    filename: path,
                    locking,
                } => {
                    filename = Some(path.clone());
                    let dev = FileDevice::open(&FileOptions {
                        filename: path.clone(),
                        read_only: spec.read_only,
                        auto_read_only: spec.auto_read_only,
                        direct: inherit.direct,
                        no_flush: inherit.no_flush,
                        discard_unmap: spec.discard_unmap,
                        locking: *locking,
                    })
                    .map_err(|e| ConfigError::new(e.to_string()))?;
                    Arc::new(dev)
                }
                DriverSpec::Null {
                    size,
                    read_zeroes,
                    latency_ns,
                } => Arc::new(NullDevice::new(
                    *size,
                    *read_zeroes,
                    Duration::from_nanos(*latency_ns),
                )),
                DriverSpec::Nbd {
                    server,
                    export,
                    reconnect_delay,
                    open_timeout,
                    request_timeout,
                    tls_creds,
                    tls_hostname,
                } => {
                    let tls = match tls_creds {
                        None => None,
                        Some(id) => {
                            let creds = self
                                .host
                                .objects
                                .tls(id, crate::tls::Endpoint::Client)
                                .map_err(ConfigError::new)?;
                            Some(
                                crate::nbd::client::ClientTls::new(
                                    creds,
                                    tls_hostname.as_deref(),
                                    server,
                                )
                                .map_err(ConfigError::new)?,
                            )
                        }
                    };
                    let opts = crate::nbd::client::ClientOptions {
                        server: server.clone(),
                        export: export.clone(),
                        reconnect_delay: Duration::from_secs(*reconnect_delay),
                        open_timeout: Duration::from_secs(*open_timeout),
                        request_timeout: Duration::from_secs(*request_timeout),
                        tls,
                    };
                    let c = crate::nbd::client::NbdClient::open(opts)
                        .await
                        .map_err(|e| ConfigError::new(e.to_string()))?;
                    Arc::new(c)
                }
                DriverSpec::Raw { file, offset, size } => {
                    let (child_name, child) = self
                        .open_child(file, &name, "file", staging, inherit)
                        .await?;
                    filename = self.filename_of(staging, &child_name);
                    children.push(("file".to_string(), child_name));
                    Arc::new(RawDevice::open(
                        child,
                        *offset,
                        *size,
                        spec.read_only,
                        spec.discard_unmap,
                    )?)
                }
                DriverSpec::Quorum {
                    blkverify,
                    children: refs,
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
                } => {
                    // Q7–Q12 before any child is opened.
                    quorum::validate(
                        refs.len(),
                        *vote_threshold,
                        *read_pattern,
                        *rewrite_corrupted,
                        *blkverify,
                    )?;
                    // Q13: in order; an error releases the ones opened so far (staging drop).
                    let mut devs = Vec::with_capacity(refs.len());
                    for (i, r) in refs.iter().enumerate() {
                        let child_name = format!("children.{i}");
                        let (node, dev) = self
                            .open_child(r, &name, &child_name, staging, inherit)
                            .await?;
                        children.push((child_name, node.clone()));
                        devs.push((node, dev));
                    }
                    let q = Arc::new(Quorum::open(
                        QuorumOptions {
                            node_name: name.clone(),
                            threshold: *vote_threshold as usize,
                            read_pattern: *read_pattern,
                            rewrite_corrupted: *rewrite_corrupted,
                            blkverify: *blkverify,
                            read_only: spec.read_only,
                            discard_unmap: spec.discard_unmap,
                            resync: *resync,
                            resync_inflight: usize::try_from(*resync_inflight)
                                .unwrap_or(usize::MAX),
                            resync_min_speed: *resync_min_speed,
                        },
                        devs,
                        self.host.clone(),
                    )?);
                    match metadata {
                        Some(r) => {
                            let (node, dev) = self
                                .open_child(r, &name, "metadata", staging, inherit)
                                .await?;
                            children.push(("metadata".to_string(), node.clone()));
                            let opts = quorum::durable::MetadataOptions {
                                intent_cold: Duration::from_secs(*intent_cold),
                                intent_extents: usize::try_from(*intent_extents)
                                    .unwrap_or(usize::MAX),
                                reset: *metadata_reset,
                            };
                            q.attach_metadata(&node, dev, &opts).await?;
                        }
                        None if refs.len() > 1 => {
                            // H19: said once, at open.
                            self.host.log(&format!(
                                "ballot: note: quorum '{name}' has no metadata node: after a crash of this process, only a full x-quorum-verify restores redundancy (docs/healing.md H19)"
                            ));
                        }
                        None => {}
                    }
                    quorum_node = Some(q.clone());
                    q
                }
                DriverSpec::Overlay { backing, file } => {
                    let (bname, bdev) = self
                        .open_child(backing, &name, "backing", staging, inherit)
                        .await?;
                    children.push(("backing".to_string(), bname.clone()));
                    let file = match file {
                        Some(f) => {
                            let (fname, fdev) =
                                self.open_child(f, &name, "file", staging, inherit).await?;
                            children.push(("file".to_string(), fname.clone()));
                            Some((fname, fdev))
                        }
                        None => None,
                    };
                    let o = Arc::new(Overlay::open(
                        &name,
                        (&bname, bdev),
                        file.as_ref().map(|(n, d)| (n.as_str(), d.clone())),
                    )?);
                    overlay_node = Some(o.clone());
                    o
                }
                DriverSpec::Qcow2 {
                    file,
                    backing,
                    l2_cache_size,
                    refcount_cache_size,
                } => {
                    let (fname, fdev) = self
                        .open_child(file, &name, "file", staging, inherit)
                        .await?;
                    filename = self.filename_of(staging, &fname);
                    children.push(("file".to_string(), fname.clone()));
                    let label = match &filename {
                        Some(f) => format!("'{f}'"),
                        None => format!("on node '{fname}'"),
                    };
                    let header = Qcow2::read_header(&fdev, &label)
                        .await
                        .map_err(|e| ConfigError::new(e.to_string()))?;
                    let bdev = match backing {
                        Some(Some(r)) => {
                            let (bname, bdev) = self
                                .open_child(r, &name, "backing", staging, inherit)
                                .await?;
                            children.push(("backing".to_string(), bname));
                            Some(bdev)
                        }
                        Some(None) => None,
                        None => match &header.backing_file {
                            None => None,
                            Some(b) => {
                                let (bname, bdev) = self
                                    .open_implicit_backing(
                                        &name,
                                        filename.as_deref(),
                                        b,
                                        header.backing_format.as_deref(),
                                        staging,
                                        inherit,
                                    )
                                    .await?;
                                children.push(("backing".to_string(), bname));
                                Some(bdev)
                            }
                        },
                    };
                    let q = Arc::new(
                        Qcow2::open(
                            &name,
                            &label,
                            fdev,
                            header,
                            bdev,
                            Qcow2Options {
                                read_only: spec.read_only,
                                discard_unmap: spec.discard_unmap,
                                l2_cache_bytes: *l2_cache_size,
                                refcount_cache_bytes: *refcount_cache_size,
                            },
                        )
                        .await
                        .map_err(|e| ConfigError::new(e.to_string()))?,
                    );
                    if let Some(r) = q.repaired() {
                        self.host.warn(&format!(
                            "ballot: warning: qcow2 image {label} was marked dirty (lazy refcounts after a crash): its refcounts were rebuilt ({} clusters changed, {} COPIED flags fixed)",
                            r.refcounts_fixed, r.copied_fixed
                        ));
                    }
                    qcow2_node = Some(q.clone());
                    q
                }
                DriverSpec::Replication { mode, file, top_id } => {
                    // R6: `file` is opened first, then the mode's top-id checks.
                    let (fname, fdev) = self
                        .open_child(file, &name, "file", staging, inherit)
                        .await?;
                    children.push(("file".to_string(), fname));
                    let r =
                        Replication::open(&name, *mode, top_id.clone(), fdev, self.host.clone())?;
                    replication_node = Some(r.clone());
                    r
                }
            };
            let (dev, stats) = crate::stats::Counted::wrap(dev);
            staging.nodes.push(Node {
                name: name.clone(),
                dev: dev.clone(),
                stats,
                quorum: quorum_node,
                overlay: overlay_node,
                qcow2: qcow2_node,
                filename,
                replication: replication_node,
                hooks: PortHooks::new(&name),
                children,
                parent: None,
                implicit: false,
                exports: Vec::new(),
            });
            Ok((name, dev))
        })
    }

    /// The file name of node `name`, opened in this definition or before it.
    fn filename_of(&self, staging: &Staging, name: &str) -> Option<String> {
        staging
            .nodes
            .iter()
            .find(|n| n.name == name)
            .or_else(|| self.nodes.get(name))
            .and_then(|n| n.filename.clone())
    }

    /// Opens the backing file an image names (QEMU's implicit backing): relative to the
    /// image's directory, read-only, in the format the image records (probed when it records
    /// none), refusing a chain that comes back to an image already in it.
    async fn open_implicit_backing(
        &mut self,
        parent: &str,
        image: Option<&str>,
        backing: &str,
        format: Option<&str>,
        staging: &mut Staging,
        inherit: Inherit,
    ) -> Result<(String, Device), ConfigError> {
        let depth = staging.chain.len();
        let r = self
            .open_implicit_inner(parent, image, backing, format, staging, inherit)
            .await;
        staging.chain.truncate(depth);
        r
    }

    async fn open_implicit_inner(
        &mut self,
        parent: &str,
        image: Option<&str>,
        backing: &str,
        format: Option<&str>,
        staging: &mut Staging,
        inherit: Inherit,
    ) -> Result<(String, Device), ConfigError> {
        let path = match image {
            Some(img) if !backing.starts_with('/') => {
                let dir = std::path::Path::new(img)
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                let joined = dir.join(backing);
                if dir == std::path::Path::new(".") {
                    backing.to_string()
                } else {
                    joined.to_string_lossy().into_owned()
                }
            }
            _ => backing.to_string(),
        };
        let fail = |m: String| ConfigError::new(format!("Could not open backing file: {m}"));
        let canonical = std::fs::canonicalize(&path).map_err(|e| {
            fail(format!(
                "Could not open '{path}': {}",
                crate::error::Error::from_io(&e, "").kind().strerror()
            ))
        })?;
        if let Some(img) = image {
            if let Ok(c) = std::fs::canonicalize(img) {
                if !staging.chain.contains(&c) {
                    staging.chain.push(c);
                }
            }
        }
        if staging.chain.contains(&canonical) {
            let names: Vec<String> = staging
                .chain
                .iter()
                .chain(std::iter::once(&canonical))
                .map(|p| p.display().to_string())
                .collect();
            return Err(fail(format!("Backing file loop: {}", names.join(" -> "))));
        }
        let fmt = match format {
            Some(f) => f.to_string(),
            None => {
                let mut magic = [0u8; 4];
                let is_qcow2 = std::fs::File::open(&path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                    .is_ok()
                    && u32::from_be_bytes(magic) == crate::drivers::qcow2::format::MAGIC;
                if is_qcow2 { "qcow2" } else { "raw" }.to_string()
            }
        };
        let file = ChildRef::Inline(Box::new(NodeSpec {
            node_name: None,
            read_only: true,
            auto_read_only: false,
            discard_unmap: false,
            cache_direct: None,
            cache_no_flush: None,
            driver: DriverSpec::File {
                filename: path.clone(),
                locking: true,
            },
        }));
        let driver = match fmt.as_str() {
            "qcow2" => DriverSpec::Qcow2 {
                file,
                backing: None,
                l2_cache_size: crate::drivers::qcow2::L2_CACHE_BYTES_DEFAULT,
                refcount_cache_size: crate::drivers::qcow2::REFCOUNT_CACHE_BYTES_DEFAULT,
            },
            "raw" => DriverSpec::Raw {
                file,
                offset: 0,
                size: None,
            },
            other => {
                return Err(fail(format!(
                    "'{path}' has format '{other}', which ballot does not support (qcow2 and raw)"
                )))
            }
        };
        let spec = NodeSpec {
            node_name: None,
            read_only: true,
            auto_read_only: false,
            discard_unmap: false,
            cache_direct: None,
            cache_no_flush: None,
            driver,
        };
        staging.chain.push(canonical);
        let r = Box::pin(self.open_child(
            &ChildRef::Inline(Box::new(spec)),
            parent,
            "backing",
            staging,
            inherit,
        ))
        .await;
        r.map_err(|e| {
            let m = e.to_string();
            if m.starts_with("Could not open backing file") {
                e
            } else {
                fail(m)
            }
        })
    }

    async fn open_child(
        &mut self,
        r: &ChildRef,
        parent: &str,
        child_name: &str,
        staging: &mut Staging,
        inherit: Inherit,
    ) -> Result<(String, Device), ConfigError> {
        match r {
            ChildRef::Ref(node) => {
                let existing = self.nodes.get(node).ok_or_else(|| not_found(node))?;
                let holder = existing
                    .parent
                    .clone()
                    .or_else(|| staging.claimed.get(node).cloned());
                if let Some((p, c)) = holder {
                    // Q5: one writer per node; QEMU's permission-conflict wording.
                    return Err(ConfigError::new(format!(
                        "Conflicts with use by {p} as '{c}', which does not allow 'write' on {node}"
                    )));
                }
                // An overlay's backing may keep its writable export: COLO's secondary disk is
                // both H's backing and the target of the primary's forwarded writes (§2.2).
                if child_name != "backing" {
                    existing.check_no_writer()?;
                }
                staging
                    .claimed
                    .insert(node.clone(), (parent.to_string(), child_name.to_string()));
                Ok((node.clone(), existing.dev.clone()))
            }
            ChildRef::Inline(spec) => {
                let (node, dev) = self.open_spec(spec, staging, inherit).await?;
                if let Some(n) = staging.nodes.iter_mut().find(|n| n.name == node) {
                    n.parent = Some((parent.to_string(), child_name.to_string()));
                }
                Ok((node, dev))
            }
        }
    }

    /// `x-blockdev-change`: removes `child` from, or appends `node` to, `parent` (Q52–Q56).
    ///
    /// # Errors
    /// Q52–Q54's messages, in their order.
    pub async fn change(
        &mut self,
        parent: &str,
        child: Option<&str>,
        node: Option<&str>,
    ) -> Result<(), ConfigError> {
        let p = self.nodes.get(parent).ok_or_else(|| not_found(parent))?;
        match (child, node) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                "The parameters child and node are in conflict",
            )),
            (None, None) => Err(ConfigError::new("Either child or node must be specified")),
            (Some(child), None) => {
                let Some((_, child_node)) = p.children.iter().find(|(c, _)| c == child).cloned()
                else {
                    return Err(ConfigError::new(format!(
                        "Node '{parent}' does not have child '{child}'"
                    )));
                };
                let Some(q) = p.quorum.clone() else {
                    return Err(ConfigError::new(format!(
                        "The node {parent} does not support removing a child"
                    )));
                };
                q.remove_child(child).await?;
                if let Some(p) = self.nodes.get_mut(parent) {
                    p.children.retain(|(c, _)| c != child);
                }
                let drop_node = match self.nodes.get_mut(&child_node) {
                    Some(n) => {
                        n.parent = None;
                        n.implicit
                    }
                    None => false,
                };
                if drop_node {
                    let closed = self.remove_subtree(&child_node);
                    self.close_replication(closed).await;
                }
                Ok(())
            }
            (None, Some(node)) => {
                let n = self
                    .nodes
                    .get(node)
                    .ok_or_else(|| ConfigError::new(format!("Node '{node}' not found")))?;
                let Some(q) = p.quorum.clone() else {
                    return Err(ConfigError::new(format!(
                        "The node {parent} does not support adding a child"
                    )));
                };
                if n.parent.is_some() {
                    return Err(ConfigError::new(format!(
                        "The node {node} already has a parent"
                    )));
                }
                n.check_no_writer()?;
                let dev = n.dev.clone();
                let name = q.add_child(node, dev).await?;
                if let Some(p) = self.nodes.get_mut(parent) {
                    p.children.push((name.clone(), node.to_string()));
                }
                if let Some(n) = self.nodes.get_mut(node) {
                    n.parent = Some((parent.to_string(), name));
                }
                Ok(())
            }
        }
    }

    /// R25: resolves the chain of secondary node `r` (A = its file, H = A's backing, S = H's
    /// backing), with the checks in R25's order.
    fn secondary_chain(&self, r: &Replication) -> Result<SecondaryChain, ConfigError> {
        let node = self.nodes.get(r.name());
        let child = |n: Option<&Node>, edge: &str| {
            n.and_then(|n| n.children.iter().find(|(c, _)| c == edge))
                .and_then(|(_, name)| self.nodes.get(name))
        };
        // A and H are copy-on-write layers: `overlay` or `qcow2` nodes (issue 19).
        let layer = |n: &Node| n.layer();
        let a = child(node, "file");
        let active = a
            .and_then(layer)
            .ok_or_else(|| ConfigError::new("Active disk doesn't have backing file"))?;
        let h = child(a, "backing");
        let hidden = h
            .and_then(layer)
            .ok_or_else(|| ConfigError::new("Hidden disk doesn't have backing file"))?;
        if active.granule() != hidden.granule() {
            return Err(ConfigError::new(format!(
                "Active disk and hidden disk need the same cluster size ({} and {} bytes)",
                active.granule(),
                hidden.granule()
            )));
        }
        let s = child(h, "backing")
            .ok_or_else(|| ConfigError::new("Hidden disk doesn't have backing file"))?;
        if s.exports.is_empty() {
            return Err(ConfigError::new(
                "The secondary disk doesn't have block backend",
            ));
        }
        let lens = [
            active.length().ok(),
            hidden.length().ok(),
            s.dev.length().ok(),
        ];
        if lens.iter().any(Option::is_none) || lens.iter().any(|l| *l != lens[0]) {
            return Err(ConfigError::new(
                "Active disk, hidden disk, secondary disk's length are not the same",
            ));
        }
        // R25 step 5 cannot fail: A and H are overlays (O3).
        let top_ok = r
            .top_id()
            .and_then(|t| self.nodes.get(t))
            .is_some_and(|top| top.parent.is_none() && self.contains(&top.name, r.name()));
        if !top_ok {
            return Err(ConfigError::new("No top_bs or it is invalid"));
        }
        Ok(SecondaryChain {
            active,
            hidden,
            disk: s.dev.clone(),
            hooks: s.hooks.clone(),
        })
    }

    /// Whether `node` is in the subtree of `root` (itself included).
    fn contains(&self, root: &str, node: &str) -> bool {
        if root == node {
            return true;
        }
        self.nodes
            .get(root)
            .is_some_and(|n| n.children.iter().any(|(_, c)| self.contains(c, node)))
    }

    /// The replication nodes, newest first (R35).
    pub fn replication_nodes(&self) -> &[Arc<Replication>] {
        &self.replication
    }

    /// R36 start_all(mode): every node in list order, stopping at the first error.
    ///
    /// # Errors
    /// The first node's error.
    pub async fn replication_start_all(&self, mode: Mode) -> Result<(), ConfigError> {
        for r in &self.replication {
            r.start(mode, || self.secondary_chain(r)).await?;
        }
        Ok(())
    }

    /// R36 do_checkpoint_all.
    ///
    /// # Errors
    /// The first node's error.
    pub async fn replication_checkpoint_all(&self) -> Result<(), ConfigError> {
        for r in &self.replication {
            r.do_checkpoint().await?;
        }
        Ok(())
    }

    /// R36 get_error_all: the first error, with the stage of the node that gave it, or of the
    /// newest node when none did (O2's `stage`; `None` with no node).
    pub fn replication_status(&self) -> (Result<(), ConfigError>, Option<Stage>) {
        for r in &self.replication {
            if let Err(e) = r.get_error() {
                return (Err(e), Some(r.stage()));
            }
        }
        (Ok(()), self.replication.first().map(|r| r.stage()))
    }

    /// R36 stop_all(failover).
    ///
    /// # Errors
    /// The first node's error.
    pub async fn replication_stop_all(&self, failover: bool) -> Result<(), ConfigError> {
        for r in &self.replication {
            r.stop(failover).await?;
        }
        Ok(())
    }

    /// `x-query-quorum-out-of-sync` (QUORUM.md Q51): one entry per child, in child order.
    ///
    /// # Errors
    /// `Cannot find device='<n>' nor node-name='<n>'`; `Node '<n>' is not a quorum node`.
    pub async fn query_out_of_sync(&self, node: &str) -> Result<Value, ConfigError> {
        let n = self.nodes.get(node).ok_or_else(|| not_found(node))?;
        let q = n
            .quorum
            .as_ref()
            .ok_or_else(|| ConfigError::new(format!("Node '{node}' is not a quorum node")))?;
        Ok(Value::Array(
            q.out_of_sync().await.iter().map(|r| r.to_json()).collect(),
        ))
    }

    /// QEMU's `BlockStats` of node `name`: its counters, its `file` child's entry as `parent`
    /// and its backing node's as `backing`; for a quorum, ballot's `x-quorum`: how its reads
    /// were voted, the events it emitted, each child's counters and out-of-sync bytes, and
    /// its resync and verify jobs.
    pub async fn blockstats(&self, name: &str) -> Option<Value> {
        let mut v = self.blockstats_plain(name, 0)?;
        let n = self.nodes.get(name)?;
        if let Some(q) = &n.quorum {
            let vc = q.vote_counters();
            let oos = q.out_of_sync().await;
            let children: Vec<Value> = oos
                .iter()
                .map(|r| {
                    let stats = self
                        .nodes
                        .get(&r.node_name)
                        .map(|c| c.stats.snapshot().to_qmp());
                    serde_json::json!({
                        "child": r.child,
                        "node-name": r.node_name,
                        "out-of-sync-bytes": r.dirty_bytes(),
                        "stats": stats,
                    })
                })
                .collect();
            let jobs: Vec<Value> = q.job_infos().iter().map(|j| j.to_query_jobs()).collect();
            if let Value::Object(m) = &mut v {
                m.insert(
                    "x-quorum".into(),
                    serde_json::json!({
                        "reads-fast": vc.fast,
                        "reads-hashed": vc.hashed,
                        "reads-failed": vc.failed,
                        "report-bad-events": vc.report_bad,
                        "failure-events": vc.failures,
                        "children": children,
                        "jobs": jobs,
                    }),
                );
            }
        }
        Some(v)
    }

    /// [`Graph::blockstats`] without the quorum part, `depth` levels down a chain.
    fn blockstats_plain(&self, name: &str, depth: usize) -> Option<Value> {
        let n = self.nodes.get(name)?;
        let mut m = serde_json::Map::new();
        m.insert("node-name".into(), Value::String(name.to_string()));
        m.insert("stats".into(), n.stats.snapshot().to_qmp());
        // Chains are finite (loops are refused), but bound the walk all the same.
        if depth < 64 {
            for (child, cname) in &n.children {
                let key = match child.as_str() {
                    "file" => "parent",
                    "backing" => "backing",
                    _ => continue,
                };
                if let Some(c) = self.blockstats_plain(cname, depth + 1) {
                    m.insert(key.into(), c);
                }
            }
        }
        Some(Value::Object(m))
    }

    /// The process's job registry (HEALING.md H16).
    pub fn jobs(&self) -> crate::jobs::Jobs {
        self.host.jobs.clone()
    }

    /// The quorum node `node`, for its jobs (HEALING.md H16, H17).
    ///
    /// # Errors
    /// `Cannot find device='<n>' nor node-name='<n>'`; `Node '<n>' is not a quorum node`.
    pub fn quorum(&self, node: &str) -> Result<Arc<Quorum>, ConfigError> {
        let n = self.nodes.get(node).ok_or_else(|| not_found(node))?;
        n.quorum
            .clone()
            .ok_or_else(|| ConfigError::new(format!("Node '{node}' is not a quorum node")))
    }

    /// `blockdev-del`: removes a node added by `blockdev-add`, with its implicit children.
    ///
    /// # Errors
    /// QEMU's messages: the node does not exist, is not owned by the monitor, or is in use;
    /// REPLICATION.md R26 for the top node of an armed secondary.
    pub async fn blockdev_del(&mut self, name: &str) -> Result<(), ConfigError> {
        let n = self.nodes.get(name).ok_or_else(|| {
            ConfigError::new(format!("Failed to find node with node-name='{name}'"))
        })?;
        if n.implicit {
            return Err(ConfigError::new(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if n.parent.is_some() || !n.exports.is_empty() {
            return Err(ConfigError::new(format!("Node {name} is in use")));
        }
        if self
            .replication
            .iter()
            .any(|r| r.armed() && r.top_id() == Some(name))
        {
            return Err(ConfigError::new(format!(
                "Node '{name}' is busy: Block device is in use by internal backup job"
            )));
        }
        // H23: blockdev-del of a quorum is a clean shutdown of its metadata node.
        if let Some(q) = n.quorum.clone() {
            if let Err(e) = q.close().await {
                self.host.warn(&format!(
                    "ballot: quorum '{name}' could not be closed cleanly: {e}"
                ));
            }
        }
        let closed = self.remove_subtree(name);
        self.close_replication(closed).await;
        Ok(())
    }

    /// H23: the clean shutdown of every quorum with a metadata node (SIGTERM, SIGINT, `quit`),
    /// after the exports have drained. Returns the errors, one line each.
    pub async fn close_quorums(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, n) in &self.nodes {
            if let Some(q) = &n.quorum {
                if let Err(e) = q.close().await {
                    errors.push(format!("quorum '{name}' could not be closed cleanly: {e}"));
                }
            }
        }
        errors
    }

    /// R33: closes replication nodes that left the graph, and drops them from the registry.
    async fn close_replication(&mut self, closed: Vec<Arc<Replication>>) {
        for r in closed {
            r.close().await;
            self.replication.retain(|x| !Arc::ptr_eq(x, &r));
        }
    }

    /// Ends a claim made by [`Graph::claim`] (an export going away).
    pub fn unclaim(&mut self, node: &str, user: &str) {
        if let Some(n) = self.nodes.get_mut(node) {
            if let Some(i) = n.exports.iter().position(|(u, _)| u == user) {
                n.exports.remove(i);
            }
        }
    }

    /// Records `user` (an export) on `node`. Several exports may share a node, as in
    /// qemu-storage-daemon; a writable one is refused on a node that is some node's child (Q5),
    /// and a node with a writable export cannot become a child.
    ///
    /// # Errors
    /// The node does not exist, or `writable` and it has a parent.
    /// Returns the device the export uses: the node's port ([`Port`]).
    ///
    /// # Errors
    /// The node does not exist, or `writable` and it has a parent other than an overlay's
    /// backing edge.
    pub fn claim(&mut self, node: &str, user: &str, writable: bool) -> Result<Device, ConfigError> {
        let n = self.nodes.get_mut(node).ok_or_else(|| not_found(node))?;
        if let (true, Some((p, c))) = (writable, &n.parent) {
            if c != "backing" {
                return Err(ConfigError::new(format!(
                    "Conflicts with use by {p} as '{c}', which does not allow 'write' on {node}"
                )));
            }
        }
        n.exports.push((user.to_string(), writable));
        Ok(Port::new(n.dev.clone(), n.hooks.clone()))
    }

    /// Removes `name` and its implicit children; returns the replication nodes removed.
    fn remove_subtree(&mut self, name: &str) -> Vec<Arc<Replication>> {
        let mut closed = Vec::new();
        if let Some(n) = self.nodes.remove(name) {
            closed.extend(n.replication);
            for (_, c) in n.children {
                let implicit = self.nodes.get(&c).is_some_and(|n| n.implicit);
                if implicit {
                    closed.extend(self.remove_subtree(&c));
                } else if let Some(cn) = self.nodes.get_mut(&c) {
                    cn.parent = None;
                }
            }
        }
        closed
    }
}
