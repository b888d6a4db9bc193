//! ballot-sim: the deterministic simulator (SIMULATION.md). Until the simulator issue lands,
//! only `smoke` exists: it runs the unchanged quorum driver inside a seeded madsim runtime to
//! prove the driver crate works under `--cfg madsim` (virtual time, madsim tasks).

#[cfg(madsim)]
mod smoke;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        #[cfg(madsim)]
        Some("smoke") => {
            let seed = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
            std::process::exit(smoke::run(seed));
        }
        _ => {
            eprintln!(
                "ballot-sim {}: only `cargo sim smoke [SEED]` exists yet; run, sweep, replay, shrink \
                 and report arrive with the simulator issue (SIMULATION.md)",
                env!("CARGO_PKG_VERSION")
            );
            std::process::exit(64);
        }
    }
}
