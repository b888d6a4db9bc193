//! `ballot create`: a new image, in `qemu-img create`'s syntax (issue 19).

use std::process::ExitCode;
use std::sync::Arc;

use ballot::device::Device;
use ballot::drivers::file::{FileDevice, FileOptions};
use ballot::drivers::qcow2::create::{cluster_bits, create, refcount_order, CreateOptions};
use ballot::drivers::qcow2::Qcow2;

const USAGE: &str =
    "usage: ballot create [-f qcow2|raw] [-b BACKING [-F FMT]] [-o OPTIONS] FILE [SIZE]

Creates FILE (an existing one is overwritten, as qemu-img create does). SIZE takes the
suffixes K, M, G, T (powers of 1024); with -b it defaults to the backing file's size.
-b names the backing file as stored in the image (a relative name is relative to FILE's
directory); -F its format (qcow2 or raw; probed when omitted).
-o takes qcow2 options, comma-separated: cluster_size=SIZE (512 to 2M, default 64K),
compat=0.10|1.1 (image version 2 or 3, default 1.1), refcount_bits=1|2|4|8|16|32|64.";

type CliResult = Result<(), (u8, String)>;

fn usage(m: impl Into<String>) -> (u8, String) {
    (2, format!("{}\n{USAGE}", m.into()))
}

/// Entry point for `ballot create ARGS`.
pub fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, m)) => {
            eprintln!("ballot: {m}");
            ExitCode::from(code)
        }
    }
}

fn run(args: &[String]) -> CliResult {
    let mut fmt = "raw".to_string();
    let mut backing = None;
    let mut backing_fmt = None;
    let mut options = Vec::new();
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| usage(format!("option '{name}' requires an argument")))
        };
        match a.as_str() {
            "-f" => fmt = value("-f")?,
            "-b" => backing = Some(value("-b")?),
            "-F" => backing_fmt = Some(value("-F")?),
            "-o" => options.push(value("-o")?),
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(usage(format!("unknown option '{s}'")))
            }
            _ => pos.push(a.clone()),
        }
    }
    let (file, size) = match pos.as_slice() {
        [f] => (f.clone(), None),
        [f, s] => (
            f.clone(),
            Some(super::metadata::parse_size(s).map_err(usage)?),
        ),
        [] => return Err(usage("Expecting image file name")),
        _ => return Err(usage(format!("unexpected argument '{}'", pos[2]))),
    };
    let mut o = CreateOptions::default();
    for opt in options.iter().flat_map(|s| s.split(',')) {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| usage(format!("-o '{opt}': expected key=value")))?;
        match k {
            "cluster_size" => {
                let b = super::metadata::parse_size(v).map_err(usage)?;
                o.cluster_bits = cluster_bits(b).map_err(|m| (1, format!("{m} (got {v})")))?;
            }
            "compat" => {
                o.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err((
                            1,
                            format!("Invalid parameter '{v}' for compat (use 0.10 or 1.1)"),
                        ))
                    }
                }
            }
            "refcount_bits" => {
                let b: u64 = v
                    .parse()
                    .map_err(|_| (1, format!("Invalid refcount_bits '{v}'")))?;
                o.refcount_order = refcount_order(b).map_err(|m| (1, m))?;
            }
            _ => {
                return Err((
                    1,
                    format!(
                    "Invalid parameter '{k}' (ballot knows cluster_size, compat, refcount_bits)"
                ),
                ))
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (1, format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        // The backing file: its format and size (relative names are relative to FILE's dir).
        if let Some(b) = &backing {
            let path = if b.starts_with('/') {
                b.clone()
            } else {
                std::path::Path::new(&file)
                    .parent()
                    .map(|d| d.join(b).to_string_lossy().into_owned())
                    .unwrap_or_else(|| b.clone())
            };
            let dev: Device = Arc::new(
                open_file(&path, true)
                    .map_err(|m| (1, format!("Could not open backing file '{b}': {m}")))?,
            );
            let h = Qcow2::read_header(&dev, &format!("'{path}'")).await;
            let bfmt = match (&backing_fmt, &h) {
                (Some(f), _) => f.clone(),
                (None, Ok(_)) => "qcow2".to_string(),
                (None, Err(_)) => "raw".to_string(),
            };
            let bsize = match bfmt.as_str() {
                "qcow2" => h.map_err(|e| (1, e.to_string()))?.size,
                "raw" => dev.length().map_err(|e| (1, e.to_string()))?,
                other => {
                    return Err((
                        1,
                        format!("Unknown backing format '{other}' (use qcow2 or raw)"),
                    ))
                }
            };
            o.size = size.unwrap_or(bsize);
            if fmt == "qcow2" {
                o.backing = Some((b.clone(), bfmt));
            }
        } else {
            o.size = size.ok_or_else(|| usage("Image creation needs a size parameter"))?;
        }
        // Truncate (qemu-img create overwrites), then lay the image out.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file)
            .map_err(|e| (1, format!("Could not create '{file}': {e}")))?;
        match fmt.as_str() {
            "raw" => {
                if backing.is_some() {
                    return Err((1, "Backing file not supported for file format 'raw'".into()));
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .map_err(|e| (1, format!("Could not open '{file}': {e}")))?;
                f.set_len(o.size)
                    .map_err(|e| (1, format!("Could not resize '{file}': {e}")))?;
            }
            "qcow2" => {
                let dev: Device = Arc::new(open_file(&file, false).map_err(|m| (1, m))?);
                create(&dev, &o)
                    .await
                    .map_err(|e| (1, format!("Could not create '{file}': {e}")))?;
            }
            other => {
                return Err((
                    1,
                    format!("Unknown file format '{other}' (ballot creates qcow2 and raw)"),
                ))
            }
        }
        println!(
            "Formatting '{file}', fmt={fmt} size={}{}",
            o.size,
            match &o.backing {
                Some((b, f)) => format!(" backing_file={b} backing_fmt={f}"),
                None => String::new(),
            }
        );
        Ok(())
    })
}

fn open_file(path: &str, read_only: bool) -> Result<FileDevice, String> {
    FileDevice::open(&FileOptions {
        filename: path.to_string(),
        read_only,
        auto_read_only: false,
        direct: false,
        no_flush: false,
        discard_unmap: false,
        locking: true,
    })
    .map_err(|e| e.to_string())
}
