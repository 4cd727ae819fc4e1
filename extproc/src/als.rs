//! Envoy's gRPC access log service (`envoy.service.accesslog.v3`): how sandgate sees requests that
//! outlive their ext_proc stream (WebSockets, SSE, long polls).
//!
//! With `access_log_flush_interval`, Envoy sends a DownstreamPeriodic entry for every open stream
//! each interval and a DownstreamEnd entry when it ends (every upgrade, and every request that
//! lived 500 ms or more). Each entry touches its sandbox; periodic entries keep the stream open in
//! the [`StreamTable`] (where ext_proc already opened upgrades at their start), the end entry
//! closes it. The sandbox ID comes from the dynamic metadata sandgate-extproc set on the request,
//! never from the request itself. When an Envoy goes away, the streams it reported are closed; a
//! stream not refreshed within the expiry is closed too.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogType, HttpAccessLogEntry};
use envoy_types::pb::envoy::service::accesslog::v3::{
    access_log_service_server::{AccessLogService, AccessLogServiceServer},
    stream_access_logs_message::LogEntries,
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tonic::{Request, Response, Status, Streaming};

use crate::activity::ActivityTable;
use crate::grpc::{METADATA_NAMESPACE, METADATA_SANDBOX_ID};
use crate::index::SandboxKey;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::streams::StreamTable;

#[derive(Clone)]
pub struct AccessLogs {
    pub activity: Arc<ActivityTable>,
    pub streams: Arc<StreamTable>,
    pub metrics: Metrics,
    /// Ends every access-log stream, so graceful shutdown does not wait on them forever.
    pub shutdown: Shutdown,
}

impl AccessLogs {
    pub fn into_service(self) -> AccessLogServiceServer<Self> {
        AccessLogServiceServer::new(self)
    }
}

/// The open streams one Envoy connection has reported, closed when it goes away.
#[derive(Default)]
pub struct OpenStreams(HashSet<(SandboxKey, String)>);

#[tonic::async_trait]
impl AccessLogService for AccessLogs {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut inbound = request.into_inner();
        let mut open = OpenStreams::default();
        // How long a stream this Envoy reported may go without a periodic entry; known once its
        // first message names the Envoy.
        let mut expiry = self.streams.default_expiry();
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = self.shutdown.wait() => break,
            };
            match next {
                Ok(Some(msg)) => {
                    if let Some(id) = &msg.identifier {
                        expiry = self.expiry_for(id.node.as_ref());
                    }
                    if let Some(LogEntries::HttpLogs(logs)) = msg.log_entries {
                        for entry in &logs.log_entry {
                            self.apply(entry, &mut open, expiry);
                        }
                    }
                    self.streams.expire();
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%status, "access log stream from Envoy ended");
                    break;
                }
            }
        }
        // That Envoy is gone: nothing it had open is known to be open any more.
        for (key, id) in open.0.drain() {
            self.streams.ended(key, &id);
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

/// The Envoy node metadata key that names its `access_log_flush_interval`.
pub const FLUSH_INTERVAL_METADATA_KEY: &str = "sandgate.access_log_flush_interval";

/// How long a stream may go without a periodic entry from an Envoy that flushes every
/// `interval`: three intervals (so one late or lost entry is not an end), plus two of its gRPC
/// logger's 1 s buffer flushes.
pub fn expiry_after(interval: Duration) -> Duration {
    interval.saturating_mul(3) + Duration::from_secs(2)
}

impl AccessLogs {
    /// The stream expiry for an Envoy: by the flush interval its node metadata names, else the
    /// table's default.
    fn expiry_for(&self, node: Option<&Node>) -> Duration {
        let named = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(FLUSH_INTERVAL_METADATA_KEY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let node_id = node.map_or("", |n| n.id.as_str());
        match named
            .as_deref()
            .map(sandgate_shared::duration::parse_duration)
        {
            Some(Ok(interval)) if !interval.is_zero() => expiry_after(interval),
            Some(_) => {
                tracing::warn!(node = node_id, value = ?named, "node metadata {FLUSH_INTERVAL_METADATA_KEY} is not a duration: its streams expire after --stream-expiry");
                self.streams.default_expiry()
            }
            None => self.streams.default_expiry(),
        }
    }

    /// Applies one access log entry from an Envoy whose open streams send a periodic entry at
    /// least every `expiry`.
    pub fn apply(&self, entry: &HttpAccessLogEntry, open: &mut OpenStreams, expiry: Duration) {
        let Some(common) = entry.common_properties.as_ref() else {
            return;
        };
        let Some(key) = sandbox_of(entry) else { return };
        self.metrics.access_log_entries.inc();
        // The request ID is what ext_proc saw (x-request-id) when it opened an upgrade.
        let stream = match entry.request.as_ref().map(|r| r.request_id.as_str()) {
            Some(id) if !id.is_empty() => id,
            _ => common.stream_id.as_str(),
        };
        match AccessLogType::try_from(common.access_log_type) {
            Ok(AccessLogType::DownstreamPeriodic) if !stream.is_empty() => {
                self.streams.seen_within(key, stream, expiry);
                open.0.insert((key, stream.to_string()));
            }
            Ok(AccessLogType::DownstreamEnd) if !stream.is_empty() => {
                open.0.remove(&(key, stream.to_string()));
                if !self.streams.ended(key, stream) {
                    self.activity.touch(key);
                }
            }
            _ => self.activity.touch(key),
        }
    }
}

/// The sandbox ID sandgate-extproc put in the request's dynamic metadata, else the name of the
/// hot route that carried it (the fast path names each route after its sandbox; the catch-all
/// route's name is not a sandbox ID). Never anything the client sent.
fn sandbox_of(entry: &HttpAccessLogEntry) -> Option<SandboxKey> {
    let common = entry.common_properties.as_ref()?;
    let from_metadata = || {
        let lb = common
            .metadata
            .as_ref()?
            .filter_metadata
            .get(METADATA_NAMESPACE)?;
        match &lb.fields.get(METADATA_SANDBOX_ID)?.kind {
            Some(Kind::StringValue(id)) => SandboxKey::new(id),
            _ => None,
        }
    };
    from_metadata().or_else(|| SandboxKey::new(&common.route_name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::AccessLogCommon;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn entry(id: Option<&str>, stream: &str, kind: AccessLogType) -> HttpAccessLogEntry {
        let mut fields = std::collections::HashMap::new();
        if let Some(id) = id {
            fields.insert(
                METADATA_SANDBOX_ID.to_string(),
                Value {
                    kind: Some(Kind::StringValue(id.into())),
                },
            );
        }
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                stream_id: stream.into(),
                access_log_type: kind as i32,
                metadata: Some(Metadata {
                    filter_metadata: [(METADATA_NAMESPACE.to_string(), Struct { fields })].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn logs_expiring_after(expiry: std::time::Duration) -> AccessLogs {
        let mut reg = prometheus_client::registry::Registry::default();
        let activity = Arc::new(ActivityTable::new());
        AccessLogs {
            streams: Arc::new(StreamTable::new(activity.clone(), expiry)),
            activity,
            metrics: Metrics::new(&mut reg),
            shutdown: crate::shutdown::channel().1,
        }
    }

    fn logs() -> AccessLogs {
        logs_expiring_after(std::time::Duration::from_secs(60))
    }

    fn open_streams(l: &AccessLogs, id: &str) -> u32 {
        l.activity
            .snapshot(0)
            .sandboxes
            .iter()
            .find(|r| r.id.as_str() == id)
            .map(|r| r.open_streams)
            .unwrap_or(0)
    }

    #[test]
    fn periodic_entries_open_a_stream_and_the_end_closes_it() {
        let l = logs();
        let mut open = OpenStreams::default();
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        assert_eq!(open_streams(&l, "ws"), 1);
        l.apply(
            &entry(Some("ws"), "s2", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        assert_eq!(open_streams(&l, "ws"), 2);
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamEnd),
            &mut open,
            l.streams.default_expiry(),
        );
        assert_eq!(open_streams(&l, "ws"), 1);
        // A short request's only entry is its end: activity, no stream.
        l.apply(
            &entry(Some("short"), "s9", AccessLogType::DownstreamEnd),
            &mut open,
            l.streams.default_expiry(),
        );
        assert_eq!(open_streams(&l, "short"), 0);
        assert!(l
            .activity
            .snapshot(0)
            .sandboxes
            .iter()
            .any(|r| r.id.as_str() == "short"));
    }

    #[test]
    fn entries_without_sandgate_metadata_are_ignored() {
        let l = logs();
        let mut open = OpenStreams::default();
        l.apply(
            &entry(None, "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        l.apply(
            &entry(Some("Not_Valid"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        assert!(l.activity.is_empty());
    }

    #[test]
    fn unrefreshed_streams_expire() {
        let l = logs_expiring_after(std::time::Duration::ZERO);
        let mut open = OpenStreams::default();
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        l.streams.expire();
        assert_eq!(open_streams(&l, "ws"), 0);
    }

    fn node(flush: Option<&str>) -> Node {
        let mut fields = std::collections::HashMap::new();
        if let Some(f) = flush {
            fields.insert(
                FLUSH_INTERVAL_METADATA_KEY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(f.into())),
                },
            );
        }
        Node {
            id: "gw".into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    #[test]
    fn an_envoy_that_names_its_flush_interval_gets_streams_that_expire_by_it() {
        let l = logs();
        let default = l.streams.default_expiry();
        assert_eq!(
            l.expiry_for(Some(&node(Some("1s")))),
            std::time::Duration::from_secs(5)
        );
        assert_eq!(
            l.expiry_for(Some(&node(Some("30s")))),
            std::time::Duration::from_secs(92)
        );
        for bad in [None, Some("soon"), Some("0s"), Some("")] {
            assert_eq!(l.expiry_for(Some(&node(bad))), default, "{bad:?}");
        }
        assert_eq!(l.expiry_for(None), default);
        // A periodic entry from such an Envoy carries its expiry, whatever the table's.
        let mut open = OpenStreams::default();
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            std::time::Duration::ZERO,
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(l.streams.expire(), 1);
        assert_eq!(open_streams(&l, "ws"), 0);
    }

    #[test]
    fn an_upgrade_opened_by_ext_proc_is_closed_by_its_end_entry() {
        let l = logs();
        let mut open = OpenStreams::default();
        l.streams.seen(SandboxKey::new("ws").unwrap(), "s1");
        assert_eq!(open_streams(&l, "ws"), 1);
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
            l.streams.default_expiry(),
        );
        assert_eq!(
            open_streams(&l, "ws"),
            1,
            "the periodic entry is the same stream"
        );
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamEnd),
            &mut open,
            l.streams.default_expiry(),
        );
        assert_eq!(open_streams(&l, "ws"), 0);
    }
}
