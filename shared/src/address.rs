//! Sandbox addresses: which sandbox, and which port in it, a request is for.
//!
//! Four forms are accepted, tried in this order:
//! 1. host `<port>-<id>.<domain>` (the E2B convention);
//! 2. host `<id>.<domain>` (the pod's default port);
//! 3. headers `x-sandbox-id` and optionally `x-sandbox-port`, or the E2B SDK's `e2b-sandbox-id` and
//!    `e2b-sandbox-port` (ours win when both are sent; each pair is read on its own);
//! 4. path `/sandboxes/<id>/<port>/rest…`, rewritten to `/rest…` before it reaches the pod.
//!
//! A host under a configured domain always wins: with the host form, a path that happens to start
//! with `/sandboxes/` belongs to the sandbox's own application. This module only parses; it never
//! decides where a request goes: destinations come from the route index alone.

use std::borrow::Cow;

/// Longest sandbox ID accepted. IDs are stored in a label value (≤ 63) and must fit in one DNS
/// label together with a `<port>-` prefix.
pub const MAX_ID_LEN: usize = 50;
/// Header naming the sandbox.
pub const HEADER_ID: &str = "x-sandbox-id";
/// Header naming the port inside the sandbox.
pub const HEADER_PORT: &str = "x-sandbox-port";
/// The E2B SDK's header naming the sandbox (`E2b-Sandbox-Id`, lower-cased as Envoy passes it).
pub const E2B_HEADER_ID: &str = "e2b-sandbox-id";
/// The E2B SDK's header naming the port (`E2b-Sandbox-Port`).
pub const E2B_HEADER_PORT: &str = "e2b-sandbox-port";
/// Path prefix of the path form.
pub const PATH_PREFIX: &str = "/sandboxes/";

/// Which form a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressForm {
    HostWithPort,
    Host,
    Header,
    Path,
}

/// A parsed sandbox address. Borrowed from the request where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxAddress<'a> {
    pub id: Cow<'a, str>,
    /// `None` means "the pod's default port".
    pub port: Option<u16>,
    pub form: AddressForm,
    /// For the path form: the path the pod must see, query string kept.
    pub rewritten_path: Option<Cow<'a, str>>,
}

/// Why a request carries no usable sandbox address. Every variant becomes a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("no sandbox address: expected host <port>-<id>.<domain>, header x-sandbox-id or path /sandboxes/<id>/<port>/")]
    Missing,
    #[error("invalid sandbox id: {0}")]
    InvalidId(&'static str),
    #[error("invalid sandbox port: expected an integer from 1 to 65535")]
    InvalidPort,
    #[error("malformed sandbox host: expected <port>-<id>.<domain> or <id>.<domain>")]
    MalformedHost,
    #[error("malformed sandbox path: expected /sandboxes/<id>/<port>/...")]
    MalformedPath,
    #[error("x-sandbox-port given without x-sandbox-id")]
    PortWithoutId,
    /// A routing header (or the host) given twice: which one the request means is ambiguous, as
    /// request-smuggling defences treat it.
    #[error("{0} given more than once: a request must name one sandbox address")]
    Duplicate(&'static str),
}

impl AddressError {
    /// A stable, low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            AddressError::Missing => "missing",
            AddressError::InvalidId(_) => "invalid_id",
            AddressError::InvalidPort => "invalid_port",
            AddressError::MalformedHost => "malformed_host",
            AddressError::MalformedPath => "malformed_path",
            AddressError::PortWithoutId => "port_without_id",
            AddressError::Duplicate(_) => "duplicate",
        }
    }
}

/// A configured domain suffix that is not a valid DNS name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox domain {0:?}: expected a DNS name such as sandbox.example.com")]
pub struct InvalidDomain(pub String);

/// The domain suffixes under which hosts name sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressConfig {
    /// Lower-case, no leading or trailing dot, longest first so the most specific matches.
    domains: Vec<String>,
}

/// The parts of a request that can carry an address, as raw bytes from Envoy.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestParts<'a> {
    pub authority: &'a [u8],
    pub path: &'a [u8],
    pub header_id: Option<&'a [u8]>,
    pub header_port: Option<&'a [u8]>,
    pub e2b_header_id: Option<&'a [u8]>,
    pub e2b_header_port: Option<&'a [u8]>,
    /// A routing header the request carried more than once (the caller counts them).
    pub duplicate: Option<&'static str>,
}

