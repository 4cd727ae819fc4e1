//! The messages of `proto/process.proto` and `proto/filesystem.proto` in proto3's canonical JSON
//! mapping, which is all the E2B SDKs speak: lowerCamelCase names (the original snake_case names
//! accepted too), `bytes` as padded base64, `int64` as a string, enums by name, defaults left out.
//! Unknown fields are ignored, as proto3 JSON parsers do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `bytes` fields: standard base64 with padding.
pub mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        // proto3 JSON parsers accept URL-safe and unpadded base64 as well.
        let cleaned: String = text
            .trim_end_matches('=')
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(cleaned)
            .map_err(serde::de::Error::custom)
    }
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

// ---------------------------------------------------------------------------------------------
// process.Process

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessConfig {
    pub cmd: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PtySize {
    pub cols: u32,
    pub rows: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Pty {
    pub size: Option<PtySize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    pub process: Option<ProcessConfig>,
    pub pty: Option<Pty>,
    pub tag: Option<String>,
    /// Absent (older SDKs) means a stdin pipe; `false` means `/dev/null`.
    pub stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProcessSelector {
    pub pid: Option<u32>,
    pub tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConnectRequest {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UpdateRequest {
    pub process: Option<ProcessSelector>,
    pub pty: Option<Pty>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProcessInput {
    #[serde(with = "opt_b64")]
    pub stdin: Option<Vec<u8>>,
    #[serde(with = "opt_b64")]
    pub pty: Option<Vec<u8>>,
}

/// `Option<bytes>` for oneof members.
pub mod opt_b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendInputRequest {
    pub process: Option<ProcessSelector>,
    pub input: Option<ProcessInput>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputStart {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputData {
    pub input: Option<ProcessInput>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputRequest {
    pub start: Option<StreamInputStart>,
    pub data: Option<StreamInputData>,
    pub keepalive: Option<serde_json::Value>,
}

/// `Signal` by name or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signal {
    #[default]
    Unspecified,
    Term,
    Kill,
    Other(i64),
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => match s.as_str() {
                "SIGNAL_UNSPECIFIED" => Signal::Unspecified,
                "SIGNAL_SIGTERM" => Signal::Term,
                "SIGNAL_SIGKILL" => Signal::Kill,
                other => return Err(serde::de::Error::custom(format!("unknown signal {other}"))),
            },
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(0) => Signal::Unspecified,
                Some(15) => Signal::Term,
                Some(9) => Signal::Kill,
                Some(n) => Signal::Other(n),
                None => return Err(serde::de::Error::custom("signal is not an integer")),
            },
            serde_json::Value::Null => Signal::Unspecified,
            _ => {
                return Err(serde::de::Error::custom(
                    "signal must be a name or a number",
                ))
            }
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendSignalRequest {
    pub process: Option<ProcessSelector>,
    pub signal: Signal,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CloseStdinRequest {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Serialize)]
pub struct ProcessInfo {
    pub config: ProcessConfig,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListResponse {
    pub processes: Vec<ProcessInfo>,
}

/// `ProcessEvent.EndEvent`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub exit_code: i32,
    #[serde(skip_serializing_if = "is_false")]
    pub exited: bool,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `ProcessEvent.DataEvent`: one of its outputs.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    Stdout(#[serde(with = "b64")] Vec<u8>),
    Stderr(#[serde(with = "b64")] Vec<u8>),
    Pty(#[serde(with = "b64")] Vec<u8>),
}

#[derive(Debug, Clone, Serialize)]
pub struct StartEvent {
    pub pid: u32,
}

/// `ProcessEvent`, the oneof `event`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessEvent {
    Start(StartEvent),
    Data(Output),
    End(EndEvent),
    Keepalive {},
}

/// `StartResponse` and `ConnectResponse`.
#[derive(Debug, Serialize)]
pub struct EventResponse<'a> {
    pub event: &'a ProcessEvent,
}

// ---------------------------------------------------------------------------------------------
// filesystem.Filesystem

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FileType {
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "FILE_TYPE_FILE")]
    File,
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory,
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub path: String,
    /// int64: a JSON string.
    #[serde(serialize_with = "as_string")]
    pub size: u64,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "is_false")]
    pub is_symlink: bool,
}

fn as_string<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PathRequest {
    pub path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MoveRequest {
    pub source: String,
    pub destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListDirRequest {
    pub path: String,
    pub depth: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatchRequest {
    pub path: String,
    pub recursive: bool,
    #[serde(rename = "includeEntry", alias = "include_entry")]
    pub include_entry: bool,
    #[serde(rename = "allowNetworkMounts", alias = "allow_network_mounts")]
    pub allow_network_mounts: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WatcherRequest {
    #[serde(rename = "watcherId", alias = "watcher_id")]
    pub watcher_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create,
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write,
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove,
    #[serde(rename = "EVENT_TYPE_RENAME")]
    Rename,
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod,
}

#[derive(Debug, Clone, Serialize)]
pub struct FilesystemEvent {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// `WatchDirResponse`, the oneof `event`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchEvent {
    Start {},
    Filesystem(Box<FilesystemEvent>),
    Keepalive {},
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_events_are_proto3_json() {
        let e = ProcessEvent::Data(Output::Stdout(b"hello\n".to_vec()));
        assert_eq!(
            serde_json::to_string(&EventResponse { event: &e }).unwrap(),
            r#"{"event":{"data":{"stdout":"aGVsbG8K"}}}"#
        );
        let end = ProcessEvent::End(EndEvent {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
        });
        assert_eq!(
            serde_json::to_string(&EventResponse { event: &end }).unwrap(),
            r#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#
        );
        let ka = ProcessEvent::Keepalive {};
        assert_eq!(
            serde_json::to_string(&EventResponse { event: &ka }).unwrap(),
            r#"{"event":{"keepalive":{}}}"#
        );
    }

    #[test]
    fn requests_parse_as_the_sdks_send_them() {
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A_B":"1"},"cwd":"/tmp"},"stdin":false,"unknown":1}"#,
        )
        .unwrap();
        let p = r.process.unwrap();
        assert_eq!(p.args, ["-l", "-c", "echo hi"]);
        assert_eq!(p.envs["A_B"], "1");
        assert_eq!(r.stdin, Some(false));
        let r: StartRequest = serde_json::from_str(r#"{"process":{"cmd":"x"}}"#).unwrap();
        assert_eq!(r.stdin, None, "absent stdin is told from false");
        let s: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!((s.process.unwrap().pid, s.signal), (Some(7), Signal::Kill));
        let s: SendSignalRequest = serde_json::from_str(r#"{"signal":15}"#).unwrap();
        assert_eq!(s.signal, Signal::Term);
        let i: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"input":{"stdin":"YQ=="}}"#).unwrap();
        assert_eq!(i.input.unwrap().stdin.unwrap(), b"a");
        let w: WatcherRequest = serde_json::from_str(r#"{"watcher_id":"w1"}"#).unwrap();
        assert_eq!(w.watcher_id, "w1");
        let w: WatcherRequest = serde_json::from_str(r#"{"watcherId":"w2"}"#).unwrap();
        assert_eq!(w.watcher_id, "w2");
        let w: WatchRequest =
            serde_json::from_str(r#"{"path":"/x","includeEntry":true,"recursive":true}"#).unwrap();
        assert!(w.include_entry && w.recursive);
        let w: WatchRequest = serde_json::from_str(r#"{"include_entry":true}"#).unwrap();
        assert!(w.include_entry);
    }

    #[test]
    fn entries_carry_size_as_a_string_and_symlinks_both_ways() {
        let e = EntryInfo {
            name: "l".into(),
            kind: FileType::Symlink,
            path: "/t/l".into(),
            size: 5,
            mode: 0o777,
            permissions: "Lrwxrwxrwx".into(),
            owner: "root".into(),
            group: "root".into(),
            modified_time: "2026-01-02T03:04:05Z".into(),
            symlink_target: Some("/t/f".into()),
            metadata: BTreeMap::new(),
            is_symlink: true,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["size"], "5");
        assert_eq!(v["type"], "FILE_TYPE_SYMLINK");
        assert_eq!(v["isSymlink"], true);
        assert_eq!(v["symlinkTarget"], "/t/f");
        assert_eq!(v["modifiedTime"], "2026-01-02T03:04:05Z");
    }
}
