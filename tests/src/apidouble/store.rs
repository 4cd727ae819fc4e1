//! The API double's object store: every resource kind in one map, one resourceVersion counter,
//! an event log for watches that resume from a resourceVersion, and the write semantics the
//! binaries rely on (preconditions, status subresource, finalizers).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::selector::Selector;

/// Events kept for watches that resume from an older resourceVersion.
const LOG_LEN: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, with the object before it (for selector transitions).
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub resource: String,
    pub namespace: String,
    pub kind: EventType,
    pub object: Value,
    pub old: Option<Value>,
}

/// An API error, rendered as a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
    }
    pub fn to_status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// How a PATCH body is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`; strategic merge is treated the same way.
    Merge,
    /// `application/json-patch+json`, with `test` operations as preconditions.
    Json,
}

type Key = (String, String, String);

struct Inner {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Arc<Change>>,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Arc<Change>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// As the API server does for Secrets: `stringData` is written into `data` (base64) and dropped.
fn string_data_to_data(obj: &mut Value) {
    use base64::Engine as _;
    let Some(Value::Object(plain)) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    let data = obj
        .as_object_mut()
        .map(|o| o.entry("data").or_insert_with(|| json!({})));
    if let Some(Value::Object(data)) = data {
        for (k, v) in plain {
            let text = v.as_str().unwrap_or_default().to_string();
            data.insert(
                k,
                json!(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
}

fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    super::rfc3339(d.as_secs())
}

impl Store {
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(65_536);
        Store {
            inner: Mutex::new(Inner {
                rv: 1,
                uid: 0,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
            }),
            changes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    fn record(
        &self,
        inner: &mut Inner,
        resource: &str,
        ns: &str,
        kind: EventType,
        object: Value,
        old: Option<Value>,
    ) {
        let change = Arc::new(Change {
            rv: inner.rv,
            resource: resource.to_string(),
            namespace: ns.to_string(),
            kind,
            object,
            old,
        });
        if inner.log.len() >= LOG_LEN {
            inner.log.pop_front();
        }
        inner.log.push_back(change.clone());
        let _ = self.changes.send(change);
    }

    pub fn create(&self, resource: &str, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        if resource == "secrets" {
            string_data_to_data(&mut obj);
        }
        let mut inner = self.lock();
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::new(400, "BadRequest", "object has no metadata"))?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(g) => format!("{g}{}", super::random_suffix()),
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name or metadata.generateName is required",
                    ))
                }
            },
        };
        let key = (resource.to_string(), ns.to_string(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            ));
        }
        inner.rv += 1;
        inner.uid += 1;
        meta.insert("name".into(), json!(name));
        if !ns.is_empty() {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", inner.uid)),
        );
        meta.insert("resourceVersion".into(), json!(inner.rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        inner.objects.insert(key, obj.clone());
        self.record(
            &mut inner,
            resource,
            ns,
            EventType::Added,
            obj.clone(),
            None,
        );
        Ok(obj)
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&(resource.to_string(), ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))
    }

    /// Objects of a resource (in one namespace, or all when `ns` is `None`) matching a selector.
    pub fn list(&self, resource: &str, ns: Option<&str>, sel: &Selector) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((r, n, _), o)| r == resource && ns.is_none_or(|ns| ns == n) && sel.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, inner.rv)
    }

    /// Replaces an object (PUT). `status` selects the status subresource.
    pub fn replace(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        new: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.write(resource, ns, name, status, |_| Ok(new))
    }

    pub fn patch(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.write(resource, ns, name, status, |cur| {
            let mut doc = cur.clone();
            match kind {
                PatchKind::Merge => json_patch::merge(&mut doc, body),
                PatchKind::Json => {
                    // As the API server does: a `test` for null passes on a missing path.
                    let body = match body.as_array() {
                        Some(ops) => Value::Array(
                            ops.iter()
                                .filter(|op| {
                                    let missing_null = op["op"] == "test"
                                        && op["value"].is_null()
                                        && op["path"]
                                            .as_str()
                                            .is_some_and(|p| doc.pointer(p).is_none());
                                    !missing_null
                                })
                                .cloned()
                                .collect(),
                        ),
                        None => body.clone(),
                    };
                    let ops: json_patch::Patch = serde_json::from_value(body).map_err(|e| {
                        ApiError::new(400, "BadRequest", format!("invalid JSON patch: {e}"))
                    })?;
                    json_patch::patch(&mut doc, &ops).map_err(|e| {
                        ApiError::new(422, "Invalid", format!("JSON patch failed: {e}"))
                    })?;
                }
            }
            Ok(doc)
        })
    }

    /// Read-modify-write with resourceVersion precondition, status-subresource and finalizer rules.
    fn write(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        status: bool,
        f: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (resource.to_string(), ns.to_string(), name.to_string());
        let cur = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        let mut new = f(&cur)?;
        let cur_rv = cur["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match new["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() && rv != cur_rv => {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                ))
            }
            _ => {}
        }
        // The status subresource changes only status; the main resource never does.
        let mut merged = cur.clone();
        if status {
            merged["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        } else {
            let keep_status = cur.get("status").cloned();
            if let Some(obj) = new.as_object_mut() {
                obj.remove("status");
                if let Some(s) = keep_status {
                    obj.insert("status".into(), s);
                }
            }
            // Immutable identity fields stay.
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
            ] {
                match cur["metadata"].get(f) {
                    Some(v) => new["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            if new.get("spec") != cur.get("spec") {
                let g = cur["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                new["metadata"]["generation"] = json!(g);
            }
            merged = new;
        }
        if merged == cur {
            return Ok(cur);
        }
        inner.rv += 1;
        merged["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let finalizing = merged["metadata"].get("deletionTimestamp").is_some()
            && merged["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        if finalizing {
            inner.objects.remove(&key);
            self.record(
                &mut inner,
                resource,
                ns,
                EventType::Deleted,
                merged.clone(),
                Some(cur),
            );
        } else {
            inner.objects.insert(key, merged.clone());
            self.record(
                &mut inner,
                resource,
                ns,
                EventType::Modified,
                merged.clone(),
                Some(cur),
            );
        }
        Ok(merged)
    }

    /// Deletes an object; with finalizers it is only marked for deletion.
    /// `precondition`: the resourceVersion the caller saw; any other is a 409, as in the API server.
    pub fn delete(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (resource.to_string(), ns.to_string(), name.to_string());
        let cur = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        if let Some(rv) = precondition {
            if cur["metadata"]["resourceVersion"].as_str() != Some(rv) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("Precondition failed: ResourceVersion in precondition: {rv}, in object meta: {}", cur["metadata"]["resourceVersion"]),
                ));
            }
        }
        inner.rv += 1;
        let mut obj = cur.clone();
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let has_finalizers = cur["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if cur["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                inner.objects.insert(key, obj.clone());
                self.record(
                    &mut inner,
                    resource,
                    ns,
                    EventType::Modified,
                    obj.clone(),
                    Some(cur),
                );
            }
            return Ok(obj);
        }
        inner.objects.remove(&key);
        self.record(
            &mut inner,
            resource,
            ns,
            EventType::Deleted,
            obj.clone(),
            Some(cur),
        );
        if resource == "namespaces" {
            // What lives in a deleted namespace goes too (objects with finalizers wait for them).
            let inside: Vec<(String, String, String)> = inner
                .objects
                .keys()
                .filter(|(_, n, _)| n == name)
                .cloned()
                .collect();
            drop(inner);
            for (r, n, o) in inside {
                let _ = self.delete(&r, &n, &o, None);
            }
        }
        Ok(obj)
    }

    /// Changes after `rv` still in the log, or `None` when `rv` is older than the log (410 Gone).
    pub fn changes_since(&self, rv: u64) -> Option<Vec<Arc<Change>>> {
        let inner = self.lock();
        if let Some(first) = inner.log.front() {
            if rv + 1 < first.rv && inner.log.len() >= LOG_LEN {
                return None;
            }
        }
        Some(inner.log.iter().filter(|c| c.rv > rv).cloned().collect())
    }
}
