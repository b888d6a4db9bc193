//! The Prometheus scrape endpoint of `ballot serve --metrics addr.type=...` (issue 20 item 3).
//!
//! `GET /metrics` answers with the Prometheus text exposition (format 0.0.4) of the figures
//! `query-blockstats` reports ([`crate::stats`]), encoded by the `prometheus-client` crate:
//!
//! - `ballot_node_read_bytes_total`, `ballot_node_written_bytes_total`,
//!   `ballot_node_discarded_bytes_total` (`node` label);
//! - `ballot_node_requests_total`, `ballot_node_failed_requests_total`,
//!   `ballot_node_invalid_requests_total` (`node`, `op` = read, write, flush, discard);
//! - `ballot_node_request_duration_seconds` histograms of successful requests (`node`, `op`);
//! - `ballot_quorum_reads_total` (`node`, `vote` = fast, hashed, failed),
//!   `ballot_quorum_report_bad_events_total`, `ballot_quorum_failure_events_total` (`node`),
//!   `ballot_quorum_out_of_sync_bytes` (`node`, `child`);
//! - `ballot_job_progress_bytes` and `ballot_job_total_bytes` (`job`, `type`) of the resync and
//!   verify jobs.
//!
//! The HTTP side is the least a scraper needs: one request per connection, `GET /metrics` (or
//! `/`), a 404 for other paths, a 405 for other methods, requests over 8 KiB refused.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::graph::Graph;
use crate::stats::{Snapshot, LATENCY_BUCKETS_NS};

/// Largest request head read from a scraper.
const REQUEST_BYTES_MAX: usize = 8192;

type Labels = Vec<(String, String)>;

