//! Scenario files (SIMULATION.md §9): one TOML file pins part of a run and states what must
//! happen. This is the one parser for them (STYLE.md habit 4): unknown keys and values are
//! errors naming the key and the file (C2).

use crate::ids::{Fault, Path as PathId};
use std::collections::BTreeMap;
use std::path::Path;

use toml::Value as Tv;

use crate::oracle::OpKind;
use crate::params::{flatten, Params};
use crate::units::{parse_range, parse_time_ns};

/// A scripted guest op (C4).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Step id, referenced by expectations.
    pub id: String,
    /// Op kind.
    pub op: OpKind,
    /// Byte range (flush: ignored).
    pub range: (u64, u64),
    /// FUA.
    pub fua: bool,
    /// `hot_remove` steps: the child (`cN`) to remove with x-blockdev-change's logic (Q53).
    pub remove: Option<usize>,
    /// `after`: virtual time to let pass before the step is issued (network faults heal and
    /// clients reconnect in time, not in ops).
    pub after_ns: u64,
}

/// When a scripted fault fires (C3).
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    /// At a virtual time, ns.
    At(u64),
    /// After this many completed guest ops.
    AtOp(u64),
    /// COLO: at checkpoint k (1 = the first), at the point the family names.
    AtCheckpoint(u64),
}

/// A scripted fault.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// Family id.
    pub id: Fault,
    /// Child index (`cN`), or None for the host (`qhost`).
    pub target: Option<usize>,
    /// Byte range.
    pub range: Option<(u64, u64)>,
    /// When it fires.
    pub when: When,
    /// When a lasting fault ends (F10): ns or op count.
    pub until: Option<When>,
    /// Requests it hits.
    pub count: u64,
    /// F5 `applied`, F10 `factor`.
    pub params: BTreeMap<String, Tv>,
}

/// An expectation (C5).
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// A step's result: "ok" or an errno name.
    Result {
        /// Step id.
        step: String,
        /// Expected result: "ok", an errno name, or "refused" (hot_remove).
        result: String,
        /// For "refused": the exact message.
        message: Option<String>,
    },
    /// Events on the internal (or QMP) stream.
    Event {
        /// Event name.
        event: String,
        /// Child node-names (empty: any).
        nodes: Vec<String>,
        /// `type` (read, write, flush).
        io: Option<String>,
        /// Presence of `error`.
        error: Option<bool>,
        /// Exact count, or min/max.
        count: Option<u64>,
        /// Minimum count.
        min: Option<u64>,
        /// Maximum count.
        max: Option<u64>,
        /// QMP stream instead of internal.
        qmp: bool,
    },
    /// A range of a child (or the guest view) equals a step's data, "initial" or "zero".
    Contents {
        /// Child index, or None for the guest view.
        child: Option<usize>,
        /// Byte range.
        range: (u64, u64),
        /// Step id, "initial" or "zero".
        equals: String,
    },
    /// Warning (Q15) or fatal (Q33) lines the host logged, over all incarnations.
    Log {
        /// Fatal lines instead of warnings.
        fatal: bool,
        /// Exact count.
        count: u64,
    },
    /// A fault family was injected at least `min` times.
    Injected {
        /// Family.
        fault: Fault,
        /// Minimum count.
        min: u64,
    },
    /// COLO: the replication status a side reports at the end (`query-xen-replication-status`).
    Replication {
        /// `colo-p` or `colo-s`.
        node: String,
        /// `error`.
        error: bool,
        /// `stage` (none, running, failover, failover-failed, done).
        stage: Option<String>,
    },
    /// COLO: a side's disk at the end equals a model state.
    ColoContents {
        /// `colo-p` (P) or `colo-s` (S).
        node: String,
        /// Byte range.
        range: (u64, u64),
        /// `checkpoint:K+svm` (checkpoint K's primary state plus the SVM's writes since),
        /// `checkpoint:last+svm`, or `primary` (every acked PVM write).
        equals: String,
    },
    /// A recovery path was reached at least `min` times.
    Path {
        /// Path id (P1...).
        path: PathId,
        /// Minimum count.
        min: u64,
    },
}

/// A parsed scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name (the file stem).
    pub name: String,
    /// Description.
    pub description: String,
    /// Default seed.
    pub seed: Option<u64>,
    /// Pinned parameters by dotted key.
    pub pins: BTreeMap<String, Tv>,
    /// Scripted steps.
    pub steps: Vec<Step>,
    /// Scripted faults.
    pub faults: Vec<FaultSpec>,
    /// Expectations.
    pub expects: Vec<Expect>,
    /// A designed experiment (`[grid]`): a sweep runs the scenario at every point.
    pub grid: Option<Grid>,
    /// The pins a grid point added to this scenario's own (empty outside a grid), in the
    /// `--set key=value` form that reproduces the point.
    pub point: Vec<(String, Tv)>,
    /// The grid point's (case, level), 0-based.
    pub point_index: Option<(usize, usize)>,
}

/// A designed experiment: the scenario at every (case, level) point, `runs` seeds each
/// (the scenario's seed, seed + 1, ...; the same seeds at every point, so points differ only in
/// what the grid pins). Cases are usually configurations, levels fault intensities.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Seeds per point.
    pub runs: u64,
    /// Pins of each case.
    pub cases: Vec<BTreeMap<String, Tv>>,
    /// Pins of each level.
    pub levels: Vec<BTreeMap<String, Tv>>,
}

/// Largest number of seeds per grid point.
pub const GRID_RUNS_MAX: u64 = 100;

/// Largest number of grid points (cases × levels).
pub const GRID_POINTS_MAX: usize = 1000;

/// Pins of one grid case or level: a table shaped like the scenario file's own sections.
fn grid_pins(v: &Tv, what: &str) -> Result<BTreeMap<String, Tv>, String> {
    let t = v
        .as_table()
        .ok_or_else(|| format!("key 'grid.{what}': expected a table"))?;
    let mut pins = BTreeMap::new();
    for (k, v) in t {
        match k.as_str() {
            "budget" => {
                pins.insert("budget".to_string(), v.clone());
            }
            "topology" | "workload" | "faults" | "phases" | "disk" | "nbd_client" | "network"
            | "healing" | "image" | "child_image" | "layers" => {
                let inner = v
                    .as_table()
                    .ok_or_else(|| format!("key 'grid.{what}.{k}': expected a table"))?;
                if inner.contains_key("step") {
                    return Err(format!(
                        "key 'grid.{what}.{k}.step': steps cannot vary across a grid"
                    ));
                }
                flatten(k, inner, &mut pins);
            }
            other => {
                return Err(format!(
                    "key 'grid.{what}': unknown key '{other}' (a grid point pins parameters: budget, topology, workload, faults, phases, disk, nbd_client, network, healing)"
                ))
            }
        }
    }
    Ok(pins)
}

