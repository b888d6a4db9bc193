//! JUnit XML for CI systems (issue 22 item 4): one test case per run of a sweep, the violation
//! and the line that reproduces it in a failing case's text. The layout is the one Jenkins,
//! GitLab and GitHub's test reporters read: `<testsuites>` holding one `<testsuite>` with
//! `tests`, `failures`, `errors`, `skipped` and `time`, and a `<testcase classname name time>`
//! per run, with a `<failure message type>` child when the run broke a rule. This module
//! depends on nothing else in the simulator: the sweep hands it plain values.

use crate::ids::Violation;
use std::fmt::Write as _;

/// One run, as a test case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The scenario's name (`swarm` for a random seed): the test case's class.
    pub scenario: String,
    /// The run's seed.
    pub seed: u64,
    /// Wall seconds the run took.
    pub wall_s: f64,
    /// The rule broken and its message, for a failing run.
    pub violation: Option<Violation>,
    /// The command that replays the run.
    pub reproduce: String,
}

/// XML text with `& < > " '` escaped, and characters XML 1.0 cannot hold dropped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// The JUnit document for a sweep named `suite` that took `wall_s` seconds.
pub fn render(suite: &str, cases: &[Case], wall_s: f64) -> String {
    let failures = cases.iter().filter(|c| c.violation.is_some()).count();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{wall_s:.3}\">",
        escape(suite),
        cases.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{wall_s:.3}\">",
        escape(suite),
        cases.len()
    );
    for c in cases {
        let _ = write!(
            x,
            "    <testcase classname=\"ballot-sim.{}\" name=\"{} seed={}\" time=\"{:.3}\"",
            escape(&c.scenario),
            escape(&c.scenario),
            c.seed,
            c.wall_s
        );
        match &c.violation {
            None => x.push_str("/>\n"),
            Some(Violation { rule, message: msg }) => {
                let rule = rule.as_str();
                let _ = writeln!(
                    x,
                    ">\n      <failure message=\"{}: {}\" type=\"{}\">{} {}\nreproduce: {}</failure>\n    </testcase>",
                    escape(rule),
                    escape(msg),
                    escape(rule),
                    escape(rule),
                    escape(msg),
                    escape(&c.reproduce)
                );
            }
        }
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passing_and_a_failing_run_with_text_that_needs_escaping() {
        let cases = vec![
            Case {
                scenario: "swarm".into(),
                seed: 7,
                wall_s: 0.25,
                violation: None,
                reproduce: "cargo sim replay --seed 7".into(),
            },
            Case {
                scenario: "nbd3-<odd>".into(),
                seed: 9,
                wall_s: 1.5,
                violation: Some(Violation::new(
                    crate::ids::Rule::I3,
                    "read 0 & 1 differ \"here\"\u{1}",
                )),
                reproduce: "cargo sim replay --seed 9 scenarios/x.toml".into(),
            },
        ];
        let x = render("sweep", &cases, 2.0);
        assert_eq!(
            x,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <testsuites name=\"sweep\" tests=\"2\" failures=\"1\" errors=\"0\" time=\"2.000\">\n\
             \x20 <testsuite name=\"sweep\" tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"0\" time=\"2.000\">\n\
             \x20   <testcase classname=\"ballot-sim.swarm\" name=\"swarm seed=7\" time=\"0.250\"/>\n\
             \x20   <testcase classname=\"ballot-sim.nbd3-&lt;odd&gt;\" name=\"nbd3-&lt;odd&gt; seed=9\" time=\"1.500\">\n\
             \x20     <failure message=\"I3: read 0 &amp; 1 differ &quot;here&quot;\" type=\"I3\">I3 read 0 &amp; 1 differ &quot;here&quot;\n\
             reproduce: cargo sim replay --seed 9 scenarios/x.toml</failure>\n\
             \x20   </testcase>\n\
             \x20 </testsuite>\n\
             </testsuites>\n"
        );
    }
}
