//! `ballot-sim report SUMMARY.json... [--out DIR]` (SIMULATION.md U5, U8; issue 7): renders
//! one or more sweep summaries, shards merged, into `DIR/summary.md` and SVG plots beside it.
//! `sweep` writes the same files through [`write`].
//!
//! The plots: the outcomes of the guest ops each fault family touched (heat map); the fraction
//! of reads served against the fault rate for the most common (children, threshold, read
//! pattern) configurations; the virtual latency distribution of every op kind per topology;
//! runs by scenario and outcome; the fault × recovery-path coverage matrix; simulation speed.
//!
//! Pure code over JSON: it builds without madsim, so `cargo run -p ballot-sim -- report` works
//! in the plain build too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Value as Json};

use crate::units::thousands;

/// Summary schema versions this renderer reads (1 lacks latency and fault outcomes).
const SCHEMAS: [u64; 2] = [1, 2];

/// Configurations drawn in the served-vs-rate plot.
const SERVED_CONFIGS: usize = 6;

/// Runs with fewer reads than this are left out of the served-vs-rate plot (too few to give a
/// fraction).
const SERVED_MIN_READS: u64 = 20;

/// Families that only slow I/O down (F10 slow disk, F12 network latency): not counted in the
/// fault rate of the served-vs-rate plot.
const SLOW_ONLY: [&str; 2] = ["F10", "F12"];

const FONT: &str = "sans-serif";

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// `report` on the command line: `SUMMARY.json... [--out DIR]`.
pub fn cmd_report(args: &[String]) -> Result<i32, String> {
    let mut inputs = Vec::new();
    let mut out = PathBuf::from("reports");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--out" {
            out = PathBuf::from(it.next().ok_or("--out needs a directory")?);
        } else if let Some(d) = a.strip_prefix("--out=") {
            out = PathBuf::from(d);
        } else if a.starts_with('-') {
            return Err(format!("report: unknown option '{a}'"));
        } else {
            inputs.push(PathBuf::from(a));
        }
    }
    if inputs.is_empty() {
        return Err("report needs at least one SUMMARY.json".into());
    }
    let mut parts = Vec::new();
    for p in &inputs {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let j: Json =
            serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", p.display()))?;
        parts.push((p.display().to_string(), j));
    }
    let merged = merge(parts)?;
    // The merged summary as JSON too, so merges can be compared and merged again.
    println!("wrote {}", write_json(&merged, &out)?.display());
    let written = write(&merged, &out)?;
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(0)
}

/// Sums `x` into `acc`: numbers add, objects merge key by key.
fn add_json(acc: &mut Json, x: &Json) {
    match (acc, x) {
        (Json::Object(a), Json::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) => add_json(slot, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (acc @ Json::Number(_), Json::Number(b)) => {
            let sum = match (acc.as_u64(), b.as_u64()) {
                (Some(p), Some(q)) => json!(p + q),
                _ => json!(acc.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0)),
            };
            *acc = sum;
        }
        _ => {}
    }
}

/// Keys summed across shards.
const SUMMED: [&str; 17] = [
    "seeds",
    "operations",
    "violations",
    "child_operations",
    "crashes",
    "safety_phase_errors",
    "wall_s",
    "faults_injected",
    "faults_skipped_by_budget",
    "outcomes",
    "recovery_paths",
    "invariant_checks",
    "violations_by_rule",
    "by_scenario",
    "fault_outcomes",
    "latency_ns",
    "jobs",
];

