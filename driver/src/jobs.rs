//! QEMU's job model for ballot's background jobs (HEALING.md H16, H18): one registry per
//! process, job ids, the status machine (created → running ⇄ paused → concluded → null),
//! pause/resume/cancel/dismiss, a speed limit, progress, `JOB_STATUS_CHANGE` on every
//! transition and `BLOCK_JOB_COMPLETED` at the end. A job's own work (the quorum's resync and
//! verify) lives with its driver and talks to the registry through a [`JobControl`]: it calls
//! [`JobControl::checkpoint`] between units of work (where pausing and cancelling take effect)
//! and reports progress. QMP only dispatches here.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::error::ErrorKind;
use crate::events::{Event, EventBus};

/// A job's status, with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Registered, not yet started.
    Created,
    /// Working.
    Running,
    /// Paused by `job-pause` (takes effect at the job's next checkpoint).
    Paused,
    /// Finished, kept until dismissed (`auto-dismiss: false`).
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// Why a job's checkpoint tells it to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

#[derive(Debug)]
struct State {
    status: JobStatus,
    /// `job-pause` asked; the job pauses at its next checkpoint.
    pause_requested: bool,
    cancelled: bool,
    /// Bytes done and bytes to do.
    current: u64,
    total: u64,
    /// Bytes per second, 0 = no limit.
    speed: u64,
    /// Inside a unit of work (QEMU's `busy`).
    busy: bool,
    error: Option<ErrorKind>,
    /// What went wrong, in words, when the job says more than the error's kind.
    error_message: Option<String>,
    /// Counters a finished job reports (verify's `checked`, `mismatched`...).
    result: Vec<(&'static str, u64)>,
}

/// A job as the registry and the job's task both see it.
#[derive(Debug)]
pub struct JobControl {
    id: String,
    job_type: &'static str,
    auto_dismiss: bool,
    state: Mutex<State>,
    /// Woken on resume, cancel and speed changes.
    changed: Notify,
    events: EventBus,
    registry: Arc<Mutex<Vec<Arc<JobControl>>>>,
}

/// What `query-jobs` and `query-block-jobs` show of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// `id`.
    pub id: String,
    /// `type`.
    pub job_type: &'static str,
    /// `status`.
    pub status: JobStatus,
    /// `current-progress`, bytes.
    pub current: u64,
    /// `total-progress`, bytes.
    pub total: u64,
    /// `speed`, bytes per second.
    pub speed: u64,
    /// `busy`.
    pub busy: bool,
    /// `error`, once concluded with one.
    pub error: Option<ErrorKind>,
    /// The error in words (`blockdev-create`'s reasons), shown instead of the kind's.
    pub error_message: Option<String>,
    /// Result counters.
    pub result: Vec<(&'static str, u64)>,
    /// `auto-dismiss`, as the job was started with.
    pub auto_dismiss: bool,
}

impl JobInfo {
    /// One entry of `query-jobs`.
    pub fn to_query_jobs(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("type".into(), json!(self.job_type));
        m.insert("status".into(), json!(self.status.as_str()));
        m.insert("current-progress".into(), json!(self.current));
        m.insert("total-progress".into(), json!(self.total));
        if let Some(e) = &self.error {
            let text = self
                .error_message
                .clone()
                .unwrap_or_else(|| e.strerror().into());
            m.insert("error".into(), json!(text));
        }
        for (k, v) in &self.result {
            m.insert((*k).into(), json!(v));
        }
        Value::Object(m)
    }

