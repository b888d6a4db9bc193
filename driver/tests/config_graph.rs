//! `--blockdev` parsing and the graph: every error message (QEMU's wording where QEMU has one,
//! checked against qemu-storage-daemon 10.0.2 by hand), open order (Q6–Q15), child naming
//! (Q2, Q55) and `x-blockdev-change` (Q52–Q56).

mod common;

use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::{Captured, Host};
use ballot::BlockDevice;

/// A scratch directory with three 1 MiB images and one 2 MiB image.
struct Images {
    dir: common::Scratch,
}

impl Images {
    fn new() -> Images {
        let dir = common::Scratch::new("cfg");
        for (name, len) in [
            ("a", 1 << 20),
            ("b", 1 << 20),
            ("c", 1 << 20),
            ("big", 2 << 20),
        ] {
            dir.image(&format!("{name}.raw"), len);
        }
        Images { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.0.join(format!("{name}.raw")).display().to_string()
    }
}

fn graph() -> (Graph, Captured) {
    let (host, cap) = Host::recording(EventBus::new());
    (Graph::new(host), cap)
}

/// Adds every arg; returns the first error message, or "" when all succeed.
async fn add_all(g: &mut Graph, args: &[String]) -> String {
    for a in args {
        if let Err(e) = g.blockdev_add_arg(a).await {
            return e.message().to_string();
        }
    }
    String::new()
}

fn files(im: &Images) -> Vec<String> {
    ["a", "b", "c"]
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            vec![
                format!("driver=file,node-name=f{i},filename={}", im.path(n)),
                format!("driver=raw,node-name=r{i},file=f{i}"),
            ]
        })
        .collect()
}

async fn error_of(extra: &str) -> String {
    let im = Images::new();
    let (mut g, _) = graph();
    let mut args = files(&im);
    args.push(extra.replace("BIG", &im.path("big")));
    add_all(&mut g, &args).await
}

