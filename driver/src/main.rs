//! The `ballot` command.
//!
//! `ballot check --blockdev SPEC...` opens a driver graph exactly as `ballot serve` will and
//! prints it, so a configuration can be validated without serving it. Errors print
//! `ballot: <message>` on stderr and exit 1 (ARCHITECTURE.md).

use std::process::ExitCode;

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;

const USAGE: &str = "usage: ballot check --blockdev SPEC [--blockdev SPEC]...

  --blockdev SPEC   a node, in qemu-storage-daemon's dotted form
                    (driver=file,node-name=f0,filename=a.raw) or as JSON

Opens the graph (files, quorum votes' preconditions, lengths) and prints each node.
`ballot serve` (the NBD front end) is not part of this build yet.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {}
        Some("-h") | Some("--help") | Some("help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("ballot: unknown command '{other}'\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    let mut blockdevs = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--blockdev=") {
            blockdevs.push(v.to_string());
        } else if a == "--blockdev" {
            match it.next() {
                Some(v) => blockdevs.push(v.clone()),
                None => {
                    eprintln!("ballot: option '--blockdev' requires an argument");
                    return ExitCode::from(2);
                }
            }
        } else {
            eprintln!("ballot: unknown option '{a}'");
            return ExitCode::from(2);
        }
    }
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
        let mut graph = Graph::new(Host::process(EventBus::new()));
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
        ExitCode::SUCCESS
    })
}
