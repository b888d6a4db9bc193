//! ballot-sim: the deterministic simulator. This is a placeholder until the simulator issue
//! (SIMULATION.md); it only proves the driver crate links into the simulator crate.

fn main() {
    eprintln!(
        "ballot-sim {}: the simulator is not built yet (see SIMULATION.md)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(64);
}
