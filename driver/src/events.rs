//! QMP-shaped events and their rate limiter (QUORUM.md §14, Q57–Q61).
//!
//! Drivers call [`EventBus::emit`]. Every event goes at once to the *internal* stream (what
//! the simulator's event accounting checks, SIMULATION.md I8) and through the per-key 1 s rate
//! limiter to the *QMP* stream (what monitors receive). Time is `tokio::time`, so the limiter
//! runs in virtual time under the simulator.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::error::ErrorKind;

/// The `type` field of `QUORUM_REPORT_BAD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoType {
    /// A read (also block status, Q43).
    Read,
    /// A write, write-zeroes or forwarded discard (Q37, Q46).
    Write,
    /// A flush (Q41).
    Flush,
}

impl IoType {
    /// The QMP value (`read`, `write`, `flush`).
    pub fn as_str(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
        }
    }
}

/// A QMP event, with QEMU's field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `QUORUM_REPORT_BAD`: one child failed or lost a vote.
    QuorumReportBad {
        /// `type`.
        io: IoType,
        /// `error`: present only for an I/O error, absent for a data mismatch.
        error: Option<ErrorKind>,
        /// `node-name` of the child.
        node_name: String,
        /// `sector-num` (Q57).
        sector_num: u64,
        /// `sectors-count` (Q57).
        sectors_count: u64,
    },
    /// `QUORUM_FAILURE`: the quorum could not produce a result.
    QuorumFailure {
        /// `reference`: the quorum's node-name.
        reference: String,
        /// `sector-num` (Q57).
        sector_num: u64,
        /// `sectors-count` (Q57).
        sectors_count: u64,
    },
    /// `BLOCK_JOB_COMPLETED` of a failover commit (REPLICATION.md O2). Not rate limited.
    BlockJobCompleted {
        /// `type`: the job type (`commit`).
        job_type: &'static str,
        /// `device`: the replication node's name.
        device: String,
        /// `len`: bytes the job had to commit.
        len: u64,
        /// `offset`: bytes it committed.
        offset: u64,
        /// `error`: strerror text when the job failed.
        error: Option<ErrorKind>,
        /// `speed`: the job's speed limit, bytes per second (0: none).
        speed: u64,
        /// ballot's result counters of the job (HEALING.md H18: verify's `checked`,
        /// `mismatched`, `repaired`, `unrecoverable`), after QEMU's fields.
        result: Vec<(&'static str, u64)>,
    },
    /// `JOB_STATUS_CHANGE` (HEALING.md H16). Not rate limited.
    JobStatusChange {
        /// `id`.
        id: String,
        /// `status`: QEMU's name of the new status.
        status: &'static str,
    },
}

/// The rate-limit key of an event (Q59).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RateKey {
    /// `QUORUM_REPORT_BAD`, keyed by the child's node-name alone.
    ReportBad(String),
    /// `QUORUM_FAILURE`: one key for the whole process.
    Failure,
}

impl Event {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::QuorumReportBad { .. } => "QUORUM_REPORT_BAD",
            Event::QuorumFailure { .. } => "QUORUM_FAILURE",
            Event::BlockJobCompleted { .. } => "BLOCK_JOB_COMPLETED",
            Event::JobStatusChange { .. } => "JOB_STATUS_CHANGE",
        }
    }

    /// The key the rate limiter groups this event under; `None`: never limited (QEMU limits
    /// only some events, and job events are not among them).
    pub fn rate_key(&self) -> Option<RateKey> {
        match self {
            Event::QuorumReportBad { node_name, .. } => Some(RateKey::ReportBad(node_name.clone())),
            Event::QuorumFailure { .. } => Some(RateKey::Failure),
            Event::BlockJobCompleted { .. } | Event::JobStatusChange { .. } => None,
        }
    }

    /// The `data` member, with QEMU's field names and order.
    pub fn data(&self) -> Value {
        let mut m = Map::new();
        match self {
            Event::QuorumReportBad {
                io,
                error,
                node_name,
                sector_num,
                sectors_count,
            } => {
                m.insert("type".into(), json!(io.as_str()));
                if let Some(kind) = error {
                    m.insert("error".into(), json!(kind.strerror()));
                }
                m.insert("node-name".into(), json!(node_name));
                m.insert("sector-num".into(), json!(sector_num));
                m.insert("sectors-count".into(), json!(sectors_count));
            }
            Event::QuorumFailure {
                reference,
                sector_num,
                sectors_count,
            } => {
                m.insert("reference".into(), json!(reference));
                m.insert("sector-num".into(), json!(sector_num));
                m.insert("sectors-count".into(), json!(sectors_count));
            }
            Event::BlockJobCompleted {
                job_type,
                device,
                len,
                offset,
                error,
                speed,
                result,
            } => {
                m.insert("type".into(), json!(job_type));
                m.insert("device".into(), json!(device));
                m.insert("len".into(), json!(len));
                m.insert("offset".into(), json!(offset));
                m.insert("speed".into(), json!(speed));
                if let Some(kind) = error {
                    m.insert("error".into(), json!(kind.strerror()));
                }
                for (k, v) in result {
                    m.insert((*k).into(), json!(v));
                }
            }
            Event::JobStatusChange { id, status } => {
                m.insert("id".into(), json!(id));
                m.insert("status".into(), json!(status));
            }
        }
        Value::Object(m)
    }
}

