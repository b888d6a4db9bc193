//! The `ballot` command.
//!
//! `ballot check --blockdev SPEC...` opens a driver graph exactly as `ballot serve` will and
//! prints it, so a configuration can be validated without serving it. `ballot serve` takes
//! qemu-storage-daemon's `--blockdev`, `--nbd-server` and `--export` and serves the graph over
//! NBD until SIGINT or SIGTERM (NBD.md N33). `ballot libvirt` serves the quorum disk of
//! libvirt's quorum proposal and prints the network disk element that attaches it. Errors print `ballot: <message>` on stderr and
//! exit 1 (ARCHITECTURE.md).

use std::process::ExitCode;

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;

#[path = "cli/serve.rs"]
mod serve;

#[path = "cli/libvirt.rs"]
mod libvirt;

#[path = "cli/metadata.rs"]
mod metadata;

#[path = "cli/create.rs"]
mod create;

#[path = "cli/args.rs"]
mod args;

fn main() -> ExitCode {
    use clap::{CommandFactory, Parser};
    let cli = match args::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return args::report(&e),
    };
    let format = if cli.log_format == "json" {
        ballot::log::Format::Json
    } else {
        ballot::log::Format::Text
    };
    if let Err(e) = ballot::log::init(cli.log.as_deref(), format) {
        eprintln!("ballot: {e}");
        return ExitCode::from(2);
    }
    let (blockdevs, objects) = match cli.cmd {
        args::Cmd::Check { blockdev, object } => (blockdev, object),
        args::Cmd::Serve(s) => return serve::main(&s.to_args()),
        args::Cmd::Libvirt { cmd } => {
            let a = cmd.map(|c| c.to_args()).unwrap_or_default();
            return libvirt::main(&a, serve::main);
        }
        args::Cmd::Metadata { cmd } => {
            let a = cmd.map(|c| c.to_args()).unwrap_or_default();
            return metadata::main(&a);
        }
        args::Cmd::Create(c) => return create::main(&c.to_args()),
        args::Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut args::Cli::command(), "ballot", &mut script);
            use std::io::Write;
            let _ = std::io::stdout().write_all(&script);
            return ExitCode::SUCCESS;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ballot: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    rt.block_on(async {
        let host = Host::process(EventBus::new());
        for o in &objects {
            if let Err(e) = host.objects.add_arg(o) {
                eprintln!("ballot: --object: {e}");
                return ExitCode::from(1);
            }
        }
        let mut graph = Graph::new(host);
        for b in &blockdevs {
            if let Err(e) = graph.blockdev_add_arg(b).await {
                eprintln!("ballot: {e}");
                return ExitCode::from(1);
            }
        }
        for n in graph.nodes() {
            let len = n
                .dev
                .length()
                .map(|l| l.to_string())
                .unwrap_or_else(|e| e.to_string());
            let kids: Vec<String> = n
                .children
                .iter()
                .map(|(c, node)| format!("{c}={node}"))
                .collect();
            println!(
                "{} driver={} length={} align={}{}",
                n.name,
                n.dev.driver(),
                len,
                n.dev.request_alignment(),
                if kids.is_empty() {
                    String::new()
                } else {
                    format!(" children=[{}]", kids.join(","))
                }
            );
        }
        // H23: a quorum's metadata node is left clean, as `ballot serve` leaves it.
        let errors = graph.close_quorums().await;
        for e in &errors {
            eprintln!("ballot: {e}");
        }
        if errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    })
}
