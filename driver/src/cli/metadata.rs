//! `ballot metadata create|show`: a quorum's metadata node (HEALING.md H19–H23) as a file.

use std::io::Write as _;
use std::process::ExitCode;

use ballot::drivers::quorum::durable::summarize;
use ballot::drivers::quorum::metadata::{
    ChildInfo, Header, Layout, INTENT_EXTENT_BYTES, SLOT_BYTES,
};
use ballot::drivers::quorum::sync::GRANULE_BYTES;

const USAGE: &str = "usage: ballot metadata create FILE --size SIZE --children NODE,NODE,...
                              [--max-children N] [--in-sync] [--force]
       ballot metadata show FILE

create writes a metadata node for a quorum of SIZE bytes (suffixes K, M, G, T: powers of
1024) whose children have these node-names, in the quorum's order; the quorum names it with
metadata=NODE. Without --in-sync every granule of every child starts out of sync, so the first
open compares the whole disk (use --in-sync only when the children are known to be identical,
e.g. new zeroed images). --max-children (default: children + 1) leaves room for hot-adding
children before removing others. An existing file is refused unless --force.
show prints the header, the dirty write-intent extents and the out-of-sync bytes per child.";

/// Entry point for `ballot metadata ARGS`.
pub fn main(args: &[String]) -> ExitCode {
    let r = match args.first().map(String::as_str) {
        Some("create") => create(&args[1..]),
        Some("show") => show(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, m)) => {
            eprintln!("ballot: {m}");
            ExitCode::from(code)
        }
    }
}

type CliResult = Result<(), (u8, String)>;

fn usage(m: impl Into<String>) -> (u8, String) {
    (2, format!("{}\n{USAGE}", m.into()))
}

/// Parses `512`, `64K`, `1G`, `1.5T`... (powers of 1024, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(format!("size '{s}': unknown suffix '{c}' (use K, M, G, T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("size '{s}' is not a number"))?;
    let bytes = v * mult as f64;
    if !(v.is_finite() && v >= 0.0) || bytes >= 2f64.powi(63) || bytes.fract() != 0.0 {
        return Err(format!(
            "size '{s}' is not a whole number of bytes below 2^63"
        ));
    }
    Ok(bytes as u64)
}

fn create(args: &[String]) -> CliResult {
    let mut file = None;
    let mut size = None;
    let mut children: Option<Vec<String>> = None;
    let mut max_children = None;
    let mut in_sync = false;
    let mut force = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, (u8, String)> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| usage(format!("option '{name}' requires an argument")))
        };
        match key {
            "--size" => size = Some(parse_size(&value("--size")?).map_err(usage)?),
            "--children" => {
                let v = value("--children")?;
                let names: Vec<String> = v.split(',').map(str::to_string).collect();
                if names.iter().any(String::is_empty) {
                    return Err(usage(format!("--children '{v}': an empty node-name")));
                }
                children = Some(names);
            }
            "--max-children" => {
                let v = value("--max-children")?;
                max_children = Some(
                    v.parse::<u64>()
                        .map_err(|_| usage(format!("--max-children '{v}' is not a number")))?,
                );
            }
            "--in-sync" => in_sync = true,
            "--force" => force = true,
            _ if a.starts_with('-') => return Err(usage(format!("unknown option '{a}'"))),
            _ if file.is_none() => file = Some(a.clone()),
            _ => return Err(usage(format!("unexpected argument '{a}'"))),
        }
    }
    let file = file.ok_or_else(|| usage("FILE is missing"))?;
    let size = size.ok_or_else(|| usage("--size is missing"))?;
    let children = children.ok_or_else(|| usage("--children is missing"))?;
    if size == 0 {
        return Err(usage("--size must be more than 0"));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = children.iter().find(|c| !seen.insert(c.as_str())) {
        return Err(usage(format!("--children names '{d}' twice")));
    }
    let n = children.len() as u64;
    let room = max_children.unwrap_or(n + 1);
    if room < n {
        return Err(usage(format!(
            "--max-children {room} is fewer than the {n} children"
        )));
    }
    let header = Header {
        seq: 1,
        disk_len: size,
        granule: GRANULE_BYTES as u32,
        extent: INTENT_EXTENT_BYTES as u32,
        clean: true,
        children: children
            .iter()
            .map(|c| ChildInfo {
                node_name: c.clone(),
                length: size,
            })
            .collect(),
    };
    let slot = header.encode().map_err(|m| (1, m))?;
    let layout = Layout {
        disk_len: size,
        children: n,
        granule: GRANULE_BYTES,
    };
    let total = Layout {
        children: room,
        ..layout
    }
    .total_bytes();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let f = opts.open(&file).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
            " (--force replaces it)"
        } else {
            ""
        };
        (1, format!("Could not create '{file}': {e}{hint}"))
    })?;
    let io = |e: std::io::Error| (1, format!("Could not write '{file}': {e}"));
    f.set_len(total).map_err(io)?;
    if !in_sync {
        // H8: nothing says the children are copies of each other.
        let granules = layout.granules();
        let mut bits = vec![0xffu8; (granules / 8) as usize];
        if granules % 8 != 0 {
            bits.push((1u8 << (granules % 8)) - 1);
        }
        for i in 0..n {
            write_at(&f, layout.oos_offset(i), &bits).map_err(io)?;
        }
    }
    write_at(&f, header.slot() * SLOT_BYTES, &slot).map_err(io)?;
    f.sync_all().map_err(io)?;
    let _ = writeln!(
        std::io::stdout(),
        "created '{file}': {total} bytes for a quorum of {size} bytes, children {} (room for {room}), {}",
        children.join(","),
        if in_sync {
            "children in sync"
        } else {
            "every granule out of sync (the first open compares the whole disk)"
        }
    );
    Ok(())
}

fn write_at(f: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(data, offset)
}

fn show(args: &[String]) -> CliResult {
    let [file] = args else {
        return Err(usage("show takes one FILE"));
    };
    let bytes = std::fs::read(file).map_err(|e| (1, format!("Could not read '{file}': {e}")))?;
    let s = summarize(&bytes).map_err(|m| (1, format!("'{file}': {m}")))?;
    let h = &s.header;
    let mut out = String::new();
    out += &format!("file: {file}\n");
    out += &format!("sequence: {} (slot {})\n", h.seq, s.slot);
    out += &format!("clean: {}\n", if h.clean { "yes" } else { "no" });
    out += &format!("disk length: {}\n", h.disk_len);
    out += &format!("granule: {}\n", h.granule);
    out += &format!(
        "dirty intent extents: {} ({} bytes each){}\n",
        s.dirty_extents.len(),
        h.extent,
        if s.dirty_extents.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                s.dirty_extents
                    .iter()
                    .take(32)
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
                    + if s.dirty_extents.len() > 32 {
                        ",..."
                    } else {
                        ""
                    }
            )
        }
    );
    out += &format!("children: {}\n", h.children.len());
    for (i, (c, (g, bytes))) in h.children.iter().zip(&s.out_of_sync).enumerate() {
        out += &format!(
            "  {i} {}: out-of-sync {bytes} bytes ({g} granules)\n",
            c.node_name
        );
    }
    print!("{out}");
    Ok(())
}
