//! The command line as clap sees it (issue 20 item 5): every subcommand with its options and
//! their help, `--help` everywhere, `--version`, and shell completions. clap only recognises
//! the options; their values (qemu-storage-daemon's `--blockdev`/`--nbd-server`/`--export`/
//! `--chardev`/`--monitor` syntax, sizes, XML paths) are handed, unchanged and in order, to the
//! parsers each subcommand had before, so every command line keeps its meaning and its errors.

use clap::{Args, Parser, Subcommand};

/// A quorum block driver and COLO block replication, served over NBD.
#[derive(Debug, Parser)]
#[command(name = "ballot", version, disable_help_subcommand = true)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// Which log events to print: LEVEL and TARGET=LEVEL, comma-separated
    /// (e.g. `warn,ballot::nbd=debug`); default info, or $BALLOT_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
    /// How log events are printed: `text` (ballot: warning: ...) or `json` (one object per line).
    #[arg(long = "log-format", global = true, value_name = "FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Open a driver graph exactly as `serve` will and print each node (a dry run).
    Check {
        /// A node, in qemu-storage-daemon's dotted form (driver=file,node-name=f0,filename=a.raw)
        /// or as JSON.
        #[arg(long, value_name = "SPEC", required = true)]
        blockdev: Vec<String>,
        /// An object the nodes use: tls-creds-x509,id=ID,dir=DIR,endpoint=client.
        #[arg(long, value_name = "SPEC")]
        object: Vec<String>,
    },
    /// Serve a driver graph over NBD, with qemu-storage-daemon's command line, until SIGINT or
    /// SIGTERM (then drain and flush).
    Serve(ServeArgs),
    /// Serve the quorum disk of libvirt's quorum proposal, and print the disk element that
    /// attaches it.
    Libvirt {
        #[command(subcommand)]
        cmd: Option<LibvirtCmd>,
    },
    /// Create or show a quorum's metadata node (docs/healing.md H19).
    Metadata {
        #[command(subcommand)]
        cmd: Option<MetadataCmd>,
    },
    /// Create a qcow2 or raw image, with qemu-img create's syntax (an existing file is
    /// overwritten).
    Create(CreateArgs),
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A node: driver=...,node-name=...[,...] or JSON, as qemu-storage-daemon takes it.
    #[arg(long, value_name = "SPEC")]
    pub blockdev: Vec<String>,
    /// Where NBD clients connect: addr.type=inet,addr.host=H,addr.port=P or
    /// addr.type=unix,addr.path=P [,max-connections=N].
    #[arg(long = "nbd-server", value_name = "ADDR")]
    pub nbd_server: Vec<String>,
    /// An export: type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on]
    /// [,description=TEXT][,multi-conn=on|off|auto].
    #[arg(long, value_name = "SPEC")]
    pub export: Vec<String>,
    /// A socket for a monitor: socket,id=ID,path=P|host=H,port=N,server=on,wait=off.
    #[arg(long, value_name = "SPEC")]
    pub chardev: Vec<String>,
    /// A QMP monitor on a chardev: chardev=ID.
    #[arg(long, value_name = "SPEC")]
    pub monitor: Vec<String>,
    /// A Prometheus scrape endpoint (GET /metrics): addr.type=inet,addr.host=H,addr.port=P or
    /// addr.type=unix,addr.path=P.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Vec<String>,
    /// An object, created before any node or server: tls-creds-x509,id=ID,dir=DIR,
    /// endpoint=server|client[,verify-peer=on|off].
    #[arg(long, value_name = "SPEC")]
    pub object: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum LibvirtCmd {
    /// Read a <disk type='quorum'> (or a whole domain) and print, or run, the `ballot serve`
    /// command that serves it.
    Import {
        /// The disk or domain XML.
        #[arg(value_name = "DISK.xml")]
        file: Option<String>,
        /// The guest device (default: the disk's target dev).
        #[arg(long, value_name = "DEV")]
        target: Option<String>,
        /// The export name (default: the target dev).
        #[arg(long, value_name = "NAME")]
        export: Option<String>,
        /// Serve on this unix socket (default: NAME.sock beside the XML).
        #[arg(long, value_name = "PATH")]
        socket: Option<String>,
        /// Serve on TCP.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// Start the server instead of printing its command.
        #[arg(long)]
        run: bool,
    },
    /// Print the <disk type='network'> element that attaches an export to a domain.
    DiskXml {
        /// The export name.
        #[arg(long, value_name = "NAME")]
        export: Option<String>,
        /// The server's unix socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<String>,
        /// The server's TCP address.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// The guest device.
        #[arg(long, value_name = "DEV")]
        target: Option<String>,
        /// The bus (virtio, scsi, ide, sata; default: from the target's name).
        #[arg(long, value_name = "BUS")]
        bus: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetadataCmd {
    /// Write a metadata node for a quorum of SIZE bytes whose children have these node-names.
    Create {
        /// The metadata file.
        file: String,
        /// The quorum's size (suffixes K, M, G, T: powers of 1024).
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
        /// The children's node-names, in the quorum's order, comma-separated.
        #[arg(long, value_name = "NODE,...")]
        children: Option<String>,
        /// Room for hot-added children (default: children + 1).
        #[arg(long = "max-children", value_name = "N")]
        max_children: Option<String>,
        /// Start with every child in sync (only for children known to be identical).
        #[arg(long = "in-sync")]
        in_sync: bool,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the header, the dirty write-intent extents and the out-of-sync bytes per child.
    Show {
        /// The metadata file.
        file: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The format: qcow2 or raw (default raw, as qemu-img).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// The backing file, as stored in the image (relative to FILE's directory).
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// The backing file's format (qcow2 or raw; probed when omitted).
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<String>,
    /// qcow2 options, comma-separated: cluster_size=SIZE, compat=0.10|1.1, refcount_bits=N.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// The image file.
    pub file: String,
    /// The size (suffixes K, M, G, T; with -b it defaults to the backing file's).
    pub size: Option<String>,
}

fn push_all(out: &mut Vec<String>, flag: &str, values: &[String]) {
    for v in values {
        out.push(flag.to_string());
        out.push(v.clone());
    }
}

fn push_opt(out: &mut Vec<String>, flag: &str, value: &Option<String>) {
    if let Some(v) = value {
        out.push(flag.to_string());
        out.push(v.clone());
    }
}

impl ServeArgs {
    /// The arguments as `serve`'s parser takes them (by kind; each kind in its given order,
    /// which is all the order that parser keeps).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        push_all(&mut a, "--blockdev", &self.blockdev);
        push_all(&mut a, "--nbd-server", &self.nbd_server);
        push_all(&mut a, "--export", &self.export);
        push_all(&mut a, "--chardev", &self.chardev);
        push_all(&mut a, "--monitor", &self.monitor);
        push_all(&mut a, "--metrics", &self.metrics);
        push_all(&mut a, "--object", &self.object);
        a
    }
}

impl LibvirtCmd {
    /// The arguments as `libvirt`'s parser takes them.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        match self {
            LibvirtCmd::Import {
                file,
                target,
                export,
                socket,
                addr,
                run,
            } => {
                a.push("import".into());
                a.extend(file.clone());
                push_opt(&mut a, "--target", target);
                push_opt(&mut a, "--export", export);
                push_opt(&mut a, "--socket", socket);
                push_opt(&mut a, "--addr", addr);
                if *run {
                    a.push("--run".into());
                }
            }
            LibvirtCmd::DiskXml {
                export,
                socket,
                addr,
                target,
                bus,
            } => {
                a.push("disk-xml".into());
                push_opt(&mut a, "--export", export);
                push_opt(&mut a, "--socket", socket);
                push_opt(&mut a, "--addr", addr);
                push_opt(&mut a, "--target", target);
                push_opt(&mut a, "--bus", bus);
            }
        }
        a
    }
}

impl MetadataCmd {
    /// The arguments as `metadata`'s parser takes them.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        match self {
            MetadataCmd::Create {
                file,
                size,
                children,
                max_children,
                in_sync,
                force,
            } => {
                a.push("create".into());
                a.push(file.clone());
                push_opt(&mut a, "--size", size);
                push_opt(&mut a, "--children", children);
                push_opt(&mut a, "--max-children", max_children);
                if *in_sync {
                    a.push("--in-sync".into());
                }
                if *force {
                    a.push("--force".into());
                }
            }
            MetadataCmd::Show { file } => {
                a.push("show".into());
                a.push(file.clone());
            }
        }
        a
    }
}