/// Merges sweep summaries (shards of one sweep, or several sweeps): counters and tables add,
/// runs concatenate, rates are recomputed. Refuses an input that is not a sweep summary, by
/// name.
pub fn merge(parts: Vec<(String, Json)>) -> Result<Json, String> {
    let mut out: Option<Json> = None;
    let mut commits: Vec<String> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for (name, j) in parts {
        let v = j["schema_version"]
            .as_u64()
            .ok_or(format!("{name}: no schema_version: not a sweep summary"))?;
        if !SCHEMAS.contains(&v) {
            return Err(format!(
                "{name}: schema_version {v} is not one this report reads ({SCHEMAS:?})"
            ));
        }
        if !j["runs"].is_array() {
            return Err(format!("{name}: no runs array: not a sweep summary"));
        }
        let c = j["commit"].as_str().unwrap_or("?").to_string();
        if !commits.contains(&c) {
            commits.push(c);
        }
        let a = j["arguments"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        if !args.contains(&a) {
            args.push(a);
        }
        match &mut out {
            None => out = Some(j),
            Some(acc) => {
                for k in SUMMED {
                    if !j[k].is_null() {
                        if acc[k].is_null() {
                            acc[k] = j[k].clone();
                        } else {
                            add_json(&mut acc[k], &j[k]);
                        }
                    }
                }
                let runs = j["runs"].as_array().cloned().unwrap_or_default();
                if let Some(a) = acc["runs"].as_array_mut() {
                    a.extend(runs);
                }
                let cores = acc["host_cores"]
                    .as_u64()
                    .unwrap_or(0)
                    .max(j["host_cores"].as_u64().unwrap_or(0));
                acc["host_cores"] = json!(cores);
                acc["schema_version"] = json!(acc["schema_version"]
                    .as_u64()
                    .unwrap_or(1)
                    .min(j["schema_version"].as_u64().unwrap_or(1)));
            }
        }
    }
    let mut s = out.ok_or("report needs at least one summary")?;
    // Shards of one sweep: their runs back in the unsharded order (each run carries its
    // index in the sweep; summaries written before it did keep the order given).
    if let Some(runs) = s["runs"].as_array_mut() {
        if runs.iter().all(|r| r["index"].is_u64()) {
            runs.sort_by_key(|r| r["index"].as_u64());
        }
    }
    let shards = args.len().max(commits.len());
    s["commit"] = json!(commits.join(", "));
    s["merged_inputs"] = json!(shards);
    if args.len() > 1 {
        s["arguments"] = json!(args);
    }
    recompute(&mut s);
    Ok(s)
}

/// Rates and coverage gaps from the (merged) counters and runs.
fn recompute(s: &mut Json) {
    let wall = s["wall_s"].as_f64().unwrap_or(0.0);
    let per = |n: f64| if wall > 0.0 { n / wall } else { 0.0 };
    let ops = s["operations"].as_f64().unwrap_or(0.0);
    let child = s["child_operations"].as_f64().unwrap_or(0.0);
    let seeds = s["seeds"].as_f64().unwrap_or(0.0);
    s["guest_ops_per_wall_s"] = json!(per(ops));
    s["child_ops_per_wall_s"] = json!(per(child));
    s["seeds_per_minute"] = json!(per(seeds * 60.0));
    let mut ratios: Vec<f64> = runs(s)
        .iter()
        .filter_map(|r| {
            let w = r["wall_s"].as_f64()?;
            (w > 0.0).then(|| r["virtual_s"].as_f64().unwrap_or(0.0) / w)
        })
        .collect();
    ratios.sort_by(|a, b| a.total_cmp(b));
    if let Some(m) = ratios.get(ratios.len() / 2) {
        s["median_virtual_to_wall"] = json!(m);
    }
    let count = |key: &str, name: &str| s[key][name].as_u64().unwrap_or(0);
    let mut gaps = Vec::new();
    for key in ["families", "paths"] {
        let counter = if key == "families" {
            "faults_injected"
        } else {
            "recovery_paths"
        };
        for x in s["coverage"][key].as_array().cloned().unwrap_or_default() {
            if let Some(x) = x.as_str() {
                if count(counter, x) == 0 {
                    gaps.push(json!(x));
                }
            }
        }
    }
    if s["coverage"].is_object() {
        s["coverage"]["gaps"] = Json::Array(gaps);
    }
}

fn runs(s: &Json) -> &[Json] {
    s["runs"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// One plot: file name, Markdown heading and what it shows.
struct Plot {
    file: &'static str,
    title: &'static str,
    caption: String,
    svg: String,
}

/// Writes the summary itself, `DIR/summary.json` (U8); returns its path.
pub fn write_json(s: &Json, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(s).unwrap_or_default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Writes `dir/summary.md` and the plots; returns the paths written.
pub fn write(s: &Json, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let plots = plots(s)?;
    let mut written = Vec::new();
    for p in &plots {
        let path = dir.join(p.file);
        std::fs::write(&path, &p.svg).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    let md = dir.join("summary.md");
    std::fs::write(&md, markdown(s, &plots)).map_err(|e| format!("{}: {e}", md.display()))?;
    written.push(md);
    Ok(written)
}

fn plots(s: &Json) -> Result<Vec<Plot>, String> {
    let mut v = Vec::new();
    if let Some(p) = fault_outcome_plot(s)? {
        v.push(p);
    }
    if let Some(p) = served_plot(s)? {
        v.push(p);
    }
    if let Some(p) = latency_plot(s)? {
        v.push(p);
    }
    v.push(scenario_plot(s)?);
    if let Some(p) = coverage_plot(s)? {
        v.push(p);
    }
    v.push(speed_plot(s)?);
    Ok(v)
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("plot: {e:?}")
}

/// Orders family names numerically (`none` first, then F1, F2, ..., F10).
fn family_order(name: &str) -> (u32, String) {
    match name.strip_prefix('F').and_then(|n| n.parse::<u32>().ok()) {
        Some(n) => (n, String::new()),
        None if name == crate::measure::NO_FAULT => (0, String::new()),
        None => (u32::MAX, name.to_string()),
    }
}

/// Orders outcome labels: by op kind in the order guests issue them, `ok` first.
fn outcome_order(label: &str) -> (usize, bool, String) {
    const KINDS: [&str; 14] = [
        "read",
        "write",
        "write_zeroes",
        "trim",
        "flush",
        "block_status",
        "pvm/read",
        "pvm/write",
        "pvm/write_zeroes",
        "pvm/flush",
        "svm/read",
        "svm/write",
        "svm/write_zeroes",
        "svm/flush",
    ];
    let (kind, res) = label.rsplit_once('/').unwrap_or((label, ""));
    let k = KINDS.iter().position(|x| *x == kind).unwrap_or(KINDS.len());
    (k, res != "ok", label.to_string())
}

/// A heat map: rows × columns, each cell a fraction in [0, 1] with an optional label.
struct Heat<'a> {
    title: &'a str,
    x_desc: &'a str,
    rows: Vec<String>,
    cols: Vec<String>,
    /// (fraction, text) per row and column.
    cells: Vec<Vec<(f64, String)>>,
}

fn heat_color(f: f64) -> RGBColor {
    // White to dark blue.
    let f = f.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0))
}

/// Escapes text for SVG.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draws a heat map as plain SVG (row labels left, column labels slanted above the grid, the
/// cell text centred), which lays out long labels better than a chart's axis would.
fn draw_heat(h: &Heat) -> Result<String, String> {
    const CELL_W: f64 = 62.0;
    const CELL_H: f64 = 24.0;
    const CHAR_W: f64 = 6.6;
    let (nr, nc) = (h.rows.len(), h.cols.len());
    let label_w = CHAR_W * h.rows.iter().map(|r| r.len()).max().unwrap_or(4) as f64 + 16.0;
    // Column labels at -50 degrees: their height is about 0.77 of their length.
    let longest = h.cols.iter().map(|c| c.len()).max().unwrap_or(4) as f64;
    let head = 40.0 + 0.77 * CHAR_W * longest + 10.0;
    let w = label_w + CELL_W * nc as f64 + 0.64 * CHAR_W * longest + 20.0;
    let hgt = head + CELL_H * nr as f64 + 40.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{hgt:.0}" viewBox="0 0 {w:.0} {hgt:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="24" font-size="17" text-anchor="middle">{}</text>"#,
        w / 2.0,
        xml(h.title)
    );
    for (c, name) in h.cols.iter().enumerate() {
        let x = label_w + CELL_W * (c as f64 + 0.5);
        let _ = writeln!(
            o,
            r#"<text transform="translate({x:.1},{:.1}) rotate(-50)" font-size="11">{}</text>"#,
            head - 6.0,
            xml(name)
        );
    }
    for (r, name) in h.rows.iter().enumerate() {
        let y = head + CELL_H * r as f64;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end" dominant-baseline="central">{}</text>"#,
            label_w - 8.0,
            y + CELL_H / 2.0,
            xml(name)
        );
        for (c, (f, text)) in h.cells[r].iter().enumerate() {
            let x = label_w + CELL_W * c as f64;
            let RGBColor(red, green, blue) = heat_color(*f);
            let _ = writeln!(
                o,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{CELL_W}" height="{CELL_H}" fill="#{red:02x}{green:02x}{blue:02x}" stroke="#dddddd" stroke-width="0.5"/>"##
            );
            if !text.is_empty() {
                let color = if *f > 0.55 { "white" } else { "black" };
                let _ = writeln!(
                    o,
                    r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" dominant-baseline="central" fill="{color}">{}</text>"#,
                    x + CELL_W / 2.0,
                    y + CELL_H / 2.0,
                    xml(text)
                );
            }
        }
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
        label_w + CELL_W * nc as f64 / 2.0,
        head + CELL_H * nr as f64 + 24.0,
        xml(h.x_desc)
    );
    o += "</svg>\n";
    Ok(o)
}

/// The label of the row or column whose centre is at `v` (labels sit at half-integers).
fn center_label(v: f64, names: &[String]) -> String {
    let i = v - 0.5;
    if (i - i.round()).abs() < 1e-6 && i >= -1e-6 {
        names.get(i.round() as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

fn pct(f: f64) -> String {
    if f <= 0.0 {
        String::new()
    } else if f < 0.001 {
        "<0.1%".into()
    } else if f < 0.1 {
        format!("{:.1}%", f * 100.0)
    } else {
        format!("{:.0}%", f * 100.0)
    }
}

/// Outcomes of the guest ops each fault family touched (row-normalised).
fn fault_outcome_plot(s: &Json) -> Result<Option<Plot>, String> {
    let Some(fo) = s["fault_outcomes"].as_object().filter(|o| !o.is_empty()) else {
        return Ok(None);
    };
    let mut rows: Vec<String> = fo.keys().cloned().collect();
    rows.sort_by_key(|r| family_order(r));
    let mut cols: BTreeSet<String> = BTreeSet::new();
    for v in fo.values() {
        if let Some(o) = v.as_object() {
            cols.extend(o.keys().cloned());
        }
    }
    let mut cols: Vec<String> = cols.into_iter().collect();
    cols.sort_by_key(|c| outcome_order(c));
    let mut cells = Vec::new();
    let mut labels = Vec::new();
    for r in &rows {
        let total: u64 = fo[r]
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        labels.push(format!("{r} ({})", thousands(total)));
        cells.push(
            cols.iter()
                .map(|c| {
                    let n = fo[r][c].as_u64().unwrap_or(0);
                    let f = if total > 0 {
                        n as f64 / total as f64
                    } else {
                        0.0
                    };
                    (f, pct(f))
                })
                .collect(),
        );
    }
    let svg = draw_heat(&Heat {
        title: "Outcome of the guest ops each fault type touched",
        x_desc: "outcome (op kind / result)",
        rows: labels,
        cols,
        cells,
    })?;
    Ok(Some(Plot {
        file: "fault-outcomes.svg",
        title: "Fault type × outcome",
        caption: "Each row is a fault family and the guest ops it touched (count in brackets); \
                  each cell the share of those ops that ended with that outcome. Charged to a \
                  guest op: a fault injected into one of its child requests; a copy its reads \
                  meet that a fault damaged and nothing has rewritten since (sticky flips, rot \
                  and latent errors F1, F3, F4; stale, lost, torn, misdirected or emptied copies \
                  F5, F6, F8, F9, F14, F18; writes a crash cut off, F16); an answer from a \
                  replica that a partition, pause, crash or given-up connection has down (F13 to \
                  F17); a fault outside any op (a crash, a replica's disk behind NBD, COLO \
                  faults) when the op is in flight at that instant, or, for one that lasts (a \
                  stall F10, a partition, a pause), at any time while it lasts. `none`: ops no \
                  fault was charged to; the few errors left there follow effects the charging \
                  does not trace (a write a timeout lost, without a partition). A run with no \
                  fault at all fails no request (I16)."
            .into(),
        svg,
    }))
}

/// A run's fault rate (non-slow faults per 1000 child requests) and fraction of reads served.
fn served_point(r: &Json) -> Option<(f64, f64)> {
    let child = r["child_ops"].as_u64()?;
    if child == 0 {
        return None;
    }
    let faults: u64 = r["faults"]
        .as_object()?
        .iter()
        .filter(|(k, _)| !SLOW_ONLY.contains(&k.as_str()))
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    let o = r["outcomes"].as_object()?;
    let (mut ok, mut all) = (0u64, 0u64);
    for (k, v) in o {
        if let Some(res) = k.strip_prefix("read/") {
            let n = v.as_u64().unwrap_or(0);
            all += n;
            if res == "ok" {
                ok += n;
            }
        }
    }
    if all < SERVED_MIN_READS {
        return None;
    }
    Some((
        faults as f64 * 1000.0 / child as f64,
        ok as f64 / all as f64,
    ))
}

fn config_of(r: &Json) -> Option<String> {
    let p = &r["parameters"];
    if p["topology"].as_str() == Some("colo") {
        return None;
    }
    let n = p["children"].as_u64()?;
    Some(format!(
        "{n} {}, t={}, {}",
        if n == 1 { "child" } else { "children" },
        p["vote_threshold"].as_u64()?,
        p["read_pattern"].as_str()?
    ))
}

/// Median of each x-quantile bin of `pts` (sorted by x): the line through a scatter.
fn binned_medians(pts: &[(f64, f64)], bins: usize) -> Vec<(f64, f64)> {
    let mut v = pts.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let per = v.len().div_ceil(bins.max(1)).max(1);
    v.chunks(per)
        .map(|c| {
            let mut ys: Vec<f64> = c.iter().map(|p| p.1).collect();
            ys.sort_by(|a, b| a.total_cmp(b));
            let xs: f64 = c.iter().map(|p| p.0).sum::<f64>() / c.len() as f64;
            (xs, ys[ys.len() / 2])
        })
        .collect()
}

/// Per configuration, per grid level: the points of the runs of a designed experiment
/// (`[grid]` scenarios), in level order.
type GridSeries = Vec<(String, Vec<Vec<(f64, f64)>>)>;

/// (fault rate, fraction served) of each run, by grid level.
type ByLevel = BTreeMap<u64, Vec<(f64, f64)>>;

fn grid_series(rs: &[Json]) -> GridSeries {
    let mut by: BTreeMap<(usize, String), ByLevel> = BTreeMap::new();
    let scenarios: BTreeSet<&str> = rs
        .iter()
        .filter(|r| r["grid"].is_object())
        .filter_map(|r| r["scenario"].as_str())
        .collect();
    for r in rs.iter().filter(|r| r["grid"].is_object()) {
        let (Some(c), Some(pt)) = (config_of(r), served_point(r)) else {
            continue;
        };
        let case = r["grid"]["case"].as_u64().unwrap_or(0) as usize;
        let name = if scenarios.len() > 1 {
            format!("{}: {c}", r["scenario"].as_str().unwrap_or("?"))
        } else {
            c
        };
        let level = r["grid"]["level"].as_u64().unwrap_or(0);
        by.entry((case, name))
            .or_default()
            .entry(level)
            .or_default()
            .push(pt);
    }
    by.into_iter()
        .map(|((_, name), levels)| (name, levels.into_values().collect()))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Fraction of reads served against the fault rate, per configuration: the designed
/// experiment when the summary has one, else the random runs.
fn served_plot(s: &Json) -> Result<Option<Plot>, String> {
    let rs = runs(s);
    let grid = grid_series(rs);
    if !grid.is_empty() {
        return served_grid_plot(&grid).map(Some);
    }
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rs {
        if let (Some(c), Some(pt)) = (config_of(r), served_point(r)) {
            by.entry(c).or_default().push(pt);
        }
    }
    if by.is_empty() {
        return Ok(None);
    }
    let mut configs: Vec<(String, Vec<(f64, f64)>)> = by.into_iter().collect();
    configs.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    configs.truncate(SERVED_CONFIGS);
    let x_max = configs
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 1.05;
    let y_lo = served_floor(configs.iter().flat_map(|(_, v)| v.iter().map(|p| p.1)));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Reads served vs fault rate in the random runs, by configuration",
                (FONT, 18),
            )
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, y_lo..1.005f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("faults injected per 1000 child requests (F10 and F12 not counted)")
            .y_desc("fraction of guest reads that returned data")
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .draw()
            .map_err(err)?;
        for (i, (name, pts)) in configs.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new(*p, 3, color.mix(0.6).filled())),
                )
                .map_err(err)?
                .label(format!("{name} ({} runs)", pts.len()))
                .legend(move |(x, y)| Circle::new((x + 9, y), 3, color.filled()));
            if pts.len() >= 12 {
                let line = binned_medians(pts, 6);
                chart
                    .draw_series(LineSeries::new(line, color.stroke_width(2)))
                    .map_err(err)?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        root.present().map_err(err)?;
    }
    Ok(Some(Plot {
        file: "served-vs-fault-rate.svg",
        title: "Reads served vs fault rate",
        caption: format!(
            "One point per quorum run with at least {SERVED_MIN_READS} reads, for the \
             {SERVED_CONFIGS} configurations with the most runs; with 12 runs or more a line \
             joins the medians of six equal-count bins. The summary has no designed experiment \
             (`scenarios/served-vs-fault-rate.toml`), so this mixes every fault family and both \
             budgets."
        ),
        svg,
    }))
}

/// The bottom of the served axis: the lowest tenth at or below every value.
fn served_floor(ys: impl Iterator<Item = f64>) -> f64 {
    let y_min = ys.fold(1.0f64, f64::min);
    ((y_min * 10.0).floor() / 10.0).clamp(0.0, 0.9)
}

fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 12))
        .draw()
        .map_err(err)
}

