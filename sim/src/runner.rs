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
    /// Whether this thread is inside a run, whose panics become its violation.
    static IN_RUN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Routes the panic messages of runs to the panicking thread's slot, so parallel runs keep
/// theirs apart; a panic outside a run goes to the hook that was there before.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(install_hook);
}

fn install_hook() {
    let before = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_RUN.with(|r| r.get()) {
            return before(info);
        }
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

/// Runs one seed of `sc` with parameters `p`, on the topology its parameters name.
pub fn run(p: Params, sc: &Scenario, opts: &RunOpts) -> RunResult {
    run_with(p, sc, opts, |p, sc, opts| async move {
        // The topology seam: build, drive, judge.
        use crate::topology::run;
        if p.colo.is_some() {
            run::<crate::colo::ColoRun>(p, sc, opts).await
        } else if p.image.is_some() {
            run::<crate::image::ImageRun>(p, sc, opts).await
        } else {
            run::<crate::quorum::QuorumRun>(p, sc, opts).await
        }
    })
}

/// The run loop: `main` (a topology's build, drive and judge) on a node of its own in the
/// runtime built from `p`'s seed, bounded in virtual time (W5), with every host node ended
/// when it returns; a panic, a hang or a deadlock is the run's violation.
pub(crate) fn run_with<F, Fut>(p: Params, sc: &Scenario, opts: &RunOpts, main: F) -> RunResult
where
    F: FnOnce(Params, Scenario, RunOpts) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = RunResult> + Send + 'static,
{
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
    IN_RUN.with(|r| r.set(true));
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(async move {
            // The run's own tasks live on a node of their own, so that, with every host's,
            // they can be killed when it ends (`end_hosts`).
            let h = madsim::runtime::Handle::current();
            let node = h.create_node().name("world").build();
            crate::nodes::track_node(node.id());
            if let Ok(r) = node.spawn(main(p, sc2, opts2)).await {
                *out2.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
            crate::nodes::end_hosts().await;
        })
    }));
    IN_RUN.with(|r| r.set(false));
    let mut result = out
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    if r.is_err() {
        let msg = take_panic().unwrap_or_else(|| "panic".into());
        // W5: madsim's time limit, or every task blocked with no timer left ("no events, all
        // tasks will block forever"), is a hang: a liveness failure.
        let hang = [
            "time limit exceeded",
            "deadlock",
            "all tasks will block forever",
        ];
        let rule = if hang.iter().any(|h| msg.contains(h)) {
            Rule::I14
        } else {
            Rule::I16
        };
        result.violation = Some(Violation::new(rule, format!("panic: {msg}")));
    }
    result.wall_s = wall.elapsed().as_secs_f64();
    result
}

#[cfg(test)]
mod tests {
    //! The run loop with stand-in topologies: the seam's order, a run that cannot start, a
    //! panic, a hang and determinism.
    use super::*;
    use crate::topology::{run as seam, Topology};
    use std::collections::BTreeMap;

    /// Parameters of seed 7 without pins.
    fn params() -> Params {
        Params::derive(7, &BTreeMap::new()).expect("seed 7 derives")
    }

    /// What a stand-in topology does in `drive`.
    #[derive(Clone, Copy)]
    enum Act {
        /// Draws three numbers from the runtime's seeded randomness, as the result's ops.
        Draw,
        Panic,
        /// Waits forever on nothing: madsim finds no task that can run.
        Hang,
        /// Sleeps past the run's time limit in virtual time.
        Overrun,
    }

    /// A stand-in topology that logs the seam's steps in its result's trace lines.
    struct Fake {
        act: Act,
        steps: Mutex<Vec<String>>,
        drawn: Mutex<u64>,
    }

    static ACT: Mutex<Act> = Mutex::new(Act::Draw);

    #[async_trait::async_trait]
    impl Topology for Fake {
        async fn build(p: Params, _sc: Scenario, _opts: RunOpts) -> Result<Fake, RunResult> {
            if p.ops == 0 {
                return Err(RunResult {
                    violation: Some(Violation::new(Rule::Harness, "no ops")),
                    ..RunResult::default()
                });
            }
            Ok(Fake {
                act: *ACT.lock().unwrap_or_else(|p| p.into_inner()),
                steps: Mutex::new(vec!["build".into()]),
                drawn: Mutex::new(0),
            })
        }

        async fn drive(&self) {
            self.steps.lock().unwrap().push("drive".into());
            match self.act {
                Act::Draw => {
                    use rand::Rng as _;
                    let mut x = 0u64;
                    for _ in 0..3 {
                        x = x.wrapping_mul(1_000_003) ^ madsim::rand::thread_rng().gen::<u64>();
                    }
                    *self.drawn.lock().unwrap() = x;
                }
                Act::Panic => panic!("the stand-in topology panicked"),
                Act::Hang => std::future::pending::<()>().await,
                Act::Overrun => tokio::time::sleep(Duration::from_secs(1 << 40)).await,
            }
        }

        async fn judge(&self) -> RunResult {
            let mut steps = self.steps.lock().unwrap().clone();
            steps.push("judge".into());
            RunResult {
                ops: *self.drawn.lock().unwrap(),
                trace_lines: steps,
                ..RunResult::default()
            }
        }
    }

    /// Runs the stand-in with `act` (the tests share the static, so they take turns).
    fn run_fake(act: Act, p: Params) -> RunResult {
        static TURN: Mutex<()> = Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        *ACT.lock().unwrap_or_else(|p| p.into_inner()) = act;
        run_with(p, &Scenario::swarm(), &RunOpts::default(), |p, sc, o| {
            seam::<Fake>(p, sc, o)
        })
    }

    #[test]
    fn the_seam_runs_build_drive_judge_in_order() {
        let r = run_fake(Act::Draw, params());
        assert_eq!(r.trace_lines, ["build", "drive", "judge"]);
        assert!(r.violation.is_none());
        assert!(r.wall_s > 0.0);
    }

    #[test]
    fn a_run_that_cannot_start_returns_its_result_without_driving() {
        let mut p = params();
        p.ops = 0;
        let r = run_fake(Act::Draw, p);
        assert_eq!(r.trace_lines, Vec::<String>::new());
        let v = r.violation.clone().expect("a violation");
        assert_eq!((v.rule, v.message.as_str()), (Rule::Harness, "no ops"));
        assert_eq!(r.exit_code(), 70);
    }

    #[test]
    fn a_panic_is_an_i16_violation_naming_it() {
        install_panic_hook();
        let r = run_fake(Act::Panic, params());
        let v = r.violation.clone().expect("a violation");
        assert_eq!(v.rule, Rule::I16);
        assert!(
            v.message
                .starts_with("panic: the stand-in topology panicked at sim/src/runner.rs:"),
            "{}",
            v.message
        );
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn a_hang_or_an_overrun_is_an_i14_violation() {
        install_panic_hook();
        for (act, cause) in [
            (Act::Hang, "panic: no events, all tasks will block forever"),
            (Act::Overrun, "panic: time limit exceeded"),
        ] {
            let r = run_fake(act, params());
            let v = r.violation.clone().expect("a violation");
            assert_eq!(v.rule, Rule::I14, "{}", v.message);
            assert!(v.message.starts_with(cause), "{}", v.message);
            assert_eq!(r.exit_code(), 2);
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_and_another_seed_does_not() {
        let a = run_fake(Act::Draw, params()).ops;
        let b = run_fake(Act::Draw, params()).ops;
        let mut p = params();
        p.seed = 8;
        let c = run_fake(Act::Draw, p).ops;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
