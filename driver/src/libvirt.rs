//! libvirt: the quorum disk of libvirt's quorum proposal, served by `ballot serve`, and the
//! network disk element that attaches the export to a domain (issue 8).
//!
//! The proposal (`../shared/seeds/001_ffd58c94f2716c96.txt`) describes
//! `<disk type='quorum'>` with a `<threshold value=N/>` and one `<backingStore type='file'>`
//! per replica, each with `<format type=.../>` and `<source file=.../>`. libvirt never shipped
//! it, and its text is not well-formed XML: the threshold's value is unquoted and the
//! `<backingStore>` and `<disk>` elements are never closed. [`parse_xml`] therefore reads XML
//! the way a person means it: unquoted attribute values are accepted, elements still open at
//! the end of the text are closed there, and in a text that closes no `<backingStore>` at all
//! each `<backingStore>` closes the one before it (siblings, as the proposal means them). In a
//! text that closes its backingStores, a backingStore inside another is libvirt's backing
//! chain: a qcow2 child's chain is the one its image names, which ballot opens as QEMU does
//! (issue 19); a raw child cannot have one and is refused by name.
//!
//! [`import`] turns the disk into the `ballot serve` arguments (file + raw or qcow2 node per
//! child, a quorum node, the NBD server and the export); [`disk_xml`] prints the
//! `<disk type='network'>` element for the domain.

use std::path::{Path, PathBuf};

use crate::drivers::quorum::{validate, ReadPattern};

/// Largest XML text read (a disk element, or a whole domain).
pub const XML_BYTES_MAX: usize = 4 << 20;

/// Deepest element nesting accepted.
pub const XML_DEPTH_MAX: usize = 64;

/// Elements a `<backingStore>` holds in libvirt's schema; in tag soup any other start tag
/// ends an open backingStore.
const BACKING_STORE_CHILDREN: [&str; 5] = ["format", "source", "encryption", "auth", "privateData"];

/// An element of the document: name, attributes in order, child elements, first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Tag name.
    pub name: String,
    /// Attributes, in document order.
    pub attrs: Vec<(String, String)>,
    /// Child elements (text is not kept).
    pub children: Vec<Element>,
    /// 1-based line of the start tag.
    pub line: usize,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Child elements named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The first child element named `name`.
    pub fn first(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every element named `name` in this subtree (self included), in document order.
    fn find_all<'a>(&'a self, name: &str, out: &mut Vec<&'a Element>) {
        if self.name == name {
            out.push(self);
        }
        for c in &self.children {
            c.find_all(name, out);
        }
    }
}

/// One token of the tag soup.
#[derive(Debug)]
enum Token {
    Start {
        name: String,
        attrs: Vec<(String, String)>,
        empty: bool,
        line: usize,
    },
    End {
        name: String,
        line: usize,
    },
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

/// Splits the text into start and end tags; comments, processing instructions, DOCTYPE,
/// CDATA and text are skipped.
fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    /// Constructs skipped whole: opening, closing, and what an unclosed one is called.
    const SKIPPED: [(&str, &str, &str); 4] = [
        ("<!--", "-->", "a comment"),
        ("<![CDATA[", "]]>", "a CDATA section"),
        ("<?", "?>", "a processing instruction"),
        ("<!", ">", "a declaration"),
    ];
    let mut out = Vec::new();
    let mut pos = 0;
    // The line of `counted`, kept up to date as the scan moves on (never a rescan from the
    // start of the text, which would be quadratic in a text of many tags).
    let (mut line, mut counted) = (1usize, 0usize);
    'scan: while let Some(off) = text[pos..].find('<') {
        let start = pos + off;
        let rest = &text[start..];
        line += text[counted..start].bytes().filter(|b| *b == b'\n').count();
        counted = start;
        for (open, close, what) in SKIPPED {
            if rest.starts_with(open) {
                pos = rest
                    .find(close)
                    .map(|e| start + e + close.len())
                    .ok_or_else(|| format!("line {line}: {what} is never closed"))?;
                continue 'scan;
            }
        }
        // A tag: up to the '>' outside quotes.
        let mut quote: Option<char> = None;
        let mut end = None;
        for (i, c) in rest.char_indices().skip(1) {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '>') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            return Err(format!("line {line}: a tag is never closed with '>'"));
        };
        let body = &rest[1..end];
        pos = start + end + 1;
        if let Some(name) = body.strip_prefix('/') {
            let name = name.trim();
            if name.is_empty() || !name.chars().all(is_name_char) {
                return Err(format!("line {line}: bad end tag '</{name}>'"));
            }
            out.push(Token::End {
                name: name.to_string(),
                line,
            });
            continue;
        }
        let (body, empty) = match body.strip_suffix('/') {
            Some(b) => (b, true),
            None => (body, false),
        };
        let name: String = body.chars().take_while(|c| is_name_char(*c)).collect();
        if name.is_empty() {
            // A lone '<' in text: not a tag.
            pos = start + 1;
            continue;
        }
        let attrs = parse_attrs(&body[name.len()..], line, &name)?;
        out.push(Token::Start {
            name,
            attrs,
            empty,
            line,
        });
    }
    Ok(out)
}