/// The designed experiment: per configuration, the mean fraction served at each fault level
/// (bars: lowest and highest run), against the mean fault rate measured at that level.
fn served_grid_plot(grid: &GridSeries) -> Result<Plot, String> {
    // Log x: a level without faults sits on the left edge.
    let lo = 0.5f64;
    let hi = grid
        .iter()
        .flat_map(|(_, lv)| lv.iter().flat_map(|v| v.iter().map(|p| p.0)))
        .fold(10.0f64, f64::max);
    let hi = 10f64.powf(hi.log10().ceil());
    let y_lo = served_floor(
        grid.iter()
            .flat_map(|(_, lv)| lv.iter().flat_map(|v| v.iter().map(|p| p.1))),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 580)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Reads served vs fault rate, by (children, threshold, read pattern)",
                (FONT, 18),
            )
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((lo..hi).log_scale(), y_lo..1.005f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("faults injected per 1000 child requests (mean of the level's runs; log scale)")
            .y_desc("fraction of guest reads that returned data")
            .x_label_formatter(&|x| human(*x))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .draw()
            .map_err(err)?;
        for (i, (name, levels)) in grid.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64, f64, f64)> = levels
                .iter()
                .filter(|v| !v.is_empty())
                .map(|v| {
                    let xs: Vec<f64> = v.iter().map(|p| p.0).collect();
                    let ys: Vec<f64> = v.iter().map(|p| p.1).collect();
                    let lo_y = ys.iter().copied().fold(1.0f64, f64::min);
                    let hi_y = ys.iter().copied().fold(0.0f64, f64::max);
                    (mean(&xs).max(lo), mean(&ys), lo_y, hi_y)
                })
                .collect();
            let runs: usize = levels.iter().map(|v| v.len()).sum();
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("{name} ({runs} runs)"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
                )
                .map_err(err)?;
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color.mix(0.7))),
                )
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        root.present().map_err(err)?;
    }
    Ok(Plot {
        file: "served-vs-fault-rate.svg",
        title: "Reads served vs fault rate",
        caption: "The designed experiment `scenarios/served-vs-fault-rate.toml`: each \
                  configuration at every fault level (sticky and transient bit flips, latent \
                  sector errors and write errors at one per-request rate, beyond the safety \
                  budget), several seeds per level. Dot: the mean over the level's runs; bar: \
                  its lowest and highest run. Wrong data is never an option (the oracle fails \
                  the run, I7): what a configuration cannot outvote it must refuse with an \
                  error, so this is the price of its threshold. The fifo configuration gets no \
                  bit flips (B4: a read without a vote would serve them), only the errors. \
                  Without faults every configuration serves every read: overlapping requests \
                  are ordered (README D8), so a read never sees the children mid-write."
            .into(),
        svg,
    })
}

