//! `ballot-sim`: started as `cargo sim <run|sweep|replay|shrink|check-determinism>`.

fn main() {
    #[cfg(madsim)]
    {
        let args: Vec<String> = std::env::args().skip(1).collect();
        std::process::exit(ballot_sim::cli::main(args));
    }
    #[cfg(not(madsim))]
    {
        // `report` renders sweep summaries and needs no simulator runtime.
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().map(String::as_str) == Some("report") {
            let code = match ballot_sim::report::cmd_report(&args[1..]) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ballot-sim: {e}");
                    64
                }
            };
            std::process::exit(code);
        }
        eprintln!(
            "ballot-sim {}: this build has no simulator runtime; run it as `cargo sim <run|sweep|replay|shrink|check-determinism|report>` (it builds with --cfg madsim in target-sim/)",
            env!("CARGO_PKG_VERSION")
        );
        std::process::exit(64);
    }
}