fn parse_grid(v: &Tv) -> Result<Grid, String> {
    let t = v.as_table().ok_or("key 'grid': expected a table")?;
    let mut g = Grid {
        runs: 1,
        cases: vec![BTreeMap::new()],
        levels: vec![BTreeMap::new()],
    };
    for (k, v) in t {
        match k.as_str() {
            "runs" => {
                let n = v
                    .as_integer()
                    .ok_or("key 'grid.runs': expected an integer")?;
                if !(1..=GRID_RUNS_MAX as i64).contains(&n) {
                    return Err(format!(
                        "key 'grid.runs': {n} is not between 1 and {GRID_RUNS_MAX}"
                    ));
                }
                g.runs = n as u64;
            }
            "cases" | "levels" => {
                let a = v
                    .as_array()
                    .ok_or_else(|| format!("key 'grid.{k}': expected an array of tables"))?;
                if a.is_empty() {
                    return Err(format!("key 'grid.{k}': empty"));
                }
                let list = a
                    .iter()
                    .enumerate()
                    .map(|(i, x)| grid_pins(x, &format!("{k}[{}]", i + 1)))
                    .collect::<Result<Vec<_>, _>>()?;
                if k == "cases" {
                    g.cases = list;
                } else {
                    g.levels = list;
                }
            }
            other => {
                return Err(format!(
                    "key 'grid': unknown key '{other}' (known: runs, cases, levels)"
                ))
            }
        }
    }
    let points = g.cases.len() * g.levels.len();
    if points > GRID_POINTS_MAX {
        return Err(format!(
            "key 'grid': {} cases x {} levels = {points} points, more than {GRID_POINTS_MAX}",
            g.cases.len(),
            g.levels.len()
        ));
    }
    Ok(g)
}

/// Checks a scenario's pins against the topology they derive: scripted faults that the
/// topology has, and child and range references that exist (SIMULATION.md §9).
fn check_derived(sc: &Scenario, pins: &BTreeMap<String, Tv>) -> Result<(), String> {
    let derived = Params::derive(sc.seed.unwrap_or(0), pins)?;
    for f in &sc.faults {
        let colo_fault = crate::params::COLO_FAMILIES.contains(&f.id);
        if colo_fault != derived.colo.is_some() {
            return Err(if colo_fault {
                format!("key 'fault': {} needs topology.kind = \"colo\"", f.id)
            } else {
                format!(
                    "key 'fault': {} is not a COLO fault (the COLO topology scripts F19-F24)",
                    f.id
                )
            });
        }
        let net = matches!(f.id, Fault::F13 | Fault::F15 | Fault::F17 | Fault::F18)
            || (f.id == Fault::F16 && f.target.is_some());
        if net && derived.nbd.is_none() {
            return Err(format!(
                "key 'fault': {} on a replica needs topology.transport = \"nbd\"",
                f.id
            ));
        }
    }
    if derived.image.is_some() {
        if let Some(why) = image_unsupported(sc) {
            return Err(why);
        }
    }
    if derived.colo.is_none() {
        check_refs(sc, derived.children, derived.disk_size)?;
    }
    Ok(())
}

/// What the image topology (`topology.image = true`) cannot run of a scenario: it has no
/// scripted steps or faults, and checks only `injected` and `path` expectations.
pub fn image_unsupported(sc: &Scenario) -> Option<String> {
    if !sc.steps.is_empty() {
        return Some("key 'workload.step': the image topology runs no scripted steps".into());
    }
    if !sc.faults.is_empty() {
        return Some("key 'fault': the image topology runs no scripted faults".into());
    }
    let i = sc
        .expects
        .iter()
        .position(|e| !matches!(e, Expect::Injected { .. } | Expect::Path { .. }))?;
    Some(format!(
        "key 'expect[{i}]': the image topology checks only 'injected' and 'path' expectations"
    ))
}

impl Scenario {
    /// An empty scenario: a pure swarm run.
    pub fn swarm() -> Scenario {
        Scenario {
            name: "swarm".into(),
            description: String::new(),
            seed: None,
            pins: BTreeMap::new(),
            steps: Vec::new(),
            faults: Vec::new(),
            expects: Vec::new(),
            grid: None,
            point: Vec::new(),
            point_index: None,
        }
    }

    /// Grid points (cases × levels); 1 for a scenario without a grid.
    pub fn points(&self) -> usize {
        self.grid
            .as_ref()
            .map_or(1, |g| g.cases.len() * g.levels.len())
    }

    /// The scenario at grid point `k` (0-based, case-major): its pins plus the case's and the
    /// level's, without the grid. Without a grid, point 0 is the scenario itself.
    pub fn at_point(&self, k: usize) -> Scenario {
        let mut sc = self.clone();
        sc.grid = None;
        if let Some(g) = &self.grid {
            let (ci, li) = ((k / g.levels.len()) % g.cases.len(), k % g.levels.len());
            sc.point_index = Some((ci, li));
            let case = &g.cases[ci];
            let level = &g.levels[li];
            for (key, v) in case.iter().chain(level.iter()) {
                sc.pins.insert(key.clone(), v.clone());
                sc.point.retain(|(k2, _)| k2 != key);
                sc.point.push((key.clone(), v.clone()));
            }
        }
        sc
    }

    /// `--set key=value` arguments that reproduce this grid point (empty outside a grid).
    pub fn point_sets(&self) -> Vec<String> {
        self.point
            .iter()
            .map(|(k, v)| format!("--set '{k}={v}'"))
            .collect()
    }