/// Latency histogram by kind: (bucket, count) sorted.
fn histogram(h: &Json) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = h
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn bucket_ns(s: &Json, b: u32) -> f64 {
    let per = s["latency_buckets_per_doubling"].as_u64().unwrap_or(4) as f64;
    2f64.powf(b as f64 / per)
}

/// The upper bucket bound below which fraction `q` of the histogram lies.
fn quantile(s: &Json, h: &[(u32, u64)], q: f64) -> f64 {
    let total: u64 = h.iter().map(|x| x.1).sum();
    let want = (q * total as f64).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (b, n) in h {
        acc += n;
        if acc >= want {
            return bucket_ns(s, *b);
        }
    }
    h.last().map(|x| bucket_ns(s, x.0)).unwrap_or(0.0)
}

fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.0} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// Topology keys of the summary's `latency_ns` (the sweep writes them, the report reads them).
pub const TOPOLOGY_LOCAL: &str = "quorum-local";
/// See [`TOPOLOGY_LOCAL`].
pub const TOPOLOGY_NBD: &str = "quorum-nbd";
/// See [`TOPOLOGY_LOCAL`].
pub const TOPOLOGY_COLO: &str = "colo";

const CLASSES: [(&str, &str); 3] = [
    (TOPOLOGY_LOCAL, "quorum over local virtual disks"),
    (TOPOLOGY_NBD, "quorum over NBD replicas"),
    (TOPOLOGY_COLO, "COLO (PVM and SVM ops)"),
];

