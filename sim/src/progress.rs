//! The sweep's progress line (issue 22 item 4): runs done of the total, violations so far,
//! guest operations per wall-second and the time left, redrawn in place on a terminal and
//! silent otherwise (a CI log gets the per-run lines only). Depends on nothing else in the
//! simulator but a unit formatter.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::units::thousands;

/// Progress of a sweep of `total` runs.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    done: usize,
    violations: usize,
    ops: u64,
    started: Instant,
    /// Whether to draw at all: standard error is a terminal.
    enabled: bool,
    /// When the line was last drawn (it is redrawn at most ten times a second).
    drawn: Option<Instant>,
}

/// "1h02m", "3m07s" or "42s".
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Progress {
    /// Progress of `total` runs, drawn when standard error is a terminal.
    pub fn new(total: usize) -> Progress {
        Progress::with(total, std::io::stderr().is_terminal(), Instant::now())
    }

    fn with(total: usize, enabled: bool, started: Instant) -> Progress {
        Progress {
            total,
            done: 0,
            violations: 0,
            ops: 0,
            started,
            enabled,
            drawn: None,
        }
    }

    /// Counts one finished run of `ops` guest operations.
    pub fn record(&mut self, ops: u64, violated: bool) {
        self.done += 1;
        self.ops += ops;
        self.violations += usize::from(violated);
    }

    /// The line as of `now`: `runs 40/844 (5%), 0 violations, 19,210 ops/s, ETA 1m36s`.
    pub fn line(&self, now: Instant) -> String {
        let elapsed = now.saturating_duration_since(self.started);
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        };
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let eta = if self.done == 0 {
            "ETA ?".to_string()
        } else {
            let left = self.total.saturating_sub(self.done) as f64;
            format!(
                "ETA {}",
                clock(Duration::from_secs_f64(secs / self.done as f64 * left))
            )
        };
        format!(
            "runs {}/{} ({pct}%), {} violation{}, {} ops/s, {eta}",
            self.done,
            self.total,
            self.violations,
            if self.violations == 1 { "" } else { "s" },
            thousands(rate.round() as u64)
        )
    }

    /// Clears the line so that an ordinary line can be printed where it was.
    pub fn clear(&self) {
        if self.enabled && self.drawn.is_some() {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
        }
    }

    /// Ends the line when the sweep stopped before its last run (a time budget, a failure
    /// with `--until-fail`), so the shell's prompt starts on a line of its own.
    pub fn end(&self) {
        if self.enabled && self.drawn.is_some() && self.done < self.total {
            eprintln!();
        }
    }

    /// Draws the line again (at most ten times a second, and always for the last run).
    pub fn draw(&mut self) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let last = self.done == self.total;
        if !last
            && self
                .drawn
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(now);
        let mut e = std::io::stderr();
        let _ = write!(e, "\r\x1b[K{}", self.line(now));
        if last {
            let _ = writeln!(e);
        }
        let _ = e.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_counts_runs_violations_rate_and_time_left() {
        let t0 = Instant::now();
        let mut p = Progress::with(844, false, t0);
        assert_eq!(p.line(t0), "runs 0/844 (0%), 0 violations, 0 ops/s, ETA ?");
        for k in 0..40 {
            p.record(1_000, k == 7);
        }
        // 40 runs in 10 s: 804 left take 201 s; 40,000 ops in 10 s.
        assert_eq!(
            p.line(t0 + Duration::from_secs(10)),
            "runs 40/844 (4%), 1 violation, 4,000 ops/s, ETA 3m21s"
        );
        p.record(2_000_000, true);
        assert_eq!(
            p.line(t0 + Duration::from_secs(4100)),
            "runs 41/844 (4%), 2 violations, 498 ops/s, ETA 22h18m"
        );
    }

    #[test]
    fn clock_reads_as_people_write_it() {
        assert_eq!(clock(Duration::from_secs(59)), "59s");
        assert_eq!(clock(Duration::from_secs(61)), "1m01s");
        assert_eq!(clock(Duration::from_secs(3_725)), "1h02m");
    }

    #[test]
    fn off_the_terminal_nothing_is_drawn() {
        let mut p = Progress::with(2, false, Instant::now());
        p.record(5, false);
        p.draw();
        assert_eq!(p.drawn, None);
    }
}