/// Attributes `k='v'`, `k="v"` or `k=v` (unquoted, up to white space).
fn parse_attrs(s: &str, line: usize, tag: &str) -> Result<Vec<(String, String)>, String> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let Some(&(i, _)) = chars.peek() else { break };
        let key: String = s[i..].chars().take_while(|c| is_name_char(*c)).collect();
        if key.is_empty() {
            return Err(format!(
                "line {line}: <{tag}>: unexpected '{}' in the attributes",
                &s[i..].chars().next().unwrap_or(' ')
            ));
        }
        for _ in 0..key.chars().count() {
            chars.next();
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().map(|(_, c)| *c) != Some('=') {
            return Err(format!(
                "line {line}: <{tag}>: attribute '{key}' has no value"
            ));
        }
        chars.next();
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let value = match chars.peek().map(|(_, c)| *c) {
            Some(q @ ('"' | '\'')) => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some((_, c)) if c == q => break,
                        Some((_, c)) => v.push(c),
                        None => {
                            return Err(format!(
                                "line {line}: <{tag}>: the value of '{key}' is never closed"
                            ))
                        }
                    }
                }
                v
            }
            Some(_) => {
                // Unquoted (the proposal's `value=2`).
                let mut v = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    v.push(c);
                    chars.next();
                }
                v
            }
            None => {
                return Err(format!(
                    "line {line}: <{tag}>: attribute '{key}' has no value"
                ))
            }
        };
        if attrs.iter().any(|(k, _)| *k == key) {
            return Err(format!(
                "line {line}: <{tag}>: attribute '{key}' given twice"
            ));
        }
        attrs.push((key, unescape(&value)));
    }
    Ok(attrs)
}