/// Virtual latency CDFs by op kind, one panel per topology.
fn latency_plot(s: &Json) -> Result<Option<Plot>, String> {
    let lat = &s["latency_ns"];
    let classes: Vec<(&str, &str)> = CLASSES
        .iter()
        .copied()
        .filter(|(k, _)| lat[*k].as_object().is_some_and(|o| !o.is_empty()))
        .collect();
    if classes.is_empty() {
        return Ok(None);
    }
    let mut lo = f64::MAX;
    let mut hi = 0f64;
    for (k, _) in &classes {
        for (_, h) in lat[*k].as_object().into_iter().flatten() {
            for (b, _) in histogram(h) {
                lo = lo.min(bucket_ns(s, b));
                hi = hi.max(bucket_ns(s, b));
            }
        }
    }
    // Below a microsecond is "immediate" (an ignored discard, a cached COLO read): the axis
    // starts there and such ops sit on its left edge.
    let lo = 10f64.powf(lo.max(1e3).log10().floor());
    let hi = 10f64.powf(hi.max(10.0).log10().ceil());
    let mut svg = String::new();
    {
        let h = 330 * classes.len() as u32;
        let root = SVGBackend::with_string(&mut svg, (900, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let panels = root.split_evenly((classes.len(), 1));
        for ((key, title), area) in classes.iter().zip(panels.iter()) {
            latency_panel(s, &lat[*key], title, area, lo, hi)?;
        }
        root.present().map_err(err)?;
    }
    Ok(Some(Plot {
        file: "latency.svg",
        title: "Latency distribution",
        caption: "Cumulative distribution of guest op latency in virtual time (issue to \
                  completion, all phases), per op kind and topology; log-scale buckets of a \
                  quarter doubling. Slow and gray disks (F10), stalls, network latency (F12), \
                  partitions and NBD reconnects make the long tails."
            .into(),
        svg,
    }))
}

fn latency_panel(
    s: &Json,
    by_kind: &Json,
    title: &str,
    area: &DrawingArea<SVGBackend, Shift>,
    lo: f64,
    hi: f64,
) -> Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Guest op latency: {title}"), (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("virtual latency")
        .y_desc("fraction of ops at or below")
        .x_label_formatter(&|x| fmt_ns(*x))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .draw()
        .map_err(err)?;
    let mut kinds: Vec<(&String, &Json)> = by_kind.as_object().into_iter().flatten().collect();
    kinds.sort_by_key(|(k, _)| outcome_order(&format!("{k}/ok")));
    for (i, (kind, h)) in kinds.into_iter().enumerate() {
        let hist = histogram(h);
        let total: u64 = hist.iter().map(|x| x.1).sum();
        if total == 0 {
            continue;
        }
        let mut acc = 0u64;
        let mut pts = Vec::new();
        for (b, n) in &hist {
            let x = bucket_ns(s, *b).clamp(lo, hi);
            pts.push((x, acc as f64 / total as f64));
            acc += n;
            pts.push((x, acc as f64 / total as f64));
        }
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{kind} ({} ops)", thousands(total)))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Runs by scenario, passed and failed (U8).
fn scenario_plot(s: &Json) -> Result<Plot, String> {
    let by: Vec<(String, u64, u64)> = s["by_scenario"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let n = v["runs"].as_u64().unwrap_or(0);
                    let f = v["failures"].as_u64().unwrap_or(0);
                    (k.clone(), n - f.min(n), f)
                })
                .collect()
        })
        .unwrap_or_default();
    let n = by.len().max(1);
    let max = by.iter().map(|x| x.1 + x.2).max().unwrap_or(1).max(1);
    let label_w = 8 * by.iter().map(|x| x.0.len()).max().unwrap_or(8) as u32 + 20;
    let mut svg = String::new();
    {
        let h = 90 + 16 * n as u32;
        let root = SVGBackend::with_string(&mut svg, (900, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Runs by scenario: passed (green) and failed (red)",
                (FONT, 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(label_w)
            .build_cartesian_2d((0.5f64..max as f64 * 1.05).log_scale(), n as f64..0f64)
            .map_err(err)?;
        let names: Vec<String> = by.iter().map(|x| x.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| center_label(*y, &names))
            .y_label_style((FONT, 11))
            .x_desc("runs (log scale)")
            .draw()
            .map_err(err)?;
        for (i, (_, pass, fail)) in by.iter().enumerate() {
            let y = i as f64;
            let p = (*pass as f64).max(0.5);
            if *pass > 0 {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(0.5, y + 0.15), (p, y + 0.85)],
                        RGBColor(44, 160, 44).filled(),
                    )))
                    .map_err(err)?;
            }
            if *fail > 0 {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(p, y + 0.15), (p + *fail as f64, y + 0.85)],
                        RGBColor(214, 39, 40).filled(),
                    )))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(Plot {
        file: "scenarios.svg",
        title: "Outcomes by scenario",
        caption: "Every scenario file and the random swarm seeds (`swarm`): runs that passed \
                  and runs that violated a rule."
            .into(),
        svg,
    })
}