    /// Loads and checks `path`.
    ///
    /// # Errors
    /// `<path>: <problem>` for unreadable files, TOML syntax, and every unknown or invalid key.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Scenario::parse(&text, &stem).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses scenario text for a file whose stem is `stem`.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn parse(text: &str, stem: &str) -> Result<Scenario, String> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("TOML syntax: {}", e.to_string().trim_end()))?;
        let mut sc = Scenario::swarm();
        let mut pins = BTreeMap::new();
        for (k, v) in &table {
            match k.as_str() {
                "name" => {
                    let name = v.as_str().ok_or("key 'name': expected a string")?;
                    if name != stem {
                        return Err(format!(
                            "key 'name': '{name}' must equal the file stem '{stem}'"
                        ));
                    }
                    sc.name = name.to_string();
                }
                "description" => {
                    sc.description = v
                        .as_str()
                        .ok_or("key 'description': expected a string")?
                        .to_string();
                }
                "seed" => {
                    let s = v.as_integer().ok_or("key 'seed': expected an integer")?;
                    sc.seed =
                        Some(u64::try_from(s).map_err(|_| "key 'seed': must not be negative")?);
                }
                "budget" => {
                    pins.insert("budget".to_string(), v.clone());
                }
                "topology" | "workload" | "faults" | "phases" | "disk" | "nbd_client"
                | "network" | "healing" | "image" | "child_image" | "layers" => {
                    let t = v
                        .as_table()
                        .ok_or_else(|| format!("key '{k}': expected a table"))?;
                    let mut t = t.clone();
                    if k == "workload" {
                        if let Some(steps) = t.remove("step") {
                            sc.steps = parse_steps(&steps)?;
                        }
                    }
                    flatten(k, &t, &mut pins);
                }
                "fault" => sc.faults = parse_faults(v)?,
                "expect" => sc.expects = parse_expects(v)?,
                "grid" => sc.grid = Some(parse_grid(v)?),
                other => return Err(format!("unknown key '{other}'")),
            }
        }
        if sc.name == "swarm" && !stem.is_empty() && stem != "swarm" {
            return Err(format!(
                "key 'name' is missing (it must equal the file stem '{stem}')"
            ));
        }
        // A scenario file is about the children it names: local vdisks unless it says
        // `transport = "nbd"` (random swarm seeds draw the transport).
        pins.entry("topology.kind".to_string())
            .or_insert_with(|| Tv::String("quorum".into()));
        if pins.get("topology.kind").and_then(Tv::as_str) != Some("colo") {
            pins.entry("topology.transport".to_string())
                .or_insert_with(|| Tv::String("local".into()));
        }
        // Every pinned key must be a parameter: derive once to check (at every grid point).
        check_derived(&sc, &pins)?;
        if let Some(g) = &sc.grid {
            let base = Scenario {
                pins: pins.clone(),
                ..sc.clone()
            };
            for k in 0..sc.points() {
                let at = base.at_point(k);
                check_derived(&at, &at.pins).map_err(|e| {
                    format!(
                        "key 'grid': case {}, level {}: {e}",
                        k / g.levels.len() + 1,
                        k % g.levels.len() + 1
                    )
                })?;
            }
        }
        let ids: Vec<&str> = sc.steps.iter().map(|s| s.id.as_str()).collect();
        for e in &sc.expects {
            let step = match e {
                Expect::Result { step, .. } => Some(step),
                Expect::Contents { equals, .. } if equals != "initial" && equals != "zero" => {
                    Some(equals)
                }
                _ => None,
            };
            if let Some(s) = step {
                if !ids.contains(&s.as_str()) && s != "open" {
                    return Err(format!(
                        "key 'expect': step '{s}' is not a workload.step id"
                    ));
                }
            }
        }
        sc.pins = pins;
        Ok(sc)
    }

    /// Applies `--set key=value` (S3); the value is TOML (`3`, `true`, `"fifo"`, or a bare
    /// word taken as a string).
    ///
    /// # Errors
    /// A message naming the key.
    pub fn pin(&mut self, kv: &str) -> Result<(), String> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set '{kv}': expected key=value"))?;
        let value: Tv = match format!("x = {v}").parse::<toml::Table>() {
            Ok(t) => t.get("x").cloned().unwrap_or(Tv::String(v.to_string())),
            Err(_) => Tv::String(v.to_string()),
        };
        let mut t = toml::Table::new();
        t.insert("x".into(), value);
        let v = t.remove("x").unwrap_or(Tv::Boolean(false));
        self.pins.insert(k.trim().to_string(), v);
        Ok(())
    }

    /// [`Scenario::pin`], then a check that the pins so far derive parameters.
    pub fn set(&mut self, kv: &str) -> Result<(), String> {
        self.pin(kv)?;
        Params::derive(0, &self.pins).map(|_| ())
    }
}

fn table_of<'a>(v: &'a Tv, what: &str, i: usize) -> Result<&'a toml::Table, String> {
    v.as_table()
        .ok_or_else(|| format!("key '{what}[{i}]': expected a table"))
}

fn check_keys(t: &toml::Table, what: &str, i: usize, allowed: &[&str]) -> Result<(), String> {
    for k in t.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "key '{what}[{i}].{k}': unknown (allowed: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn str_key<'a>(
    t: &'a toml::Table,
    what: &str,
    i: usize,
    key: &str,
) -> Result<Option<&'a str>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(Tv::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "key '{what}[{i}].{key}': expected a string, got {}",
            other.type_str()
        )),
    }
}

fn u64_key(t: &toml::Table, what: &str, i: usize, key: &str) -> Result<Option<u64>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(Tv::Integer(n)) if *n >= 0 => Ok(Some(*n as u64)),
        Some(other) => Err(format!(
            "key '{what}[{i}].{key}': expected a non-negative integer, got {other}"
        )),
    }
}

