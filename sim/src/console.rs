//! What the commands share: the options they parse, the header and verdict they print (U6,
//! U7), scenario loading and the line that replays a run. Below the sweep and the command
//! line, above the runner.

use std::path::{Path, PathBuf};

use crate::ids::Violation;
use crate::outcome::RunResult;
use crate::params::Params;
use crate::runner::capture_trace;
use crate::scenario::Scenario;

/// `commit=<sha>[+dirty]` for headers (U6); harness code, outside the simulation.
pub fn commit() -> String {
    static C: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let sha = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let dirty = std::process::Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .ok()
            .is_some_and(|o| !o.stdout.is_empty());
        format!("{sha}{}", if dirty { "+dirty" } else { "" })
    })
    .clone()
}

/// Loads a scenario and applies `--set`s; errors are usage errors naming the file and key.
pub fn load(path: Option<&str>, sets: &[String]) -> Result<Scenario, String> {
    let mut sc = match path {
        Some(p) => Scenario::load(Path::new(p))?,
        None => Scenario::swarm(),
    };
    // Every --set first, then one check: a pin can depend on another given after it
    // (`topology.child_image` exists only once `topology.kind=quorum` is pinned).
    for s in sets {
        sc.pin(s).map_err(|e| format!("--set {s}: {e}"))?;
    }
    if !sets.is_empty() {
        Params::derive(0, &sc.pins).map_err(|e| format!("--set {}: {e}", sets.join(" --set ")))?;
    }
    Ok(sc)
}

/// The first output line (U6).
pub fn header(p: &Params, sc: &Scenario) -> String {
    format!(
        "ballot-sim {} commit={} seed={} scenario={} config={}",
        env!("CARGO_PKG_VERSION"),
        commit(),
        p.seed,
        sc.name,
        p.config_id()
    )
}

pub(crate) fn reproduce(seed: u64, scenario: Option<&str>, sc: &Scenario) -> String {
    let mut cmd = match scenario {
        Some(s) => format!("cargo sim replay --seed {seed} {s}"),
        None => format!("cargo sim replay --seed {seed}"),
    };
    // A grid point is the scenario plus the point's pins.
    for set in sc.point_sets() {
        cmd += " ";
        cmd += &set;
    }
    cmd
}

/// Prints a run's verdict (U7) and returns its exit code.
pub fn report(p: &Params, sc: &Scenario, path: Option<&str>, r: &RunResult) -> i32 {
    match &r.violation {
        None => {
            println!(
                "PASS seed={} ops={} child_ops={} crashes={} virtual={:.3}s wall={:.3}s trace={}",
                p.seed,
                r.ops,
                r.child_ops,
                r.crashes,
                r.virtual_s,
                r.wall_s,
                &r.trace_hash[..16.min(r.trace_hash.len())]
            );
        }
        Some(Violation { rule, message: msg }) => {
            println!("FAIL {rule} {msg}");
            println!(
                "seed={} commit={} scenario={} config={}",
                p.seed,
                commit(),
                sc.name,
                p.config_id()
            );
            print!("{}", p.to_toml(&sc.name));
            print!("{}", r.detail);
            println!("reproduce: {}", reproduce(p.seed, path, sc));
            let trace = save_trace(p, sc);
            if let Some(t) = trace {
                println!("trace: {}", t.display());
            }
        }
    }
    r.exit_code()
}

/// Re-runs verbosely into `reports/traces/<name>-<seed>.log` (the saved trace of U7).
fn save_trace(p: &Params, sc: &Scenario) -> Option<PathBuf> {
    let dir = PathBuf::from("reports/traces");
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{}-{}.log", sc.name, p.seed));
    let text = capture_trace(p.clone(), sc);
    std::fs::write(&path, text).ok()?;
    Some(path)
}

/// Parsed common options.
#[derive(Default)]
pub struct Common {
    /// Scenario path.
    pub scenario: Option<String>,
    /// Seed.
    pub seed: Option<u64>,
    /// `--set`s.
    pub sets: Vec<String>,
    /// Verbosity.
    pub verbose: u8,
    /// Op window.
    pub from_op: u64,
    /// Op window end.
    pub to_op: u64,
    /// Other flags with values.
    pub flags: Vec<(String, String)>,
}

/// Parses `args`, accepting `with_values` as flags that take a value.
pub fn parse(args: &[String], with_values: &[&str]) -> Result<Common, String> {
    let mut c = Common {
        to_op: u64::MAX,
        ..Common::default()
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let val = |i: usize| -> Result<String, String> {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--seed" => {
                let v = val(i)?;
                c.seed = Some(
                    v.parse()
                        .map_err(|_| format!("--seed '{v}' is not a 64-bit unsigned integer"))?,
                );
                i += 1;
            }
            "--set" => {
                c.sets.push(val(i)?);
                i += 1;
            }
            "-v" => c.verbose = c.verbose.max(1),
            "-vv" => c.verbose = 2,
            "--from-op" | "--to-op" => {
                let v = val(i)?;
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("{a} '{v}' is not an op number"))?;
                if a == "--from-op" {
                    c.from_op = n
                } else {
                    c.to_op = n
                }
                i += 1;
            }
            f if with_values.contains(&f) => {
                c.flags.push((f.to_string(), val(i)?));
                i += 1;
            }
            f if f.starts_with('-') => return Err(format!("unknown option '{f}'")),
            path => {
                if c.scenario.is_some() {
                    return Err(format!("more than one scenario given ('{path}')"));
                }
                c.scenario = Some(path.to_string());
            }
        }
        i += 1;
    }
    Ok(c)
}

/// The seed of U1: `--seed`, else the scenario's, else the OS's, once.
pub fn pick_seed(c: &Common, sc: &Scenario) -> u64 {
    c.seed.or(sc.seed).unwrap_or_else(|| {
        let mut b = [0u8; 8];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut b);
        }
        u64::from_le_bytes(b) >> 1
    })
}
