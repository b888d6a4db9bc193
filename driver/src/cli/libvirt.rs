//! `ballot libvirt`: serve the quorum disk of libvirt's quorum proposal, and print the network
//! disk element that attaches it to a domain (issue 8; `ballot::libvirt`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ballot::libvirt::{
    bus_for, check_name, default_export, disk_xml, import, serve_args, shell_quote, Endpoint,
};

pub const USAGE: &str = "usage: ballot libvirt import DISK.xml [--target DEV] [--export NAME]
                              [--socket PATH | --addr HOST:PORT] [--run]
       ballot libvirt disk-xml --export NAME (--socket PATH | --addr HOST:PORT)
                               --target DEV [--bus virtio|scsi|ide|sata]

import reads a <disk type='quorum'> (libvirt's quorum proposal: <threshold value=N/> and one
<backingStore type='file'> per raw replica; a whole domain XML works too) and prints the
`ballot serve` command that serves it as an NBD export (default name: the disk's target dev;
default socket: NAME.sock beside the XML); --run starts it. disk-xml prints the
<disk type='network'> element to paste into the domain.";

fn usage(msg: &str) -> ExitCode {
    eprintln!("ballot: {msg}\n{USAGE}");
    ExitCode::from(2)
}

/// Options of both subcommands.
#[derive(Default)]
struct Opts {
    file: Option<String>,
    target: Option<String>,
    export: Option<String>,
    socket: Option<String>,
    addr: Option<String>,
    bus: Option<String>,
    run: bool,
}

fn parse(args: &[String], with_file: bool) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let slot = match flag {
            "--target" => &mut o.target,
            "--export" => &mut o.export,
            "--socket" => &mut o.socket,
            "--addr" => &mut o.addr,
            "--bus" => &mut o.bus,
            "--run" if with_file => {
                o.run = true;
                continue;
            }
            f if f.starts_with('-') => return Err(format!("unknown option '{a}'")),
            _ if with_file && o.file.is_none() => {
                o.file = Some(a.clone());
                continue;
            }
            _ => return Err(format!("unexpected argument '{a}'")),
        };
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("option '{flag}' requires an argument"))?,
        };
        if slot.replace(v).is_some() {
            return Err(format!("option '{flag}' given twice"));
        }
    }
    if o.socket.is_some() && o.addr.is_some() {
        return Err("give --socket or --addr, not both".into());
    }
    Ok(o)
}

fn endpoint(o: &Opts, default_socket: Option<PathBuf>) -> Result<Endpoint, String> {
    match (&o.socket, &o.addr, default_socket) {
        (Some(s), _, _) => Ok(Endpoint::Unix(absolute(Path::new(s)))),
        (None, Some(a), _) => Endpoint::tcp(a),
        (None, None, Some(d)) => Ok(Endpoint::Unix(d)),
        (None, None, None) => Err("give --socket PATH or --addr HOST:PORT".into()),
    }
}

/// `p` against the working directory (`std::path::absolute`; as given if that fails).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Entry point; `args` follow `libvirt`. `serve` runs `ballot serve` with arguments (--run).
pub fn main(args: &[String], serve: fn(&[String]) -> ExitCode) -> ExitCode {
    match args.first().map(String::as_str) {
        Some("import") => match parse(&args[1..], true) {
            Ok(o) => cmd_import(&o, serve),
            Err(e) => usage(&e),
        },
        Some("disk-xml") => match parse(&args[1..], false) {
            Ok(o) => cmd_disk_xml(&o),
            Err(e) => usage(&e),
        },
        Some("-h") | Some("--help") | Some("help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => usage(&format!("unknown libvirt command '{other}'")),
        None => usage("libvirt needs a command"),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ballot: {msg}");
    ExitCode::from(1)
}

fn cmd_import(o: &Opts, serve: fn(&[String]) -> ExitCode) -> ExitCode {
    let Some(file) = &o.file else {
        return usage("import needs DISK.xml");
    };
    let path = absolute(Path::new(file));
    let text = match std::fs::read(&path) {
        Ok(b) if b.len() > ballot::libvirt::XML_BYTES_MAX => {
            return fail(format!(
                "{}: {} bytes, more than {}",
                path.display(),
                b.len(),
                ballot::libvirt::XML_BYTES_MAX
            ))
        }
        Ok(b) => match String::from_utf8(b) {
            Ok(t) => t,
            Err(_) => return fail(format!("{}: not UTF-8 text", path.display())),
        },
        Err(e) => return fail(format!("{}: {e}", path.display())),
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let disk = match import(&text, &base, o.target.as_deref()) {
        Ok(d) => d,
        Err(e) => return fail(format!("{}: {e}", path.display())),
    };
    let export = o.export.clone().unwrap_or_else(|| default_export(&disk));
    if let Err(e) = check_name("export", &export) {
        return fail(e);
    }
    let at = match endpoint(o, Some(base.join(format!("{export}.sock")))) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let args = serve_args(&disk, &export, &at);
    let mut cmd = String::from("ballot serve");
    for a in &args {
        cmd += " \\\n    ";
        cmd += &shell_quote(a);
    }
    let target = disk.target.clone().unwrap_or_else(|| "vda".into());
    let mut attach = format!(
        "ballot libvirt disk-xml --export {} --target {}",
        shell_quote(&export),
        shell_quote(&target)
    );
    match &at {
        Endpoint::Unix(p) => {
            attach += &format!(" --socket {}", shell_quote(&p.display().to_string()))
        }
        Endpoint::Tcp(h, p) => attach += &format!(" --addr {}", shell_quote(&format!("{h}:{p}"))),
    }
    if o.run {
        eprintln!("ballot: serving with\n{cmd}\nballot: attach it with: {attach}");
        return serve(&args);
    }
    println!("{cmd}");
    eprintln!("# attach it to a domain with: {attach}");
    ExitCode::SUCCESS
}

fn cmd_disk_xml(o: &Opts) -> ExitCode {
    let Some(export) = &o.export else {
        return usage("disk-xml needs --export NAME");
    };
    let Some(target) = &o.target else {
        return usage("disk-xml needs --target DEV");
    };
    if let Err(e) = check_name("--export", export).and_then(|_| check_name("--target", target)) {
        return usage(&e);
    }
    let bus = match (&o.bus, bus_for(target)) {
        (Some(b), _) if ["virtio", "scsi", "ide", "sata"].contains(&b.as_str()) => b.clone(),
        (Some(b), _) => return usage(&format!("--bus '{b}': expected virtio, scsi, ide or sata")),
        (None, Some(b)) => b.to_string(),
        (None, None) => {
            return usage(&format!(
                "--target '{target}': no bus follows from the name (vd*, sd*, hd*); give --bus"
            ))
        }
    };
    let at = match endpoint(o, None) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    print!("{}", disk_xml(export, &at, target, &bus));
    ExitCode::SUCCESS
}
