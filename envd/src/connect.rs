//! The Connect protocol with the JSON codec, as the E2B SDKs speak it (connect-py, connect-web):
//! unary calls are `application/json` in and out, errors a non-200 status with
//! `{"code":"not_found","message":…}`; streams are `application/connect+json` envelopes
//! (`flags:u8 | len:u32be | json`), always closed by an end-stream envelope (flag 2) that carries
//! the error if there is one, on HTTP 200.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// The largest unary request or stream message accepted.
pub const MAX_MESSAGE: usize = 16 << 20;

pub const UNARY: &str = "application/json";
pub const STREAM: &str = "application/connect+json";

/// Connect error codes (the SDKs map them to their exceptions by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error (Connect's table).
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).expect("valid status"),
            Code::Unknown | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// An RPC's failure: a code and a message for the caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

pub type RpcResult<T> = Result<T, RpcError>;

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid response")
}

/// A unary call's answer.
pub fn unary<T: Serialize>(result: RpcResult<T>) -> Response<Body> {
    match result.and_then(|v| serde_json::to_vec(&v).map_err(|e| RpcError::internal(e.to_string())))
    {
        Ok(body) => full(StatusCode::OK, UNARY, body),
        Err(e) => full(e.code.status(), UNARY, e.json().to_string()),
    }
}

/// The Connect deadline a request carries (`connect-timeout-ms`), if any.
pub fn deadline(headers: &HeaderMap) -> RpcResult<Option<Duration>> {
    match headers.get("connect-timeout-ms") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|ms| s_len_ok(*ms))
            .map(|ms| Some(Duration::from_millis(ms)))
            .ok_or_else(|| RpcError::invalid("connect-timeout-ms is not a number of milliseconds")),
    }
}

/// Connect allows at most ten digits.
fn s_len_ok(ms: u64) -> bool {
    ms < 10_000_000_000
}

/// How often a stream sends keepalives when nothing else goes out (`Keepalive-Ping-Interval`,
/// seconds; envd's default is 90 s).
pub fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(90))
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Whether a request's content type is the Connect JSON one for its kind of call. Only JSON is
/// served: every pinned SDK uses it, and an answer must use the codec of its request.
pub fn check_codec(headers: &HeaderMap, streaming: bool) -> Result<(), Response<Body>> {
    let ct = content_type(headers);
    let base = ct.split(';').next().unwrap_or("").trim();
    let want = if streaming { STREAM } else { UNARY };
    if base.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(full(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            UNARY,
            RpcError::new(
                Code::Unimplemented,
                format!("content-type {ct:?} is not served here: use {want}"),
            )
            .json()
            .to_string(),
        ))
    }
}

/// Reads a unary request's message.
pub async fn read_unary<T: DeserializeOwned>(body: Incoming) -> RpcResult<T> {
    let bytes = http_body_util::Limited::new(body, MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| RpcError::invalid(format!("reading the request: {e}")))?
        .to_bytes();
    parse(&bytes)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> RpcResult<T> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| RpcError::invalid(format!("bad message: {e}")))
}

/// The envelopes of a streaming request, read as they arrive.
pub struct Envelopes {
    body: BodyStream<Incoming>,
    buf: BytesMut,
}

impl Envelopes {
    pub fn new(body: Incoming) -> Self {
        Envelopes {
            body: BodyStream::new(body),
            buf: BytesMut::new(),
        }
    }

    /// The next message; `None` at the end of the request (or at its end-stream envelope).
    pub async fn next<T: DeserializeOwned>(&mut self) -> RpcResult<Option<T>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if len > MAX_MESSAGE {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("message of {len} bytes is over the limit"),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len);
                    if flags & 0x01 != 0 {
                        return Err(RpcError::internal("compressed messages are not accepted"));
                    }
                    if flags & 0x02 != 0 {
                        return Ok(None);
                    }
                    return parse(&payload).map(Some);
                }
            }
            match self.body.next().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(RpcError::new(Code::Canceled, e.to_string())),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(RpcError::invalid("the request ends inside a message")),
            }
        }
    }
}

fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.put_u8(flags);
    b.put_u32(json.len() as u32);
    b.put_slice(json);
    b.freeze()
}

/// The sending side of a streaming response.
pub struct Sink {
    tx: mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
}

impl Sink {
    /// Sends one message; `false` once the caller has gone.
    pub async fn send<T: Serialize>(&self, msg: &T) -> bool {
        let json = serde_json::to_vec(msg).expect("messages serialize");
        self.tx
            .send(Ok(Frame::data(envelope(0, &json))))
            .await
            .is_ok()
    }

    /// Ends the stream, with its error if any.
    pub async fn finish(self, result: RpcResult<()>) {
        let end = match result {
            Ok(()) => serde_json::json!({}),
            Err(e) => serde_json::json!({"error": e.json()}),
        };
        let _ = self
            .tx
            .send(Ok(Frame::data(envelope(2, end.to_string().as_bytes()))))
            .await;
    }

    /// Resolves when the caller has gone (its connection or stream closed).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A streaming response and the sink that feeds it. The content type is exactly
/// `application/connect+json`: Python's client refuses any parameter on it.
pub fn stream() -> (Response<Body>, Sink) {
    let (tx, rx) = mpsc::channel(16);
    let body = BodyExt::boxed(StreamBody::new(tokio_stream_wrapper(rx)));
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, STREAM)
        .body(body)
        .expect("valid response");
    (resp, Sink { tx })
}

fn tokio_stream_wrapper(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A streaming call that fails before its first message: HTTP 200 and the error in the
/// end-stream envelope, which every SDK reads (a non-200 answer loses the message in JS).
pub fn stream_error(e: RpcError) -> Response<Body> {
    let end = serde_json::json!({"error": e.json()}).to_string();
    full(StatusCode::OK, STREAM, envelope(2, end.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_errors_carry_connect_codes_and_statuses() {
        let r = unary::<()>(Err(RpcError::not_found("no such pid")));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = unary::<()>(Err(RpcError::new(Code::AlreadyExists, "x")));
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(r.headers()[header::CONTENT_TYPE], UNARY);
    }

    #[test]
    fn deadlines_and_keepalives_read_their_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(deadline(&h).unwrap(), None);
        assert_eq!(keepalive(&h), Duration::from_secs(90));
        h.insert("connect-timeout-ms", "1500".parse().unwrap());
        h.insert("keepalive-ping-interval", "50".parse().unwrap());
        assert_eq!(deadline(&h).unwrap(), Some(Duration::from_millis(1500)));
        assert_eq!(keepalive(&h), Duration::from_secs(50));
        h.insert("connect-timeout-ms", "soon".parse().unwrap());
        assert_eq!(deadline(&h).unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn codecs_other_than_json_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(check_codec(&h, false).is_ok());
        assert!(check_codec(&h, true).is_err());
        h.insert(header::CONTENT_TYPE, "application/proto".parse().unwrap());
        assert_eq!(
            check_codec(&h, false).unwrap_err().status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn envelopes_frame_their_length() {
        let e = envelope(2, b"{}");
        assert_eq!(&e[..], &[2, 0, 0, 0, 2, b'{', b'}']);
    }
}
