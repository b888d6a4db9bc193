//! Logging (docs/serve.md, "Logs"): `tracing` events on stderr, as text lines or JSON lines,
//! filtered per module by `--log` (or `BALLOT_LOG`), and a rate limit on what peers can make
//! ballot say (L1–L4 in docs/serve.md).
//!
//! L1: a text line reads `ballot: warning: MESSAGE` (`error:`, `debug:`, `trace:` likewise;
//! an info line has no level word). A message that already starts with `ballot:` (the
//! drivers' warning lines) is printed as it is.
//! L2: the filter is a list of `target=level` and a bare default `level`; without a bare level
//! the default stays `info`, so naming one module never silences the others.
//! L3: messages a peer can trigger (a client's failed TLS handshake, a refused negotiation)
//! go through [`peer_warning`]: at most [`PEER_BURST`] per kind in each [`PEER_WINDOW`], then
//! one line says how many were suppressed.
//! L4: errors before the server runs (bad options, files, objects) are not log events: they
//! print `ballot: MESSAGE` and exit, whatever the filter.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ballot: warning: ...` lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("log format '{s}' is not 'text' or 'json'")),
        }
    }
}

/// L2: parses a `--log` filter; a filter without a bare level keeps `info` as the default.
///
/// # Errors
/// A message quoting the part that is not `target=level` or a level.
pub fn parse_filter(spec: &str) -> Result<Targets, String> {
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let level = part.rsplit_once('=').map_or(part, |(_, l)| l).trim();
        if LevelFilter::from_str(level).is_err() {
            return Err(format!(
                "--log: '{part}' is not TARGET=LEVEL or LEVEL (levels: off, error, warn, info, \
                 debug, trace)"
            ));
        }
    }
    let t = Targets::from_str(spec).map_err(|e| format!("--log: '{spec}': {e}"))?;
    Ok(if t.default_level().is_none() {
        t.with_default(LevelFilter::INFO)
    } else {
        t
    })
}

/// Installs the process's subscriber on stderr (once; later calls do nothing).
///
/// # Errors
/// A bad filter.
pub fn init(filter: Option<&str>, format: Format) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = std::env::var("BALLOT_LOG").ok();
    let targets = match filter.or(env.as_deref()) {
        Some(f) => parse_filter(f)?,
        None => Targets::new().with_default(LevelFilter::INFO),
    };
    let result = match format {
        Format::Text => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(TextLine)
                    .with_filter(targets),
            )
            .try_init(),
        Format::Json => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_filter(targets),
            )
            .try_init(),
    };
    // Already installed (a second call in one process): the first one stays.
    let _ = result;
    Ok(())
}

use tracing_subscriber::Layer as _;

/// L1's text line.
struct TextLine;

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "kind" {
            // L3's rate-limit key: for JSON consumers, not for a reader.
        } else if field.name() == "message" {
            self.message = value.to_string();
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "kind" {
        } else if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message.starts_with("ballot:") {
            return writeln!(w, "{}{}", f.message, f.rest);
        }
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            Level::INFO => "",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
        };
        if *event.metadata().level() >= Level::DEBUG {
            writeln!(
                w,
                "ballot: {level}[{}] {}{}",
                event.metadata().target(),
                f.message,
                f.rest
            )
        } else {
            writeln!(w, "ballot: {level}{}{}", f.message, f.rest)
        }
    }
}

/// L3: messages of one kind a peer can cause, at most, per window.
pub const PEER_BURST: u32 = 5;
/// L3: the window.
pub const PEER_WINDOW: Duration = Duration::from_secs(10);

struct Window {
    start: Instant,
    shown: u32,
    suppressed: u32,
}

static PEER: Mutex<Option<HashMap<&'static str, Window>>> = Mutex::new(None);

/// What [`RateLimit::admit`] decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Show it; first say that `n` earlier ones were suppressed, when `n > 0`.
    Show(u32),
    /// Drop it (counted).
    Suppress,
}

/// L3's per-kind limit, separate from the clock so it can be tested.
#[derive(Default)]
pub struct RateLimit {
    windows: HashMap<&'static str, Window>,
}

impl RateLimit {
    /// Whether a message of `kind` at `now` is shown.
    pub fn admit(&mut self, kind: &'static str, now: Instant) -> Admit {
        admit(&mut self.windows, kind, now)
    }
}

fn admit(windows: &mut HashMap<&'static str, Window>, kind: &'static str, now: Instant) -> Admit {
    let w = windows.entry(kind).or_insert(Window {
        start: now,
        shown: 0,
        suppressed: 0,
    });
    if now.duration_since(w.start) >= PEER_WINDOW {
        let suppressed = w.suppressed;
        *w = Window {
            start: now,
            shown: 1,
            suppressed: 0,
        };
        return Admit::Show(suppressed);
    }
    if w.shown < PEER_BURST {
        w.shown += 1;
        Admit::Show(0)
    } else {
        w.suppressed += 1;
        Admit::Suppress
    }
}

/// L3: a warning a peer caused, rate-limited per `kind`.
pub fn peer_warning(kind: &'static str, msg: &str) {
    let decision = {
        let mut g = PEER.lock().unwrap_or_else(|p| p.into_inner());
        admit(g.get_or_insert_with(HashMap::new), kind, Instant::now())
    };
    match decision {
        Admit::Show(0) => tracing::warn!(target: "ballot::peer", kind, "{msg}"),
        Admit::Show(n) => {
            tracing::warn!(
                target: "ballot::peer",
                kind,
                "{n} more messages of this kind were suppressed in the last {} s",
                PEER_WINDOW.as_secs()
            );
            tracing::warn!(target: "ballot::peer", kind, "{msg}");
        }
        Admit::Suppress => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l3_five_per_window_then_a_count_of_the_suppressed() {
        let mut r = RateLimit::default();
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(r.admit("k", t0 + Duration::from_millis(i)), Admit::Show(0));
        }
        for i in 5..12 {
            assert_eq!(r.admit("k", t0 + Duration::from_millis(i)), Admit::Suppress);
        }
        // Another kind has its own window.
        assert_eq!(r.admit("other", t0), Admit::Show(0));
        // The next window starts by saying how many were dropped.
        assert_eq!(r.admit("k", t0 + PEER_WINDOW), Admit::Show(7));
        assert_eq!(r.admit("k", t0 + PEER_WINDOW), Admit::Show(0));
    }

    #[test]
    fn l2_a_named_module_keeps_info_as_the_default() {
        let t = parse_filter("ballot::nbd=debug").unwrap();
        assert_eq!(t.default_level(), Some(LevelFilter::INFO));
        assert!(t.would_enable("ballot::nbd::server", &Level::DEBUG));
        assert!(!t.would_enable("ballot::graph", &Level::DEBUG));
        assert!(t.would_enable("ballot::graph", &Level::INFO));
        let t = parse_filter("warn,ballot::peer=off").unwrap();
        assert_eq!(t.default_level(), Some(LevelFilter::WARN));
        assert!(!t.would_enable("ballot::peer", &Level::WARN));
        assert!(!t.would_enable("ballot::graph", &Level::INFO));
        let e = parse_filter("ballot::nbd=loud").unwrap_err();
        assert_eq!(
            e,
            "--log: 'ballot::nbd=loud' is not TARGET=LEVEL or LEVEL (levels: off, error, warn, \
             info, debug, trace)"
        );
    }
}
