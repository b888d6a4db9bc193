//! One simulated run (SIMULATION.md §3, §8): the madsim runtime built from the seed, the
//! `qhost` node running the unchanged quorum driver over virtual disks together with the
//! guest workload, the supervisor that crashes and restarts it, the safety phase, the
//! liveness phase, and the scenario's expectations.

use crate::ids::{Path, Rule};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ballot::drivers::quorum::Quorum;
use ballot::events::{Emitted, Event};
use ballot::nbd::client::NbdClient;
use ballot::ErrorKind;

use crate::measure::OpSpan;
use crate::netmodel::Replica;
use crate::oracle::{Finding, OpKind, Oracle};
use crate::params::Params;
use crate::rng::Rng;
use crate::runlog::RunLog;
use crate::scenario::Scenario;
use crate::vdisk::DiskSet;

/// The phase of a run (SIMULATION.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Safety,
    Liveness,
    Done,
}

pub(crate) struct State {
    pub(crate) oracle: Oracle,
    /// The run's first finding, whose op and sector the failure report shows the history of.
    pub(crate) first_finding: Option<Finding>,
    pub(crate) phase: Phase,
    pub(crate) next_step: usize,
    pub(crate) step_results: BTreeMap<String, String>,
    pub(crate) step_ops: BTreeMap<String, u64>,
    pub(crate) issued: u64,
    pub(crate) completed: u64,
    pub(crate) inflight: u64,
    pub(crate) events_by_op: BTreeMap<u64, Vec<Event>>,
    pub(crate) all_events: Vec<Event>,
    pub(crate) qmp_events: Vec<Emitted>,
    /// (incarnation, virtual ns, event) of both streams, for I8's limiter check.
    pub(crate) internal_timed: Vec<(u64, u64, Event)>,
    pub(crate) qmp_timed: Vec<(u64, u64, Event)>,
    /// Virtual ns at which each incarnation ended (crash), by incarnation.
    pub(crate) incarnation_end: BTreeMap<u64, u64>,
    pub(crate) quorum: Option<Arc<Quorum>>,
    pub(crate) alive: bool,
    pub(crate) incarnation: u64,
    pub(crate) wrng: Rng,
    pub(crate) fired: Vec<bool>,
    pub(crate) crash_requested: bool,
    pub(crate) crashes: u64,
    pub(crate) f11_at: Option<u64>,
    /// (child, sector) copies a scrub read could not repair because that child failed the
    /// request (Q26 rewrites only children that returned wrong data): I6 leaves them out.
    pub(crate) unrepairable: std::collections::BTreeSet<(usize, u64)>,
    /// Children that failed the last completed op.
    pub(crate) last_failed_children: Vec<usize>,
    /// Warning and fatal lines of each host incarnation (Q15, Q33).
    pub(crate) captured: Vec<ballot::host::Captured>,
    /// Every completed guest op, for the report's latency and fault-outcome tables.
    pub(crate) spans: Vec<OpSpan>,
    /// The live qhost's QMP monitor (jobs are driven through it, H16).
    pub(crate) monitor: Option<Arc<ballot::qmp::Monitor>>,
    /// The healing harness (HEALING.md §7).
    pub(crate) heal: crate::healstate::HealState,
    /// I19: sectors a power cut may have left different on the children, until the next
    /// open of the metadata node checks them.
    pub(crate) crash_suspects: std::collections::BTreeSet<u64>,
}

/// One run's shared state: parameters, disks, the oracle and the hosts.
pub(crate) struct World {
    /// How the topology issues a guest op outside the workload (F27, from the healing
    /// harness): the world cannot call its topology, so the topology hands it this.
    pub(crate) extra_op: fn(&Arc<World>, OpKind, u64, u64),
    pub(crate) p: Params,
    pub(crate) sc: Scenario,
    /// The trace, the first violation and the counters.
    pub(crate) log: Arc<RunLog>,
    pub(crate) disks: Arc<DiskSet>,
    pub(crate) st: Mutex<State>,
    pub(crate) wake: tokio::sync::Notify,
    pub(crate) crash_now: tokio::sync::Notify,
    /// Replica hosts (quorum over NBD).
    pub(crate) net: Mutex<Vec<Replica>>,
    /// The qhost node, once built.
    pub(crate) qhost: Mutex<Option<madsim::task::NodeId>>,
    /// Every NBD client qhost opened, for the P9–P11 tally.
    pub(crate) clients: Mutex<Vec<Arc<NbdClient>>>,
    /// The replicas' NBD servers (one per connection) when they require TLS, whose completed
    /// handshakes the run counts at its end (K11).
    pub(crate) tls_servers: Mutex<Vec<Arc<ballot::nbd::server::Server>>>,
    /// The quorum's metadata disk (HEALING.md H19), when the run has one.
    pub(crate) meta: Option<Arc<crate::metadisk::MetaDisk>>,
    /// F28: the live qhost starts a clean shutdown of its quorum (H23).
    pub(crate) shutdown_now: tokio::sync::Notify,
}

