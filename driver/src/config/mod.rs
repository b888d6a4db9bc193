//! Configuration: qemu-storage-daemon's dotted `--blockdev` syntax ([`keyval`]) and the
//! type-level option checks that turn a definition into a [`spec::NodeSpec`] (QUORUM.md Q6).

pub mod keyval;
pub mod spec;

use serde_json::Value;

use crate::error::ConfigError;

/// Reads one `--blockdev` argument: JSON when it starts with `{`, else the dotted syntax.
/// Returns the tree and whether its values are keyval strings (to be converted by
/// [`spec::parse_node`]).
///
/// # Errors
/// `JSON parse error, <serde's message>`, or [`keyval::parse`]'s messages.
pub fn parse_blockdev_arg(arg: &str) -> Result<(Value, bool), ConfigError> {
    if arg.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(arg)
            .map_err(|e| ConfigError::new(format!("JSON parse error, {e}")))?;
        Ok((v, false))
    } else {
        Ok((keyval::parse(arg)?, true))
    }
}

/// A string parameter (numbers and booleans taken as their text), or `None` if absent.
pub(crate) fn text(
    m: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(format!(
            "Invalid parameter type for '{key}', expected: string"
        )),
    }
}
