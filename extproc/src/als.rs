//! Envoy's gRPC access log service (`envoy.service.accesslog.v3`): how sandgate sees requests that
//! outlive their ext_proc stream (WebSockets, SSE, long polls).
//!
//! With `access_log_flush_interval`, Envoy sends a DownstreamPeriodic entry for every open stream
//! each interval and a DownstreamEnd entry when it ends. Each entry touches its sandbox; periodic
//! entries mark the stream open, the end entry closes it. The sandbox ID comes from the dynamic
//! metadata sandgate-extproc set on the request, never from the request itself. Streams are counted
//! per Envoy connection: when an Envoy goes away, or a stream is not refreshed within the expiry,
//! its streams are closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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

#[derive(Clone)]
pub struct AccessLogs {
    pub activity: Arc<ActivityTable>,
    pub metrics: Metrics,
    /// An open stream with no periodic entry for this long is taken as closed.
    pub stream_expiry: Duration,
    /// Ends every access-log stream, so graceful shutdown does not wait on them forever.
    pub shutdown: Shutdown,
}

impl AccessLogs {
    pub fn into_service(self) -> AccessLogServiceServer<Self> {
        AccessLogServiceServer::new(self)
    }
}

/// Open streams seen on one Envoy connection: stream ID → (sandbox, last seen in ms).
#[derive(Default)]
pub struct OpenStreams(HashMap<String, (SandboxKey, i64)>);

#[tonic::async_trait]
impl AccessLogService for AccessLogs {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut inbound = request.into_inner();
        let mut open = OpenStreams::default();
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = self.shutdown.wait() => break,
            };
            match next {
                Ok(Some(msg)) => {
                    if let Some(LogEntries::HttpLogs(logs)) = msg.log_entries {
                        for entry in &logs.log_entry {
                            self.apply(entry, &mut open);
                        }
                    }
                    self.expire(&mut open);
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%status, "access log stream from Envoy ended");
                    break;
                }
            }
        }
        // That Envoy is gone: nothing it had open is known to be open any more.
        for (_, (key, _)) in open.0.drain() {
            self.activity.stream_delta(key, false);
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

impl AccessLogs {
    /// Applies one access log entry.
    pub fn apply(&self, entry: &HttpAccessLogEntry, open: &mut OpenStreams) {
        let Some(common) = entry.common_properties.as_ref() else {
            return;
        };
        let Some(key) = sandbox_of(entry) else { return };
        self.metrics.access_log_entries.inc();
        let stream = if common.stream_id.is_empty() {
            entry
                .request
                .as_ref()
                .map(|r| r.request_id.as_str())
                .unwrap_or_default()
        } else {
            common.stream_id.as_str()
        };
        let now = self.activity.now_ms();
        match AccessLogType::try_from(common.access_log_type) {
            Ok(AccessLogType::DownstreamPeriodic) if !stream.is_empty() => {
                if let Some(s) = open.0.get_mut(stream) {
                    s.1 = now;
                    self.activity.touch_at(key, now);
                } else {
                    open.0.insert(stream.to_string(), (key, now));
                    self.activity.stream_delta(key, true);
                }
            }
            Ok(AccessLogType::DownstreamEnd) if open.0.remove(stream).is_some() => {
                self.activity.stream_delta(key, false);
            }
            _ => self.activity.touch_at(key, now),
        }
    }

    fn expire(&self, open: &mut OpenStreams) {
        let cutoff = self.activity.now_ms() - self.stream_expiry.as_millis() as i64;
        open.0.retain(|_, (key, seen)| {
            let keep = *seen >= cutoff;
            if !keep {
                self.activity.stream_delta(*key, false);
            }
            keep
        });
    }
}

/// The sandbox ID sandgate-extproc put in the request's dynamic metadata.
fn sandbox_of(entry: &HttpAccessLogEntry) -> Option<SandboxKey> {
    let meta = entry.common_properties.as_ref()?.metadata.as_ref()?;
    let lb = meta.filter_metadata.get(METADATA_NAMESPACE)?;
    match &lb.fields.get(METADATA_SANDBOX_ID)?.kind {
        Some(Kind::StringValue(id)) => SandboxKey::new(id),
        _ => None,
    }
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

    fn logs() -> AccessLogs {
        let mut reg = prometheus_client::registry::Registry::default();
        AccessLogs {
            activity: Arc::new(ActivityTable::new()),
            metrics: Metrics::new(&mut reg),
            stream_expiry: Duration::from_secs(60),
            shutdown: crate::shutdown::channel().1,
        }
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
        );
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
        );
        assert_eq!(open_streams(&l, "ws"), 1);
        l.apply(
            &entry(Some("ws"), "s2", AccessLogType::DownstreamPeriodic),
            &mut open,
        );
        assert_eq!(open_streams(&l, "ws"), 2);
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamEnd),
            &mut open,
        );
        assert_eq!(open_streams(&l, "ws"), 1);
        // A short request's only entry is its end: activity, no stream.
        l.apply(
            &entry(Some("short"), "s9", AccessLogType::DownstreamEnd),
            &mut open,
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
        );
        l.apply(
            &entry(Some("Not_Valid"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
        );
        assert!(l.activity.is_empty());
    }

    #[test]
    fn unrefreshed_streams_expire() {
        let mut l = logs();
        l.stream_expiry = Duration::ZERO;
        let mut open = OpenStreams::default();
        l.apply(
            &entry(Some("ws"), "s1", AccessLogType::DownstreamPeriodic),
            &mut open,
        );
        std::thread::sleep(Duration::from_millis(5));
        l.expire(&mut open);
        assert_eq!(open_streams(&l, "ws"), 0);
    }
}