impl CreateArgs {
    /// The arguments as `create`'s parser takes them.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        push_opt(&mut a, "-f", &self.format);
        push_opt(&mut a, "-b", &self.backing);
        push_opt(&mut a, "-F", &self.backing_format);
        push_all(&mut a, "-o", &self.options);
        a.push(self.file.clone());
        if let Some(s) = &self.size {
            a.push(s.clone());
        }
        a
    }
}

/// A clap error as ballot words usage errors: `ballot: <message>` and exit 2, with the wording
/// the hand-written parsers used for unknown options, missing values and unknown commands;
/// `--help` and `--version` print to stdout and exit 0.
pub fn report(e: &clap::Error) -> std::process::ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let ctx = |k: ContextKind| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed pipe (`ballot --help | head`) is not an error worth a panic.
            use std::io::Write;
            let _ = write!(std::io::stdout(), "{}", e.render());
            return std::process::ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            return std::process::ExitCode::from(2);
        }
        _ => {}
    }
    let flag = |s: String| s.split([' ', '=']).next().unwrap_or_default().to_string();
    let msg = match e.kind() {
        ErrorKind::UnknownArgument => match ctx(ContextKind::InvalidArg) {
            Some(a) if a.starts_with('-') => format!("unknown option '{}'", flag(a)),
            Some(a) => format!("unexpected argument '{a}'"),
            None => "unknown option".into(),
        },
        ErrorKind::MissingRequiredArgument => match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::Strings(v)) => format!("missing {}", v.join(", ")),
            _ => "a required argument is missing".into(),
        },
        ErrorKind::InvalidSubcommand => match ctx(ContextKind::InvalidSubcommand) {
            Some(c) => format!("unknown command '{c}'"),
            None => "unknown command".into(),
        },
        ErrorKind::InvalidValue if ctx(ContextKind::InvalidValue).as_deref() == Some("") => {
            match ctx(ContextKind::InvalidArg) {
                Some(a) => format!("option '{}' requires an argument", flag(a)),
                None => "an option requires an argument".into(),
            }
        }
        _ => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            first.strip_prefix("error: ").unwrap_or(first).to_string()
        }
    };
    eprintln!("ballot: {msg}");
    std::process::ExitCode::from(2)
}