/// Runs in which each fault family was injected and each recovery path reached (U8).
fn coverage_plot(s: &Json) -> Result<Option<Plot>, String> {
    let rs = runs(s);
    let mut fams: BTreeSet<String> = BTreeSet::new();
    let mut paths: BTreeSet<String> = BTreeSet::new();
    for r in rs {
        fams.extend(
            r["faults"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|x| x.0.clone()),
        );
        paths.extend(
            r["paths"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|x| x.0.clone()),
        );
    }
    if fams.is_empty() || paths.is_empty() {
        return Ok(None);
    }
    let mut fams: Vec<String> = fams.into_iter().collect();
    fams.sort_by_key(|f| family_order(f));
    let mut paths: Vec<String> = paths.into_iter().collect();
    paths.sort_by_key(|p| {
        p.strip_prefix('P')
            .and_then(|n| n.parse::<u32>().ok())
            .map(|n| (n, String::new()))
            .unwrap_or((u32::MAX, p.clone()))
    });
    let has = |r: &Json, key: &str, name: &str| r[key][name].as_u64().unwrap_or(0) > 0;
    let mut cells = Vec::new();
    let mut rows = Vec::new();
    for f in &fams {
        let with_f: Vec<&Json> = rs.iter().filter(|r| has(r, "faults", f)).collect();
        rows.push(format!("{f} ({} runs)", with_f.len()));
        cells.push(
            paths
                .iter()
                .map(|p| {
                    let n = with_f.iter().filter(|r| has(r, "paths", p)).count();
                    let frac = if with_f.is_empty() {
                        0.0
                    } else {
                        n as f64 / with_f.len() as f64
                    };
                    (frac, if n > 0 { n.to_string() } else { String::new() })
                })
                .collect(),
        );
    }
    let svg = draw_heat(&Heat {
        title: "Fault × recovery path: runs that had both",
        x_desc: "recovery path",
        rows,
        cols: paths,
        cells,
    })?;
    Ok(Some(Plot {
        file: "coverage.svg",
        title: "Fault × recovery-path coverage",
        caption: "Cell: the runs in which the fault family was injected and the recovery path \
                  was reached (shade: as a share of the row's runs). An empty row or column is \
                  a coverage gap (I15)."
            .into(),
        svg,
    }))
}

/// Per-run simulation speed: guest ops per wall-second and virtual-to-wall ratio (M1, U8).
fn speed_plot(s: &Json) -> Result<Plot, String> {
    let mut ops_rate = Vec::new();
    let mut ratio = Vec::new();
    for r in runs(s) {
        let w = r["wall_s"].as_f64().unwrap_or(0.0);
        let ops = r["ops"].as_f64().unwrap_or(0.0);
        if w > 0.0 && ops >= 100.0 {
            ops_rate.push(ops / w);
            ratio.push(r["virtual_s"].as_f64().unwrap_or(0.0) / w);
        }
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 620)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let panels = root.split_evenly((2, 1));
        speed_panel(
            &panels[0],
            &ops_rate,
            "Guest ops per wall-second, per run",
            "guest ops / wall s",
        )?;
        speed_panel(
            &panels[1],
            &ratio,
            "Virtual-to-wall time ratio, per run",
            "virtual s / wall s",
        )?;
        root.present().map_err(err)?;
    }
    Ok(Plot {
        file: "speed.svg",
        title: "Simulation speed",
        caption: "Runs with at least 100 guest ops; log-scale bins of a quarter decade (M1, M2)."
            .into(),
        svg,
    })
}

