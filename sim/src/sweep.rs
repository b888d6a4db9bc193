//! Sweeps, determinism checks and shrinking (SIMULATION.md U2, U4, U8, M4, I13, I15).

use crate::ids::{Fault, Path as PathId, Rule, Violation};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value as Json};

use crate::console::{commit, header, load, parse, report};
use crate::outcome::{RunOpts, RunResult};
use crate::params::{all_families, Params};
use crate::runner::{capture_trace, run};
use crate::scenario::Scenario;
use crate::units::parse_time_ns;

/// One job of a sweep.
#[derive(Clone)]
struct Job {
    index: usize,
    scenario: Scenario,
    path: Option<String>,
    seed: u64,
}

fn scenarios_in(dir: &Path) -> Result<Vec<(String, Scenario)>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| Scenario::load(&p).map(|s| (p.display().to_string(), s)))
        .collect()
}

fn flag<'a>(c: &'a crate::console::Common, name: &str) -> Option<&'a str> {
    c.flags
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn num(c: &crate::console::Common, name: &str, default: u64) -> Result<u64, String> {
    match flag(c, name) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} '{v}' is not a number")),
        None => Ok(default),
    }
}

fn run_jobs(
    jobs: Vec<Job>,
    threads: usize,
    quiet: bool,
    budget_ns: Option<u64>,
    until_fail: bool,
) -> Vec<(Job, Params, RunResult)> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jobs_total = jobs.len();
    let queue = Arc::new(Mutex::new(jobs.into_iter().rev().collect::<Vec<_>>()));
    let out: Arc<Mutex<Vec<(Job, Params, RunResult)>>> = Arc::default();
    let progress = Arc::new(Mutex::new(crate::progress::Progress::new(jobs_total)));
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let queue = queue.clone();
        let out = out.clone();
        let stop = stop.clone();
        let progress = progress.clone();
        // Harness threads, outside any simulation: one madsim runtime per run.
        handles.push(std::thread::spawn(move || loop {
            if budget_ns.is_some_and(|b| started.elapsed().as_nanos() as u64 >= b)
                || stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                return;
            }
            let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(job) = job else { return };
            let p = match Params::derive(job.seed, &job.scenario.pins) {
                Ok(p) => p,
                Err(e) => {
                    let r = RunResult {
                        violation: Some(Violation::new(Rule::Harness, e)),
                        ..RunResult::default()
                    };
                    out.lock().unwrap_or_else(|p| p.into_inner()).push((
                        job,
                        Params::derive(0, &Default::default()).expect("defaults"),
                        r,
                    ));
                    continue;
                }
            };
            let r = run(p.clone(), &job.scenario, &RunOpts::default());
            if !quiet {
                let verdict = match &r.violation {
                    None => "ok".to_string(),
                    Some(v) => format!("FAIL {} {}", v.rule, v.message),
                };
                // The progress line (a terminal only) is cleared, the run's line printed
                // where it was, and the progress line drawn again below it.
                let mut pr = progress.lock().unwrap_or_else(|p| p.into_inner());
                pr.clear();
                println!(
                    "[{:>4}] {:<40} seed={:<20} ops={:<5} wall={:.2}s {}",
                    job.index, job.scenario.name, job.seed, r.ops, r.wall_s, verdict
                );
                pr.record(r.ops, r.violation.is_some());
                pr.draw();
            }
            if until_fail && r.violation.is_some() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            out.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((job, p, r));
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    progress.lock().unwrap_or_else(|p| p.into_inner()).end();
    let mut v = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    v.sort_by_key(|(j, _, _)| j.index);
    v
}

/// `cargo sim sweep` (U2, U8).
pub fn cmd_sweep(args: &[String]) -> Result<i32, String> {
    let mut args: Vec<String> = args.to_vec();
    let until_fail = args.iter().any(|a| a == "--until-fail");
    args.retain(|a| a != "--until-fail");
    let c = parse(
        &args,
        &[
            "--seeds",
            "--seed-from",
            "--jobs",
            "--shard",
            "--time-budget",
            "--report",
            "--scenarios",
            "--only",
            "--junit",
        ],
    )?;
    if c.scenario.is_some() || c.seed.is_some() || !c.sets.is_empty() {
        return Err("sweep takes no scenario, --seed or --set (use run)".into());
    }
    let only = flag(&c, "--only").map(String::from);
    let seeds = num(&c, "--seeds", 200)?;
    let from = num(&c, "--seed-from", 1)?;
    let jobs_n = num(&c, "--jobs", 2)? as usize;
    let (shard_i, shard_n) = flag(&c, "--shard").map_or(Ok((1, 1)), parse_shard)?;
    let budget = flag(&c, "--time-budget").map(parse_time_ns).transpose()?;
    let dir = PathBuf::from(flag(&c, "--report").unwrap_or("reports/sweep"));
    let sdir = PathBuf::from(flag(&c, "--scenarios").unwrap_or("scenarios"));
    let mut scenarios = scenarios_in(&sdir)?;
    if let Some(name) = &only {
        scenarios.retain(|(_, s)| &s.name == name);
        if scenarios.is_empty() {
            return Err(format!(
                "--only '{name}': no such scenario in {}",
                sdir.display()
            ));
        }
    }
    let mut jobs = sweep_jobs(&scenarios, seeds, from);
    jobs.retain(|j| (j.index as u64) % shard_n == shard_i - 1);
    println!(
        "ballot-sim {} commit={} sweep: {} scenario(s) + {} random seed(s) from {} = {} run(s) in this shard {}/{} with {} job(s)",
        env!("CARGO_PKG_VERSION"),
        commit(),
        scenarios.len(),
        seeds,
        from,
        jobs.len(),
        shard_i,
        shard_n,
        jobs_n
    );
    let wall = std::time::Instant::now();
    let results = run_jobs(jobs, jobs_n, false, budget, until_fail);
    let wall_s = wall.elapsed().as_secs_f64();
    let summary = summarize(&results, &args, wall_s, jobs_n);
    write_outputs(&summary, &results, &dir, flag(&c, "--junit"), wall_s)?;
    let md_path = dir.join("summary.md");
    // Failures: print each in full (U7).
    let mut worst = 0;
    for (job, p, r) in &results {
        if r.violation.is_some() {
            println!();
            let code = report(p, &job.scenario, job.path.as_deref(), r);
            worst = more_severe(worst, code);
        }
    }
    let gaps: Vec<String> = summary["coverage"]["gaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if worst == 0 && !gaps.is_empty() && shard_n == 1 && budget.is_none() && only.is_none() {
        println!("coverage gap (I15): {}", gaps.join(", "));
        worst = 4;
    }
    println!(
        "sweep: {} run(s), {} operation(s), {} violation(s), {:.1}s wall, {:.0} guest ops/s, {:.0} child ops/s; report {}",
        summary["seeds"],
        summary["operations"],
        summary["violations"],
        wall_s,
        summary["guest_ops_per_wall_s"].as_f64().unwrap_or(0.0),
        summary["child_ops_per_wall_s"].as_f64().unwrap_or(0.0),
        md_path.display()
    );
    Ok(worst)
}

/// `--shard i/n`, checked.
fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--shard '{s}': expected i/n");
    let (a, b) = s.split_once('/').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || a > b {
        return Err(format!("--shard '{s}': need 1 <= i <= n"));
    }
    Ok((a, b))
}

