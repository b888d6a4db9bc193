//! One run from its parameters: the madsim runtime built from the seed (W2), the topology's
//! main on a node of its own, every host node ended when it returns, and a panic turned into
//! the run's violation. Sweeps, replays and shrinking all go through [`run`].

use crate::ids::{Rule, Violation};
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::outcome::{RunOpts, RunResult};
use crate::params::Params;
use crate::scenario::Scenario;

thread_local! {
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Routes panic messages to the panicking thread's slot, so parallel runs keep theirs apart.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        PANIC.with(|p| {
            let mut p = p.borrow_mut();
            if p.is_none() {
                *p = Some(format!("{msg}{loc}"));
            }
        });
    }));
}

/// Takes this thread's last panic message.
pub fn take_panic() -> Option<String> {
    PANIC.with(|p| p.borrow_mut().take())
}

/// Runs `p` again keeping every trace record; returns them as text.
pub fn capture_trace(p: Params, sc: &Scenario) -> String {
    let r = run(
        p,
        sc,
        &RunOpts {
            capture: true,
            ..RunOpts::default()
        },
    );
    let mut s = r.trace_lines.join("\n");
    s.push('\n');
    s
}

/// Runs one seed of `sc` with parameters `p`.
pub fn run(p: Params, sc: &Scenario, opts: &RunOpts) -> RunResult {
    let wall = std::time::Instant::now();
    let seed = p.seed;
    let mut config = madsim::Config::default();
    if let Some(c) = &p.colo {
        // COLO: every link (NBD forward, QMP) has the seeded latency.
        config.net.send_latency = Duration::from_nanos(c.latency_ns.0)
            ..Duration::from_nanos(c.latency_ns.1.max(c.latency_ns.0 + 1));
    }
    if let Some(n) = &p.nbd {
        // F12: a seeded one-way latency per message (W10).
        config.net.send_latency = Duration::from_nanos(n.latency_ns.0)
            ..Duration::from_nanos(n.latency_ns.1.max(n.latency_ns.0 + 1));
    }
    let mut rt = madsim::runtime::Runtime::with_seed_and_config(seed, config);
    // W5 backstop: a hang past every phase's limit is a liveness failure.
    rt.set_time_limit(Duration::from_nanos(
        p.time_limit_ns
            .saturating_add(p.deadline_ns.saturating_mul(8))
            .saturating_add(3_600_000_000_000),
    ));
    let sc2 = sc.clone();
    let opts2 = opts.clone();
    let out: Arc<Mutex<Option<RunResult>>> = Arc::default();
    let out2 = out.clone();
    take_panic();
    crate::nodes::begin();
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(async move {
            // The run's own tasks live on a node of their own, so that, with every host's,
            // they can be killed when it ends (`end_hosts`).
            let h = madsim::runtime::Handle::current();
            let node = h.create_node().name("world").build();
            crate::nodes::track_node(node.id());
            let topology = async move {
                // The topology seam: build, drive, judge.
                use crate::topology::run;
                if p.colo.is_some() {
                    run::<crate::colo::ColoRun>(p, sc2, opts2).await
                } else if p.image.is_some() {
                    run::<crate::image::ImageRun>(p, sc2, opts2).await
                } else {
                    run::<crate::quorum::QuorumRun>(p, sc2, opts2).await
                }
            };
            if let Ok(r) = node.spawn(topology).await {
                *out2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
            crate::nodes::end_hosts().await;
        })
    }));
    let mut result = out
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    if r.is_err() {
        let msg = take_panic().unwrap_or_else(|| "panic".into());
        let rule = if msg.contains("time limit exceeded") || msg.contains("deadlock") {
            Rule::I14
        } else {
            Rule::I16
        };
        result.violation = Some(Violation::new(rule, format!("panic: {msg}")));
    }
    result.wall_s = wall.elapsed().as_secs_f64();
    result
}