impl World {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replicas' network and process state.
    pub(crate) fn net_lock(&self) -> MutexGuard<'_, Vec<Replica>> {
        self.net.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The qhost node.
    pub(crate) fn qhost_node(&self) -> Option<madsim::task::NodeId> {
        *self.qhost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the counters of every NBD client still alive to the P9–P11 tally and forgets
    /// them (a crashed qhost's clients go with it).
    pub(crate) fn harvest_clients(&self) {
        let list = std::mem::take(&mut *self.clients.lock().unwrap_or_else(|p| p.into_inner()));
        for c in list {
            let s = c.stats();
            self.log.paths(Path::P9, s.resent);
            self.log.paths(Path::P10, s.failed_lost);
            self.log.paths(Path::P11, u64::from(s.open_retries > 0));
            self.log.paths(Path::NbdLosses, s.losses);
            self.log.paths(Path::NbdReconnects, s.reconnects);
        }
    }

    /// Keeps a replica's TLS server, to count its handshakes at the end of the run.
    pub(crate) fn note_tls_server(&self, s: Arc<ballot::nbd::server::Server>) {
        self.tls_servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }

    /// K11: the TLS handshakes every replica server completed, first connections and
    /// reconnections alike, as the counted path `TLS-sessions`.
    pub(crate) fn harvest_tls(&self) {
        let list = std::mem::take(&mut *self.tls_servers.lock().unwrap_or_else(|p| p.into_inner()));
        let n: u64 = list.iter().map(|s| s.tls_sessions()).sum();
        if n > 0 {
            *self
                .lock()
                .oracle
                .tally
                .paths
                .entry(Path::TlsSessions)
                .or_default() += n;
        }
    }

    /// The NBD clients of the live qhost.
    pub(crate) fn clients(&self) -> Vec<Arc<NbdClient>> {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the safety phase is on.
    pub(crate) fn in_safety(&self) -> bool {
        self.lock().phase == Phase::Safety
    }

    /// O5 outside a crash of qhost: re-derives on `sectors` which acked writes are still
    /// guaranteed by the copies the disks hold.
    pub(crate) fn reassess(&self, sectors: &[u64]) {
        let disks = self.disks.clone();
        self.lock()
            .oracle
            .reassess(sectors, |s, v| disks.holders(s, v));
    }

    /// Notes a completed guest op for the report (harness bookkeeping, not traced).
    pub(crate) fn span<T>(&self, id: u64, start_ns: u64, kind: OpKind, r: &Result<T, ErrorKind>) {
        let end_ns = self.disks.now_ns();
        let outcome = match r {
            Ok(_) => format!("{}/ok", kind.as_str()),
            Err(k) => format!("{}/{}", kind.as_str(), k.errno_name()),
        };
        self.lock().spans.push(OpSpan {
            id,
            start_ns,
            end_ns,
            kind: kind.as_str().into(),
            outcome,
        });
    }

    /// Records a finding; the first is the run's violation, as "op=N sector=S message".
    pub(crate) fn violate(&self, v: Finding) {
        let mut st = self.lock();
        let message = format!(
            "op={} {}{}",
            v.op,
            v.sector.map(|s| format!("sector={s} ")).unwrap_or_default(),
            v.message
        );
        if self.log.fail(v.rule, message) {
            st.first_finding = Some(v);
        }
        st.phase = Phase::Done;
        drop(st);
        self.wake.notify_one();
    }

    /// A violation that belongs to no guest op or sector.
    pub(crate) fn fail(&self, rule: Rule, message: String) {
        self.violate(Finding {
            rule,
            op: 0,
            sector: None,
            message,
        });
    }

    /// The disks' excused sectors (beyond the budget, latent: [`DiskSet::excused_sectors`]),
    /// the first list with the sectors a recovery filled under faults it cannot tell from
    /// data (README D19), which hold whatever it copied.
    pub(crate) fn excused_sectors(&self) -> (Vec<u64>, Vec<u64>) {
        let (mut over, latent) = self.disks.excused_sectors();
        over.extend(self.lock().oracle.recovered_any.iter().copied());
        (over, latent)
    }

    /// [`World::excused_sectors`] as one set.
    pub(crate) fn excused_set(&self) -> std::collections::BTreeSet<u64> {
        let (over, latent) = self.excused_sectors();
        over.into_iter().chain(latent).collect()
    }

    /// Drops the run's devices and hosts' handles. The quorum's event sinks and the NBD
    /// children's wrappers hold the world, so without this every run's world (disks, oracle,
    /// trace) stayed in memory until the process ended: a sweep grew by megabytes a run.
    pub(crate) fn teardown(&self) {
        let (quorum, monitor) = {
            let mut st = self.lock();
            (st.quorum.take(), st.monitor.take())
        };
        drop((quorum, monitor));
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.tls_servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub(crate) fn failed(&self) -> bool {
        self.log.failed()
    }
}
