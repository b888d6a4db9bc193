//! The `ballot` binary: configuration errors print `ballot: <message>` and exit non-zero
//! (ARCHITECTURE.md, QUORUM.md §3 "Presentation"); a good configuration opens and is listed.

mod peers;

use peers::ballot;

#[test]
fn startup_error_prints_ballot_prefix_and_exits_1() {
    let (code, out, err) = ballot(&[
        "check",
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
        "--blockdev",
        "driver=quorum,node-name=q0,vote-threshold=2,children.0=n0",
    ]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(err, "ballot: threshold may not exceed children count\n");
}

#[test]
fn weak_threshold_warns_on_stderr_and_the_graph_is_listed() {
    let (code, out, err) = ballot(&[
        "check",
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
        "--blockdev=driver=null-co,node-name=n1,size=1048576",
        "--blockdev",
        r#"{"driver":"quorum","node-name":"q0","vote-threshold":1,"children":["n0","n1"]}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err,
        "ballot: warning: quorum node 'q0': vote-threshold 1 with 2 children is not a strict majority; stale or tied reads are possible\n\
         ballot: note: quorum 'q0' has no metadata node: after a crash of this process, only a full x-quorum-verify restores redundancy (docs/healing.md H19)\n"
    );
    assert_eq!(
        out,
        "n0 driver=null-co length=1048576 align=1\n\
         n1 driver=null-co length=1048576 align=1\n\
         q0 driver=quorum length=1048576 align=1 children=[children.0=n0,children.1=n1]\n"
    );
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let (code, _, err) = ballot(&["check", "--blockdev"]);
    assert_eq!(
        (code, err.as_str()),
        (2, "ballot: option '--blockdev' requires an argument\n")
    );
    let (code, _, err) = ballot(&["check", "--frobnicate"]);
    assert_eq!(
        (code, err.as_str()),
        (2, "ballot: unknown option '--frobnicate'\n")
    );
    let (code, _, err) = ballot(&["launch"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("ballot: unknown command 'launch'\n"),
        "{err}"
    );
}

/// Issue 20 item 5: `--version`, `--help` on every command, and completion scripts, from clap;
/// the old usage errors keep their words.
#[test]
fn version_help_and_completions() {
    let (code, out, _) = ballot(&["--version"]);
    assert_eq!(
        (code, out.as_str()),
        (0, concat!("ballot ", env!("CARGO_PKG_VERSION"), "\n"))
    );
    let (code, out, _) = ballot(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("Serve a driver graph over NBD"), "{out}");
    for opt in [
        "--blockdev <SPEC>",
        "--nbd-server <ADDR>",
        "--export <SPEC>",
        "--chardev <SPEC>",
        "--monitor <SPEC>",
        "--metrics <ADDR>",
    ] {
        assert!(out.contains(opt), "serve --help lacks {opt}: {out}");
    }
    let (code, out, _) = ballot(&["libvirt", "import", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Usage: ballot libvirt import [OPTIONS] [DISK.xml]"),
        "{out}"
    );
    for cmd in [
        &["check", "--help"][..],
        &["create", "--help"],
        &["metadata", "create", "--help"],
        &["metadata", "show", "--help"],
        &["libvirt", "disk-xml", "--help"],
        &["--help"],
    ] {
        let (code, out, err) = ballot(cmd);
        assert_eq!(code, 0, "{cmd:?}: {err}");
        assert!(out.contains("Usage: ballot"), "{cmd:?}: {out}");
    }
    let (code, out, _) = ballot(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("_ballot() {"), "{out}");
    assert!(
        out.contains("--nbd-server"),
        "the script completes serve's options"
    );
    let (code, _, err) = ballot(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("ballot: invalid value 'tcsh' for '<SHELL>'"),
        "{err}"
    );
}
