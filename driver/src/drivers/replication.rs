//! `replication`: the disk half of COLO (REPLICATION.md §3–§8).
//!
//! A primary node forwards the PVM's writes to its `file` (an nbd client to the secondary's
//! export of S) and records, never returns, a failed forward (R11). A secondary node sits over
//! the active overlay A, whose backing is the hidden overlay H over the secondary disk S: the SVM
//! reads A → H → S and writes into A; writes arriving at S through its export first preserve
//! S's old clusters into H (copy-before-write, §6); a checkpoint empties A and H; a failover
//! commits them into S (R31) and the node then uses S directly.
//!
//! The stage machine is R8's; every control operation follows its rule's steps in order with
//! QEMU's messages (R24–R30), except E1 (disarming copy-before-write is never an error). The
//! I/O gate ([`IoGate`]) gives R17: control operations wait for requests in flight on the node
//! (on the secondary also forwarded writes landing on S) and hold new ones.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::cow::{self, Layer};
use crate::device::{
    check_request, Access, BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags,
};
use crate::error::{ConfigError, Error, ErrorKind, Result};
use crate::events::Event;
use crate::host::Host;
use crate::port::{BeforeWrite, HookPass, PortHooks};
use crate::waiter::wait_until;

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards writes to the secondary.
    Primary,
    /// Buffers the SVM's view in A and H.
    Secondary,
}

impl Mode {
    /// QEMU's enum value, used in its mode-mismatch message (R24 step 3).
    pub fn number(self) -> u8 {
        match self {
            Mode::Primary => 0,
            Mode::Secondary => 1,
        }
    }

    /// The option value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Primary => "primary",
            Mode::Secondary => "secondary",
        }
    }
}

/// The stage (R8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opened, not started.
    None,
    /// Replicating.
    Running,
    /// Secondary: the failover commit is running.
    Failover,
    /// Secondary: the failover commit failed.
    FailoverFailed,
    /// Finished.
    Done,
}

impl Stage {
    /// The value of `query-xen-replication-status`'s `stage` (O2).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Running => "running",
            Stage::Failover => "failover",
            Stage::FailoverFailed => "failover-failed",
            Stage::Done => "done",
        }
    }
}

/// R17's gate: requests pass while it is open; a holder waits until none is in flight and
/// keeps new ones waiting until it lets go. One holder at a time.
#[derive(Debug, Default)]
pub struct IoGate {
    st: Mutex<(usize, bool)>,
    changed: Notify,
}

/// A request in flight through the gate.
#[derive(Debug)]
pub struct GatePass(Arc<IoGate>);

/// The gate held by a control operation.
#[derive(Debug)]
pub struct GateHold(Arc<IoGate>);

impl IoGate {
    fn lock(&self) -> MutexGuard<'_, (usize, bool)> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while the gate is held, then counts a request in flight.
    pub async fn enter(self: &Arc<Self>) -> GatePass {
        wait_until(&self.st, &self.changed, |st| (!st.1).then(|| st.0 += 1)).await;
        GatePass(self.clone())
    }

    /// Closes the gate, then waits for requests in flight to end.
    pub async fn hold(self: &Arc<Self>) -> GateHold {
        wait_until(&self.st, &self.changed, |st| (!st.1).then(|| st.1 = true)).await;
        wait_until(&self.st, &self.changed, |st| (st.0 == 0).then_some(())).await;
        GateHold(self.clone())
    }
}

impl Drop for GatePass {
    fn drop(&mut self) {
        self.0.lock().0 -= 1;
        self.0.changed.notify_waiters();
    }
}

impl Drop for GateHold {
    fn drop(&mut self) {
        self.0.lock().1 = false;
        self.0.changed.notify_waiters();
    }
}

/// The secondary's chain, resolved from the graph at start (R25).
#[derive(Clone)]
pub struct SecondaryChain {
    /// A (an `overlay` or a `qcow2` node).
    pub active: Layer,
    /// H.
    pub hidden: Layer,
    /// S (the node itself, not its export's port).
    pub disk: Device,
    /// S's port hooks: copy-before-write and the failover fence.
    pub hooks: Arc<PortHooks>,
}

impl fmt::Debug for SecondaryChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecondaryChain")
            .field("active", &self.active.layer_name())
            .field("hidden", &self.hidden.layer_name())
            .finish()
    }
}

#[derive(Debug)]
struct State {
    stage: Stage,
    /// The recorded error (R29).
    error: Option<ErrorKind>,
    chain: Option<SecondaryChain>,
    /// Secondary: copy-before-write armed.
    armed: bool,
    /// Secondary: the failover commit succeeded; I/O goes to S.
    promoted: bool,
    /// The running failover commit.
    commit: Option<tokio::task::JoinHandle<()>>,
}

