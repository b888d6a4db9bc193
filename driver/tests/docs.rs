//! Issue 20 item 6: the manual in `docs/` stands on its own. Every rule id a code comment cites
//! is defined in `docs/` (as `**ID**`), and every relative link in README.md and `docs/`
//! points at a file of the repository.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// The rule ids `text` defines: `**X12**` at the start of a list item or paragraph.
fn defined(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for part in text.split("**").skip(1).step_by(2) {
        if is_id(part) {
            out.insert(part.to_string());
        }
    }
    out
}

/// A rule id: one capital letter and one to three digits (`Q7`, `N28`, `F30`), optionally with
/// a sub-item (`N20.1`).
fn is_id(s: &str) -> bool {
    let mut c = s.chars();
    let Some(first) = c.next() else {
        return false;
    };
    let rest: String = c.collect();
    let digits = rest.split('.').next().unwrap_or("");
    first.is_ascii_uppercase()
        && (1..=3).contains(&digits.len())
        && digits.chars().all(|d| d.is_ascii_digit())
        && rest[digits.len()..]
            .strip_prefix('.')
            .is_none_or(|sub| !sub.is_empty() && sub.chars().all(|d| d.is_ascii_digit()))
}

/// Rule ids cited in the comments of `text` (`//`, `//!`, `///`, `#`), with one line each.
fn cited(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let Some(at) = line
            .find("//")
            .or_else(|| line.trim_start().starts_with('#').then_some(0))
        else {
            continue;
        };
        let comment = &line[at..];
        for w in comment.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.')) {
            let w = w.trim_end_matches('.');
            let base = w.split('.').next().unwrap_or(w);
            if is_id(base) && base.len() <= 4 {
                out.push((base.to_string(), n + 1));
            }
        }
    }
    out
}

#[test]
fn every_rule_id_cited_in_a_comment_is_defined_in_docs() {
    let root = repo();
    let mut docs = Vec::new();
    files(&root.join("docs"), "md", &mut docs);
    assert!(docs.len() >= 10, "docs/ pages: {docs:?}");
    let mut defs = BTreeSet::new();
    for d in &docs {
        defs.extend(defined(&std::fs::read_to_string(d).unwrap()));
    }
    // Families are the letters the manual defines rules for; other capital-letter-and-digit
    // words in comments (register names, "L2 table") are not citations.
    let families: BTreeSet<char> = defs.iter().filter_map(|d| d.chars().next()).collect();
    let mut sources = Vec::new();
    for dir in [
        "driver/src",
        "driver/tests",
        "sim/src",
        "check/src",
        "fuzz/fuzz_targets",
    ] {
        files(&root.join(dir), "rs", &mut sources);
    }
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &sources {
        let text = std::fs::read_to_string(f).unwrap();
        for (id, line) in cited(&text) {
            let fam = id.chars().next().unwrap();
            if families.contains(&fam) && !defs.contains(&id) {
                missing.entry(id).or_default().push(format!(
                    "{}:{line}",
                    f.strip_prefix(&root).unwrap().display()
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "rule ids cited in comments but defined nowhere in docs/:\n{}",
        missing
            .iter()
            .map(|(id, at)| format!(
                "  {id}: {}",
                at.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn readme_and_docs_link_only_inside_the_repository() {
    let root = repo();
    let mut pages = vec![root.join("README.md")];
    files(&root.join("docs"), "md", &mut pages);
    let mut bad = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        if text.contains("../shared") {
            bad.push(format!("{}: mentions ../shared", page.display()));
        }
        // Markdown links: ](target)
        for part in text.split("](").skip(1) {
            let Some(end) = part.find(')') else { continue };
            let target = &part[..end];
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let path = target.split('#').next().unwrap_or("");
            if path.is_empty() {
                continue;
            }
            let resolved = page.parent().unwrap().join(path);
            if !resolved.exists() {
                bad.push(format!("{}: link to missing '{target}'", page.display()));
            } else if !resolved
                .canonicalize()
                .is_ok_and(|p| p.starts_with(root.canonicalize().unwrap()))
            {
                bad.push(format!(
                    "{}: link outside the repository '{target}'",
                    page.display()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn ids_and_citations_are_recognised() {
    assert!(is_id("Q7") && is_id("N20.1") && is_id("F30") && is_id("K12"));
    assert!(!is_id("Q") && !is_id("q7") && !is_id("N20.") && !is_id("QMP") && !is_id("F4011"));
    assert_eq!(
        defined("- **Q7** the threshold ... **bold** and **H12** too"),
        ["H12", "Q7"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        cited("let x = 1; // Q7: see N20.1 and SHA256 (not K)\nfn f() {} // nothing"),
        vec![("Q7".to_string(), 1), ("N20".to_string(), 1)]
    );
}