fn parse_steps(v: &Tv) -> Result<Vec<Step>, String> {
    let arr = v
        .as_array()
        .ok_or("key 'workload.step': expected an array")?;
    let mut out: Vec<Step> = Vec::new();
    for (i, s) in arr.iter().enumerate() {
        let w = "workload.step";
        let t = table_of(s, w, i)?;
        check_keys(t, w, i, &["id", "op", "range", "fua", "child", "after"])?;
        let after_ns = match str_key(t, w, i, "after")? {
            Some(a) => parse_time_ns(a).map_err(|e| format!("key '{w}[{i}].after': {e}"))?,
            None => 0,
        };
        let id = str_key(t, w, i, "id")?.ok_or(format!("key '{w}[{i}].id' is missing"))?;
        if out.iter().any(|x| x.id == id) {
            return Err(format!("key '{w}[{i}].id': '{id}' is used twice"));
        }
        let op = str_key(t, w, i, "op")?.ok_or(format!("key '{w}[{i}].op' is missing"))?;
        if op == "hot_remove" {
            let c = str_key(t, w, i, "child")?.ok_or(format!("key '{w}[{i}].child' is missing"))?;
            let c = parse_target(c, &format!("{w}[{i}].child"))?
                .ok_or(format!("key '{w}[{i}].child': expected a child"))?;
            out.push(Step {
                id: id.to_string(),
                op: OpKind::Flush,
                range: (0, 0),
                fua: false,
                remove: Some(c),
                after_ns,
            });
            continue;
        }
        let op = OpKind::parse(op).ok_or(format!(
            "key '{w}[{i}].op': '{op}' is not one of read, write, write_zeroes, trim, flush, block_status, hot_remove"
        ))?;
        let range = match str_key(t, w, i, "range")? {
            Some(r) => parse_range(r).map_err(|e| format!("key '{w}[{i}].range': {e}"))?,
            None if op == OpKind::Flush => (0, 0),
            None => return Err(format!("key '{w}[{i}].range' is missing")),
        };
        let fua = match t.get("fua") {
            None => false,
            Some(Tv::Boolean(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "key '{w}[{i}].fua': expected true or false, got {other}"
                ))
            }
        };
        out.push(Step {
            id: id.to_string(),
            op,
            range,
            fua,
            remove: None,
            after_ns,
        });
    }
    Ok(out)
}

/// Children and ranges a quorum scenario names must exist in the topology it derives: a fault
/// on a child that is not there would silently never fire, and a range past the disk would
/// script I/O the disk refuses (found by the `scenario_file` fuzz target).
fn check_refs(sc: &Scenario, children: usize, disk: u64) -> Result<(), String> {
    let child = |what: &str, c: usize| {
        if c < children {
            Ok(())
        } else {
            Err(format!(
                "key '{what}': child {c} does not exist (the topology has {children} children)"
            ))
        }
    };
    let range = |what: &str, (a, b): (u64, u64)| {
        if b <= disk {
            Ok(())
        } else {
            Err(format!(
                "key '{what}': range {a}..{b} ends past the disk ({disk} bytes)"
            ))
        }
    };
    for (i, s) in sc.steps.iter().enumerate() {
        range(&format!("workload.step[{i}].range"), s.range)?;
    }
    for (i, f) in sc.faults.iter().enumerate() {
        if let Some(t) = f.target {
            child(&format!("fault[{i}].target"), t)?;
        }
        if let Some(r) = f.range {
            range(&format!("fault[{i}].range"), r)?;
        }
    }
    for (i, e) in sc.expects.iter().enumerate() {
        if let Expect::Contents {
            child: c, range: r, ..
        } = e
        {
            if let Some(c) = c {
                child(&format!("expect[{i}].child"), *c)?;
            }
            range(&format!("expect[{i}].range"), *r)?;
        }
    }
    Ok(())
}

fn parse_target(s: &str, what: &str) -> Result<Option<usize>, String> {
    if s == "qhost" {
        return Ok(None);
    }
    s.strip_prefix('c')
        .or_else(|| s.strip_prefix('r'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < 7)
        .map(Some)
        .ok_or_else(|| format!("key '{what}': '{s}' names no node (c0..c6, r0..r6 or qhost)"))
}

fn parse_faults(v: &Tv) -> Result<Vec<FaultSpec>, String> {
    let arr = v.as_array().ok_or("key 'fault': expected an array")?;
    let mut out = Vec::new();
    for (i, f) in arr.iter().enumerate() {
        let w = "fault";
        let t = table_of(f, w, i)?;
        check_keys(
            t,
            w,
            i,
            &[
                "id",
                "target",
                "range",
                "at",
                "at_op",
                "at_checkpoint",
                "until",
                "until_op",
                "count",
                "params",
            ],
        )?;
        // The family is parsed once, here; everything after matches on the enum.
        let id: Fault = str_key(t, w, i, "id")?
            .ok_or(format!("key '{w}[{i}].id' is missing"))?
            .parse()
            .map_err(|e| format!("key '{w}[{i}].id': {e}"))?;
        out.push(if crate::params::COLO_FAMILIES.contains(&id) {
            parse_colo_fault(t, id, i)?
        } else {
            parse_fault(t, id, i)?
        });
    }
    Ok(out)
}

/// The families a scenario can script in the quorum topologies (F8 and F9 act through
/// F16's crash; F19-F24 are the COLO topology's).
const SCRIPTED: [Fault; 14] = [
    Fault::F1,
    Fault::F2,
    Fault::F3,
    Fault::F4,
    Fault::F5,
    Fault::F6,
    Fault::F7,
    Fault::F10,
    Fault::F11,
    Fault::F13,
    Fault::F15,
    Fault::F16,
    Fault::F17,
    Fault::F18,
];

/// A scripted fault of the quorum topologies (C3): target, range, when and until, count and
/// the family's params.
fn parse_fault(t: &toml::Table, id: Fault, i: usize) -> Result<FaultSpec, String> {
    let w = "fault";
    if t.contains_key("at_checkpoint") {
        return Err(format!(
            "key '{w}[{i}].at_checkpoint': only COLO faults (F19-F24) fire at a checkpoint"
        ));
    }
    if !SCRIPTED.contains(&id) {
        return Err(format!(
            "key '{w}[{i}].id': '{id}' cannot be scripted ({}, and F19-F24 in the COLO topology; F8 and F9 act through F16)",
            SCRIPTED.map(Fault::as_str).join(", ")
        ));
    }
    let target = match str_key(t, w, i, "target")? {
        Some(s) => parse_target(s, &format!("{w}[{i}].target"))?,
        None if id == Fault::F16 || id == Fault::F15 => None,
        None => return Err(format!("key '{w}[{i}].target' is missing")),
    };
    if id != Fault::F16 && id != Fault::F15 && target.is_none() {
        return Err(format!("key '{w}[{i}].target': {id} needs a child (c0..)"));
    }
    let range = match str_key(t, w, i, "range")? {
        Some(r) => Some(parse_range(r).map_err(|e| format!("key '{w}[{i}].range': {e}"))?),
        None => None,
    };
    if matches!(id, Fault::F1 | Fault::F3 | Fault::F4) && range.is_none() && id != Fault::F3 {
        return Err(format!(
            "key '{w}[{i}].range' is missing ({id} marks sectors)"
        ));
    }
    let when = match (str_key(t, w, i, "at")?, u64_key(t, w, i, "at_op")?) {
        (Some(_), Some(_)) => {
            return Err(format!("key '{w}[{i}]': give 'at' or 'at_op', not both"))
        }
        (Some(s), None) => {
            When::At(parse_time_ns(s).map_err(|e| format!("key '{w}[{i}].at': {e}"))?)
        }
        (None, Some(n)) => When::AtOp(n),
        (None, None) => When::AtOp(0),
    };
    let until = match (str_key(t, w, i, "until")?, u64_key(t, w, i, "until_op")?) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "key '{w}[{i}]': give 'until' or 'until_op', not both"
            ))
        }
        (Some(s), None) => Some(When::At(
            parse_time_ns(s).map_err(|e| format!("key '{w}[{i}].until': {e}"))?,
        )),
        (None, Some(n)) => Some(When::AtOp(n)),
        (None, None) => None,
    };
    let count = u64_key(t, w, i, "count")?.unwrap_or(1);
    Ok(FaultSpec {
        id,
        target,
        range,
        when,
        until,
        count,
        params: fault_params(t, id, i)?,
    })
}

