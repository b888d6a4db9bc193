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

const USAGE: &str = "usage: ballot check --blockdev SPEC [--blockdev SPEC]...
       ballot serve --blockdev SPEC... --nbd-server ADDR --export SPEC...
       ballot libvirt import DISK.xml | disk-xml ...   (ballot libvirt --help)
       ballot metadata create FILE --size SIZE --children NODE,... | show FILE
                                                       (ballot metadata --help)
       ballot create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o OPTS] FILE [SIZE]
                                                       (ballot create --help)

  --blockdev SPEC   a node, in qemu-storage-daemon's dotted form
                    (driver=file,node-name=f0,filename=a.raw) or as JSON
  --nbd-server ADDR addr.type=inet,addr.host=H,addr.port=P | addr.type=unix,addr.path=P
                    [,max-connections=N]
  --export SPEC     type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on]
                    [,description=TEXT][,multi-conn=on|off|auto]
  --metrics ADDR    Prometheus metrics (GET /metrics) at addr.type=inet,addr.host=H,addr.port=P
                    | addr.type=unix,addr.path=P

check opens the graph (files, quorum votes' preconditions, lengths) and prints each node;
serve serves it over NBD until SIGINT or SIGTERM, then drains and flushes.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {}
        Some("serve") => return serve::main(&args[1..]),
        Some("libvirt") => return libvirt::main(&args[1..], serve::main),
        Some("metadata") => return metadata::main(&args[1..]),
        Some("create") => return create::main(&args[1..]),
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