    /// One entry of `query-block-jobs` (`device` is the job id, as QEMU reports a job created
    /// with an id).
    pub fn to_query_block_jobs(&self) -> Value {
        json!({
            "type": self.job_type,
            "device": self.id,
            "len": self.total,
            "offset": self.current,
            "busy": self.busy,
            "paused": self.status == JobStatus::Paused,
            "speed": self.speed,
            "io-status": "ok",
            "ready": false,
            "status": self.status.as_str(),
            "auto-finalize": true,
            "auto-dismiss": self.auto_dismiss,
        })
    }
}

/// The process's jobs. Cheap to clone; clones share the registry.
#[derive(Debug, Clone)]
pub struct Jobs {
    list: Arc<Mutex<Vec<Arc<JobControl>>>>,
    events: EventBus,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `GenericError` text for a job id that is not registered (QEMU's wording).
pub fn not_found(id: &str) -> String {
    format!("Job '{id}' not found")
}

impl Jobs {
    /// An empty registry whose events go to `events`.
    pub fn new(events: EventBus) -> Jobs {
        Jobs {
            list: Arc::default(),
            events,
        }
    }

    /// Registers a job in status `created` and emits `JOB_STATUS_CHANGE`.
    ///
    /// # Errors
    /// `Job ID '<id>' already in use`, or an id that is empty or starts with a character QEMU
    /// does not allow (`Invalid job ID '<id>'`).
    pub fn create(
        &self,
        id: &str,
        job_type: &'static str,
        speed: u64,
        auto_dismiss: bool,
    ) -> Result<Arc<JobControl>, String> {
        let valid = id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(format!("Invalid job ID '{id}'"));
        }
        let mut list = lock(&self.list);
        if list.iter().any(|j| j.id == id) {
            return Err(format!("Job ID '{id}' already in use"));
        }
        let job = Arc::new(JobControl {
            id: id.to_string(),
            job_type,
            auto_dismiss,
            state: Mutex::new(State {
                status: JobStatus::Created,
                pause_requested: false,
                cancelled: false,
                current: 0,
                total: 0,
                speed,
                busy: false,
                error: None,
                error_message: None,
                result: Vec::new(),
            }),
            changed: Notify::new(),
            events: self.events.clone(),
            registry: self.list.clone(),
        });
        list.push(job.clone());
        drop(list);
        job.emit_status(JobStatus::Created);
        Ok(job)
    }

    /// Every registered job, in creation order.
    pub fn list(&self) -> Vec<JobInfo> {
        lock(&self.list).iter().map(|j| j.info()).collect()
    }

    /// The job `id`.
    ///
    /// # Errors
    /// [`not_found`].
    pub fn get(&self, id: &str) -> Result<Arc<JobControl>, String> {
        lock(&self.list)
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// `job-pause`: the job pauses at its next checkpoint.
    ///
    /// # Errors
    /// Unknown id; a job that is not running.
    pub fn pause(&self, id: &str) -> Result<(), String> {
        let j = self.get(id)?;
        let mut st = lock(&j.state);
        if !matches!(st.status, JobStatus::Created | JobStatus::Running) || st.pause_requested {
            return Err(verb_refused(id, st.status, "pause"));
        }
        st.pause_requested = true;
        Ok(())
    }

    /// `job-resume`.
    ///
    /// # Errors
    /// Unknown id; a job that is not paused.
    pub fn resume(&self, id: &str) -> Result<(), String> {
        let j = self.get(id)?;
        let mut st = lock(&j.state);
        if !st.pause_requested {
            return Err(verb_refused(id, st.status, "resume"));
        }
        st.pause_requested = false;
        let was_paused = st.status == JobStatus::Paused;
        if was_paused {
            st.status = JobStatus::Running;
        }
        drop(st);
        if was_paused {
            j.emit_status(JobStatus::Running);
        }
        j.changed.notify_waiters();
        Ok(())
    }

    /// `job-cancel`: the job stops at its next checkpoint and concludes with no error, as QEMU
    /// reports a cancelled job that had nothing to roll back.
    ///
    /// # Errors
    /// Unknown id; a job that has concluded.
    pub fn cancel(&self, id: &str) -> Result<(), String> {
        let j = self.get(id)?;
        let mut st = lock(&j.state);
        if matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
            return Err(verb_refused(id, st.status, "cancel"));
        }
        st.cancelled = true;
        drop(st);
        j.changed.notify_waiters();
        Ok(())
    }

    /// `block-job-set-speed`.
    ///
    /// # Errors
    /// Unknown id (`Block job '<id>' not found`); a negative speed.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), String> {
        let j = self
            .get(id)
            .map_err(|_| format!("Block job '{id}' not found"))?;
        let speed = u64::try_from(speed)
            .map_err(|_| "Parameter 'speed' expects a non-negative value".to_string())?;
        lock(&j.state).speed = speed;
        j.changed.notify_waiters();
        Ok(())
    }