/// A scripted fault's `params`: only the keys its family reads, with values it accepts.
fn fault_params(t: &toml::Table, id: Fault, i: usize) -> Result<BTreeMap<String, Tv>, String> {
    let w = "fault";
    let mut params = BTreeMap::new();
    if let Some(p) = t.get("params") {
        let pt = p
            .as_table()
            .ok_or(format!("key '{w}[{i}].params': expected a table"))?;
        for (k, v) in pt {
            match (id, k.as_str(), v) {
                (Fault::F5, "applied", Tv::String(s)) if ["none", "all", "some"].contains(&s.as_str()) => {}
                (Fault::F5, "applied", other) => {
                    return Err(format!("key '{w}[{i}].params.applied': {other} is not \"none\", \"all\" or \"some\""))
                }
                (Fault::F10, "factor", Tv::Integer(n)) if *n >= 1 => {}
                (Fault::F10, "factor", other) => {
                    return Err(format!("key '{w}[{i}].params.factor': {other} is not an integer >= 1"))
                }
                (Fault::F11, "delta", Tv::Integer(n)) if *n != 0 && n % 512 == 0 => {}
                (Fault::F11, "delta", other) => {
                    return Err(format!("key '{w}[{i}].params.delta': {other} is not a non-zero multiple of 512"))
                }
                (Fault::F16 | Fault::F18, "restart", Tv::String(s))
                | (Fault::F17, "length", Tv::String(s))
                | (Fault::F15, "window", Tv::String(s)) => {
                    parse_time_ns(s).map_err(|e| format!("key '{w}[{i}].params.{k}': {e}"))?;
                }
                (Fault::F13, "kind", Tv::String(s)) if ["both", "in", "out", "isolate"].contains(&s.as_str()) => {}
                (Fault::F13, "kind", other) => {
                    return Err(format!("key '{w}[{i}].params.kind': {other} is not \"both\", \"in\", \"out\" or \"isolate\""))
                }
                _ => return Err(format!("key '{w}[{i}].params.{k}': unknown for {id}")),
            }
            params.insert(k.clone(), v.clone());
        }
    }
    Ok(params)
}

/// A COLO fault (F19-F24): `at_checkpoint`, `at` or `at_op`, `until` for lasting ones, and its
/// `params.kind`.
fn parse_colo_fault(t: &toml::Table, id: Fault, i: usize) -> Result<FaultSpec, String> {
    let w = "fault";
    let when = match (
        u64_key(t, w, i, "at_checkpoint")?,
        str_key(t, w, i, "at")?,
        u64_key(t, w, i, "at_op")?,
    ) {
        (Some(k), None, None) if k >= 1 => When::AtCheckpoint(k),
        (Some(_), None, None) => {
            return Err(format!(
                "key '{w}[{i}].at_checkpoint': checkpoints count from 1"
            ))
        }
        (None, Some(s), None) if matches!(id, Fault::F22 | Fault::F23) => {
            When::At(parse_time_ns(s).map_err(|e| format!("key '{w}[{i}].at': {e}"))?)
        }
        (None, None, Some(n)) if matches!(id, Fault::F22 | Fault::F23) => When::AtOp(n),
        (None, None, None) => return Err(format!("key '{w}[{i}].at_checkpoint' is missing")),
        _ if matches!(id, Fault::F22 | Fault::F23) => {
            return Err(format!(
                "key '{w}[{i}]': give one of at_checkpoint, at or at_op"
            ))
        }
        _ => {
            return Err(format!(
                "key '{w}[{i}]': {id} fires at a checkpoint: give only at_checkpoint"
            ))
        }
    };
    if let Some(tg) = str_key(t, w, i, "target")? {
        if !["colo-p", "colo-s", "ham"].contains(&tg) {
            return Err(format!(
                "key '{w}[{i}].target': '{tg}' names no COLO host (colo-p, colo-s, ham)"
            ));
        }
    }
    let until = match str_key(t, w, i, "until")? {
        Some(s) => Some(When::At(
            parse_time_ns(s).map_err(|e| format!("key '{w}[{i}].until': {e}"))?,
        )),
        None => None,
    };
    let kinds: &[&str] = match id {
        Fault::F21 => &["fail", "second", "crash"],
        Fault::F22 => &["error", "partition"],
        Fault::F23 => &["lose-primary", "lose-secondary"],
        _ => &[],
    };
    let mut params = BTreeMap::new();
    if let Some(p) = t.get("params") {
        let pt = p
            .as_table()
            .ok_or(format!("key '{w}[{i}].params': expected a table"))?;
        for (k, v) in pt {
            match (k.as_str(), v) {
                ("kind", Tv::String(s)) if kinds.contains(&s.as_str()) => {}
                ("kind", other) if !kinds.is_empty() => {
                    return Err(format!(
                        "key '{w}[{i}].params.kind': {other} is not one of {}",
                        kinds.join(", ")
                    ))
                }
                _ => return Err(format!("key '{w}[{i}].params.{k}': unknown for {id}")),
            }
            params.insert(k.clone(), v.clone());
        }
    }
    if !kinds.is_empty() && !params.contains_key("kind") {
        params.insert("kind".into(), Tv::String(kinds[0].into()));
    }
    Ok(FaultSpec {
        id,
        target: None,
        range: None,
        when,
        until,
        count: 1,
        params,
    })
}

