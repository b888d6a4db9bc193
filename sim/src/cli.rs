//! The command line of ballot-sim (SIMULATION.md U1–U7, M4).

use crate::console::{header, load, parse, pick_seed, report};
use crate::outcome::RunOpts;
use crate::params::Params;
use crate::runner::{install_panic_hook, run};
use crate::sweep;

const USAGE: &str = "usage: cargo sim <command>
  run [SCENARIO] [--seed N] [--set key=value]...
  sweep [--seeds N] [--seed-from S] [--jobs J] [--shard i/n] [--time-budget DUR] [--report DIR] [--scenarios DIR] [--only NAME] [--until-fail] [--junit FILE]
  replay --seed N [SCENARIO] [-v|-vv] [--from-op K] [--to-op K]
  shrink --seed N [SCENARIO] [--max-runs R] [--out PATH]
  check-determinism [--seeds N] [--scenarios DIR]
  report SUMMARY.json... [--out DIR]";

/// Usage errors (exit 64).
pub fn usage(msg: &str) -> i32 {
    eprintln!("ballot-sim: {msg}\n{USAGE}");
    64
}

/// Entry point; returns the exit code.
pub fn main(args: Vec<String>) -> i32 {
    install_panic_hook();
    let Some(cmd) = args.first() else {
        return usage("no command");
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "run" | "replay" => cmd_run(rest, cmd == "replay"),
        "sweep" => sweep::cmd_sweep(rest),
        "shrink" => sweep::cmd_shrink(rest),
        "check-determinism" => sweep::cmd_determinism(rest),
        "report" => crate::report::cmd_report(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => return usage(&format!("unknown command '{other}'")),
    };
    r.unwrap_or_else(|e| usage(&e))
}

fn cmd_run(args: &[String], replay: bool) -> Result<i32, String> {
    let c = parse(args, &[])?;
    if replay && c.seed.is_none() {
        return Err("replay needs --seed N".into());
    }
    let sc = load(c.scenario.as_deref(), &c.sets)?;
    let seed = pick_seed(&c, &sc);
    let p = Params::derive(seed, &sc.pins).map_err(|e| match &c.scenario {
        Some(s) => format!("{s}: {e}"),
        None => e,
    })?;
    println!("{}", header(&p, &sc));
    print!("{}", p.to_toml(&sc.name));
    if !p.majority() {
        println!("# 2t <= N: I3 (no stale read) is not asserted; I5 (tie safety) applies");
    }
    let opts = RunOpts {
        verbose: replay || c.verbose > 0,
        window: (c.from_op, c.to_op),
        capture: false,
    };
    let r = run(p.clone(), &sc, &opts);
    Ok(report(&p, &sc, c.scenario.as_deref(), &r))
}
