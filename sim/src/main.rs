//! `ballot-sim`: started as `cargo sim <run|sweep|replay|shrink|check-determinism>`.

fn main() {
    #[cfg(madsim)]
    {
        tune_allocator();
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

/// Large simulation buffers (whole-disk verify reads, image files) come from the heap and are
/// reused. By default glibc maps every allocation over 128 KiB (up to 32 MiB as it adapts) on
/// its own and unmaps it when freed, and those page faults were a fifth of a long run's time
/// (issue 22). Peak memory is the same; freed memory is kept for the next run.
#[cfg(madsim)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters, and runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