    /// `job-dismiss`: removes a concluded job.
    ///
    /// # Errors
    /// Unknown id; a job that has not concluded.
    pub fn dismiss(&self, id: &str) -> Result<(), String> {
        let j = self.get(id)?;
        let status = lock(&j.state).status;
        if status != JobStatus::Concluded {
            return Err(verb_refused(id, status, "dismiss"));
        }
        j.set_null();
        Ok(())
    }
}

fn verb_refused(id: &str, status: JobStatus, verb: &str) -> String {
    format!(
        "Job '{id}' in state '{}' cannot accept command verb '{verb}'",
        status.as_str()
    )
}

impl JobControl {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A snapshot for the query commands.
    pub fn info(&self) -> JobInfo {
        let st = lock(&self.state);
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: st.status,
            current: st.current,
            total: st.total,
            speed: st.speed,
            busy: st.busy,
            error: st.error,
            error_message: st.error_message.clone(),
            result: st.result.clone(),
            auto_dismiss: self.auto_dismiss,
        }
    }

    fn emit_status(&self, status: JobStatus) {
        self.events.emit(Event::JobStatusChange {
            id: self.id.clone(),
            status: status.as_str(),
        });
    }

    /// created → running, when the job's task starts.
    pub fn start(&self) {
        let mut st = lock(&self.state);
        if st.status != JobStatus::Created {
            return;
        }
        st.status = JobStatus::Running;
        drop(st);
        self.emit_status(JobStatus::Running);
    }

    /// Whether `job-cancel` has been asked.
    pub fn is_cancelled(&self) -> bool {
        lock(&self.state).cancelled
    }

    /// The job's speed limit, bytes per second (0: none).
    pub fn speed(&self) -> u64 {
        lock(&self.state).speed
    }

    /// Progress: `current` bytes done of `total`. `current` never goes down (H16); `total`
    /// may grow.
    pub fn progress(&self, current: u64, total: u64) {
        let mut st = lock(&self.state);
        st.current = st.current.max(current);
        st.total = total.max(st.current);
    }

