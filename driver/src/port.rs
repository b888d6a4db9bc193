//! What users outside the graph (NBD exports) write through: a [`Port`] onto a node.
//!
//! The graph's own edges (a parent reading or committing into its child) use the node directly;
//! every export gets the node's port. Replication uses the port of the secondary disk S for two
//! things the graph's edges must not see (REPLICATION.md §6, O1):
//! - copy-before-write (R18–R21): while armed, a write, write-zeroes or discard arriving through
//!   the port (the primary's forwarded writes) first runs the armed hook, which preserves the
//!   clusters into the hidden overlay and holds the replication node's I/O gate until the write
//!   has landed (R17);
//! - the failover fence (O1): once stop has run on the secondary, writes through the port fail
//!   with EPERM, so a late forwarded write never lands on the promoted disk; the failover
//!   commit writes S directly and is not affected.
//!
//! With nothing armed, a request costs one atomic load beyond the node's own.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::join::BoxFuture;

/// Held by a port write from the hook's answer until the write has landed.
pub type HookPass = Box<dyn Send + Sync>;

/// Runs before a write through a port changes the node (copy-before-write).
#[async_trait]
pub trait BeforeWrite: Send + Sync {
    /// Prepares `[offset, offset + len)` for being overwritten. The returned pass is dropped
    /// after the write completed; an error fails the write and leaves the node unchanged (R21).
    async fn before_write(&self, offset: u64, len: u64) -> Result<HookPass>;
}

/// The hooks of one node, shared by all its ports.
pub struct PortHooks {
    /// Anything armed (fast path when false).
    active: AtomicBool,
    fenced: AtomicBool,
    hook: Mutex<Option<Arc<dyn BeforeWrite>>>,
    node: String,
}

impl fmt::Debug for PortHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortHooks")
            .field("fenced", &self.fenced.load(Ordering::SeqCst))
            .finish()
    }
}

impl PortHooks {
    /// Hooks of node `node`, none armed.
    pub fn new(node: &str) -> Arc<PortHooks> {
        Arc::new(PortHooks {
            active: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            hook: Mutex::new(None),
            node: node.to_string(),
        })
    }

    /// Whether a port write must go through [`PortHooks::admit`].
    fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    fn refresh(&self, hook: &Option<Arc<dyn BeforeWrite>>) {
        self.active.store(
            hook.is_some() || self.fenced.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    /// Arms `hook` (R18).
    pub fn arm(&self, hook: Arc<dyn BeforeWrite>) {
        let mut h = self.hook.lock().unwrap_or_else(|p| p.into_inner());
        *h = Some(hook);
        self.refresh(&h);
    }

    /// Disarms the hook; never an error (R18, E1).
    pub fn disarm(&self) {
        let mut h = self.hook.lock().unwrap_or_else(|p| p.into_inner());
        *h = None;
        self.refresh(&h);
    }

    /// Whether a hook is armed.
    pub fn armed(&self) -> bool {
        self.hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Sets or lifts the O1 fence.
    pub fn set_fenced(&self, on: bool) {
        let h = self.hook.lock().unwrap_or_else(|p| p.into_inner());
        self.fenced.store(on, Ordering::SeqCst);
        self.refresh(&h);
    }

    /// Whether port writes are refused.
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// The fence or the hook, before a write of `[offset, offset + len)`; nothing when
    /// neither is armed.
    async fn admit(&self, offset: u64, len: u64) -> Result<Option<HookPass>> {
        if !self.active() {
            return Ok(None);
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Perm,
                format!(
                    "node '{}' was promoted by a failover and refuses writes from its exports (docs/colo.md O1)",
                    self.node
                ),
            ));
        }
        let hook = self.hook.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match hook {
            Some(h) => Ok(Some(h.before_write(offset, len).await?)),
            None => Ok(None),
        }
    }
}

/// An export's handle on a node.
pub struct Port {
    inner: Device,
    hooks: Arc<PortHooks>,
}

impl fmt::Debug for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Port").field("inner", &self.inner).finish()
    }
}

impl Port {
    /// A port onto `inner` with `hooks`.
    pub fn new(inner: Device, hooks: Arc<PortHooks>) -> Arc<Port> {
        Arc::new(Port { inner, hooks })
    }
}

#[async_trait]
impl BlockDevice for Port {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }

    fn length(&self) -> Result<u64> {
        self.inner.length()
    }

    fn request_alignment(&self) -> u32 {
        self.inner.request_alignment()
    }

    fn read<'a, 'b>(&'a self, offset: u64, len: usize) -> BoxFuture<'b, Result<Bytes>>
    where
        'a: 'b,
        Self: 'b,
    {
        self.inner.read(offset, len)
    }

    fn write<'a, 'b>(
        &'a self,
        offset: u64,
        data: Bytes,
        flags: WriteFlags,
    ) -> BoxFuture<'b, Result<()>>
    where
        'a: 'b,
        Self: 'b,
    {
        if !self.hooks.active() {
            return self.inner.write(offset, data, flags);
        }
        Box::pin(async move {
            let pass = self.hooks.admit(offset, data.len() as u64).await?;
            let r = self.inner.write(offset, data, flags).await;
            drop(pass);
            r
        })
    }

    fn flush<'a, 'b>(&'a self) -> BoxFuture<'b, Result<()>>
    where
        'a: 'b,
        Self: 'b,
    {
        self.inner.flush()
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let pass = self.hooks.admit(offset, len).await?;
        let r = self.inner.write_zeroes(offset, len, flags).await;
        drop(pass);
        r
    }

    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }

    fn completes_inline(&self) -> bool {
        self.inner.completes_inline()
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let pass = self.hooks.admit(offset, len).await?;
        let r = self.inner.discard(offset, len).await;
        drop(pass);
        r
    }

    fn discard_zeroes(&self) -> bool {
        self.inner.discard_zeroes()
    }

    fn block_status<'a, 'b>(&'a self, offset: u64, len: u64) -> BoxFuture<'b, Result<BlockStatus>>
    where
        'a: 'b,
        Self: 'b,
    {
        self.inner.block_status(offset, len)
    }
}