/// Reads XML as a person means it (see the module documentation) into its top-level elements.
///
/// # Errors
/// `line N: ...` for what cannot be read: an unclosed tag or quote, an end tag that matches no
/// open element, a text that closes some `<backingStore>` elements but not all, a text over
/// [`XML_BYTES_MAX`] or nested deeper than [`XML_DEPTH_MAX`].
pub fn parse_xml(text: &str) -> Result<Vec<Element>, String> {
    if text.len() > XML_BYTES_MAX {
        return Err(format!(
            "the XML is {} bytes, more than {XML_BYTES_MAX}",
            text.len()
        ));
    }
    let tokens = tokenize(text)?;
    let opens = tokens
        .iter()
        .filter(|t| matches!(t, Token::Start { name, empty: false, .. } if name == "backingStore"))
        .count();
    let closes = tokens
        .iter()
        .filter(|t| matches!(t, Token::End { name, .. } if name == "backingStore"))
        .count();
    let soup = closes == 0 && opens > 0;
    if closes != 0 && closes != opens {
        return Err(format!(
            "{opens} <backingStore> elements are opened and {closes} closed: close all of them, or none (then each one ends where the next begins)"
        ));
    }
    let mut stack: Vec<Element> = vec![Element {
        name: String::new(),
        attrs: Vec::new(),
        children: Vec::new(),
        line: 0,
    }];
    fn close_top(stack: &mut Vec<Element>) {
        if stack.len() > 1 {
            if let Some(e) = stack.pop() {
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(e);
                }
            }
        }
    }
    for t in tokens {
        match t {
            Token::Start {
                name,
                attrs,
                empty,
                line,
            } => {
                if soup
                    && (name == "backingStore" || !BACKING_STORE_CHILDREN.contains(&name.as_str()))
                {
                    // Tag soup: a backingStore ends where the next one begins, or where an
                    // element it cannot hold (the disk's <target>, say) begins.
                    if let Some(i) = stack.iter().rposition(|e| e.name == "backingStore") {
                        while stack.len() > i {
                            close_top(&mut stack);
                        }
                    }
                }
                let e = Element {
                    name,
                    attrs,
                    children: Vec::new(),
                    line,
                };
                if empty {
                    if let Some(top) = stack.last_mut() {
                        top.children.push(e);
                    }
                } else {
                    if stack.len() > XML_DEPTH_MAX {
                        return Err(format!(
                            "line {line}: elements nested deeper than {XML_DEPTH_MAX}"
                        ));
                    }
                    stack.push(e);
                }
            }
            Token::End { name, line } => {
                let Some(i) = stack.iter().skip(1).rposition(|e| e.name == name) else {
                    return Err(format!("line {line}: </{name}> closes no open <{name}>"));
                };
                // Elements left open inside it (the proposal's habit) close with it.
                while stack.len() > i + 1 {
                    close_top(&mut stack);
                }
            }
        }
    }
    while stack.len() > 1 {
        close_top(&mut stack);
    }
    Ok(stack.pop().map(|r| r.children).unwrap_or_default())
}

/// One replica of the quorum disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The image, resolved against the XML file's directory.
    pub path: PathBuf,
    /// `<format type=...>`.
    pub format: String,
    /// 1-based position among the disk's children.
    pub index: usize,
}

/// What [`import`] read from a quorum disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumDisk {
    /// `<target dev=...>`, if any.
    pub target: Option<String>,
    /// `<threshold value=...>`.
    pub threshold: i64,
    /// The replicas, in document order.
    pub replicas: Vec<Replica>,
}

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP host and port.
    Tcp(String, u16),
    /// Unix socket path.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `HOST:PORT` (IPv6 as `[addr]:port`).
    ///
    /// # Errors
    /// A message naming the text.
    pub fn tcp(s: &str) -> Result<Endpoint, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("--addr '{s}': expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .map_err(|_| format!("--addr '{s}': '{port}' is not a port number"))?;
        if host.is_empty() || port == 0 {
            return Err(format!("--addr '{s}': expected HOST:PORT"));
        }
        Ok(Endpoint::Tcp(host.to_string(), port))
    }
}