fn speed_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    values: &[f64],
    title: &str,
    x_desc: &str,
) -> Result<(), String> {
    let mut bins: BTreeMap<i64, u64> = BTreeMap::new();
    for v in values.iter().filter(|v| **v > 0.0) {
        *bins.entry((v.log10() * 4.0).floor() as i64).or_default() += 1;
    }
    let (lo, hi) = match (bins.keys().next(), bins.keys().last()) {
        (Some(a), Some(b)) => (*a, *b + 1),
        _ => (0, 4),
    };
    let max = bins.values().copied().max().unwrap_or(1) as f64;
    let x = |b: i64| 10f64.powf(b as f64 / 4.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((x(lo)..x(hi)).log_scale(), 0f64..max * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("runs")
        .x_label_formatter(&|v| human(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bins.iter().map(|(b, n)| {
            Rectangle::new([(x(*b), 0.0), (x(*b + 1), *n as f64)], PALETTE[0].filled())
        }))
        .map_err(err)?;
    if !values.is_empty() {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v[v.len() / 2];
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(med, 0.0), (med, max * 1.1)],
                PALETTE[3].stroke_width(2),
            )))
            .map_err(err)?
            .label(format!("median {}", human(med)))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[3]));
        legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    }
    Ok(())
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The Markdown report: totals, the plots with their captions, the latency percentiles, the
/// served-fraction table, then the counter tables.
fn markdown(s: &Json, plots: &[Plot]) -> String {
    let mut m = String::new();
    m += "# ballot-sim sweep\n\n";
    let args = match &s["arguments"] {
        Json::Array(a) if a.iter().all(|x| x.is_string()) => a
            .iter()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    let _ = writeln!(
        m,
        "commit `{}`, {} host core(s), {} job(s), arguments `{}`{}\n",
        s["commit"].as_str().unwrap_or(""),
        s["host_cores"],
        s["jobs"],
        args,
        match s["merged_inputs"].as_u64() {
            Some(n) if n > 1 => format!("; {n} summaries merged (wall time is their sum)"),
            _ => String::new(),
        }
    );
    m += "| measure | value |\n|---|---|\n";
    for (k, label) in [
        ("seeds", "runs (scenarios + random seeds)"),
        ("operations", "guest operations"),
        ("child_operations", "child operations"),
        ("violations", "violations"),
        ("crashes", "crashes (F16)"),
        (
            "safety_phase_errors",
            "errors in safety phases (counted, O7)",
        ),
    ] {
        let _ = writeln!(m, "| {label} | {} |", s[k]);
    }
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    let _ = writeln!(m, "| wall time | {:.1} s |", f("wall_s"));
    let _ = writeln!(
        m,
        "| guest ops per wall-second | {:.0} |",
        f("guest_ops_per_wall_s")
    );
    let _ = writeln!(
        m,
        "| child ops per wall-second | {:.0} |",
        f("child_ops_per_wall_s")
    );
    let _ = writeln!(m, "| seeds per minute | {:.1} |", f("seeds_per_minute"));
    let _ = writeln!(
        m,
        "| median virtual:wall ratio | {:.1} |\n",
        f("median_virtual_to_wall")
    );
    for p in plots {
        let _ = writeln!(
            m,
            "## {}\n\n![{}]({})\n\n{}\n",
            p.title, p.title, p.file, p.caption
        );
        if p.file == "latency.svg" {
            m += &latency_table(s);
        }
        if p.file == "served-vs-fault-rate.svg" {
            m += &served_table(s);
        }
    }
    if s["fault_outcomes"].is_null() {
        m += "This summary (schema 1) has no latency or fault-outcome data: re-run the sweep.\n\n";
    }
    let table = |title: &str, key: &str, m: &mut String| {
        let _ = writeln!(m, "## {title}\n\n| key | count |\n|---|---|");
        if let Some(o) = s[key].as_object() {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_by_key(|k| family_order(k));
            for k in keys {
                let _ = writeln!(m, "| {k} | {} |", o[k]);
            }
        }
        *m += "\n";
    };
    table("Faults injected by type", "faults_injected", &mut m);
    table(
        "Faults skipped by the budget (B3)",
        "faults_skipped_by_budget",
        &mut m,
    );
    table("Outcomes by operation and result", "outcomes", &mut m);
    table("Recovery paths reached (I15)", "recovery_paths", &mut m);
    table("Invariant checks", "invariant_checks", &mut m);
    table("Violations by rule", "violations_by_rule", &mut m);
    m += "## Runs by scenario\n\n| scenario | runs | failures |\n|---|---|---|\n";
    if let Some(o) = s["by_scenario"].as_object() {
        for (k, v) in o {
            let _ = writeln!(m, "| {k} | {} | {} |", v["runs"], v["failures"]);
        }
    }
    let gaps = s["coverage"]["gaps"]
        .as_array()
        .map(|a| {
            if a.is_empty() {
                "none".to_string()
            } else {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        })
        .unwrap_or_default();
    let _ = writeln!(
        m,
        "\nCoverage gaps: {gaps}. Not modelled yet: {}.",
        s["coverage"]["not_modelled"].as_str().unwrap_or("")
    );
    m
}

fn latency_table(s: &Json) -> String {
    let mut m = String::from(
        "| topology | op | ops | p50 | p90 | p99 | p99.9 | max |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (key, title) in CLASSES {
        let Some(o) = s["latency_ns"][key].as_object() else {
            continue;
        };
        let mut kinds: Vec<&String> = o.keys().collect();
        kinds.sort_by_key(|k| outcome_order(&format!("{k}/ok")));
        for k in kinds {
            let h = histogram(&o[k.as_str()]);
            let n: u64 = h.iter().map(|x| x.1).sum();
            if n == 0 {
                continue;
            }
            let q = |x: f64| fmt_ns(quantile(s, &h, x));
            let _ = writeln!(
                m,
                "| {title} | {k} | {} | ≤ {} | ≤ {} | ≤ {} | ≤ {} | ≤ {} |",
                thousands(n),
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                q(1.0)
            );
        }
    }
    m + "\n"
}

fn served_table(s: &Json) -> String {
    let mut by: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
    for r in runs(s) {
        let Some(c) = config_of(r) else { continue };
        let budget = r["parameters"]["budget"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        let e = by.entry((c, budget)).or_default();
        e.0 += 1;
        for (k, v) in r["outcomes"].as_object().into_iter().flatten() {
            if let Some(res) = k.strip_prefix("read/") {
                let n = v.as_u64().unwrap_or(0);
                e.2 += n;
                if res == "ok" {
                    e.1 += n;
                }
            }
        }
    }
    let mut rows: Vec<_> = by.into_iter().filter(|(_, v)| v.2 > 0).collect();
    rows.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    let mut m = String::from(
        "| configuration | budget | runs | reads | served |\n|---|---|---:|---:|---:|\n",
    );
    for ((c, b), (n, ok, all)) in rows.iter().take(16) {
        let _ = writeln!(
            m,
            "| {c} | {b} | {n} | {} | {:.2}% |",
            thousands(*all),
            *ok as f64 * 100.0 / *all as f64
        );
    }
    m + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(seed: u64, reads_ok: u64, reads_eio: u64, f4: u64) -> Json {
        json!({
            "schema_version": 2, "commit": "abc", "arguments": ["--seeds", "1"],
            "host_cores": 2, "jobs": 2, "seeds": 1, "operations": 100, "violations": 0,
            "child_operations": 300, "crashes": 0, "safety_phase_errors": reads_eio,
            "wall_s": 2.0, "faults_injected": {"F4": f4}, "faults_skipped_by_budget": {},
            "outcomes": {"read/ok": reads_ok, "read/EIO": reads_eio},
            "recovery_paths": {"P4": 1}, "invariant_checks": {"I1": 5},
            "violations_by_rule": {}, "by_scenario": {"swarm": {"runs": 1, "failures": 0}},
            "fault_outcomes": {"F4": {"read/EIO": reads_eio}, "none": {"read/ok": reads_ok}},
            "latency_buckets_per_doubling": 4,
            "latency_ns": {"quorum-local": {"read": {"40": reads_ok, "80": reads_eio}}},
            "coverage": {"families": ["F4", "F5"], "paths": ["P4"], "gaps": ["F5"],
                         "not_modelled": "x"},
            "runs": [{
                "seed": seed, "scenario": "swarm", "ops": 100, "child_ops": 300,
                "wall_s": 2.0, "virtual_s": 20.0 * seed as f64,
                "faults": {"F4": f4}, "paths": {"P4": 1},
                "outcomes": {"read/ok": reads_ok, "read/EIO": reads_eio},
                "parameters": {"topology": "quorum", "children": 3, "vote_threshold": 2,
                               "read_pattern": "quorum", "budget": "safety"}
            }]
        })
    }

    #[test]
    fn merge_adds_counters_and_nested_tables_and_concatenates_runs() {
        let m = merge(vec![
            ("a".into(), summary(1, 90, 10, 3)),
            ("b".into(), summary(2, 60, 40, 5)),
        ])
        .expect("merge");
        assert_eq!(m["seeds"], json!(2));
        assert_eq!(m["operations"], json!(200));
        assert_eq!(m["wall_s"], json!(4.0));
        assert_eq!(m["faults_injected"]["F4"], json!(8));
        assert_eq!(m["outcomes"]["read/EIO"], json!(50));
        assert_eq!(m["fault_outcomes"]["F4"]["read/EIO"], json!(50));
        assert_eq!(m["latency_ns"]["quorum-local"]["read"]["40"], json!(150));
        assert_eq!(m["by_scenario"]["swarm"]["runs"], json!(2));
        assert_eq!(m["runs"].as_array().map(|a| a.len()), Some(2));
        assert_eq!(m["guest_ops_per_wall_s"], json!(50.0));
        assert_eq!(m["seeds_per_minute"], json!(30.0));
        // Ratios 10 and 20: the median of two is the upper one.
        assert_eq!(m["median_virtual_to_wall"], json!(20.0));
        assert_eq!(m["coverage"]["gaps"], json!(["F5"]));
        assert_eq!(m["commit"], json!("abc"));
    }

    #[test]
    fn merge_puts_shards_runs_back_in_sweep_order() {
        // Shard 2/2 held runs 1 and 3, shard 1/2 runs 0 and 2, given in that order.
        let shard = |seeds: [u64; 2], idx: [u64; 2]| {
            let mut s = summary(seeds[0], 90, 10, 3);
            let mut second = s["runs"][0].clone();
            second["seed"] = json!(seeds[1]);
            s["runs"][0]["index"] = json!(idx[0]);
            second["index"] = json!(idx[1]);
            s["runs"].as_array_mut().expect("runs").push(second);
            s
        };
        let m = merge(vec![
            ("2of2".into(), shard([11, 13], [1, 3])),
            ("1of2".into(), shard([10, 12], [0, 2])),
        ])
        .expect("merge");
        let order: Vec<u64> = m["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .filter_map(|r| r["seed"].as_u64())
            .collect();
        assert_eq!(order, vec![10, 11, 12, 13]);
    }

    #[test]
    fn merge_refuses_what_is_not_a_summary_by_name() {
        let e = merge(vec![("x.json".into(), json!({"runs": []}))]).unwrap_err();
        assert_eq!(e, "x.json: no schema_version: not a sweep summary");
        let e = merge(vec![(
            "y.json".into(),
            json!({"schema_version": 9, "runs": []}),
        )])
        .unwrap_err();
        assert_eq!(
            e,
            "y.json: schema_version 9 is not one this report reads ([1, 2])"
        );
        let e = merge(vec![("z.json".into(), json!({"schema_version": 2}))]).unwrap_err();
        assert_eq!(e, "z.json: no runs array: not a sweep summary");
    }

    #[test]
    fn served_point_counts_reads_and_leaves_slow_faults_out() {
        let mut r = summary(1, 90, 10, 3)["runs"][0].clone();
        r["faults"]["F10"] = json!(1000);
        assert_eq!(served_point(&r), Some((10.0, 0.9)));
        r["outcomes"] = json!({"read/ok": 5, "write/ok": 100});
        assert_eq!(served_point(&r), None);
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let s = summary(1, 90, 10, 3);
        let h = histogram(&s["latency_ns"]["quorum-local"]["read"]);
        assert_eq!(h, vec![(40, 90), (80, 10)]);
        assert_eq!(quantile(&s, &h, 0.5), 1024.0);
        assert_eq!(quantile(&s, &h, 0.9), 1024.0);
        assert_eq!(quantile(&s, &h, 0.91), 1_048_576.0);
        assert_eq!(quantile(&s, &h, 1.0), 1_048_576.0);
    }

    #[test]
    fn binned_medians_take_each_bins_median() {
        let pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (4.0, 1.0)];
        assert_eq!(binned_medians(&pts, 2), vec![(1.5, 0.7), (3.5, 1.0)]);
    }

    #[test]
    fn write_renders_every_plot_and_links_it_from_the_markdown() {
        let dir = std::env::temp_dir().join(format!("ballot-report-test-{}", std::process::id()));
        let s = merge(vec![("a".into(), summary(1, 90, 10, 3))]).expect("merge");
        let written = write(&s, &dir).expect("write");
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names,
            [
                "fault-outcomes.svg",
                "served-vs-fault-rate.svg",
                "latency.svg",
                "scenarios.svg",
                "coverage.svg",
                "speed.svg",
                "summary.md"
            ]
        );
        let md = std::fs::read_to_string(dir.join("summary.md")).expect("md");
        for n in &names[..6] {
            assert!(md.contains(&format!("]({n})")), "{n} not linked");
        }
        assert!(md.contains("| quorum over local virtual disks | read | 100 | ≤ 1 µs | ≤ 1 µs | ≤ 1.0 ms | ≤ 1.0 ms | ≤ 1.0 ms |"), "{md}");
        assert!(
            md.contains("| 3 children, t=2, quorum | safety | 1 | 100 | 90.00% |"),
            "{md}"
        );
        let heat = std::fs::read_to_string(dir.join("fault-outcomes.svg")).expect("svg");
        assert!(heat.starts_with("<svg"), "{}", &heat[..40.min(heat.len())]);
        assert!(
            heat.contains("F4 (10)") && heat.contains("none (90)"),
            "row labels"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