#[tokio::test]
async fn q6_to_q14_every_open_error_in_qemu_wording() {
    // (rule, definition, message). "BIG" is replaced with the 2 MiB image's path.
    let rows: &[(&str, &str, &str)] = &[
        ("Q6", "driver=quorum,node-name=q,children.0=r0", "Parameter 'vote-threshold' is missing"),
        ("Q6", "driver=quorum,node-name=q,vote-threshold=1", "Parameter 'children' is missing"),
        ("Q6", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,read-pattern=random", "Parameter 'read-pattern' does not accept value 'random'"),
        ("Q6", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,foo=1", "Parameter 'foo' is unexpected"),
        ("Q6", "driver=quorum,node-name=q,vote-threshold=two,children.0=r0", "Parameter 'vote-threshold' expects integer"),
        ("Q6", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,rewrite-corrupted=maybe", "Parameter 'rewrite-corrupted' expects 'on' or 'off'"),
        ("Q6", r#"{"driver":"quorum","node-name":"q","vote-threshold":"2","children":["r0"]}"#, "Invalid parameter type for 'vote-threshold', expected: integer"),
        ("Q6", r#"{"driver":"quorum","node-name":"q","vote-threshold":1,"children":"r0"}"#, "Invalid parameter type for 'children', expected: array"),
        ("Q6", r#"{"driver":"quorum","node-name":"q","vote-threshold":1,"children":["r0"],"blkverify":"on"}"#, "Invalid parameter type for 'blkverify', expected: boolean"),
        ("Q6", r#"{"driver":"quorum","node-name":"q","vote-threshold":1,"children":[3]}"#, "Invalid parameter type for 'children.0', expected: BlockdevRef"),
        ("Q6 inline child checked before Q9", "driver=quorum,node-name=q,vote-threshold=9,children.0=r0,children.1.driver=file", "Parameter 'children.1.filename' is missing"),
        ("Q6 nested unknown option", "driver=quorum,node-name=q,vote-threshold=1,children.0.driver=raw,children.0.file=f0,children.0.bogus=1", "Parameter 'children.0.bogus' is unexpected"),
        ("Q6", "driver=quorum,node-name=q,vote-threshold=1,children.0.driver=nbdx", "Parameter 'children.0.driver' does not accept value 'nbdx'"),
        ("Q7", r#"{"driver":"quorum","node-name":"q","vote-threshold":1,"children":[]}"#, "Number of provided children must be 1 or more"),
        ("Q8", "driver=quorum,node-name=q,vote-threshold=0,children.0=r0", "Parameter 'vote-threshold' expects a value >= 1"),
        ("Q8", "driver=quorum,node-name=q,vote-threshold=-3,children.0=r0", "Parameter 'vote-threshold' expects a value >= 1"),
        ("Q9", "driver=quorum,node-name=q,vote-threshold=3,children.0=r0,children.1=r1", "threshold may not exceed children count"),
        ("Q9 fifo", "driver=quorum,node-name=q,vote-threshold=3,read-pattern=fifo,children.0=r0,children.1=r1", "threshold may not exceed children count"),
        ("Q10 D2", "driver=quorum,node-name=q,vote-threshold=2,read-pattern=fifo,blkverify=on,children.0=r0,children.1=r1", "blkverify=on cannot be used with read-pattern=fifo"),
        ("Q11", "driver=quorum,node-name=q,vote-threshold=2,blkverify=on,children.0=r0,children.1=r1,children.2=r2", "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"),
        ("Q11", "driver=quorum,node-name=q,vote-threshold=1,blkverify=on,children.0=r0,children.1=r1", "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"),
        ("Q12", "driver=quorum,node-name=q,vote-threshold=2,blkverify=on,rewrite-corrupted=on,children.0=r0,children.1=r1", "rewrite-corrupted=on cannot be used with blkverify=on"),
        ("Q13", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.1=nope", "Cannot find device='nope' nor node-name='nope'"),
        ("Q13", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.1.driver=file,children.1.filename=/nonexistent/x.raw", "Could not open '/nonexistent/x.raw': No such file or directory"),
        ("Q14", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.1.driver=file,children.1.filename=BIG", "Could not refresh total sector count: Input/output error"),
        ("Q5", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.1=r0", "Conflicts with use by q as 'children.0', which does not allow 'write' on r0"),
        ("Q5", "driver=raw,node-name=r9,file=f0", "Conflicts with use by r0 as 'file', which does not allow 'write' on f0"),
        ("root", "driver=null-co", "'node-name' must be specified for the root node"),
        ("node-name", "driver=null-co,node-name=1x", "Invalid node-name: '1x'"),
        ("node-name", "driver=null-co,node-name=abcdefghijabcdefghijabcdefghijabc", "Node name too long"),
        ("node-name", "driver=null-co,node-name=r1", "Duplicate nodes with node-name='r1'"),
        ("driver", "node-name=x", "Parameter 'driver' is missing"),
        ("driver", "driver=vmdk,node-name=x", "Parameter 'driver' does not accept value 'vmdk'"),
        ("qcow2", "driver=qcow2,node-name=x", "Parameter 'file' is missing"),
        ("qcow2", "driver=qcow2,node-name=x,file=f0,lazy-refcounts=on", "Parameter 'lazy-refcounts' is not supported by ballot: lazy refcounts trade crash consistency for speed"),
        ("file", "driver=file,node-name=x", "Parameter 'filename' is missing"),
        ("file", "driver=file,node-name=x,filename=BIG,cache.direct=maybe", "Parameter 'cache.direct' expects 'on' or 'off'"),
        ("file", "driver=file,node-name=x,filename=BIG,cache.bogus=on", "Parameter 'cache.bogus' is unexpected"),
        ("file", "driver=file,node-name=x,filename=BIG,aio=native", "Parameter 'aio' value 'native' is not supported by ballot (use 'threads')"),
        ("file", "driver=file,node-name=x,filename=BIG,discard=sometimes", "Parameter 'discard' does not accept value 'sometimes'"),
        ("raw", "driver=raw,node-name=x", "Parameter 'file' is missing"),
        ("raw", "driver=raw,node-name=x,file.driver=file,file.filename=BIG,size=1000", "Specified size is not multiple of 512"),
        ("raw", "driver=raw,node-name=x,file.driver=file,file.filename=BIG,offset=3000000", "Offset (3000000) cannot be greater than size of the containing file (2097152)"),
        ("raw", "driver=raw,node-name=x,file.driver=file,file.filename=BIG,offset=512,size=2097152", "The sum of offset (512) and size (2097152) has to be smaller or equal to the  actual size of the containing file (2097152)"),
        ("raw", "driver=raw,node-name=x,file.driver=file,file.filename=BIG,offset=-1", "Parameter 'offset' expects a value >= 0"),
        ("null-co", "driver=null-co,node-name=x,size=abc", "Parameter 'size' expects integer"),
        ("null-co", r#"{"driver":"null-co","node-name":"x","size":"abc"}"#, "Invalid parameter type for 'size', expected: integer"),
        ("keyval", "driver=quorum,node-name=q,vote-threshold", "Expected '=' after parameter 'vote-threshold'"),
        ("keyval", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.2=r1", "Parameter 'children.1' missing"),
        ("keyval", "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.0.x=r1", "Parameters 'children.0.*' used inconsistently"),
        ("json", "{\"driver\":", "JSON parse error, EOF while parsing a value at line 1 column 10"),
    ];
    for (rule, def, want) in rows {
        assert_eq!(error_of(def).await, *want, "{rule}: {def}");
    }
}

#[tokio::test]
async fn q13_failed_open_releases_inline_children_and_claims_nothing() {
    let im = Images::new();
    let (mut g, _) = graph();
    assert_eq!(add_all(&mut g, &files(&im)).await, "");
    let before: Vec<String> = g.nodes().map(|n| n.name.clone()).collect();
    let bad = format!(
        "driver=quorum,node-name=q,vote-threshold=1,children.0=r0,children.1.driver=file,children.1.node-name=inl,children.1.filename={},children.1.locking=off,children.2=nope",
        im.path("a")
    );
    assert_eq!(
        add_all(&mut g, &[bad]).await,
        "Cannot find device='nope' nor node-name='nope'"
    );
    let after: Vec<String> = g.nodes().map(|n| n.name.clone()).collect();
    assert_eq!(after, before, "inline child 'inl' must be released");
    assert_eq!(
        g.get("r0").unwrap().parent,
        None,
        "r0 must not stay claimed"
    );
    // The same node name is free again.
    let ok = "driver=quorum,node-name=q,vote-threshold=1,children.0=r0".to_string();
    assert_eq!(add_all(&mut g, &[ok]).await, "");
}

#[tokio::test]
async fn q2_children_are_named_in_order_and_inline_children_get_generated_names() {
    let im = Images::new();
    let (mut g, cap) = graph();
    let mut args = files(&im);
    args.push(format!(
        // The same image as f1: a second writer of it is refused unless locking is off (H25).
        r#"{{"driver":"quorum","node-name":"q0","vote-threshold":2,"children":["r0",{{"driver":"raw","file":{{"driver":"file","filename":"{}","locking":"off"}}}},"r2"]}}"#,
        im.path("b")
    ));
    assert_eq!(add_all(&mut g, &args).await, "");
    let q = g.get("q0").unwrap();
    assert_eq!(
        q.children,
        vec![
            ("children.0".to_string(), "r0".to_string()),
            ("children.1".to_string(), "#block000".to_string()),
            ("children.2".to_string(), "r2".to_string()),
        ]
    );
    // A node is named before its inline children are opened: the raw's file comes second.
    assert_eq!(
        g.get("#block000").unwrap().children,
        vec![("file".to_string(), "#block001".to_string())]
    );
    assert_eq!(
        q.quorum.as_ref().unwrap().child_names().await,
        vec![
            ("children.0".to_string(), "r0".to_string()),
            ("children.1".to_string(), "#block000".to_string()),
            ("children.2".to_string(), "r2".to_string()),
        ]
    );
    assert_eq!(
        g.get("r0").unwrap().parent,
        Some(("q0".into(), "children.0".into()))
    );
    assert_eq!(cap.warnings(), Vec::<String>::new());
}

#[tokio::test]
async fn q15_weak_threshold_warning_comes_from_a_configured_graph() {
    let im = Images::new();
    let (mut g, cap) = graph();
    let mut args = files(&im);
    args.push("driver=quorum,node-name=q0,vote-threshold=1,children.0=r0,children.1=r1".into());
    assert_eq!(add_all(&mut g, &args).await, "");
    assert_eq!(cap.warnings(), vec!["ballot: warning: quorum node 'q0': vote-threshold 1 with 2 children is not a strict majority; stale or tied reads are possible".to_string()]);
}

async fn quorum_graph(im: &Images, extra_nodes: &[&str], t: u32) -> Graph {
    let (mut g, _) = graph();
    let mut args = files(im);
    for n in extra_nodes {
        args.push(
            n.replace("BIG", &im.path("big"))
                .replace("A", &im.path("a")),
        );
    }
    args.push(format!(
        "driver=quorum,node-name=q0,vote-threshold={t},children.0=r0,children.1=r1"
    ));
    assert_eq!(add_all(&mut g, &args).await, "");
    g
}

async fn change(g: &mut Graph, parent: &str, child: Option<&str>, node: Option<&str>) -> String {
    match g.change(parent, child, node).await {
        Ok(()) => String::new(),
        Err(e) => e.message().to_string(),
    }
}

#[tokio::test]
async fn q52_q53_q54_change_errors_in_order() {
    let im = Images::new();
    let mut g = quorum_graph(
        &im,
        &[
            "driver=file,node-name=fbig,filename=BIG",
            "driver=null-co,node-name=n1,size=1048576",
        ],
        2,
    )
    .await;
    // Q52.
    assert_eq!(
        change(&mut g, "nope", Some("children.0"), None).await,
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        change(&mut g, "q0", Some("children.0"), Some("r2")).await,
        "The parameters child and node are in conflict"
    );
    assert_eq!(
        change(&mut g, "q0", None, None).await,
        "Either child or node must be specified"
    );
    // Q53.
    assert_eq!(
        change(&mut g, "q0", Some("children.7"), None).await,
        "Node 'q0' does not have child 'children.7'"
    );
    assert_eq!(
        change(&mut g, "r0", Some("file"), None).await,
        "The node r0 does not support removing a child"
    );
    assert_eq!(
        change(&mut g, "q0", Some("children.1"), None).await,
        "The number of children cannot be lower than the vote threshold 2"
    );
    // Q54.
    assert_eq!(
        change(&mut g, "q0", None, Some("zz")).await,
        "Node 'zz' not found"
    );
    assert_eq!(
        change(&mut g, "r2", None, Some("n1")).await,
        "The node r2 does not support adding a child"
    );
    assert_eq!(
        change(&mut g, "q0", None, Some("f2")).await,
        "The node f2 already has a parent"
    );
    assert_eq!(
        change(&mut g, "q0", None, Some("fbig")).await,
        "Cannot add child 'fbig' to quorum 'q0': its length 2097152 differs from the quorum's length 1048576"
    );
    assert_eq!(change(&mut g, "q0", None, Some("n1")).await, "");
    assert_eq!(
        g.get("n1").unwrap().parent,
        Some(("q0".into(), "children.2".into()))
    );
}

#[tokio::test]
async fn q54_blkverify_quorum_refuses_hot_add() {
    let im = Images::new();
    let (mut g, _) = graph();
    let mut args = files(&im);
    args.push(
        "driver=quorum,node-name=q0,vote-threshold=2,blkverify=on,children.0=r0,children.1=r1"
            .into(),
    );
    assert_eq!(add_all(&mut g, &args).await, "");
    assert_eq!(
        change(&mut g, "q0", None, Some("r2")).await,
        "Cannot add a child to a quorum in blkverify mode"
    );
    // Q35: hot remove is refused by the threshold rule.
    assert_eq!(
        change(&mut g, "q0", Some("children.0"), None).await,
        "The number of children cannot be lower than the vote threshold 2"
    );
}

#[tokio::test]
async fn q55_naming_counter_follows_the_documented_example() {
    // children.0, children.1; add X: children.2; remove children.2; add Y: children.2;
    // remove children.0; add Z: children.3.
    let im = Images::new();
    let mut g = quorum_graph(
        &im,
        &[
            "driver=null-co,node-name=x,size=1048576",
            "driver=null-co,node-name=y,size=1048576",
            "driver=null-co,node-name=z,size=1048576",
        ],
        1,
    )
    .await;
    let names = |g: &Graph| g.get("q0").unwrap().children.clone();
    assert_eq!(change(&mut g, "q0", None, Some("x")).await, "");
    assert_eq!(
        names(&g).last().unwrap(),
        &("children.2".to_string(), "x".to_string())
    );
    assert_eq!(change(&mut g, "q0", Some("children.2"), None).await, "");
    assert_eq!(
        g.get("x").unwrap().parent,
        None,
        "a removed --blockdev node stays, parentless"
    );
    assert_eq!(change(&mut g, "q0", None, Some("y")).await, "");
    assert_eq!(
        names(&g).last().unwrap(),
        &("children.2".to_string(), "y".to_string())
    );
    assert_eq!(change(&mut g, "q0", Some("children.0"), None).await, "");
    assert_eq!(change(&mut g, "q0", None, Some("z")).await, "");
    assert_eq!(
        names(&g),
        vec![
            ("children.1".to_string(), "r1".to_string()),
            ("children.2".to_string(), "y".to_string()),
            ("children.3".to_string(), "z".to_string()),
        ]
    );
    let q = g.get("q0").unwrap().quorum.clone().unwrap();
    assert_eq!(q.child_names().await, names(&g));
    // Q47: a hot-added child starts in sync; removal drops its record.
    assert_eq!(q.out_of_sync().await.len(), 3);
}

#[tokio::test]
async fn q53_removing_an_inline_child_deletes_it_from_the_graph() {
    let im = Images::new();
    let (mut g, _) = graph();
    let mut args = files(&im);
    args.push(format!(
        "driver=quorum,node-name=q0,vote-threshold=1,children.0=r0,children.1.driver=file,children.1.node-name=inl,children.1.filename={},children.1.locking=off",
        im.path("b")
    ));
    assert_eq!(add_all(&mut g, &args).await, "");
    assert!(g.get("inl").is_some());
    assert_eq!(change(&mut g, "q0", Some("children.1"), None).await, "");
    assert!(g.get("inl").is_none());
}

#[tokio::test]
async fn q45_zero_guarantee_is_recomputed_on_hot_add_and_remove() {
    let im = Images::new();
    let (mut g, _) = graph();
    let mut args = vec![];
    for (i, n) in ["a", "b"].iter().enumerate() {
        args.push(format!(
            "driver=file,node-name=f{i},filename={},discard=unmap",
            im.path(n)
        ));
        args.push(format!("driver=raw,node-name=r{i},file=f{i},discard=unmap"));
    }
    args.push(format!(
        "driver=file,node-name=plain,filename={}",
        im.path("c")
    ));
    args.push(
        "driver=quorum,node-name=q0,vote-threshold=1,discard=unmap,children.0=r0,children.1=r1"
            .into(),
    );
    assert_eq!(add_all(&mut g, &args).await, "");
    let q = g.get("q0").unwrap().quorum.clone().unwrap();
    assert!(q.discard_zeroes());
    assert_eq!(change(&mut g, "q0", None, Some("plain")).await, "");
    assert!(
        !q.discard_zeroes(),
        "a child without the guarantee was added"
    );
    assert_eq!(change(&mut g, "q0", Some("children.2"), None).await, "");
    assert!(q.discard_zeroes());
}

#[tokio::test(start_paused = true)]
async fn q56_hot_remove_waits_for_requests_in_flight() {
    use ballot::drivers::quorum::{Quorum, QuorumOptions};
    use std::sync::Arc;
    use std::time::Duration;
    let (host, _) = Host::recording(EventBus::new());
    let kids: Vec<_> = (0..3)
        .map(|i| common::TestChild::new(&format!("c{i}"), 0))
        .collect();
    kids[0].set_delay(Duration::from_millis(100));
    let q = Arc::new(
        Quorum::open(
            QuorumOptions::new("q0", 1),
            kids.iter()
                .map(|k| (k.name.clone(), common::dev(k)))
                .collect(),
            host,
        )
        .unwrap(),
    );
    let start = tokio::time::Instant::now();
    let reader = {
        let q = q.clone();
        tokio::spawn(async move { q.read(0, 512).await })
    };
    tokio::task::yield_now().await;
    q.remove_child("children.0").await.unwrap();
    // The remove waited for the 100 ms read that was in flight.
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert!(reader.is_finished());
    assert_eq!(reader.await.unwrap().unwrap().len(), 512);
}

#[tokio::test]
async fn q51_query_out_of_sync_lists_children_in_order_and_names_bad_nodes() {
    let im = Images::new();
    let g = quorum_graph(&im, &[], 1).await;
    // H7 at open (README D15): nothing is known to be flushed before the first flush.
    assert_eq!(
        g.query_out_of_sync("q0").await.unwrap(),
        serde_json::json!([
            {"child": "children.0", "node-name": "r0", "granularity": 65536, "dirty-bytes": 0, "ranges": [], "state": "in-sync", "unflushed-bytes": 1048576},
            {"child": "children.1", "node-name": "r1", "granularity": 65536, "dirty-bytes": 0, "ranges": [], "state": "in-sync", "unflushed-bytes": 1048576},
        ])
    );
    g.quorum("q0").unwrap().flush().await.unwrap();
    assert_eq!(
        g.query_out_of_sync("q0").await.unwrap(),
        serde_json::json!([
            {"child": "children.0", "node-name": "r0", "granularity": 65536, "dirty-bytes": 0, "ranges": [], "state": "in-sync", "unflushed-bytes": 0},
            {"child": "children.1", "node-name": "r1", "granularity": 65536, "dirty-bytes": 0, "ranges": [], "state": "in-sync", "unflushed-bytes": 0},
        ])
    );
    assert_eq!(
        g.query_out_of_sync("zz").await.unwrap_err().message(),
        "Cannot find device='zz' nor node-name='zz'"
    );
    assert_eq!(
        g.query_out_of_sync("r0").await.unwrap_err().message(),
        "Node 'r0' is not a quorum node"
    );
}

/// Inline definitions nest at most INLINE_DEPTH_MAX levels, in both syntaxes (found by the
/// blockdev_options fuzz target: a deep definition recursed the parser off its stack).
#[tokio::test]
async fn inline_definitions_nest_at_most_sixteen_levels() {
    use ballot::config::spec::INLINE_DEPTH_MAX;
    // raw over raw over ... over null-co: `levels` raw nodes.
    let dotted = |levels: usize| {
        let mut arg = String::from("node-name=top");
        let mut prefix = String::new();
        for _ in 0..levels {
            arg.push_str(&format!(",{prefix}driver=raw"));
            prefix.push_str("file.");
        }
        arg.push_str(&format!(",{prefix}driver=null-co,{prefix}size=4096"));
        (arg, prefix)
    };
    let (ok, _) = dotted(INLINE_DEPTH_MAX);
    let (mut g, _) = graph();
    assert_eq!(add_all(&mut g, &[ok]).await, "");
    assert_eq!(g.get("top").map(|n| n.dev.length().ok()), Some(Some(4096)));
    let (deep, prefix) = dotted(INLINE_DEPTH_MAX + 1);
    let (mut g, _) = graph();
    assert_eq!(
        add_all(&mut g, &[deep]).await,
        format!(
            "Parameter '{}': inline definitions nest deeper than 16 levels",
            prefix.trim_end_matches('.')
        )
    );
    assert_eq!(g.nodes().count(), 0);
    let mut json = String::from(r#"{"driver":"null-co","size":512}"#);
    for _ in 0..=INLINE_DEPTH_MAX {
        json = format!(r#"{{"driver":"raw","file":{json}}}"#);
    }
    let json = format!(r#"{{"node-name":"j",{}"#, &json[1..]);
    let (mut g, _) = graph();
    assert_eq!(
        add_all(&mut g, &[json]).await,
        format!(
            "Parameter '{}': inline definitions nest deeper than 16 levels",
            vec!["file"; INLINE_DEPTH_MAX + 1].join(".")
        )
    );
}