fn abs(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The quorum disk(s) of a document: `<disk type='quorum'>` elements anywhere in it (a bare
/// disk element, or a whole domain).
fn quorum_disks(roots: &[Element]) -> Vec<&Element> {
    let mut all = Vec::new();
    for r in roots {
        r.find_all("disk", &mut all);
    }
    all.retain(|d| d.attr("type") == Some("quorum"));
    all
}

/// Image formats a quorum child may have.
pub const FORMATS: [&str; 2] = ["raw", "qcow2"];

/// The `qemu-img convert` command that makes an image of another format usable.
fn convert_hint(path: &Path, format: &str) -> String {
    let dst = path.with_extension("qcow2");
    format!(
        "qemu-img convert -f {} -O qcow2 {} {}",
        shell_quote(format),
        shell_quote(&path.display().to_string()),
        shell_quote(&dst.display().to_string())
    )
}

/// Reads the quorum disk of `text` (picking `<target dev=TARGET>` when the text has several),
/// resolving relative image paths against `base` (the XML file's directory).
///
/// # Errors
/// A message naming the problem: no quorum disk, several and no `target`, a child that is not
/// a raw or qcow2 file (with the `qemu-img convert -O qcow2` command that makes it one), a raw
/// child with a backing chain,
/// a missing or non-numeric threshold, and QUORUM.md's messages for the child count and
/// threshold (Q7–Q9).
pub fn import(text: &str, base: &Path, target: Option<&str>) -> Result<QuorumDisk, String> {
    let roots = parse_xml(text)?;
    let disks = quorum_disks(&roots);
    let disk = match (disks.len(), target) {
        (0, _) => {
            return Err("no <disk type='quorum'> element in the XML".into());
        }
        (_, Some(t)) => *disks
            .iter()
            .find(|d| d.first("target").and_then(|e| e.attr("dev")) == Some(t))
            .ok_or_else(|| format!("no quorum disk with <target dev='{t}'/>"))?,
        (1, None) => disks[0],
        (n, None) => {
            let devs: Vec<&str> = disks
                .iter()
                .filter_map(|d| d.first("target").and_then(|e| e.attr("dev")))
                .collect();
            return Err(format!(
                "{n} quorum disks in the XML ({}): pick one with --target DEV",
                devs.join(", ")
            ));
        }
    };
    let mut replicas = Vec::new();
    for (k, b) in disk.all("backingStore").enumerate() {
        let index = k + 1;
        let kind = b.attr("type").unwrap_or("");
        let (attr, ok) = match kind {
            "file" => ("file", true),
            "block" => ("dev", true),
            _ => ("", false),
        };
        if !ok {
            return Err(format!(
                "child {index} (line {}): <backingStore type='{kind}'>: ballot serves children of type 'file' or 'block'",
                b.line
            ));
        }
        let src = b
            .first("source")
            .and_then(|s| s.attr(attr))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("child {index} (line {}): no <source {attr}='...'/>", b.line))?;
        let path = abs(base, src);
        let format = b
            .first("format")
            .and_then(|f| f.attr("type"))
            .ok_or_else(|| {
                format!(
                    "child {index} ({}): no <format type='...'/> (ballot does not probe formats; add <format type='raw'/> if it is a raw image)",
                    path.display()
                )
            })?;
        if !FORMATS.contains(&format) {
            return Err(format!(
                "child {index} ({}): format '{format}' is not served by ballot, which serves raw and qcow2 images; convert it with: {}",
                path.display(),
                convert_hint(&path, format)
            ));
        }
        if let Some(chain) = b.first("backingStore") {
            // A qcow2 image names its own backing file, which the qcow2 driver opens.
            if format == "raw" && (chain.first("source").is_some() || chain.attr("type").is_some())
            {
                return Err(format!(
                    "child {index} ({}): a raw image with a backing chain (a <backingStore> inside it, line {}); only qcow2 images have backing files: convert it with: {}",
                    path.display(),
                    chain.line,
                    convert_hint(&path, format)
                ));
            }
        }
        replicas.push(Replica {
            path,
            format: format.to_string(),
            index,
        });
    }
    let threshold = match disk.first("threshold") {
        None => {
            return Err(format!(
                "the quorum disk has no <threshold value='N'/> (with {} children a majority is {})",
                replicas.len(),
                replicas.len() / 2 + 1
            ))
        }
        Some(t) => {
            let v = t
                .attr("value")
                .ok_or_else(|| format!("line {}: <threshold> has no value", t.line))?;
            v.trim()
                .parse::<i64>()
                .map_err(|_| format!("line {}: <threshold value='{v}'>: not an integer", t.line))?
        }
    };
    validate(replicas.len(), threshold, ReadPattern::Quorum, false, false)
        .map_err(|e| e.to_string())?;
    Ok(QuorumDisk {
        target: disk
            .first("target")
            .and_then(|e| e.attr("dev"))
            .map(String::from),
        threshold,
        replicas,
    })
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@')
        });
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `ballot serve` arguments (after `serve`) that serve `disk` as export `export`.
/// Node names: `<export>-c<K>-file` and `<export>-c<K>` per child, `<export>` for the quorum.
pub fn serve_args(disk: &QuorumDisk, export: &str, at: &Endpoint) -> Vec<String> {
    let mut args = Vec::new();
    let mut kids = Vec::new();
    for r in &disk.replicas {
        let file = format!("{export}-c{}-file", r.index);
        let raw = format!("{export}-c{}", r.index);
        let f = serde_json::json!({
            "driver": "file", "node-name": file, "filename": r.path.display().to_string(),
        });
        args.push(format!("--blockdev={f}"));
        let driver = if r.format == "qcow2" { "qcow2" } else { "raw" };
        args.push(format!(
            "--blockdev=driver={driver},node-name={raw},file={file}"
        ));
        kids.push(raw);
    }
    let q = serde_json::json!({
        "driver": "quorum", "node-name": export, "vote-threshold": disk.threshold,
        "children": kids,
    });
    args.push(format!("--blockdev={q}"));
    args.push(match at {
        Endpoint::Tcp(h, p) => format!("--nbd-server=addr.type=inet,addr.host={h},addr.port={p}"),
        Endpoint::Unix(p) => format!(
            "--nbd-server=addr.type=unix,addr.path={}",
            p.display().to_string().replace(',', ",,")
        ),
    });
    args.push(format!(
        "--export=type=nbd,id={export},node-name={export},name={export},writable=on"
    ));
    args
}

