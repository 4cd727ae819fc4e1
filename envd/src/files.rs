//! `GET /files` and `POST /files`: downloads and uploads streamed between the connection and the
//! file, never held in memory whole. Uploads are multipart (field `file`, its filename the path)
//! or a raw `application/octet-stream` body (gzip when `Content-Encoding: gzip`); a single file's
//! query `path` wins over its part's filename. Errors are envd's `{"code": <status>, "message"}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::connect::{full, Body};
use crate::users::{self, User};
use crate::Envd;

pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({"code": status.as_u16(), "message": message.into()});
    full(status, "application/json", body.to_string())
}

pub fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    // form_urlencoded decodes `+` as a space, as JS's URLSearchParams writes it.
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn user_for(envd: &Envd, q: &BTreeMap<String, String>) -> Result<User, Response<Body>> {
    let settings = envd.auth.settings();
    let default = settings
        .default_user
        .as_deref()
        .unwrap_or(&envd.config.default_user);
    users::resolve(
        &envd.accounts,
        q.get("username").map(String::as_str),
        default,
    )
    .map_err(|e| error(StatusCode::UNAUTHORIZED, e.message))
}

fn resolve(envd: &Envd, path: &str, user: &User) -> Result<PathBuf, Response<Body>> {
    let settings = envd.auth.settings();
    let workdir = settings.default_workdir.as_deref().map(Path::new);
    users::resolve_path(path, user, workdir).map_err(|e| error(StatusCode::BAD_REQUEST, e.message))
}

fn io_status(e: &std::io::Error) -> StatusCode {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StatusCode::INSUFFICIENT_STORAGE,
        _ => match e.kind() {
            std::io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
            std::io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    }
}

pub async fn download(envd: &Envd, req: Request<Incoming>) -> Response<Body> {
    let q = query(&req);
    let user = match user_for(envd, &q) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(raw) = q.get("path") else {
        return error(
            StatusCode::BAD_REQUEST,
            "the path query parameter is required",
        );
    };
    let path = match resolve(envd, raw, &user) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let md = match tokio::fs::metadata(&path).await {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return error(
                StatusCode::NOT_FOUND,
                format!("path '{raw}' does not exist"),
            )
        }
        Err(e) => return error(io_status(&e), e.to_string()),
    };
    if md.is_dir() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("path '{raw}' is a directory"),
        );
    }
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return error(io_status(&e), e.to_string()),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', ""))
        .unwrap_or_default();
    let frames = ReaderStream::with_capacity(file, 64 << 10).map_ok(Frame::data);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, md.len())
        .header(
            header::CONTENT_DISPOSITION,
            format!("inline; filename=\"{name}\""),
        )
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("valid response")
}

/// Writes `from` to `path` (parents created, truncated, owned by the user); the JSON entry.
async fn write_file(
    envd: &Envd,
    path: &Path,
    user: &User,
    mut from: impl AsyncRead + Unpin,
) -> Result<serde_json::Value, Response<Body>> {
    if path.is_dir() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is a directory", path.display()),
        ));
    }
    let switch = envd.switch_user();
    if let Some(parent) = path.parent() {
        crate::fs::make_parents(parent, user, switch)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.message))?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .await
        .map_err(|e| error(io_status(&e), format!("{}: {e}", path.display())))?;
    crate::fs::chown(path, user, switch);
    tokio::io::copy(&mut from, &mut file)
        .await
        .map_err(|e| error(io_status(&e), format!("writing {}: {e}", path.display())))?;
    file.flush()
        .await
        .map_err(|e| error(io_status(&e), e.to_string()))?;
    Ok(serde_json::json!({
        "path": path.display().to_string(),
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
    }))
}

fn body_stream(body: Incoming) -> impl Stream<Item = std::io::Result<Bytes>> + Send + Unpin {
    BodyStream::new(body)
        .try_filter_map(|f| futures::future::ready(Ok(f.into_data().ok())))
        .map_err(std::io::Error::other)
}

pub async fn upload(envd: &Envd, req: Request<Incoming>) -> Response<Body> {
    let q = query(&req);
    let user = match user_for(envd, &q) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let gzip = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let mut written = Vec::new();
    if ct.starts_with("application/octet-stream") {
        let Some(raw) = q.get("path") else {
            return error(
                StatusCode::BAD_REQUEST,
                "the path query parameter is required for an octet-stream upload",
            );
        };
        let path = match resolve(envd, raw, &user) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let reader = StreamReader::new(body_stream(req.into_body()));
        let result = if gzip {
            let inflated = async_compression::tokio::bufread::GzipDecoder::new(
                tokio::io::BufReader::new(reader),
            );
            write_file(envd, &path, &user, inflated).await
        } else {
            write_file(envd, &path, &user, reader).await
        };
        match result {
            Ok(v) => written.push(v),
            Err(r) => return r,
        }
    } else if ct.starts_with("multipart/form-data") {
        let boundary = match multer::parse_boundary(&ct) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad multipart: {e}")),
        };
        let mut form = multer::Multipart::new(body_stream(req.into_body()), boundary);
        let mut seen = std::collections::HashSet::new();
        loop {
            let field = match form.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad multipart: {e}")),
            };
            if field.name() != Some("file") {
                continue;
            }
            // One file: the query path wins over the part's filename.
            let target = match (q.get("path"), field.file_name()) {
                (Some(p), _) if written.is_empty() => p.clone(),
                (_, Some(f)) => f.to_string(),
                (_, None) => {
                    return error(StatusCode::BAD_REQUEST, "a file part names no path");
                }
            };
            let path = match resolve(envd, &target, &user) {
                Ok(p) => p,
                Err(r) => return r,
            };
            if !seen.insert(path.clone()) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("two parts write {}", path.display()),
                );
            }
            let reader = StreamReader::new(field.map_err(std::io::Error::other));
            match write_file(envd, &path, &user, reader).await {
                Ok(v) => written.push(v),
                Err(r) => return r,
            }
        }
        if written.is_empty() {
            return error(StatusCode::BAD_REQUEST, "no part named file");
        }
    } else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unsupported content-type {ct:?}: use multipart/form-data or application/octet-stream"),
        );
    }
    full(
        StatusCode::OK,
        "application/json",
        serde_json::Value::Array(written).to_string(),
    )
}