impl AddressConfig {
    pub fn new<I, S>(domains: I) -> Result<Self, InvalidDomain>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for d in domains {
            let raw = d.as_ref();
            let d = raw.trim().trim_matches('.').to_ascii_lowercase();
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(InvalidDomain(raw.to_string()));
            }
            out.push(d);
        }
        out.sort_by_key(|d| std::cmp::Reverse(d.len()));
        out.dedup();
        Ok(AddressConfig { domains: out })
    }

    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// Finds the sandbox address in a request. A routing header given twice, or a value holding a
    /// comma (how Envoy joins repeated headers, a Host among them), is refused whatever else the
    /// request carries.
    pub fn parse<'a>(&self, req: RequestParts<'a>) -> Result<SandboxAddress<'a>, AddressError> {
        if let Some(name) = req.duplicate {
            return Err(AddressError::Duplicate(name));
        }
        if req.authority.contains(&b',') {
            return Err(AddressError::Duplicate("host"));
        }
        for (name, value) in [
            (HEADER_ID, req.header_id),
            (HEADER_PORT, req.header_port),
            (E2B_HEADER_ID, req.e2b_header_id),
            (E2B_HEADER_PORT, req.e2b_header_port),
        ] {
            if value.is_some_and(|v| v.contains(&b',')) {
                return Err(AddressError::Duplicate(name));
            }
        }
        if let Some(label) = self.sandbox_label(req.authority)? {
            return parse_host_label(label);
        }
        let header_pair = match (req.header_id, req.e2b_header_id) {
            (Some(id), _) => Some((id, req.header_port)),
            (None, Some(id)) => Some((id, req.e2b_header_port)),
            (None, None) => None,
        };
        if let Some((id, port)) = header_pair {
            let id = validate_id(utf8(id).ok_or(AddressError::InvalidId("not UTF-8"))?)?;
            let port = port.map(parse_port).transpose()?;
            return Ok(SandboxAddress {
                id: Cow::Borrowed(id),
                port,
                form: AddressForm::Header,
                rewritten_path: None,
            });
        }
        if req.path.starts_with(PATH_PREFIX.as_bytes()) {
            return parse_path(utf8(req.path).ok_or(AddressError::MalformedPath)?);
        }
        if req.header_port.is_some() || req.e2b_header_port.is_some() {
            return Err(AddressError::PortWithoutId);
        }
        Err(AddressError::Missing)
    }

    /// The single DNS label in front of a configured domain, if the host is under one.
    fn sandbox_label<'a>(&self, authority: &'a [u8]) -> Result<Option<&'a [u8]>, AddressError> {
        let host = strip_port(authority);
        let host = host.strip_suffix(b".").unwrap_or(host);
        for domain in &self.domains {
            let d = domain.as_bytes();
            if host.len() <= d.len() + 1 {
                continue;
            }
            let split = host.len() - d.len();
            if host[split - 1] == b'.' && host[split..].eq_ignore_ascii_case(d) {
                let label = &host[..split - 1];
                if label.contains(&b'.') {
                    return Err(AddressError::MalformedHost);
                }
                return Ok(Some(label));
            }
        }
        Ok(None)
    }
}

fn utf8(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// Removes a trailing `:port` from an authority. IPv6 literals are returned whole.
fn strip_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return authority;
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(i) => &authority[..i],
        None => authority,
    }
}

fn parse_host_label(label: &[u8]) -> Result<SandboxAddress<'_>, AddressError> {
    let label = utf8(label).ok_or(AddressError::MalformedHost)?;
    let digits = label.bytes().take_while(u8::is_ascii_digit).count();
    let (port, id, form) = match label.as_bytes().get(digits) {
        Some(b'-') if digits > 0 => (
            Some(parse_port(&label.as_bytes()[..digits])?),
            &label[digits + 1..],
            AddressForm::HostWithPort,
        ),
        _ => (None, label, AddressForm::Host),
    };
    // Hosts are case-insensitive; IDs are lower-case.
    let id = if id.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = id.to_ascii_lowercase();
        validate_id(&lower)?;
        Cow::Owned(lower)
    } else {
        Cow::Borrowed(validate_id(id)?)
    };
    Ok(SandboxAddress {
        id,
        port,
        form,
        rewritten_path: None,
    })
}

fn parse_path(path: &str) -> Result<SandboxAddress<'_>, AddressError> {
    let rest = &path[PATH_PREFIX.len()..];
    let (id, rest) = rest.split_once('/').ok_or(AddressError::MalformedPath)?;
    let id = validate_id(id)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (port, tail) = rest.split_at(end);
    if port.is_empty() {
        return Err(AddressError::MalformedPath);
    }
    let port = parse_port(port.as_bytes())?;
    let rewritten = if tail.starts_with('/') {
        Cow::Borrowed(tail)
    } else {
        Cow::Owned(format!("/{tail}"))
    };
    Ok(SandboxAddress {
        id: Cow::Borrowed(id),
        port: Some(port),
        form: AddressForm::Path,
        rewritten_path: Some(rewritten),
    })
}

/// Checks an ID: 1 to [`MAX_ID_LEN`] of `[a-z0-9-]`, starting and ending with a letter or digit.
pub fn validate_id(id: &str) -> Result<&str, AddressError> {
    if id.is_empty() {
        return Err(AddressError::InvalidId("empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(AddressError::InvalidId("longer than 50 characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(AddressError::InvalidId(
            "only lower-case letters, digits and '-' are allowed",
        ));
    }
    if id.starts_with('-') || id.ends_with('-') {
        return Err(AddressError::InvalidId(
            "must start and end with a letter or digit",
        ));
    }
    Ok(id)
}

/// Parses a port: 1–65535 in decimal, no sign, no leading zero.
pub fn parse_port(raw: &[u8]) -> Result<u16, AddressError> {
    if raw.is_empty() || raw.len() > 5 || raw[0] == b'0' || !raw.iter().all(u8::is_ascii_digit) {
        return Err(AddressError::InvalidPort);
    }
    let n = raw.iter().fold(0u32, |n, &b| n * 10 + u32::from(b - b'0'));
    u16::try_from(n).map_err(|_| AddressError::InvalidPort)
}

#[cfg(test)]
mod tests;
