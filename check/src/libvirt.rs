//! Fuzz target `libvirt_xml`: `ballot libvirt import`'s reader of libvirt disk XML
//! (`ballot::libvirt`, issue 8; STYLE.md habit 4). The input is the XML text.
//!
//! Every input must end in an error message or a quorum disk, never a panic. An accepted disk
//! is one `ballot serve` can serve: a threshold within 1..=children (Q7–Q9), every child a raw
//! image with an absolute path, and serve arguments that the `--blockdev` reader accepts as a
//! quorum of exactly those children. Reading is a function of the text.

use std::path::Path;

use ballot::config::parse_blockdev_arg;
use ballot::libvirt::{import, parse_xml, serve_args, Endpoint};

/// Checks one XML text.
pub fn check(text: &str) {
    let base = Path::new("/base");
    let first = import(text, base, None);
    assert_eq!(
        format!("{first:?}"),
        format!("{:?}", import(text, base, None)),
        "reading is not a function of the text"
    );
    // The tree reader alone never panics either, and its errors are messages.
    if let Err(e) = parse_xml(text) {
        assert!(!e.trim().is_empty(), "an empty error message");
    }
    let disk = match first {
        Ok(d) => d,
        Err(e) => {
            assert!(!e.trim().is_empty(), "an empty error message");
            return;
        }
    };
    let n = disk.replicas.len();
    assert!(
        disk.threshold >= 1 && disk.threshold as usize <= n,
        "accepted threshold {} with {n} children",
        disk.threshold
    );
    for (k, r) in disk.replicas.iter().enumerate() {
        assert_eq!(r.index, k + 1, "children numbered in order");
        assert_eq!(r.format, "raw", "a non-raw child was accepted");
        assert!(r.path.is_absolute(), "relative path {:?}", r.path);
    }
    let args = serve_args(&disk, "e0", &Endpoint::Unix("/run/s.sock".into()));
    let blockdevs: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("--blockdev="))
        .collect();
    assert_eq!(
        blockdevs.len(),
        2 * n + 1,
        "file and raw per child, one quorum"
    );
    for b in &blockdevs {
        let spec = &b["--blockdev=".len()..];
        parse_blockdev_arg(spec).unwrap_or_else(|e| panic!("printed {spec} does not parse: {e}"));
    }
    let (q, _) = parse_blockdev_arg(&blockdevs[2 * n]["--blockdev=".len()..]).expect("quorum");
    assert_eq!(
        q.get("vote-threshold").and_then(|v| v.as_i64()),
        Some(disk.threshold)
    );
    assert_eq!(
        q.get("children")
            .and_then(|c| c.as_array())
            .map(|a| a.len()),
        Some(n)
    );
}

/// The fuzz target.
pub fn fuzz(data: &[u8]) {
    check(&String::from_utf8_lossy(data));
}