fn parse_expects(v: &Tv) -> Result<Vec<Expect>, String> {
    let arr = v.as_array().ok_or("key 'expect': expected an array")?;
    let mut out = Vec::new();
    for (i, e) in arr.iter().enumerate() {
        let w = "expect";
        let t = table_of(e, w, i)?;
        let kind = str_key(t, w, i, "kind")?.ok_or(format!("key '{w}[{i}].kind' is missing"))?;
        match kind {
            "invariants" => check_keys(t, w, i, &["kind"])?,
            "result" => {
                check_keys(t, w, i, &["kind", "step", "result", "message"])?;
                let step = str_key(t, w, i, "step")?.ok_or(format!("key '{w}[{i}].step' is missing"))?;
                let result = str_key(t, w, i, "result")?.ok_or(format!("key '{w}[{i}].result' is missing"))?;
                if result != "ok" && result != "refused" && ballot::ErrorKind::from_errno_name(result).is_none() {
                    return Err(format!("key '{w}[{i}].result': '{result}' is not \"ok\", \"refused\" or an errno name such as \"EIO\""));
                }
                out.push(Expect::Result {
                    step: step.into(),
                    result: result.into(),
                    message: str_key(t, w, i, "message")?.map(String::from),
                });
            }
            "event" => out.push(expect_event(t, i)?),
            "replication" => out.push(expect_replication(t, i)?),
            "contents" if matches!(str_key(t, w, i, "view")?, Some("colo-s" | "colo-p")) => out.push(expect_colo_contents(t, i)?),
            "contents" => out.push(expect_contents(t, i)?),
            "warning" | "fatal" => {
                check_keys(t, w, i, &["kind", "count"])?;
                out.push(Expect::Log {
                    fatal: kind == "fatal",
                    count: u64_key(t, w, i, "count")?.ok_or(format!("key '{w}[{i}].count' is missing"))?,
                });
            }
            "injected" => {
                check_keys(t, w, i, &["kind", "fault", "min"])?;
                let fault = str_key(t, w, i, "fault")?.ok_or(format!("key '{w}[{i}].fault' is missing"))?;
                let fault = fault
                    .parse()
                    .map_err(|e| format!("key '{w}[{i}].fault': {e}"))?;
                out.push(Expect::Injected {
                    fault,
                    min: u64_key(t, w, i, "min")?.unwrap_or(1),
                });
            }
            "path" => {
                check_keys(t, w, i, &["kind", "path", "min"])?;
                let path = str_key(t, w, i, "path")?.ok_or(format!("key '{w}[{i}].path' is missing"))?;
                let path = path
                    .parse()
                    .map_err(|e| format!("key '{w}[{i}].path': {e}"))?;
                out.push(Expect::Path {
                    path,
                    min: u64_key(t, w, i, "min")?.unwrap_or(1),
                });
            }
            other => {
                return Err(format!(
                    "key '{w}[{i}].kind': '{other}' is not invariants, result, event, contents, replication, warning, fatal, injected or path"
                ))
            }
        }
    }
    Ok(out)
}

/// An `expect` of kind event (C5).
fn expect_event(t: &toml::Table, i: usize) -> Result<Expect, String> {
    let w = "expect";
    check_keys(
        t,
        w,
        i,
        &[
            "kind", "event", "node", "type", "error", "count", "min", "max", "stream",
        ],
    )?;
    let event = str_key(t, w, i, "event")?.ok_or(format!("key '{w}[{i}].event' is missing"))?;
    const EVENTS: [&str; 4] = [
        "QUORUM_REPORT_BAD",
        "QUORUM_FAILURE",
        "BLOCK_JOB_COMPLETED",
        "JOB_STATUS_CHANGE",
    ];
    if !EVENTS.contains(&event) {
        return Err(format!(
            "key '{w}[{i}].event': '{event}' is not one of {}",
            EVENTS.join(", ")
        ));
    }
    let nodes = match t.get("node") {
        None => vec![],
        Some(Tv::String(s)) => vec![s.clone()],
        Some(Tv::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or(format!("key '{w}[{i}].node': expected strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "key '{w}[{i}].node': expected a string or a list, got {other}"
            ))
        }
    };
    for n in &nodes {
        parse_target(n, &format!("{w}[{i}].node"))?;
    }
    let io = str_key(t, w, i, "type")?.map(String::from);
    if let Some(x) = &io {
        if !["read", "write", "flush"].contains(&x.as_str()) {
            return Err(format!(
                "key '{w}[{i}].type': '{x}' is not read, write or flush"
            ));
        }
    }
    let error = match t.get("error") {
        None => None,
        Some(Tv::Boolean(b)) => Some(*b),
        Some(other) => {
            return Err(format!(
                "key '{w}[{i}].error': expected true or false, got {other}"
            ))
        }
    };
    let qmp = match str_key(t, w, i, "stream")? {
        None | Some("internal") => false,
        Some("qmp") => true,
        Some(s) => {
            return Err(format!(
                "key '{w}[{i}].stream': '{s}' is not internal or qmp"
            ))
        }
    };
    let (count, min, max) = (
        u64_key(t, w, i, "count")?,
        u64_key(t, w, i, "min")?,
        u64_key(t, w, i, "max")?,
    );
    if count.is_none() && min.is_none() && max.is_none() {
        return Err(format!("key '{w}[{i}]': give count, or min and/or max"));
    }
    Ok(Expect::Event {
        event: event.into(),
        nodes,
        io,
        error,
        count,
        min,
        max,
        qmp,
    })
}

