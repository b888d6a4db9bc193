//! Fuzz target `blockdev_options`: `--blockdev` arguments (dotted keyval or JSON) through the
//! one option parser and the graph (QUORUM.md Q6–Q15, REPLICATION.md R41, R6).
//!
//! Each input line is one argument, added to one graph in order (so later lines can refer to
//! earlier nodes). Every argument must end in an error or a valid graph, never a panic:
//! - parsing is a function of the text (twice the same answer);
//! - a refused definition leaves the graph exactly as it was;
//! - an accepted one leaves a graph whose every edge is mirrored (child ↔ parent), whose
//!   quorums satisfy Q7–Q12 against the model in [`crate::vote::model_validate`], and whose
//!   quorum and overlay lengths equal their children's;
//! - a refusal with one of Q7–Q12's messages names a quorum of the definition that the model
//!   refuses with that message.
//!
//! Definitions whose tree contains a `file` or `nbd` node are parsed and type-checked only:
//! opening them would touch the file system or the network.

use ballot::config::parse_blockdev_arg;
use ballot::config::spec::{parse_node, ChildRef, DriverSpec, NodeSpec};
use ballot::drivers::quorum::ReadPattern;
use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;

use crate::vote::model_validate;

const Q7_Q12: [&str; 6] = [
    "Number of provided children must be 1 or more",
    "Parameter 'vote-threshold' expects a value >= 1",
    "threshold may not exceed children count",
    "blkverify=on cannot be used with read-pattern=fifo",
    "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
    "rewrite-corrupted=on cannot be used with blkverify=on",
];

/// Parses `arg` as the graph does, to the type-checked tree.
pub fn parse(arg: &str) -> Result<NodeSpec, String> {
    let (value, keyval_mode) = parse_blockdev_arg(arg).map_err(|e| e.to_string())?;
    parse_node(value, keyval_mode).map_err(|e| e.to_string())
}

fn specs<'a>(s: &'a NodeSpec, out: &mut Vec<&'a NodeSpec>) {
    out.push(s);
    let mut child = |c: &'a ChildRef| {
        if let ChildRef::Inline(n) = c {
            specs(n, out);
        }
    };
    match &s.driver {
        DriverSpec::Raw { file, .. } | DriverSpec::Replication { file, .. } => child(file),
        DriverSpec::Quorum { children, .. } => children.iter().for_each(child),
        DriverSpec::Overlay { backing, file } => {
            child(backing);
            if let Some(f) = file {
                child(f);
            }
        }
        DriverSpec::Qcow2 { file, backing, .. } => {
            child(file);
            if let Some(Some(b)) = backing {
                child(b);
            }
        }
        DriverSpec::File { .. } | DriverSpec::Null { .. } | DriverSpec::Nbd { .. } => {}
    }
}

/// A node as the refusal check compares it: name, children, parent.
type NodeShape = (String, Vec<(String, String)>, Option<(String, String)>);

fn snapshot(g: &Graph) -> Vec<NodeShape> {
    g.nodes()
        .map(|n| (n.name.clone(), n.children.clone(), n.parent.clone()))
        .collect()
}

/// Checks the invariants of an accepted graph.
fn check_graph(g: &Graph, ctx: &str) {
    for n in g.nodes() {
        for (child_name, child) in &n.children {
            let c = g
                .get(child)
                .unwrap_or_else(|| panic!("{ctx}: {} has a missing child {child}", n.name));
            assert_eq!(
                c.parent,
                Some((n.name.clone(), child_name.clone())),
                "{ctx}: edge {} -> {child} not mirrored",
                n.name
            );
        }
        if let Some((p, child_name)) = &n.parent {
            let parent = g
                .get(p)
                .unwrap_or_else(|| panic!("{ctx}: {} has a missing parent {p}", n.name));
            assert!(
                parent
                    .children
                    .contains(&(child_name.clone(), n.name.clone())),
                "{ctx}: parent edge of {} not mirrored",
                n.name
            );
        }
        if let Some(q) = &n.quorum {
            let o = q.options();
            let k = n.children.len();
            let fifo = o.read_pattern == ReadPattern::Fifo;
            assert_eq!(
                model_validate(
                    k,
                    o.threshold as i64,
                    fifo,
                    o.rewrite_corrupted,
                    o.blkverify
                ),
                None,
                "{ctx}: quorum {} open against Q7-Q12",
                n.name
            );
            for (_, c) in &n.children {
                let cl = g.get(c).and_then(|c| c.dev.length().ok());
                assert_eq!(cl, n.dev.length().ok(), "{ctx}: Q14 length of {}", n.name);
            }
        }
        if let Some(o) = &n.overlay {
            assert_eq!(
                o.backing().length().ok(),
                n.dev.length().ok(),
                "{ctx}: R41 overlay length of {}",
                n.name
            );
        }
    }
}

/// Adds each line of `text` to a fresh graph.
pub fn check(text: &str) {
    crate::rt::block_on(async {
        let (host, _) = Host::recording(EventBus::new());
        let mut g = Graph::new(host);
        for (i, line) in text.lines().take(8).enumerate() {
            let ctx = format!("line {i}");
            let spec = parse(line);
            assert_eq!(
                spec,
                parse(line),
                "{ctx}: parsing is not a function of the text"
            );
            let Ok(spec) = spec else { continue };
            let mut all = Vec::new();
            specs(&spec, &mut all);
            if all
                .iter()
                .any(|s| matches!(s.driver, DriverSpec::File { .. } | DriverSpec::Nbd { .. }))
            {
                continue;
            }
            let before = snapshot(&g);
            match g.blockdev_add_arg(line).await {
                Ok(name) => {
                    assert!(g.get(&name).is_some(), "{ctx}: node {name} missing");
                    check_graph(&g, &ctx);
                }
                Err(e) => {
                    assert_eq!(
                        snapshot(&g),
                        before,
                        "{ctx}: refused '{e}' but changed the graph"
                    );
                    let msg = e.to_string();
                    if Q7_Q12.contains(&msg.as_str()) {
                        let named = all.iter().any(|s| match &s.driver {
                            DriverSpec::Quorum {
                                blkverify,
                                children,
                                vote_threshold,
                                rewrite_corrupted,
                                read_pattern,
                                ..
                            } => {
                                model_validate(
                                    children.len(),
                                    *vote_threshold,
                                    *read_pattern == ReadPattern::Fifo,
                                    *rewrite_corrupted,
                                    *blkverify,
                                ) == Some(msg.as_str())
                            }
                            _ => false,
                        });
                        assert!(named, "{ctx}: '{msg}' for no quorum the model refuses");
                    }
                }
            }
        }
    });
}

/// The fuzz target: the input as (lossy) UTF-8 text.
pub fn fuzz(data: &[u8]) {
    check(&String::from_utf8_lossy(data));
}
