//! The simulator's shape (issue 22 item 2), read from its source: no module imports one that
//! imports it back, and no function grows past 120 lines. Reads `sim/src/*.rs` as text: the
//! `crate::MODULE` paths of each file are its imports; a function's length runs from its
//! `fn` line to its closing brace, with strings, characters and comments skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("sim/src")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("file name")
                .to_string();
            (name, std::fs::read_to_string(&p).expect("read source"))
        })
        .collect()
}

/// The text with comments, string and character literals blanked (newlines kept), so braces
/// and paths are only the code's.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && {
            let mut j = i + 1;
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            b.get(j) == Some(&'"') && (i == 0 || !(b[i - 1].is_alphanumeric() || b[i - 1] == '_'))
        } {
            let mut hashes = 0;
            let mut j = i + 1;
            while b[j] == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\'', '\u{7f}'), or a lifetime ('a).
            let end = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&j| b[j] == '\'' && j > i + 2)
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    for _ in i..=e {
                        out.push(' ');
                    }
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Module -> modules it names as `crate::MODULE`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mut g = BTreeMap::new();
    for (name, src) in &files {
        if name == "lib" || name == "main" {
            continue;
        }
        let code = code_only(src);
        let mut deps = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let m: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&m) && &m != name {
                deps.insert(m);
            }
        }
        g.insert(name.clone(), deps);
    }
    g
}

/// A cycle of the graph, if it has one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|x| x == d).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(d, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_of_the_simulator_imports_one_that_imports_it_back() {
    let g = imports();
    assert!(g.len() > 20, "read {} modules", g.len());
    assert!(
        g["sweep"].contains("runner"),
        "the reader must see the sweep's imports: {:?}",
        g["sweep"]
    );
    if let Some(c) = find_cycle(&g) {
        panic!("import cycle: {}", c.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
    };
    edge(&mut g, "cli", "sweep");
    edge(&mut g, "sweep", "runner");
    edge(&mut g, "runner", "world");
    assert_eq!(find_cycle(&g), None);
    edge(&mut g, "world", "sweep");
    assert_eq!(
        find_cycle(&g),
        Some(vec![
            "sweep".to_string(),
            "runner".into(),
            "world".into(),
            "sweep".into()
        ])
    );
}

/// Every function with its file, first line and length in lines.
fn functions() -> Vec<(String, String, usize, usize)> {
    let mut out = Vec::new();
    for (file, src) in sources() {
        let code = code_only(&src);
        let lines: Vec<&str> = code.lines().collect();
        let mut k = 0;
        while k < lines.len() {
            let t = lines[k].trim_start();
            let t = t
                .strip_prefix("pub(crate) ")
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            let t = t.strip_prefix("async ").unwrap_or(t);
            let t = t.strip_prefix("const ").unwrap_or(t);
            let Some(rest) = t.strip_prefix("fn ") else {
                k += 1;
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // From the fn line to the brace that closes its body (a declaration without a
            // body, ending in `;` first, is skipped).
            let (mut depth, mut opened, mut end) = (0i64, false, None);
            'scan: for (j, l) in lines.iter().enumerate().skip(k) {
                for ch in l.chars() {
                    match ch {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => {
                            depth -= 1;
                            if opened && depth == 0 {
                                end = Some(j);
                                break 'scan;
                            }
                        }
                        ';' if !opened => break 'scan,
                        _ => {}
                    }
                }
            }
            if let Some(e) = end {
                out.push((file.clone(), name, k + 1, e - k + 1));
            }
            k += 1;
        }
    }
    out
}

/// Issue 22: no function in `sim/` is longer than 120 lines (the last of those over it when
/// the rule was set, `vdisk::crash_disks`, was split into `crash`'s steps).
#[test]
fn no_function_is_longer_than_120_lines() {
    let fns = functions();
    assert!(fns.len() > 500, "read {} functions", fns.len());
    let over: Vec<String> = fns
        .iter()
        .filter(|(_, _, _, len)| *len > 120)
        .map(|(file, name, line, len)| format!("sim/src/{file}.rs:{line} {name}: {len} lines"))
        .collect();
    assert!(
        over.is_empty(),
        "functions over 120 lines:\n{}",
        over.join("\n")
    );
}

#[test]
fn the_function_reader_measures_bodies_past_strings_and_comments() {
    let src = "fn a() {\n    let s = \"}\"; // }\n    let c = '}';\n}\n\npub(crate) async fn b<'x>(v: &'x str) -> &'x str {\n    /* { */\n    v\n}\n";
    let code = code_only(src);
    assert_eq!(code.matches('{').count(), 2, "{code}");
    assert_eq!(code.matches('}').count(), 2, "{code}");
}
