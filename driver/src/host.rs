//! What a driver may ask of the process it runs in: the event bus, a warning log line
//! (QUORUM.md Q15) and a fatal exit (Q33, D6). Production writes to stderr and exits; tests
//! and the simulator record instead (D6: under the simulator a blkverify mismatch ends the
//! simulated process, not the simulator).

use std::sync::{Arc, Mutex};

use crate::events::EventBus;
use crate::jobs::Jobs;

type LineSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Process services handed to every driver at open.
#[derive(Clone)]
pub struct Host {
    /// The process's event bus.
    pub events: EventBus,
    /// The process's background jobs (HEALING.md H16), reporting to `events`.
    pub jobs: Jobs,
    /// The process's objects (`--object`, QMP `object-add`): TLS credentials (docs/tls.md K1).
    pub objects: crate::tls::Objects,
    warn: LineSink,
    log: LineSink,
    fatal: LineSink,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Host")
    }
}

/// Lines a recording host captured.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    warnings: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
    fatals: Arc<Mutex<Vec<String>>>,
}

impl Captured {
    /// Warning lines, in order.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Informational lines (job progress), in order.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fatal lines (each would have ended the process), in order.
    pub fn fatals(&self) -> Vec<String> {
        self.fatals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Host {
    /// The real process: warnings and progress lines go to the log (stderr unless `--log`
    /// says otherwise), a fatal line goes to stderr and exits with 1.
    pub fn process(events: EventBus) -> Host {
        Host {
            jobs: Jobs::new(events.clone()),
            objects: crate::tls::Objects::new(),
            events,
            // docs/serve.md L1: through the process's log subscriber (`--log`).
            warn: Arc::new(|line| tracing::warn!(target: "ballot::host", "{line}")),
            log: Arc::new(|line| tracing::info!(target: "ballot::host", "{line}")),
            fatal: Arc::new(|line| {
                eprintln!("{line}");
                std::process::exit(1);
            }),
        }
    }

    /// A host that records warnings and fatal lines instead of printing and exiting.
    pub fn recording(events: EventBus) -> (Host, Captured) {
        let cap = Captured::default();
        let w = cap.warnings.clone();
        let f = cap.fatals.clone();
        let l = cap.logs.clone();
        let host = Host {
            jobs: Jobs::new(events.clone()),
            objects: crate::tls::Objects::new(),
            events,
            warn: Arc::new(move |l| w.lock().unwrap_or_else(|p| p.into_inner()).push(l.into())),
            log: Arc::new(move |x| l.lock().unwrap_or_else(|p| p.into_inner()).push(x.into())),
            fatal: Arc::new(move |l| f.lock().unwrap_or_else(|p| p.into_inner()).push(l.into())),
        };
        (host, cap)
    }

    /// Logs one warning line.
    pub fn warn(&self, line: &str) {
        (self.warn)(line)
    }

    /// Logs one informational line (a job's progress).
    pub fn log(&self, line: &str) {
        (self.log)(line)
    }

    /// Reports a fatal condition. In production this does not return.
    pub fn fatal(&self, line: &str) {
        (self.fatal)(line)
    }
}