/// One node's figures at the scrape.
#[derive(Debug)]
struct NodeFigures {
    name: String,
    stats: Snapshot,
    /// Latency counts per op (`read`, `write`, `flush`, `unmap`).
    latency: Vec<(&'static str, Vec<u64>)>,
}

/// One quorum's figures at the scrape.
#[derive(Debug)]
struct QuorumFigures {
    name: String,
    votes: crate::drivers::quorum::VoteCounts,
    out_of_sync: Vec<(String, u64)>,
}

/// Everything one scrape reports, gathered under the graph lock, encoded after it.
#[derive(Debug, Default)]
struct Figures {
    nodes: Vec<NodeFigures>,
    quorums: Vec<QuorumFigures>,
    jobs: Vec<(String, &'static str, u64, u64)>,
}

async fn gather(graph: &Mutex<Graph>) -> Figures {
    let g = graph.lock().await;
    let mut f = Figures::default();
    for n in g.nodes() {
        f.nodes.push(NodeFigures {
            name: n.name.clone(),
            stats: n.stats.snapshot(),
            latency: ["read", "write", "flush", "unmap"]
                .into_iter()
                .map(|op| (op, n.stats.latency(op)))
                .collect(),
        });
        if let Some(q) = &n.quorum {
            let oos = q.out_of_sync().await;
            f.quorums.push(QuorumFigures {
                name: n.name.clone(),
                votes: q.vote_counters(),
                out_of_sync: oos
                    .iter()
                    .map(|r| (r.node_name.clone(), r.dirty_bytes()))
                    .collect(),
            });
        }
    }
    for j in g.jobs().list() {
        f.jobs.push((j.id.clone(), j.job_type, j.current, j.total));
    }
    f
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Encodes one counter family: `(labels, value)` rows.
fn counters(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (l, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn gauges(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (l, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

impl Collector for Figures {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let f = self;
        let per_node = |pick: &dyn Fn(&Snapshot) -> u64| -> Vec<(Labels, u64)> {
            f.nodes
                .iter()
                .map(|n| (labels(&[("node", &n.name)]), pick(&n.stats)))
                .collect()
        };
        counters(
            &mut e,
            "ballot_node_read",
            "Bytes read by successful read requests to the node",
            Some(&Unit::Bytes),
            &per_node(&|s| s.rd_bytes),
        )?;
        counters(
            &mut e,
            "ballot_node_written",
            "Bytes written by successful write and write-zeroes requests to the node",
            Some(&Unit::Bytes),
            &per_node(&|s| s.wr_bytes),
        )?;
        counters(
            &mut e,
            "ballot_node_discarded",
            "Bytes of successful discard requests to the node",
            Some(&Unit::Bytes),
            &per_node(&|s| s.unmap_bytes),
        )?;
        type Pick = fn(&Snapshot) -> [u64; 4];
        let ops = ["read", "write", "flush", "discard"];
        let by_op = |pick: Pick| -> Vec<(Labels, u64)> {
            f.nodes
                .iter()
                .flat_map(|n| {
                    let v = pick(&n.stats);
                    ops.iter()
                        .zip(v)
                        .map(|(op, x)| (labels(&[("node", &n.name), ("op", op)]), x))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        counters(
            &mut e,
            "ballot_node_requests",
            "Successful requests to the node",
            None,
            &by_op(|s| {
                [
                    s.rd_operations,
                    s.wr_operations,
                    s.flush_operations,
                    s.unmap_operations,
                ]
            }),
        )?;
        counters(
            &mut e,
            "ballot_node_failed_requests",
            "Requests to the node that failed",
            None,
            &by_op(|s| {
                [
                    s.failed_rd_operations,
                    s.failed_wr_operations,
                    s.failed_flush_operations,
                    s.failed_unmap_operations,
                ]
            }),
        )?;
        counters(
            &mut e,
            "ballot_node_invalid_requests",
            "Requests to the node refused by its range or alignment check",
            None,
            &by_op(|s| {
                [
                    s.invalid_rd_operations,
                    s.invalid_wr_operations,
                    s.invalid_flush_operations,
                    s.invalid_unmap_operations,
                ]
            }),
        )?;
        {
            let mut m = e.encode_descriptor(
                "ballot_node_request_duration",
                "Latency of successful requests to the node",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for n in &f.nodes {
                for (op, counts) in &n.latency {
                    let total_ns = match *op {
                        "read" => n.stats.rd_total_time_ns,
                        "write" => n.stats.wr_total_time_ns,
                        "flush" => n.stats.flush_total_time_ns,
                        _ => n.stats.unmap_total_time_ns,
                    };
                    let name = if *op == "unmap" { "discard" } else { op };
                    // Per-bucket counts: the encoder makes them cumulative.
                    let buckets: Vec<(f64, u64)> = counts
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let upper = LATENCY_BUCKETS_NS
                                .get(i)
                                .map_or(f64::INFINITY, |ns| *ns as f64 / 1e9);
                            (upper, *c)
                        })
                        .collect();
                    let l = labels(&[("node", &n.name), ("op", name)]);
                    m.encode_family(&l)?.encode_histogram::<Labels>(
                        total_ns as f64 / 1e9,
                        counts.iter().sum(),
                        &buckets,
                        None,
                    )?;
                }
            }
        }
        let votes: Vec<(Labels, u64)> = f
            .quorums
            .iter()
            .flat_map(|q| {
                [
                    ("fast", q.votes.fast),
                    ("hashed", q.votes.hashed),
                    ("failed", q.votes.failed),
                ]
                .into_iter()
                .map(|(v, x)| (labels(&[("node", &q.name), ("vote", v)]), x))
                .collect::<Vec<_>>()
            })
            .collect();
        counters(
            &mut e,
            "ballot_quorum_reads",
            "Voted quorum reads by how they were decided: fast (every copy equal), hashed (a SHA-256 vote), failed (no version won)",
            None,
            &votes,
        )?;
        let per_quorum = |pick: &dyn Fn(&QuorumFigures) -> u64| -> Vec<(Labels, u64)> {
            f.quorums
                .iter()
                .map(|q| (labels(&[("node", &q.name)]), pick(q)))
                .collect()
        };
        counters(
            &mut e,
            "ballot_quorum_report_bad_events",
            "QUORUM_REPORT_BAD events the quorum emitted",
            None,
            &per_quorum(&|q| q.votes.report_bad),
        )?;
        counters(
            &mut e,
            "ballot_quorum_failure_events",
            "QUORUM_FAILURE events the quorum emitted",
            None,
            &per_quorum(&|q| q.votes.failures),
        )?;
        let oos: Vec<(Labels, i64)> = f
            .quorums
            .iter()
            .flat_map(|q| {
                q.out_of_sync
                    .iter()
                    .map(|(c, b)| {
                        (
                            labels(&[("node", &q.name), ("child", c)]),
                            i64::try_from(*b).unwrap_or(i64::MAX),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        gauges(
            &mut e,
            "ballot_quorum_out_of_sync",
            "Bytes of a quorum child that are out of sync (docs/healing.md H1)",
            Some(&Unit::Bytes),
            &oos,
        )?;
        let job = |pick: fn(&(String, &'static str, u64, u64)) -> u64| -> Vec<(Labels, i64)> {
            f.jobs
                .iter()
                .map(|j| {
                    (
                        labels(&[("job", &j.0), ("type", j.1)]),
                        i64::try_from(pick(j)).unwrap_or(i64::MAX),
                    )
                })
                .collect()
        };
        gauges(
            &mut e,
            "ballot_job_progress",
            "Bytes a job (resync, verify, create) has done",
            Some(&Unit::Bytes),
            &job(|j| j.2),
        )?;
        gauges(
            &mut e,
            "ballot_job_total",
            "Bytes a job has to do",
            Some(&Unit::Bytes),
            &job(|j| j.3),
        )?;
        Ok(())
    }
}

/// The exposition of the graph's figures now.
pub async fn exposition(graph: &Mutex<Graph>) -> String {
    let figures = gather(graph).await;
    let mut r = Registry::default();
    r.register_collector(Box::new(figures));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

/// Answers one scraper connection.
pub async fn serve_one<S>(mut s: S, graph: Arc<Mutex<Graph>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > REQUEST_BYTES_MAX {
            let _ = respond(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
            return;
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        let _ = respond(&mut s, "405 Method Not Allowed", "text/plain", "only GET\n").await;
        return;
    }
    if path != "/metrics" && path != "/" {
        let _ = respond(&mut s, "404 Not Found", "text/plain", "try /metrics\n").await;
        return;
    }
    let body = exposition(&graph).await;
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    let _ = respond(
        &mut s,
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        &body,
    )
    .await;
}

async fn respond<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
