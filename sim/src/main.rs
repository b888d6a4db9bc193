//! `ballot-sim`: started as `cargo sim <run|sweep|replay|shrink|check-determinism>`.

fn main() {
    #[cfg(madsim)]
    {
        let args: Vec<String> = std::env::args().skip(1).collect();
        std::process::exit(ballot_sim::cli::main(args));
    }
    #[cfg(not(madsim))]
    {
        eprintln!(
            "ballot-sim {}: this build has no simulator runtime; run it as `cargo sim <run|sweep|replay|shrink|check-determinism>` (it builds with --cfg madsim in target-sim/)",
            env!("CARGO_PKG_VERSION")
        );
        std::process::exit(64);
    }
}