/// The runs of the unsharded sweep, in order (U2): every scenario (a grid scenario at every
/// point, `runs` seeds each, the same seeds everywhere), then `seeds` swarm seeds from `from`.
fn sweep_jobs(scenarios: &[(String, Scenario)], seeds: u64, from: u64) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (path, sc) in scenarios {
        let runs = sc.grid.as_ref().map_or(1, |g| g.runs);
        let base = sc.seed.unwrap_or(jobs.len() as u64);
        for k in 0..sc.points() {
            for r in 0..runs {
                jobs.push(Job {
                    index: jobs.len(),
                    scenario: sc.at_point(k),
                    path: Some(path.clone()),
                    seed: base.wrapping_add(r),
                });
            }
        }
    }
    for k in 0..seeds {
        jobs.push(Job {
            index: jobs.len(),
            scenario: Scenario::swarm(),
            path: None,
            seed: from + k,
        });
    }
    jobs
}

/// The summary's JSON, Markdown and plots in `dir` (U8, exactly as `report` writes the last
/// two), and with `--junit` the JUnit report (U10).
fn write_outputs(
    summary: &Json,
    results: &[(Job, Params, RunResult)],
    dir: &Path,
    junit: Option<&str>,
    wall_s: f64,
) -> Result<(), String> {
    crate::report::write_json(summary, dir)?;
    crate::report::write(summary, dir)?;
    if let Some(path) = junit {
        let cases: Vec<crate::junit::Case> = results
            .iter()
            .map(|(job, p, r)| crate::junit::Case {
                scenario: job.scenario.name.clone(),
                seed: p.seed,
                wall_s: r.wall_s,
                violation: r.violation.clone(),
                reproduce: crate::console::reproduce(p.seed, job.path.as_deref(), &job.scenario),
            })
            .collect();
        let xml = crate::junit::render("ballot-sim sweep", &cases, wall_s);
        std::fs::write(path, xml).map_err(|e| format!("--junit {path}: {e}"))?;
    }
    Ok(())
}

