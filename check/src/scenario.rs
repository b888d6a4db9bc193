//! Fuzz target `scenario_file`: the one scenario-file parser (SIMULATION.md §9, STYLE.md
//! habit 4). The input's first line is the file stem, the rest the file.
//!
//! Every input must end in an error message or a scenario, never a panic. An accepted
//! scenario must be one the simulator can run: its parameters derive for any seed (not only
//! the one the parser checked), the derived quorum satisfies Q7–Q12
//! ([`crate::vote::model_validate`]), every scripted step and ranged fault lies inside the
//! disk, and every fault target names an existing child; for a designed experiment (`[grid]`)
//! every point. Parsing is a function of the text.

use ballot_sim::params::Params;
use ballot_sim::scenario::Scenario;

use crate::vote::model_validate;

/// Checks one file text under `stem`.
pub fn check(stem: &str, text: &str) {
    let first = Scenario::parse(text, stem);
    let again = Scenario::parse(text, stem);
    assert_eq!(
        format!("{first:?}"),
        format!("{again:?}"),
        "parsing is not a function of the text"
    );
    let sc = match first {
        Ok(sc) => sc,
        Err(e) => {
            assert!(!e.trim().is_empty(), "an empty error message");
            return;
        }
    };
    // A designed experiment (`[grid]`): every point must be such a scenario too.
    assert_eq!(
        sc.points() == 1,
        sc.grid
            .as_ref()
            .is_none_or(|g| g.cases.len() * g.levels.len() == 1),
        "points() disagrees with the grid"
    );
    for k in 0..sc.points().min(16) {
        let at = sc.at_point(k);
        assert!(at.grid.is_none(), "a grid point still has a grid");
        check_point(&at);
    }
}

/// The run-time properties of one (grid point of a) scenario.
fn check_point(sc: &Scenario) {
    for seed in [sc.seed.unwrap_or(0), 1, 0x9E37_79B9_7F4A_7C15] {
        let p = Params::derive(seed, &sc.pins)
            .unwrap_or_else(|e| panic!("accepted, but seed {seed} does not derive: {e}"));
        if p.colo.is_none() {
            assert_eq!(
                model_validate(
                    p.children,
                    p.threshold as i64,
                    p.fifo,
                    p.rewrite,
                    p.blkverify
                ),
                None,
                "seed {seed}: derived quorum breaks Q7-Q12 ({} children, t={})",
                p.children,
                p.threshold
            );
        }
        // The references are checked against the scenario's own seed; under another seed an
        // unpinned topology may differ, and the simulator then skips what does not exist.
        let own = seed == sc.seed.unwrap_or(0);
        if p.colo.is_some() || !own {
            continue;
        }
        for s in &sc.steps {
            assert!(
                s.range.0 <= s.range.1 && s.range.1 <= p.disk_size,
                "step '{}' range {:?} outside the {}-byte disk",
                s.id,
                s.range,
                p.disk_size
            );
        }
        for f in &sc.faults {
            if let Some(t) = f.target {
                assert!(
                    t < p.children,
                    "fault {} targets child {t} of {}",
                    f.id,
                    p.children
                );
            }
        }
    }
}

/// The fuzz target.
pub fn fuzz(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (stem, body) = text.split_once('\n').unwrap_or(("", &text));
    check(stem, body);
}
