//! QEMU's dotted `key=value` syntax (`--blockdev driver=file,node-name=f0,filename=a.raw`):
//! `,,` is a literal comma inside a value; dotted keys nest (`cache.direct=on`); keys whose
//! fragments are all decimal integers form lists (`children.0=r0,children.1.driver=file`).
//! A repeated key: the last value wins, as in QEMU. Every value is a JSON string; the option
//! layer converts types (QUORUM.md Q6).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::ConfigError;

#[derive(Debug)]
enum Tree {
    Leaf(String),
    Map(BTreeMap<String, Tree>),
}

fn valid_fragment(f: &str) -> bool {
    !f.is_empty()
        && f.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Most dot-separated fragments in one key: far above any real option (`children.0.file.
/// filename` is 4), far below what would exhaust the stack of the recursive tree walk (the
/// `blockdev_options` fuzz target overflowed it with a 900-level key).
pub const KEY_DEPTH_MAX: usize = 64;

/// Parses a dotted option string into a JSON object whose leaves are strings.
///
/// # Errors
/// QEMU's keyval messages: `Expected '=' after parameter '<key>'`, `Invalid parameter
/// '<key>'`, `Parameters '<key>.*' used inconsistently`, `Parameter '<key>.<i>' missing`.
pub fn parse(input: &str) -> Result<Value, ConfigError> {
    let mut root: BTreeMap<String, Tree> = BTreeMap::new();
    let bytes = input.as_bytes();
    let mut i = 0usize;
    while i < bytes.len() {
        // Key: up to '=' or ','.
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && bytes[i] != b',' {
            i += 1;
        }
        let key = &input[key_start..i];
        if i >= bytes.len() || bytes[i] != b'=' {
            if key.is_empty() {
                return Err(ConfigError::new(format!("Invalid parameter '{key}'")));
            }
            return Err(ConfigError::new(format!(
                "Expected '=' after parameter '{key}'"
            )));
        }
        i += 1; // '='
        let mut value = String::new();
        let mut seg_start = i;
        loop {
            if i >= bytes.len() {
                value.push_str(&input[seg_start..i]);
                break;
            }
            if bytes[i] == b',' {
                if i + 1 < bytes.len() && bytes[i + 1] == b',' {
                    value.push_str(&input[seg_start..=i]);
                    i += 2;
                    seg_start = i;
                    continue;
                }
                value.push_str(&input[seg_start..i]);
                i += 1;
                break;
            }
            i += 1;
        }
        let frags: Vec<&str> = key.split('.').collect();
        if !frags.iter().all(|f| valid_fragment(f)) {
            return Err(ConfigError::new(format!("Invalid parameter '{key}'")));
        }
        // The tree is built and walked recursively: its depth is bounded before either.
        if frags.len() > KEY_DEPTH_MAX {
            return Err(ConfigError::new(format!(
                "Invalid parameter '{key}': more than {KEY_DEPTH_MAX} levels"
            )));
        }
        insert(&mut root, &frags, value)?;
    }
    listify(Tree::Map(root), "")
}

fn insert(
    map: &mut BTreeMap<String, Tree>,
    frags: &[&str],
    value: String,
) -> Result<(), ConfigError> {
    let mut cur = map;
    for (depth, frag) in frags.iter().enumerate() {
        let last = depth + 1 == frags.len();
        let prefix = frags[..=depth].join(".");
        if last {
            match cur.get(*frag) {
                Some(Tree::Map(_)) => {
                    return Err(ConfigError::new(format!(
                        "Parameters '{prefix}.*' used inconsistently"
                    )))
                }
                // The last value of a repeated key wins.
                _ => {
                    cur.insert((*frag).to_string(), Tree::Leaf(value));
                    return Ok(());
                }
            }
        }
        let entry = cur
            .entry((*frag).to_string())
            .or_insert_with(|| Tree::Map(BTreeMap::new()));
        match entry {
            Tree::Map(m) => cur = m,
            Tree::Leaf(_) => {
                return Err(ConfigError::new(format!(
                    "Parameters '{prefix}.*' used inconsistently"
                )))
            }
        }
    }
    Ok(())
}

fn is_index(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())
}

fn listify(tree: Tree, path: &str) -> Result<Value, ConfigError> {
    let map = match tree {
        Tree::Leaf(s) => return Ok(Value::String(s)),
        Tree::Map(m) => m,
    };
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    let numeric = map.keys().filter(|k| is_index(k)).count();
    if numeric > 0 && numeric < map.len() {
        return Err(ConfigError::new(format!(
            "Parameters '{}.*' used inconsistently",
            if path.is_empty() { "" } else { path }
        )));
    }
    if numeric > 0 && !path.is_empty() {
        let mut items: BTreeMap<u64, Tree> = BTreeMap::new();
        for (k, v) in map {
            let idx: u64 = k
                .parse()
                .map_err(|_| ConfigError::new(format!("Invalid parameter '{}'", join(&k))))?;
            items.insert(idx, v);
        }
        let mut out = Vec::with_capacity(items.len());
        for (expected, (idx, v)) in items.into_iter().enumerate() {
            if idx != expected as u64 {
                return Err(ConfigError::new(format!(
                    "Parameter '{}' missing",
                    join(&expected.to_string())
                )));
            }
            out.push(listify(v, &join(&idx.to_string()))?);
        }
        return Ok(Value::Array(out));
    }
    let mut obj = Map::new();
    for (k, v) in map {
        let child_path = join(&k);
        obj.insert(k, listify(v, &child_path)?);
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(s: &str) -> String {
        parse(s).unwrap_err().message().to_string()
    }

    #[test]
    fn keys_nest_at_most_key_depth_max_levels() {
        let deep = vec!["a"; KEY_DEPTH_MAX].join(".");
        assert!(parse(&format!("{deep}=1")).is_ok());
        let deeper = format!("{deep}.a");
        assert_eq!(
            parse(&format!("{deeper}=1")).unwrap_err().to_string(),
            format!("Invalid parameter '{deeper}': more than 64 levels")
        );
    }

    #[test]
    fn q6_dotted_keys_nest_and_numeric_keys_make_lists() {
        assert_eq!(
            parse("driver=quorum,children.0=r0,children.1.driver=file,children.1.filename=a,,b,cache.direct=on")
                .unwrap(),
            json!({"driver": "quorum", "children": ["r0", {"driver": "file", "filename": "a,b"}], "cache": {"direct": "on"}})
        );
    }

    #[test]
    fn q6_double_comma_escapes_and_last_repeated_key_wins() {
        assert_eq!(
            parse("filename=a,,,,b").unwrap(),
            json!({"filename": "a,,b"})
        );
        assert_eq!(parse("x=1,x=2").unwrap(), json!({"x": "2"}));
        assert_eq!(parse("x=").unwrap(), json!({"x": ""}));
        assert_eq!(parse("x=a=b").unwrap(), json!({"x": "a=b"}));
    }

    #[test]
    fn q6_keyval_errors_use_qemu_wording() {
        assert_eq!(
            err("vote-threshold"),
            "Expected '=' after parameter 'vote-threshold'"
        );
        assert_eq!(err("a=1,b"), "Expected '=' after parameter 'b'");
        assert_eq!(err("a..b=1"), "Invalid parameter 'a..b'");
        assert_eq!(err("a b=1"), "Invalid parameter 'a b'");
        assert_eq!(err("=1"), "Invalid parameter ''");
        assert_eq!(
            err("children.0=a,children.2=b"),
            "Parameter 'children.1' missing"
        );
        assert_eq!(
            err("children.0=a,children.0.x=b"),
            "Parameters 'children.0.*' used inconsistently"
        );
        assert_eq!(
            err("children.0.x=b,children.0=a"),
            "Parameters 'children.0.*' used inconsistently"
        );
        assert_eq!(
            err("children.0=a,children.x=b"),
            "Parameters 'children.*' used inconsistently"
        );
    }
}