/// Exit-code severity: 3, then 1, then 2, then 4 (§10).
fn more_severe(a: i32, b: i32) -> i32 {
    let rank = |c: i32| match c {
        3 => 5,
        70 => 4,
        1 => 3,
        2 => 2,
        4 => 1,
        _ => 0,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// The latency table a run's ops go into.
fn topology_class(p: &Params) -> &'static str {
    use crate::report::{TOPOLOGY_COLO, TOPOLOGY_LOCAL, TOPOLOGY_NBD};
    if p.colo.is_some() {
        TOPOLOGY_COLO
    } else if p.nbd.is_some() {
        TOPOLOGY_NBD
    } else {
        TOPOLOGY_LOCAL
    }
}

/// Adds one run's counters to the sweep's.
fn add<K: Ord + Clone>(m: &mut BTreeMap<K, u64>, src: &BTreeMap<K, u64>) {
    for (k, v) in src {
        *m.entry(k.clone()).or_default() += v;
    }
}

fn summarize(
    results: &[(Job, Params, RunResult)],
    args: &[String],
    wall_s: f64,
    jobs: usize,
) -> Json {
    let mut injected: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut skipped: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut paths: BTreeMap<PathId, u64> = BTreeMap::new();
    let mut checks: BTreeMap<Rule, u64> = BTreeMap::new();
    let (mut ops, mut child_ops, mut viol, mut crashes, mut serr) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut ratios: Vec<f64> = Vec::new();
    let mut runs = Vec::new();
    let mut violations_by_rule: BTreeMap<Rule, u64> = BTreeMap::new();
    let mut by_scenario: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut fault_outcomes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut latency: BTreeMap<&'static str, BTreeMap<String, BTreeMap<u32, u64>>> = BTreeMap::new();
    for (job, p, r) in results {
        add(&mut injected, &r.injected);
        add(&mut skipped, &r.skipped);
        add(&mut outcomes, &r.outcomes);
        add(&mut paths, &r.paths);
        add(&mut checks, &r.checks);
        for (fam, by) in &r.fault_outcomes {
            add(fault_outcomes.entry(fam.clone()).or_default(), by);
        }
        let class = topology_class(p);
        for (kind, h) in &r.latency {
            let acc = latency
                .entry(class)
                .or_default()
                .entry(kind.clone())
                .or_default();
            for (b, n) in h {
                *acc.entry(*b).or_default() += n;
            }
        }
        ops += r.ops;
        child_ops += r.child_ops;
        crashes += r.crashes;
        serr += r.safety_errors;
        if r.wall_s > 0.0 {
            ratios.push(r.virtual_s / r.wall_s);
        }
        let e = by_scenario
            .entry(if job.path.is_some() {
                job.scenario.name.clone()
            } else {
                "swarm".into()
            })
            .or_default();
        e.0 += 1;
        if let Some(v) = &r.violation {
            viol += 1;
            e.1 += 1;
            *violations_by_rule.entry(v.rule).or_default() += 1;
        }
        runs.push(run_json(job, p, r));
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    let median_ratio = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    let mut families = all_families();
    families.extend(crate::params::COLO_FAMILIES);
    let fam_gaps: Vec<String> = families
        .iter()
        .filter(|f| injected.get(*f).copied().unwrap_or(0) == 0)
        .map(|f| f.to_string())
        .collect();
    let path_gaps: Vec<String> = PathId::RECOVERY
        .iter()
        .filter(|p| paths.get(*p).copied().unwrap_or(0) == 0)
        .map(|p| p.to_string())
        .collect();
    let gaps: Vec<String> = fam_gaps.iter().chain(path_gaps.iter()).cloned().collect();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    json!({
        "seeds": results.len(),
        "operations": ops,
        "violations": viol,
        "schema_version": 2,
        "commit": commit(),
        "arguments": args,
        "host_cores": cores,
        "jobs": jobs,
        "wall_s": wall_s,
        "child_operations": child_ops,
        "guest_ops_per_wall_s": if wall_s > 0.0 { ops as f64 / wall_s } else { 0.0 },
        "child_ops_per_wall_s": if wall_s > 0.0 { child_ops as f64 / wall_s } else { 0.0 },
        "seeds_per_minute": if wall_s > 0.0 { results.len() as f64 * 60.0 / wall_s } else { 0.0 },
        "median_virtual_to_wall": median_ratio,
        "crashes": crashes,
        "safety_phase_errors": serr,
        "faults_injected": injected,
        "faults_skipped_by_budget": skipped,
        "outcomes": outcomes,
        "recovery_paths": paths,
        "invariant_checks": checks,
        "violations_by_rule": violations_by_rule,
        "fault_outcomes": fault_outcomes,
        "latency_buckets_per_doubling": crate::measure::BUCKETS_PER_DOUBLING,
        "latency_ns": latency,
        "by_scenario": by_scenario.iter().map(|(k, (n, f))| (k.clone(), json!({"runs": n, "failures": f}))).collect::<serde_json::Map<String, Json>>(),
        "coverage": {
            "families": families, "paths": PathId::RECOVERY, "gaps": gaps,
        },
        "runs": runs,
    })
}

/// One run of a sweep as its summary lists it.
fn run_json(job: &Job, p: &Params, r: &RunResult) -> Json {
    json!({
        // The run's place in the unsharded sweep: `report` puts shards' runs back in order.
        "index": job.index,
        "seed": job.seed,
        "scenario": job.scenario.name,
        "parameters": {
            "topology": if p.colo.is_some() { "colo" } else if p.image.is_some() { "image" } else { "quorum" },
            "transport": if p.nbd.is_some() { "nbd" } else { "local" },
            "children": p.children, "vote_threshold": p.threshold,
            "read_pattern": if p.fifo { "fifo" } else { "quorum" },
            "rewrite_corrupted": p.rewrite, "budget": p.budget.as_str(),
            "disk_size": p.disk_size, "ops": p.ops, "queue_depth": p.queue_depth,
            "families": p.families, "config": p.config_id(),
            "child_image": p.child_image.is_some(),
        },
        "outcome": if r.violation.is_some() { "fail" } else { "pass" },
        "violated_rule": r.violation.as_ref().map(|v| v.rule),
        "message": r.violation.as_ref().map(|v| v.message.clone()),
        "ops": r.ops, "child_ops": r.child_ops,
        "virtual_s": r.virtual_s, "wall_s": r.wall_s,
        "trace_hash": r.trace_hash,
        "faults": r.injected, "skipped": r.skipped, "paths": r.paths,
        "outcomes": r.outcomes,
        "grid": job.scenario.point_index.map(|(case, level)| json!({
            "case": case + 1, "level": level + 1,
            "pins": job.scenario.point.iter().map(|(k, v)| (k.clone(), v.to_string())).collect::<BTreeMap<String, String>>(),
        })),
        "crashes": r.crashes, "safety_errors": r.safety_errors,
    })
}

/// `cargo sim check-determinism` (M4, I13): each seed twice in this process and twice in
/// separate processes; the four trace hashes and parameter blocks must match.
pub fn cmd_determinism(args: &[String]) -> Result<i32, String> {
    let c = parse(args, &["--seeds", "--scenarios", "--hash-only"])?;
    if let Some(seed) = flag(&c, "--hash-only") {
        // Child-process mode: print the parameter block's id and the trace hash.
        let seed: u64 = seed
            .parse()
            .map_err(|_| "--hash-only needs a seed".to_string())?;
        let sc = load(c.scenario.as_deref(), &[])?;
        let p = Params::derive(seed, &sc.pins)?;
        let r = run(p.clone(), &sc, &RunOpts::default());
        println!("{} {}", p.config_id(), r.trace_hash);
        return Ok(0);
    }
    let n = num(&c, "--seeds", 20)? as usize;
    let sdir = PathBuf::from(flag(&c, "--scenarios").unwrap_or("scenarios"));
    let scenarios = scenarios_in(&sdir)?;
    let mut picks: Vec<(Option<String>, Scenario, u64)> = Vec::new();
    // Scenarios spread over the whole list (every topology: quorum, COLO, NBD), not the first
    // ones alphabetically.
    let step = (scenarios.len() / (n / 2).max(1)).max(1);
    for (path, sc) in scenarios.iter().step_by(step).take(n / 2) {
        picks.push((Some(path.clone()), sc.clone(), sc.seed.unwrap_or(1)));
    }
    let mut k = 0u64;
    while picks.len() < n {
        k += 1;
        picks.push((None, Scenario::swarm(), 1_000_000 + k * 7919));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut bad = 0;
    for (path, sc, seed) in &picks {
        let p = Params::derive(*seed, &sc.pins)?;
        let a = run(p.clone(), sc, &RunOpts::default());
        let b = run(p.clone(), sc, &RunOpts::default());
        let mut hashes = vec![
            (p.config_id(), a.trace_hash.clone()),
            (p.config_id(), b.trace_hash.clone()),
        ];
        for _ in 0..2 {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["check-determinism", "--hash-only", &seed.to_string()]);
            if let Some(pth) = path {
                cmd.arg(pth);
            }
            let out = cmd
                .output()
                .map_err(|e| format!("{}: {e}", exe.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().last().unwrap_or("").to_string();
            let (cfg, h) = line.split_once(' ').unwrap_or(("?", "?"));
            hashes.push((cfg.to_string(), h.to_string()));
        }
        let same = hashes.iter().all(|h| *h == hashes[0]);
        println!(
            "{} {:<40} seed={:<10} {}",
            if same { "same" } else { "DIFF" },
            sc.name,
            seed,
            hashes
                .iter()
                .map(|(c, h)| format!("{c}/{}", &h[..12.min(h.len())]))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if !same {
            bad += 1;
            // Keep both traces and show the first differing record.
            let ta = capture_trace(p.clone(), sc);
            let tb = capture_trace(p.clone(), sc);
            let _ = std::fs::create_dir_all("reports/traces");
            let fa = format!("reports/traces/{}-{seed}.a.log", sc.name);
            let fb = format!("reports/traces/{}-{seed}.b.log", sc.name);
            let _ = std::fs::write(&fa, &ta);
            let _ = std::fs::write(&fb, &tb);
            if let Some((i, (x, y))) = ta
                .lines()
                .zip(tb.lines())
                .enumerate()
                .find(|(_, (x, y))| x != y)
            {
                println!("first difference at record {i}:\n  a: {x}\n  b: {y}");
            }
            println!("traces: {fa} {fb}");
        }
    }
    println!(
        "determinism: {} seed(s), {} nondeterministic",
        picks.len(),
        bad
    );
    Ok(if bad > 0 { 3 } else { 0 })
}

/// `cargo sim shrink` (U4): minimises a failing run's parameters, keeping the violated rule.
pub fn cmd_shrink(args: &[String]) -> Result<i32, String> {
    let c = parse(args, &["--max-runs", "--out"])?;
    let seed = c.seed.ok_or("shrink needs --seed N")?;
    let sc = load(c.scenario.as_deref(), &c.sets)?;
    let max_runs = num(&c, "--max-runs", 200)?;
    let p0 = Params::derive(seed, &sc.pins)?;
    println!("{}", header(&p0, &sc));
    let r0 = run(p0.clone(), &sc, &RunOpts::default());
    let Some(Violation { rule, .. }) = r0.violation else {
        println!("seed {seed} passes; nothing to shrink");
        return Ok(0);
    };
    println!("shrinking a failure of {rule}");
    // Work on the full printed parameter block as pins, then try smaller values one at a time.
    let mut best =
        Scenario::parse(&p0.to_toml(&sc.name), &sc.name).map_err(|e| format!("internal: {e}"))?;
    best.steps = sc.steps.clone();
    best.faults = sc.faults.clone();
    best.expects = sc.expects.clone();
    let mut runs = 1u64;
    let mut improved = true;
    while improved && runs < max_runs {
        improved = false;
        let p = Params::derive(seed, &best.pins)?;
        let mut candidates: Vec<(String, toml::Value)> = Vec::new();
        let int = |x: u64| toml::Value::Integer(x as i64);
        if p.ops > 1 {
            candidates.push(("workload.ops".into(), int(p.ops / 2)));
            candidates.push(("workload.ops".into(), int(p.ops * 3 / 4)));
        }
        if p.queue_depth > 1 {
            candidates.push(("workload.queue_depth".into(), int(p.queue_depth as u64 / 2)));
        }
        if p.children > 1 && p.threshold < p.children {
            candidates.push(("topology.children".into(), int(p.children as u64 - 1)));
        }
        if p.size.1 > p.size.0 {
            let hi = (p.size.1 / 2).max(p.size.0) / 512 * 512;
            candidates.push((
                "workload.size".into(),
                toml::Value::String(format!("{}..{}", p.size.0, hi)),
            ));
        }
        for f in &p.families {
            let rest: Vec<toml::Value> = p
                .families
                .iter()
                .filter(|x| *x != f)
                .map(|x| toml::Value::String(x.to_string()))
                .collect();
            candidates.push(("faults.families".into(), toml::Value::Array(rest)));
        }
        for (k, v) in candidates {
            if runs >= max_runs {
                break;
            }
            let mut cand = best.clone();
            cand.pins.insert(k.clone(), v.clone());
            let Ok(pc) = Params::derive(seed, &cand.pins) else {
                continue;
            };
            runs += 1;
            let r = run(pc, &cand, &RunOpts::default());
            if r.violation.as_ref().map(|v| v.rule) == Some(rule) {
                println!("  {k} = {v}: still fails {rule} ({} ops)", r.ops);
                best = cand;
                improved = true;
                break;
            }
        }
    }
    let p = Params::derive(seed, &best.pins)?;
    let name = format!("shrunk-{}-{seed}", sc.name);
    let out = flag(&c, "--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("reports/{name}.toml")));
    let mut text =
        format!("# shrunk by `cargo sim shrink` from a failure of {rule} after {runs} run(s)\n");
    text += &p.to_toml(out.file_stem().and_then(|s| s.to_str()).unwrap_or(&name));
    if !sc.steps.is_empty() || !sc.faults.is_empty() || !sc.expects.is_empty() {
        text += "# the original scenario's steps, faults and expectations apply unchanged:\n";
        if let Some(path) = &c.scenario {
            let orig = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            let t: toml::Table = orig.parse().map_err(|e: toml::de::Error| e.to_string())?;
            let mut keep = toml::Table::new();
            for k in ["fault", "expect"] {
                if let Some(v) = t.get(k) {
                    keep.insert(k.into(), v.clone());
                }
            }
            if let Some(steps) = t.get("workload").and_then(|w| w.get("step")) {
                text = text.replacen(
                    "workload = { ",
                    &format!("workload = {{ step = {steps}, "),
                    1,
                );
            }
            text += &toml::to_string(&keep).map_err(|e| e.to_string())?;
        }
    }
    if let Some(d) = out.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    std::fs::write(&out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "wrote {} ({} run(s)); replay: cargo sim replay --seed {seed} {}",
        out.display(),
        runs,
        out.display()
    );
    Ok(1)
}