/// The export name [`import`]'s disk is served under by default: its target device, else
/// `quorum0`.
pub fn default_export(disk: &QuorumDisk) -> String {
    disk.target.clone().unwrap_or_else(|| "quorum0".into())
}

/// Checks an export or node name ballot will print into options and XML.
///
/// # Errors
/// A message naming it.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} '{s}': use 1-64 letters, digits, '-', '_' or '.', starting with a letter"
        ))
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The bus libvirt uses for a target device name (`vd*` virtio, `sd*` scsi, `hd*` ide).
pub fn bus_for(target: &str) -> Option<&'static str> {
    if target.starts_with("vd") {
        Some("virtio")
    } else if target.starts_with("sd") {
        Some("scsi")
    } else if target.starts_with("hd") {
        Some("ide")
    } else {
        None
    }
}

/// The libvirt `<disk type='network' device='disk'>` element that attaches export `export` at
/// `at` as `target` on `bus`.
pub fn disk_xml(export: &str, at: &Endpoint, target: &str, bus: &str) -> String {
    let host = match at {
        Endpoint::Tcp(h, p) => format!("<host name='{}' port='{p}'/>", xml_escape(h)),
        Endpoint::Unix(p) => format!(
            "<host transport='unix' socket='{}'/>",
            xml_escape(&p.display().to_string())
        ),
    };
    format!(
        "<disk type='network' device='disk'>\n  <driver name='qemu' type='raw'/>\n  <source protocol='nbd' name='{}'>\n    {host}\n  </source>\n  <target dev='{}' bus='{}'/>\n</disk>\n",
        xml_escape(export),
        xml_escape(target),
        xml_escape(bus)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_args_are_file_and_raw_per_child_a_quorum_the_server_and_the_export() {
        let d = QuorumDisk {
            target: Some("vda".into()),
            threshold: 2,
            replicas: (1..=2)
                .map(|i| Replica {
                    path: PathBuf::from(format!("/d/a,{i}.raw")),
                    format: "raw".into(),
                    index: i,
                })
                .collect(),
        };
        let a = serve_args(&d, "vda", &Endpoint::Unix("/run/x,y.sock".into()));
        assert_eq!(
            a,
            [
                r#"--blockdev={"driver":"file","filename":"/d/a,1.raw","node-name":"vda-c1-file"}"#,
                "--blockdev=driver=raw,node-name=vda-c1,file=vda-c1-file",
                r#"--blockdev={"driver":"file","filename":"/d/a,2.raw","node-name":"vda-c2-file"}"#,
                "--blockdev=driver=raw,node-name=vda-c2,file=vda-c2-file",
                r#"--blockdev={"children":["vda-c1","vda-c2"],"driver":"quorum","node-name":"vda","vote-threshold":2}"#,
                "--nbd-server=addr.type=unix,addr.path=/run/x,,y.sock",
                "--export=type=nbd,id=vda,node-name=vda,name=vda,writable=on",
            ]
        );
        let t = serve_args(&d, "e", &Endpoint::tcp("127.0.0.1:10809").expect("addr"));
        assert_eq!(
            t[5],
            "--nbd-server=addr.type=inet,addr.host=127.0.0.1,addr.port=10809"
        );
    }

    #[test]
    fn quoted_xml_relative_paths_and_a_whole_domain() {
        let xml = r#"<domain type="kvm"><devices>
          <disk type="file" device="disk"><source file="/plain.img"/><target dev="vda"/></disk>
          <disk type="quorum" device="disk">
            <threshold value="1"/>
            <backingStore type="file"><format type="raw"/><source file="img/a.raw"/></backingStore>
            <backingStore type="block"><format type="raw"/><source dev="/dev/sdz"/></backingStore>
            <target dev="vdb" bus="virtio"/>
          </disk></devices></domain>"#;
        let d = import(xml, Path::new("/etc/vm"), None).expect("import");
        assert_eq!(d.threshold, 1);
        assert_eq!(d.target.as_deref(), Some("vdb"));
        assert_eq!(d.replicas[0].path, PathBuf::from("/etc/vm/img/a.raw"));
        assert_eq!(d.replicas[1].path, PathBuf::from("/dev/sdz"));
    }

    #[test]
    fn edge_cases_get_messages_that_name_the_problem() {
        let child = |f: &str| {
            format!(
                "<backingStore type='file'><format type='raw'/><source file='{f}'/></backingStore>"
            )
        };
        let disk = |inner: &str| format!("<disk type='quorum'>{inner}<target dev='vda'/></disk>");
        let cases: Vec<(String, &str)> = vec![
            (
                disk(&format!("{}{}{}", child("a"), child("b"), child("c"))),
                "the quorum disk has no <threshold value='N'/> (with 3 children a majority is 2)",
            ),
            (
                disk("<threshold value='1'/>"),
                "Number of provided children must be 1 or more",
            ),
            (
                disk(&format!("<threshold value='0'/>{}", child("a"))),
                "Parameter 'vote-threshold' expects a value >= 1",
            ),
            (
                disk(&format!("<threshold value='3'/>{}{}", child("a"), child("b"))),
                "threshold may not exceed children count",
            ),
            (
                disk(&format!("<threshold value='two'/>{}", child("a"))),
                "line 1: <threshold value='two'>: not an integer",
            ),
            (
                disk("<threshold value=1/><backingStore type='file'><format type='raw'/><source file='/a.raw'/><backingStore type='file'><format type='raw'/><source file='/base.raw'/></backingStore></backingStore>"),
                "child 1 (/a.raw): a raw image with a backing chain (a <backingStore> inside it, line 1); only qcow2 images have backing files: convert it with: qemu-img convert -f raw -O qcow2 /a.raw /a.qcow2",
            ),
            (
                disk("<threshold value=1/><backingStore type='file'><format type='vmdk'/><source file='/a.vmdk'/></backingStore>"),
                "child 1 (/a.vmdk): format 'vmdk' is not served by ballot, which serves raw and qcow2 images; convert it with: qemu-img convert -f vmdk -O qcow2 /a.vmdk /a.qcow2",
            ),
            (
                disk("<threshold value=1/><backingStore type='file'><source file='/a.img'/></backingStore>"),
                "child 1 (/a.img): no <format type='...'/> (ballot does not probe formats; add <format type='raw'/> if it is a raw image)",
            ),
            (
                disk("<threshold value=1/><backingStore type='network'><format type='raw'/></backingStore>"),
                "child 1 (line 1): <backingStore type='network'>: ballot serves children of type 'file' or 'block'",
            ),
            (
                disk("<threshold value=1/><backingStore type='file'><format type='raw'/></backingStore>"),
                "child 1 (line 1): no <source file='...'/>",
            ),
            ("<disk type='file'/>".into(), "no <disk type='quorum'> element in the XML"),
            (
                format!("<devices>{}{}</devices>", disk("<threshold value=1/>"), disk("<threshold value=1/>")),
                "2 quorum disks in the XML (vda, vda): pick one with --target DEV",
            ),
            (
                "<disk type='quorum'><backingStore type='file'><backingStore type='file'></backingStore>".into(),
                "2 <backingStore> elements are opened and 1 closed: close all of them, or none (then each one ends where the next begins)",
            ),
            ("<disk type='quorum'></target>".into(), "line 1: </target> closes no open <target>"),
            ("<disk type='quorum\n".into(), "line 1: a tag is never closed with '>'"),
            ("<disk type=>".into(), "line 1: <disk>: attribute 'type' has no value"),
            ("<disk type='a' type='b'>".into(), "line 1: <disk>: attribute 'type' given twice"),
        ];
        for (xml, want) in cases {
            assert_eq!(
                import(&xml, Path::new("/"), None).unwrap_err(),
                want,
                "{xml}"
            );
        }
        // Line numbers count every newline before the tag, comments included.
        let multi = "<disk type='quorum'>\n<!-- a\ncomment -->\n\n<threshold value='x'/></disk>";
        assert_eq!(
            import(multi, Path::new("/"), None).unwrap_err(),
            "line 5: <threshold value='x'>: not an integer"
        );
        assert_eq!(
            parse_xml("<a>\n<b/>\n<!-- open").unwrap_err(),
            "line 3: a comment is never closed"
        );
        // One child is a quorum of one.
        let one = disk(&format!("<threshold value='1'/>{}", child("/a.raw")));
        let d = import(&one, Path::new("/"), None).expect("one child");
        assert_eq!((d.threshold, d.replicas.len()), (1, 1));
    }

    #[test]
    fn deep_or_huge_input_is_refused_without_recursion_or_allocation_blowup() {
        let deep = "<a>".repeat(XML_DEPTH_MAX + 5);
        assert_eq!(
            parse_xml(&deep).unwrap_err(),
            format!("line 1: elements nested deeper than {XML_DEPTH_MAX}")
        );
        let huge = " ".repeat(XML_BYTES_MAX + 1);
        assert!(parse_xml(&huge).unwrap_err().contains("more than"));
        // Comments, declarations and text are skipped; entities are decoded.
        let r = parse_xml(
            "<?xml version='1.0'?><!-- <disk> --><!DOCTYPE x><x a='&lt;&amp;'>t &lt; u</x>",
        )
        .expect("parse");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].attr("a"), Some("<&"));
    }

    #[test]
    fn disk_xml_for_tcp_and_unix_and_names_are_checked() {
        assert_eq!(
            disk_xml("vda", &Endpoint::tcp("[::1]:10809").expect("v6"), "vda", "virtio"),
            "<disk type='network' device='disk'>\n  <driver name='qemu' type='raw'/>\n  <source protocol='nbd' name='vda'>\n    <host name='::1' port='10809'/>\n  </source>\n  <target dev='vda' bus='virtio'/>\n</disk>\n"
        );
        assert!(
            disk_xml("q", &Endpoint::Unix("/run/b'x.sock".into()), "sdb", "scsi")
                .contains("<host transport='unix' socket='/run/b&apos;x.sock'/>")
        );
        assert_eq!(bus_for("vdc"), Some("virtio"));
        assert_eq!(bus_for("sda"), Some("scsi"));
        assert_eq!(bus_for("hdb"), Some("ide"));
        assert_eq!(bus_for("xvda"), None);
        assert_eq!(
            Endpoint::tcp("host").unwrap_err(),
            "--addr 'host': expected HOST:PORT"
        );
        assert_eq!(
            Endpoint::tcp("h:99999").unwrap_err(),
            "--addr 'h:99999': '99999' is not a port number"
        );
        assert!(check_name("--export", "vda").is_ok());
        assert_eq!(
            check_name("--export", "a,b").unwrap_err(),
            "--export 'a,b': use 1-64 letters, digits, '-', '_' or '.', starting with a letter"
        );
        assert_eq!(shell_quote("/a b/c'd"), r"'/a b/c'\''d'");
        assert_eq!(shell_quote("--x=/a,b"), "--x=/a,b");
    }
}