    /// (current, total) as last reported.
    pub fn progress_now(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.current, st.total)
    }

    /// Marks the job busy (inside a unit of work) or not.
    pub fn set_busy(&self, busy: bool) {
        lock(&self.state).busy = busy;
    }

    /// Whether `job-pause` or `job-cancel` waits for the next [`JobControl::checkpoint`] (a
    /// job with work in flight stops starting more).
    pub fn stop_requested(&self) -> bool {
        let st = lock(&self.state);
        st.cancelled || st.pause_requested
    }

    /// Between units of work: pauses here while `job-pause` holds (status `paused`), and
    /// answers whether the job must stop.
    ///
    /// # Errors
    /// [`Cancelled`] after `job-cancel`.
    pub async fn checkpoint(&self) -> Result<(), Cancelled> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.state);
                if st.cancelled {
                    return Err(Cancelled);
                }
                if !st.pause_requested {
                    return Ok(());
                }
                if st.status != JobStatus::Paused {
                    st.status = JobStatus::Paused;
                    st.busy = false;
                    drop(st);
                    self.emit_status(JobStatus::Paused);
                }
            }
            notified.await;
        }
    }

    /// Sleeps `d`, waking early on cancel (or a speed change, which the caller re-reads).
    pub async fn sleep(&self, d: Duration) {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if lock(&self.state).cancelled {
            return;
        }
        tokio::select! {
            biased;
            _ = &mut notified => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    /// Ends the job: concluded (with `error` if it failed, and `result` counters),
    /// `BLOCK_JOB_COMPLETED`, then null and unregistered unless the job was created with
    /// `auto-dismiss: false`.
    pub fn finish(&self, error: Option<ErrorKind>, result: Vec<(&'static str, u64)>) {
        let mut st = lock(&self.state);
        if matches!(st.status, JobStatus::Concluded | JobStatus::Null) {
            return;
        }
        st.status = JobStatus::Concluded;
        st.busy = false;
        st.error = error;
        st.result = result.clone();
        let (len, offset, speed) = (st.total, st.current, st.speed);
        drop(st);
        self.emit_status(JobStatus::Concluded);
        if !self.is_block_job() {
            // A generic job (blockdev-create) reports through JOB_STATUS_CHANGE alone.
            if self.auto_dismiss {
                self.set_null();
            }
            return;
        }
        self.events.emit(Event::BlockJobCompleted {
            job_type: self.job_type,
            device: self.id.clone(),
            len,
            offset,
            speed,
            error,
            result,
        });
        if self.auto_dismiss {
            self.set_null();
        }
    }

    /// [`JobControl::finish`] with an error described in words.
    pub fn fail(&self, error: ErrorKind, message: String) {
        lock(&self.state).error_message = Some(message);
        self.finish(Some(error), Vec::new());
    }

    /// Whether `query-block-jobs` lists the job and its end is a `BLOCK_JOB_COMPLETED`
    /// (QEMU's block jobs; `create` is a generic job).
    pub fn is_block_job(&self) -> bool {
        self.job_type != "create"
    }

    fn set_null(&self) {
        lock(&self.state).status = JobStatus::Null;
        lock(&self.registry).retain(|j| j.id != self.id);
        self.emit_status(JobStatus::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Stream;

    fn statuses(rec: &crate::events::Recorder) -> Vec<String> {
        rec.events()
            .iter()
            .filter_map(|e| match e {
                Event::JobStatusChange { id, status } => Some(format!("{id}:{status}")),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn h16_status_machine_and_events() {
        let bus = EventBus::new();
        let rec = bus.record(Stream::Internal);
        let jobs = Jobs::new(bus);
        let j = jobs.create("j1", "x-resync", 0, true).expect("create");
        assert_eq!(
            jobs.create("j1", "x-resync", 0, true).unwrap_err(),
            "Job ID 'j1' already in use"
        );
        assert_eq!(
            jobs.create("1x", "x-resync", 0, true).unwrap_err(),
            "Invalid job ID '1x'"
        );
        j.start();
        jobs.pause("j1").expect("pause");
        assert_eq!(
            jobs.pause("j1").unwrap_err(),
            "Job 'j1' in state 'running' cannot accept command verb 'pause'"
        );
        let j2 = j.clone();
        let paused = tokio::spawn(async move { j2.checkpoint().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(jobs.list()[0].status, JobStatus::Paused);
        jobs.resume("j1").expect("resume");
        assert_eq!(paused.await.expect("join"), Ok(()));
        jobs.cancel("j1").expect("cancel");
        assert_eq!(j.checkpoint().await, Err(Cancelled));
        assert_eq!(
            jobs.set_speed("j1", -1).unwrap_err(),
            "Parameter 'speed' expects a non-negative value"
        );
        assert_eq!(
            jobs.set_speed("nope", 1).unwrap_err(),
            "Block job 'nope' not found"
        );
        j.progress(10, 100);
        j.progress(5, 100);
        assert_eq!(j.progress_now(), (10, 100));
        j.finish(None, vec![("checked", 3)]);
        assert!(jobs.list().is_empty(), "auto-dismissed");
        assert_eq!(jobs.cancel("j1").unwrap_err(), "Job 'j1' not found");
        assert_eq!(
            statuses(&rec),
            [
                "j1:created",
                "j1:running",
                "j1:paused",
                "j1:running",
                "j1:concluded",
                "j1:null"
            ]
        );
        let done = rec
            .events()
            .into_iter()
            .find(|e| matches!(e, Event::BlockJobCompleted { .. }))
            .expect("BLOCK_JOB_COMPLETED");
        assert_eq!(
            done.data(),
            json!({"type": "x-resync", "device": "j1", "len": 100, "offset": 10, "speed": 0, "checked": 3})
        );
    }

    #[tokio::test]
    async fn a_job_kept_after_conclusion_is_dismissed_by_job_dismiss() {
        let jobs = Jobs::new(EventBus::new());
        let j = jobs.create("v", "x-verify", 0, false).expect("create");
        assert_eq!(
            jobs.dismiss("v").unwrap_err(),
            "Job 'v' in state 'created' cannot accept command verb 'dismiss'"
        );
        j.start();
        j.finish(Some(ErrorKind::Io), vec![]);
        let info = &jobs.list()[0];
        assert_eq!(info.status, JobStatus::Concluded);
        assert_eq!(info.error, Some(ErrorKind::Io));
        // query-block-jobs reports the auto-dismiss the job was started with.
        assert_eq!(info.to_query_block_jobs()["auto-dismiss"], json!(false));
        jobs.dismiss("v").expect("dismiss");
        assert!(jobs.list().is_empty());
    }
}