/// A replication node.
pub struct Replication {
    name: String,
    mode: Mode,
    top_id: Option<String>,
    file: Device,
    host: Host,
    gate: Arc<IoGate>,
    st: Mutex<State>,
    cancel: AtomicBool,
    me: Weak<Replication>,
}

impl fmt::Debug for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replication")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .finish()
    }
}

fn config(msg: impl Into<String>) -> ConfigError {
    ConfigError::new(msg)
}

impl Replication {
    /// Opens a node (R6 after `file` opened, R7). `top_id` is checked against the mode here and
    /// resolved only at start.
    ///
    /// # Errors
    /// `The primary side does not support option top-id`; `Missing the option top-id`.
    pub fn open(
        name: &str,
        mode: Mode,
        top_id: Option<String>,
        file: Device,
        host: Host,
    ) -> Result<Arc<Replication>, ConfigError> {
        match (mode, &top_id) {
            (Mode::Primary, Some(_)) => {
                return Err(config("The primary side does not support option top-id"))
            }
            (Mode::Secondary, None) => return Err(config("Missing the option top-id")),
            _ => {}
        }
        Ok(Arc::new_cyclic(|me| Replication {
            name: name.to_string(),
            mode,
            top_id,
            file,
            host,
            gate: Arc::new(IoGate::default()),
            st: Mutex::new(State {
                stage: Stage::None,
                error: None,
                chain: None,
                armed: false,
                promoted: false,
                commit: None,
            }),
            cancel: AtomicBool::new(false),
            me: me.clone(),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `top-id` (secondary).
    pub fn top_id(&self) -> Option<&str> {
        self.top_id.as_deref()
    }

    /// The stage now.
    pub fn stage(&self) -> Stage {
        self.state().stage
    }

    /// Whether copy-before-write is armed (R26).
    pub fn armed(&self) -> bool {
        self.state().armed
    }

    /// The secondary chain once started (A, H, S and S's hooks), for embedders and tests.
    pub fn chain(&self) -> Option<SecondaryChain> {
        self.state().chain.clone()
    }

    /// R24: start.
    ///
    /// `chain` resolves the secondary's A, H and S with R25's checks; it is called only when
    /// the earlier steps pass.
    ///
    /// # Errors
    /// R24's and R25's messages.
    pub async fn start(
        &self,
        mode: Mode,
        chain: impl FnOnce() -> Result<SecondaryChain, ConfigError>,
    ) -> Result<(), ConfigError> {
        let hold = self.gate.hold().await;
        {
            let st = self.state();
            match st.stage {
                Stage::Done | Stage::Failover => return Ok(()),
                Stage::None => {}
                _ => return Err(config("Block replication is running or done")),
            }
        }
        if mode != self.mode {
            return Err(config(format!(
                "The parameter mode's value is invalid, needs {}, but got {}",
                self.mode.number(),
                mode.number()
            )));
        }
        if self.mode == Mode::Primary {
            let mut st = self.state();
            st.stage = Stage::Running;
            st.error = None;
            return Ok(());
        }
        let chain = chain()?;
        if let Some(me) = self.me.upgrade() {
            chain.hooks.arm(me as Arc<dyn BeforeWrite>);
        }
        {
            let mut st = self.state();
            st.chain = Some(chain.clone());
            st.armed = true;
            st.stage = Stage::Running;
        }
        self.empty_overlays(&chain).await;
        drop(hold);
        self.state().error = None;
        Ok(())
    }

    async fn empty_overlays(&self, chain: &SecondaryChain) {
        // A qcow2 layer that cannot update its metadata keeps its clusters; the next
        // checkpoint tries again, and reads stay correct meanwhile (they see the layer).
        if let Err(e) = chain.active.make_empty().await {
            self.host.warn(&format!(
                "ballot: emptying {}: {e}",
                chain.active.layer_name()
            ));
        }
        if let Err(e) = chain.hidden.make_empty().await {
            self.host.warn(&format!(
                "ballot: emptying {}: {e}",
                chain.hidden.layer_name()
            ));
        }
    }

    /// R27: do_checkpoint.
    ///
    /// # Errors
    /// `Backup job was cancelled unexpectedly` for a secondary that is not running.
    pub async fn do_checkpoint(&self) -> Result<(), ConfigError> {
        let hold = self.gate.hold().await;
        let chain = {
            let st = self.state();
            match st.stage {
                Stage::Done | Stage::Failover => return Ok(()),
                _ if self.mode == Mode::Primary => return Ok(()),
                _ if !st.armed => return Err(config("Backup job was cancelled unexpectedly")),
                _ => st.chain.clone(),
            }
        };
        if let Some(chain) = chain {
            self.empty_overlays(&chain).await;
        }
        drop(hold);
        Ok(())
    }

    /// R28: get_error.
    ///
    /// # Errors
    /// `Block replication is not running`; `I/O error occurred`.
    pub fn get_error(&self) -> Result<(), ConfigError> {
        let st = self.state();
        if st.stage == Stage::None {
            return Err(config("Block replication is not running"));
        }
        if st.error.is_some() {
            return Err(config("I/O error occurred"));
        }
        Ok(())
    }

    /// R30: stop(failover). A failover commit runs on its own task; this returns once it has
    /// started.
    ///
    /// # Errors
    /// `Block replication is not running`; with failover=false, the emptying error.
    pub async fn stop(&self, failover: bool) -> Result<(), ConfigError> {
        let hold = self.gate.hold().await;
        {
            let st = self.state();
            match st.stage {
                Stage::Done | Stage::Failover => return Ok(()),
                Stage::Running => {}
                _ => return Err(config("Block replication is not running")),
            }
        }
        if self.mode == Mode::Primary {
            let mut st = self.state();
            st.stage = Stage::Done;
            st.error = None;
            return Ok(());
        }
        let chain = {
            let mut st = self.state();
            st.armed = false;
            st.chain.clone()
        };
        let Some(chain) = chain else {
            self.state().stage = Stage::Done;
            return Ok(());
        };
        // R18 and E1: disarming first, never an error; O1: the export of S is fenced.
        chain.hooks.disarm();
        chain.hooks.set_fenced(true);
        if !failover {
            self.empty_overlays(&chain).await;
            self.state().stage = Stage::Done;
            return Ok(());
        }
        self.state().stage = Stage::Failover;
        drop(hold);
        if let Some(me) = self.me.upgrade() {
            let task = tokio::spawn(async move { me.failover_commit(chain).await });
            self.state().commit = Some(task);
        }
        Ok(())
    }

    /// R31: commit A and H into S while the SVM goes on, then switch the path to S.
    async fn failover_commit(self: Arc<Self>, chain: SecondaryChain) {
        let overlays = [chain.active.clone(), chain.hidden.clone()];
        let len = cow::chain_allocated_bytes(&overlays).await.unwrap_or(0);
        let mut done = 0u64;
        let result = async {
            // The pass while the SVM runs (step 1, 2).
            let st = cow::commit(&overlays, &chain.disk, Some(&self.cancel)).await?;
            done += st.bytes;
            if self.cancel.load(Ordering::SeqCst) {
                return Ok(false);
            }
            // Step 2: hold new I/O, commit what was written meanwhile, switch to S.
            // What it commits under the hold counts in both len and offset (the event reports
            // len as at least offset).
            let hold = self.gate.hold().await;
            let st = cow::commit(&overlays, &chain.disk, None).await?;
            done += st.bytes;
            {
                let mut s = self.state();
                s.promoted = true;
                s.stage = Stage::Done;
                s.error = None;
            }
            drop(hold);
            Ok::<bool, Error>(true)
        }
        .await;
        let error = match result {
            Ok(true) => None,
            Ok(false) => return, // cancelled by close (R33): the chain stays consistent
            Err(e) => {
                let mut s = self.state();
                s.stage = Stage::FailoverFailed;
                s.error = Some(ErrorKind::Io);
                Some(e.kind())
            }
        };
        self.host.events.emit(Event::BlockJobCompleted {
            job_type: "commit",
            device: self.name.clone(),
            len: len.max(done),
            offset: done,
            error,
            speed: 0,
            result: Vec::new(),
        });
    }

    /// Waits for a running failover commit to end.
    pub async fn wait_commit(&self) {
        let task = self.state().commit.take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// R33: closing the node. RUNNING: stop(false), errors ignored; FAILOVER: the commit is
    /// cancelled at a cluster boundary. Copy-before-write is disarmed.
    pub async fn close(&self) {
        if self.stage() == Stage::Running {
            let _ = self.stop(false).await;
        }
        if self.stage() == Stage::Failover {
            self.cancel.store(true, Ordering::SeqCst);
            self.wait_commit().await;
        }
        let chain = {
            let mut st = self.state();
            st.armed = false;
            st.chain.clone()
        };
        if let Some(c) = chain {
            c.hooks.disarm();
        }
    }

    fn eio(&self, what: &str, stage: Stage) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "replication node '{}' ({}) refuses {what} in stage {}",
                self.name,
                self.mode.as_str(),
                stage.as_str()
            ),
        )
    }

    /// Where a secondary request goes now.
    fn secondary_target(&self, what: &str, write: bool) -> Result<Target> {
        let st = self.state();
        match st.stage {
            Stage::None => Err(self.eio(what, st.stage)),
            Stage::Done if st.promoted => Ok(Target::Disk(
                st.chain
                    .as_ref()
                    .map(|c| c.disk.clone())
                    .unwrap_or_else(|| self.file.clone()),
            )),
            Stage::FailoverFailed if write => match &st.chain {
                Some(c) => Ok(Target::Split(c.clone())),
                None => Ok(Target::Disk(self.file.clone())),
            },
            _ => Ok(Target::Disk(self.file.clone())),
        }
    }

    /// R13: the FAILOVER_FAILED split, extent by extent: allocated in A or H → A, else → S.
    async fn split<F>(&self, chain: &SecondaryChain, offset: u64, len: u64, mut op: F) -> Result<()>
    where
        F: FnMut(Device, u64, u64) -> crate::join::BoxFuture<'static, Result<()>>,
    {
        let end = offset + len;
        let mut at = offset;
        let mut first_err = None;
        let g = chain.active.granule();
        while at < end {
            let alloc = |o: u64| async move {
                Ok::<bool, Error>(
                    chain.active.is_allocated_at(o).await?
                        || chain.hidden.is_allocated_at(o).await?,
                )
            };
            let here = alloc(at).await?;
            // The run of granules with the same answer, from `at`.
            let mut stop = at;
            while stop < end && alloc(stop).await? == here {
                stop = ((stop / g + 1) * g).min(end);
            }
            let dev: Device = if here {
                chain.active.clone().as_device()
            } else {
                chain.disk.clone()
            };
            if let Err(e) = op(dev, at, stop - at).await {
                first_err.get_or_insert(e);
            }
            at = stop;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// R11: a primary write in RUNNING, forwarded; a failure is recorded, success returned.
    fn record_forward(&self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            self.state().error = Some(ErrorKind::Io);
        }
        Ok(())
    }

    fn primary_running(&self, what: &str) -> Result<()> {
        let stage = self.stage();
        if stage == Stage::Running {
            Ok(())
        } else {
            Err(self.eio(what, stage))
        }
    }

    /// Where a write or write-zeroes of `[offset, offset + len)` goes (R9, R11–R13); `op`
    /// performs it on one device over one extent.
    async fn write_path<F>(&self, offset: u64, len: u64, mut op: F) -> Result<()>
    where
        F: FnMut(Device, u64, u64) -> crate::join::BoxFuture<'static, Result<()>>,
    {
        let _pass = self.gate.enter().await;
        if self.mode == Mode::Primary {
            self.primary_running("writes")?;
            let r = op(self.file.clone(), offset, len).await;
            return self.record_forward(r);
        }
        match self.secondary_target("writes", true)? {
            Target::Disk(d) => op(d, offset, len).await,
            Target::Split(c) => {
                check_request(self.length()?, 1, offset, len, Access::Write)?;
                self.split(&c, offset, len, op).await
            }
        }
    }
}

enum Target {
    Disk(Device),
    Split(SecondaryChain),
}

#[async_trait]
impl BeforeWrite for Replication {
    /// R19–R21: preserve the clusters into H, holding the gate (R17) until the write landed.
    async fn before_write(&self, offset: u64, len: u64) -> Result<HookPass> {
        let pass = self.gate.enter().await;
        let chain = self.state().chain.clone();
        if let Some(c) = chain {
            let length = c.hidden.length()?;
            let n = len.min(length.saturating_sub(offset));
            c.hidden.preserve(offset, n).await?;
        }
        Ok(Box::new(pass))
    }
}

#[async_trait]
impl BlockDevice for Replication {
    fn driver(&self) -> &'static str {
        "replication"
    }

    fn length(&self) -> Result<u64> {
        self.file.length()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let _pass = self.gate.enter().await;
        if self.mode == Mode::Primary {
            // R10: the primary node only forwards writes.
            return Err(self.eio("reads", self.stage()));
        }
        match self.secondary_target("reads", false)? {
            Target::Disk(d) => d.read(offset, len).await,
            Target::Split(c) => c.active.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.write_path(offset, data.len() as u64, |dev, at, n| {
            let piece = data.slice((at - offset) as usize..(at - offset + n) as usize);
            Box::pin(async move { dev.write(at, piece, flags).await })
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        // R14: not gated, forwarded in every stage, its error returned and never recorded.
        self.file.flush().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.write_path(offset, len, |dev, at, n| {
            Box::pin(async move { dev.write_zeroes(at, n, flags).await })
        })
        .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // R15: succeeds at once without touching any child.
        check_request(self.length()?, 1, offset, len, Access::Read)?;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        // R16: DATA over the whole range.
        check_request(self.length()?, 1, offset, len, Access::Read)?;
        Ok(BlockStatus::data(len))
    }
}