/// An `expect` of kind replication (C5).
fn expect_replication(t: &toml::Table, i: usize) -> Result<Expect, String> {
    let w = "expect";
    check_keys(t, w, i, &["kind", "node", "error", "stage"])?;
    let node = str_key(t, w, i, "node")?.ok_or(format!("key '{w}[{i}].node' is missing"))?;
    if node != "colo-p" && node != "colo-s" {
        return Err(format!(
            "key '{w}[{i}].node': '{node}' is not colo-p or colo-s"
        ));
    }
    let error = match t.get("error") {
        Some(Tv::Boolean(b)) => *b,
        None => false,
        Some(other) => {
            return Err(format!(
                "key '{w}[{i}].error': expected true or false, got {other}"
            ))
        }
    };
    let stage = str_key(t, w, i, "stage")?;
    if let Some(st) = stage {
        if !["none", "running", "failover", "failover-failed", "done"].contains(&st) {
            return Err(format!("key '{w}[{i}].stage': '{st}' is not none, running, failover, failover-failed or done"));
        }
    }
    Ok(Expect::Replication {
        node: node.into(),
        error,
        stage: stage.map(String::from),
    })
}

/// An `expect` of kind colo contents (C5).
fn expect_colo_contents(t: &toml::Table, i: usize) -> Result<Expect, String> {
    let w = "expect";
    check_keys(t, w, i, &["kind", "view", "range", "equals"])?;
    let node = str_key(t, w, i, "view")?.unwrap_or_default();
    let range =
        parse_range(str_key(t, w, i, "range")?.ok_or(format!("key '{w}[{i}].range' is missing"))?)
            .map_err(|e| format!("key '{w}[{i}].range': {e}"))?;
    let equals = str_key(t, w, i, "equals")?.ok_or(format!("key '{w}[{i}].equals' is missing"))?;
    let ok = equals == "primary"
        || equals
            .strip_prefix("checkpoint:")
            .and_then(|x| x.strip_suffix("+svm"))
            .is_some_and(|k| k == "last" || k.parse::<u64>().is_ok());
    if !ok {
        return Err(format!("key '{w}[{i}].equals': '{equals}' is not \"checkpoint:K+svm\", \"checkpoint:last+svm\" or \"primary\""));
    }
    Ok(Expect::ColoContents {
        node: node.into(),
        range,
        equals: equals.into(),
    })
}