/// `sector-num` and `sectors-count` of a request over the whole range (Q57).
pub fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / 512;
    let end = offset.saturating_add(len).div_ceil(512);
    (first, end - first)
}

/// QMP's timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Whole seconds since the epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The runtime's clock now (virtual under the simulator, which intercepts the clock).
    pub fn now() -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp {
            seconds: d.as_secs(),
            microseconds: d.subsec_micros(),
        }
    }
}

/// An event with the time it was emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The event.
    pub event: Event,
    /// When the driver emitted it.
    pub timestamp: Timestamp,
}

impl Emitted {
    /// The QMP wire form `{"event": .., "data": {..}, "timestamp": {..}}` (Q61).
    pub fn to_qmp(&self) -> Value {
        json!({
            "event": self.event.name(),
            "data": self.event.data(),
            "timestamp": {
                "seconds": self.timestamp.seconds,
                "microseconds": self.timestamp.microseconds,
            },
        })
    }
}

type Sink = Arc<dyn Fn(&Emitted) + Send + Sync>;

/// Identifies a subscription, for [`EventBus::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubscriptionId(u64);

/// Which stream a subscriber receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Every event, at once, before rate limiting (SIMULATION.md I8).
    Internal,
    /// Events after the 1 s per-key limiter: what QMP monitors receive (Q59).
    Qmp,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    sinks: BTreeMap<SubscriptionId, (Stream, Sink)>,
    /// Keys whose window is open, with the event held for the window's end (last wins).
    windows: BTreeMap<RateKey, Option<Emitted>>,
}

/// The process's event bus. Cloning shares it.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventBus")
    }
}

/// The rate limiter's window (Q59).
pub const RATE_LIMIT_WINDOW: Duration = Duration::from_secs(1);

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> EventBus {
        EventBus::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking subscriber must not take the bus down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `sink` for every event of `stream`, from the emitting task. Sinks must not block.
    pub fn subscribe(
        &self,
        stream: Stream,
        sink: impl Fn(&Emitted) + Send + Sync + 'static,
    ) -> SubscriptionId {
        let mut inner = self.lock();
        let id = SubscriptionId(inner.next_id);
        inner.next_id += 1;
        inner.sinks.insert(id, (stream, Arc::new(sink)));
        id
    }

    /// Ends a subscription.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.lock().sinks.remove(&id);
    }

    /// A recorder that collects the events of `stream` (tests, simulator).
    pub fn record(&self, stream: Stream) -> Recorder {
        let log: Arc<Mutex<Vec<Emitted>>> = Arc::default();
        let sink_log = log.clone();
        let id = self.subscribe(stream, move |e| {
            sink_log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.clone());
        });
        Recorder {
            log,
            bus: self.clone(),
            id,
        }
    }

    fn deliver(&self, stream: Stream, e: &Emitted) {
        let sinks: Vec<Sink> = self
            .lock()
            .sinks
            .values()
            .filter(|(s, _)| *s == stream)
            .map(|(_, f)| f.clone())
            .collect();
        for sink in sinks {
            sink(e);
        }
    }

    /// Emits `event` now. Must be called from inside the runtime (the limiter's window timer is
    /// a task).
    pub fn emit(&self, event: Event) {
        let e = Emitted {
            event,
            timestamp: Timestamp::now(),
        };
        self.deliver(Stream::Internal, &e);
        let Some(key) = e.event.rate_key() else {
            self.deliver(Stream::Qmp, &e);
            return;
        };
        let send_now = {
            let mut inner = self.lock();
            match inner.windows.get_mut(&key) {
                Some(held) => {
                    *held = Some(e.clone());
                    false
                }
                None => {
                    inner.windows.insert(key.clone(), None);
                    true
                }
            }
        };
        if send_now {
            self.deliver(Stream::Qmp, &e);
            let bus = self.clone();
            tokio::spawn(async move { bus.run_window(key).await });
        }
    }

    async fn run_window(self, key: RateKey) {
        loop {
            tokio::time::sleep(RATE_LIMIT_WINDOW).await;
            let held = {
                let mut inner = self.lock();
                match inner.windows.get_mut(&key) {
                    Some(held) => match held.take() {
                        Some(e) => Some(e),
                        None => {
                            inner.windows.remove(&key);
                            None
                        }
                    },
                    None => None,
                }
            };
            match held {
                // The held event goes out and opens a new window.
                Some(e) => self.deliver(Stream::Qmp, &e),
                None => return,
            }
        }
    }
}