/// An `expect` of kind contents (C5).
fn expect_contents(t: &toml::Table, i: usize) -> Result<Expect, String> {
    let w = "expect";
    check_keys(t, w, i, &["kind", "child", "view", "range", "equals"])?;
    let child = match (str_key(t, w, i, "child")?, str_key(t, w, i, "view")?) {
        (Some(c), None) => Some(
            parse_target(c, &format!("{w}[{i}].child"))?
                .ok_or(format!("key '{w}[{i}].child': expected a child"))?,
        ),
        (None, Some("guest")) => None,
        (None, Some(v)) => return Err(format!("key '{w}[{i}].view': '{v}' is not \"guest\"")),
        _ => return Err(format!("key '{w}[{i}]': give one of child or view")),
    };
    let range =
        parse_range(str_key(t, w, i, "range")?.ok_or(format!("key '{w}[{i}].range' is missing"))?)
            .map_err(|e| format!("key '{w}[{i}].range': {e}"))?;
    let equals = str_key(t, w, i, "equals")?.ok_or(format!("key '{w}[{i}].equals' is missing"))?;
    Ok(Expect::Contents {
        child,
        range,
        equals: equals.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c2_bad_scenarios_name_the_key() {
        let cases: [(&str, &str); 17] = [
            ("name = \"x\"\nbogus = 1\n", "unknown key 'bogus'"),
            ("name = \"x\"\ntopology = { children = \"3\" }\n", "key 'topology.children': expected an integer, got string"),
            ("name = \"x\"\ntopology = { children = 9 }\n", "key 'topology.children': 9 is out of range 1..=7"),
            ("name = \"x\"\ntopology = { chidren = 3 }\n", "unknown key 'topology.chidren'"),
            ("name = \"y\"\n", "key 'name': 'y' must equal the file stem 'x'"),
            (
                "name = \"x\"\nworkload.step = [ { id = \"a\", op = \"wrtie\", range = \"0..4k\" } ]\n",
                "key 'workload.step[0].op': 'wrtie' is not one of read, write, write_zeroes, trim, flush, block_status, hot_remove",
            ),
            (
                "name = \"x\"\nfault = [ { id = \"F5\", target = \"c9\" } ]\n",
                "key 'fault[0].target': 'c9' names no node (c0..c6, r0..r6 or qhost)",
            ),
            (
                "name = \"x\"\nexpect = [ { kind = \"result\", step = \"nope\", result = \"ok\" } ]\n",
                "key 'expect': step 'nope' is not a workload.step id",
            ),
            // Found by the scenario_file fuzz target: references past the derived topology.
            (
                "name = \"x\"\ntopology = { children = 2 }\nfault = [ { id = \"F5\", target = \"c2\" } ]\n",
                "key 'fault[0].target': child 2 does not exist (the topology has 2 children)",
            ),
            (
                "name = \"x\"\ntopology = { disk_size = \"1M\" }\nworkload = { step = [ { id = \"w\", op = \"write\", range = \"1020k..1028k\" } ] }\n",
                "key 'workload.step[0].range': range 1044480..1052672 ends past the disk (1048576 bytes)",
            ),
            (
                "name = \"x\"\ntopology = { children = 3 }\nexpect = [ { kind = \"contents\", child = \"c3\", range = \"0..4k\", equals = \"initial\" } ]\n",
                "key 'expect[0].child': child 3 does not exist (the topology has 3 children)",
            ),
            // Ids are parsed once, here (issue 22): a typo is an error naming the key.
            (
                "name = \"x\"\nfault = [ { id = \"F1O\", target = \"c0\" } ]\n",
                "key 'fault[0].id': unknown fault family 'F1O' (known: F1-F30)",
            ),
            (
                "name = \"x\"\nexpect = [ { kind = \"injected\", fault = \"f4\" } ]\n",
                "key 'expect[0].fault': unknown fault family 'f4' (known: F1-F30)",
            ),
            (
                "name = \"x\"\nexpect = [ { kind = \"path\", path = \"P22\" } ]\n",
                "key 'expect[0].path': unknown recovery path 'P22' (known: P1-P21, out-of-model, NBD-losses, NBD-reconnects, TLS-sessions)",
            ),
            // The image topology has no scripted steps or faults and checks only counts.
            (
                "name = \"x\"\ntopology = { image = true }\nworkload = { step = [ { id = \"w\", op = \"write\", range = \"0..4k\" } ] }\n",
                "key 'workload.step': the image topology runs no scripted steps",
            ),
            (
                "name = \"x\"\ntopology = { image = true }\nfault = [ { id = \"F5\", target = \"c0\" } ]\n",
                "key 'fault': the image topology runs no scripted faults",
            ),
            (
                "name = \"x\"\ntopology = { image = true }\nexpect = [ { kind = \"path\", path = \"P21\" }, { kind = \"warning\", count = 0 } ]\n",
                "key 'expect[1]': the image topology checks only 'injected' and 'path' expectations",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Scenario::parse(text, "x").unwrap_err(), want, "{text}");
        }
    }

    #[test]
    fn grid_points_are_cases_times_levels_with_the_points_pins_on_top() {
        let text = "name = \"x\"\nseed = 40\ntopology = { children = 3, disk_size = \"1M\" }\n\
                    [grid]\nruns = 2\n\
                    cases = [ { topology = { vote_threshold = 2 } }, { topology = { children = 5, vote_threshold = 3 } } ]\n\
                    levels = [ { faults = { rates = { F4 = 0.0 } } }, { faults = { rates = { F4 = 0.05 } }, budget = \"beyond\" } ]\n";
        let sc = Scenario::parse(text, "x").expect("parse");
        assert_eq!(sc.points(), 4);
        assert_eq!(sc.grid.as_ref().map(|g| g.runs), Some(2));
        let p = sc.at_point(3);
        assert_eq!(p.point_index, Some((1, 1)));
        assert!(p.grid.is_none());
        let d = Params::derive(40, &p.pins).expect("derive");
        assert_eq!((d.children, d.threshold), (5, 3));
        assert_eq!(d.budget, crate::vdisk::Budget::Beyond);
        assert_eq!(
            p.point_sets(),
            [
                "--set 'topology.children=5'",
                "--set 'topology.vote_threshold=3'",
                "--set 'budget=\"beyond\"'",
                "--set 'faults.rates.F4=0.05'",
            ]
        );
        let p0 = sc.at_point(0);
        assert_eq!(p0.point_index, Some((0, 0)));
        assert_eq!(Params::derive(40, &p0.pins).expect("derive").children, 3);
        // The same run again through the printed --set arguments.
        let mut again = sc.clone();
        for (k, v) in &p.point {
            again.set(&format!("{k}={v}")).expect("set");
        }
        assert_eq!(again.pins, p.pins);
        assert_eq!(Scenario::swarm().points(), 1);
    }

    #[test]
    fn bad_grids_name_the_key_and_the_point() {
        let cases: [(&str, &str); 6] = [
            ("[grid]\nruns = 0\n", "key 'grid.runs': 0 is not between 1 and 100"),
            ("[grid]\nrepeat = 2\n", "key 'grid': unknown key 'repeat' (known: runs, cases, levels)"),
            ("[grid]\ncases = []\n", "key 'grid.cases': empty"),
            (
                "[grid]\ncases = [ { seed = 3 } ]\n",
                "key 'grid.cases[1]': unknown key 'seed' (a grid point pins parameters: budget, topology, workload, faults, phases, disk, nbd_client, network, healing)",
            ),
            (
                "topology = { children = 2 }\n[grid]\nlevels = [ { topology = { vote_threshold = 2 } }, { topology = { vote_threshold = 3 } } ]\n",
                "key 'grid': case 1, level 2: key 'topology.vote_threshold': 3 is out of range 1..=2",
            ),
            (
                "[grid]\nlevels = [ { workload = { step = [] } } ]\n",
                "key 'grid.levels[1].workload.step': steps cannot vary across a grid",
            ),
        ];
        for (body, want) in cases {
            let text = format!("name = \"x\"\n{body}");
            assert_eq!(Scenario::parse(&text, "x").unwrap_err(), want, "{text}");
        }
    }

    #[test]
    fn s4_printed_parameters_parse_back_to_the_same_run() {
        for seed in [1u64, 2, 3, 99, 12345] {
            let p = Params::derive(seed, &BTreeMap::new()).expect("derive");
            let text = p.to_toml("x");
            let sc = Scenario::parse(&text, "x").expect("parse printed block");
            let q = Params::derive(seed, &sc.pins).expect("derive pinned");
            assert_eq!(p, q, "seed {seed}:\n{text}");
        }
    }

    #[test]
    fn s3_pinning_one_parameter_leaves_the_others() {
        let free = Params::derive(5, &BTreeMap::new()).expect("derive");
        let mut sc = Scenario::swarm();
        sc.set("topology.read_pattern=fifo").expect("set");
        let pinned = Params::derive(5, &sc.pins).expect("derive");
        assert!(pinned.fifo);
        assert_eq!(pinned.children, free.children);
        assert_eq!(pinned.ops, free.ops);
        assert_eq!(pinned.rates, free.rates);
    }

    #[test]
    fn every_committed_scenario_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("scenarios/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert_eq!(n, 66, "scenario files");
    }

    /// A scenario or grid point that configures a quorum runs one: before, a seed could draw
    /// the image topology (15%) under quorum pins, and the run then ignored the scenario's
    /// steps, faults and expectations and passed (three committed scenarios did).
    #[test]
    fn quorum_pins_never_derive_the_image_topology() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut quorum = 0;
        for e in std::fs::read_dir(&dir).expect("scenarios/") {
            let p = e.expect("entry").path();
            if p.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let sc = Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
            if !sc.pins.keys().any(|k| crate::params::quorum_only(k)) {
                continue;
            }
            quorum += 1;
            // The scenario's own seed and the next 50, as `sweep --only` would vary them.
            let base = sc.seed.unwrap_or(0);
            for seed in base..base + 51 {
                let d = Params::derive(seed, &sc.pins).expect("derives");
                assert!(
                    d.image.is_none(),
                    "{} seed {seed} derived an image run",
                    sc.name
                );
            }
        }
        assert_eq!(quorum, 52, "scenarios with quorum pins");
    }
}