/// Collects events of one stream; unsubscribes when dropped.
pub struct Recorder {
    log: Arc<Mutex<Vec<Emitted>>>,
    bus: EventBus,
    id: SubscriptionId,
}

impl Recorder {
    /// The events so far, in delivery order.
    pub fn events(&self) -> Vec<Event> {
        self.emitted().into_iter().map(|e| e.event).collect()
    }

    /// Forgets the events recorded so far.
    pub fn clear(&self) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The events so far with their timestamps.
    pub fn emitted(&self) -> Vec<Emitted> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Removes and returns the events so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|e| e.event)
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(node: &str, sector: u64) -> Event {
        Event::QuorumReportBad {
            io: IoType::Read,
            error: Some(ErrorKind::Io),
            node_name: node.into(),
            sector_num: sector,
            sectors_count: 1,
        }
    }

    #[test]
    fn q57_sectors_cover_the_whole_request() {
        assert_eq!(sectors(0, 10 << 20), (0, 20480));
        assert_eq!(sectors(4096, 4096), (8, 8));
        assert_eq!(sectors(100, 1000), (0, 3));
        assert_eq!(sectors(0, 0), (0, 0));
    }

    #[test]
    fn q61_wire_form_has_qemu_field_names_and_no_error_for_mismatch() {
        let e = Emitted {
            event: Event::QuorumReportBad {
                io: IoType::Read,
                error: None,
                node_name: "r1".into(),
                sector_num: 0,
                sectors_count: 20480,
            },
            timestamp: Timestamp {
                seconds: 5,
                microseconds: 7,
            },
        };
        assert_eq!(
            e.to_qmp().to_string(),
            r#"{"data":{"node-name":"r1","sector-num":0,"sectors-count":20480,"type":"read"},"event":"QUORUM_REPORT_BAD","timestamp":{"microseconds":7,"seconds":5}}"#
        );
        let f = Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 8,
            sectors_count: 8,
        };
        assert_eq!(
            f.data().to_string(),
            r#"{"reference":"q0","sector-num":8,"sectors-count":8}"#
        );
        let w = Event::QuorumReportBad {
            io: IoType::Write,
            error: Some(ErrorKind::Io),
            node_name: "r2".into(),
            sector_num: 8,
            sectors_count: 8,
        };
        assert_eq!(
            w.data()["error"],
            Value::String("Input/output error".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn q59_rate_limit_sends_first_holds_last_and_reopens_window() {
        let bus = EventBus::new();
        let internal = bus.record(Stream::Internal);
        let qmp = bus.record(Stream::Qmp);
        // iotest 148's shape: one event at once, three more inside the window, one at its end.
        bus.emit(bad("r0", 10));
        tokio::time::sleep(Duration::from_millis(100)).await;
        bus.emit(bad("r0", 11));
        bus.emit(bad("r0", 12));
        bus.emit(bad("r0", 13));
        assert_eq!(qmp.events(), vec![bad("r0", 10)]);
        assert_eq!(internal.events().len(), 4);
        tokio::time::sleep(Duration::from_millis(950)).await;
        // Window 1 closed at t = 1 s: the last held event (sector 13) is sent.
        assert_eq!(qmp.events(), vec![bad("r0", 10), bad("r0", 13)]);
        // A second window opened at t = 1 s; an event inside it is held until t = 2 s.
        bus.emit(bad("r0", 14));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(qmp.events().len(), 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            qmp.events(),
            vec![bad("r0", 10), bad("r0", 13), bad("r0", 14)]
        );
        // Third window (t = 2 s .. 3 s) sees nothing; the key is idle afterwards and the next
        // event goes out at once.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        bus.emit(bad("r0", 15));
        assert_eq!(qmp.events().last(), Some(&bad("r0", 15)));
        assert_eq!(qmp.events().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn q59_different_children_do_not_throttle_each_other_and_failure_has_one_key() {
        let bus = EventBus::new();
        let qmp = bus.record(Stream::Qmp);
        bus.emit(bad("r0", 10));
        bus.emit(bad("r1", 11));
        bus.emit(bad("r2", 12));
        let fail = |r: &str| Event::QuorumFailure {
            reference: r.into(),
            sector_num: 0,
            sectors_count: 1,
        };
        bus.emit(fail("q0"));
        bus.emit(fail("q1"));
        assert_eq!(
            qmp.events(),
            vec![bad("r0", 10), bad("r1", 11), bad("r2", 12), fail("q0")]
        );
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert_eq!(qmp.events().last(), Some(&fail("q1")));
    }
}
