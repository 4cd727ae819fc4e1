//! Users and groups, read from `/etc/passwd` and `/etc/group` (static binaries have no NSS), and
//! the user a call runs as: the Basic-auth user (RPCs) or `username` (HTTP), else the default.

use std::path::{Path, PathBuf};

use base64::Engine;
use http::HeaderMap;

use crate::connect::{Code, RpcError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Supplementary groups (from /etc/group).
    pub groups: Vec<u32>,
}

/// Where the account files are; `/etc` in a sandbox, a temporary folder in unit tests.
#[derive(Debug, Clone)]
pub struct Accounts {
    etc: PathBuf,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts {
            etc: PathBuf::from("/etc"),
        }
    }
}

impl Accounts {
    pub fn at(etc: impl Into<PathBuf>) -> Self {
        Accounts { etc: etc.into() }
    }

    fn lines(&self, file: &str) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.etc.join(file))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
            .filter(|f| f.len() >= 4)
            .collect()
    }

    /// The account named `name`.
    pub fn lookup(&self, name: &str) -> Option<User> {
        let fields = self.lines("passwd").into_iter().find(|f| f[0] == name)?;
        let uid = fields[2].parse().ok()?;
        let gid = fields[3].parse().ok()?;
        let home = PathBuf::from(fields.get(5).map(String::as_str).unwrap_or("/"));
        let groups = self
            .lines("group")
            .into_iter()
            .filter(|g| g[3].split(',').any(|m| m == name))
            .filter_map(|g| g[2].parse().ok())
            .collect();
        Some(User {
            name: name.to_string(),
            uid,
            gid,
            home,
            groups,
        })
    }

    /// The name of `uid`, or the number.
    pub fn user_name(&self, uid: u32) -> String {
        self.name_of("passwd", uid)
    }

    /// The name of `gid`, or the number.
    pub fn group_name(&self, gid: u32) -> String {
        self.name_of("group", gid)
    }

    fn name_of(&self, file: &str, id: u32) -> String {
        let id_s = id.to_string();
        self.lines(file)
            .into_iter()
            .find(|f| f[2] == id_s)
            .map(|f| f[0].clone())
            .unwrap_or(id_s)
    }

    /// The account envd itself runs as (its effective uid), or a bare one if it has no entry.
    pub fn own(&self) -> User {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let name = self.user_name(uid);
        self.lookup(&name).unwrap_or_else(|| User {
            name,
            uid,
            // SAFETY: getegid has no preconditions.
            gid: unsafe { libc::getegid() },
            home: std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/")),
            groups: Vec::new(),
        })
    }
}

/// The user named in `Authorization: Basic base64(<user>:)`, if the header is there.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || RpcError::new(Code::Unauthenticated, "malformed Basic authorization");
    let v = v.to_str().map_err(|_| bad())?;
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Err(bad());
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let user = raw.split(':').next().unwrap_or("").to_string();
    Ok((!user.is_empty()).then_some(user))
}

/// Resolves the user a call asks for (`None`: the default). Only root can act as another user;
/// an unprivileged envd serves its own account alone.
pub fn resolve(
    accounts: &Accounts,
    asked: Option<&str>,
    default_user: &str,
) -> Result<User, RpcError> {
    let name = asked.unwrap_or(default_user);
    let user = accounts.lookup(name).ok_or_else(|| {
        RpcError::new(Code::Unauthenticated, format!("invalid username: '{name}'"))
    })?;
    let own = accounts.own();
    if own.uid != 0 && user.uid != own.uid {
        return Err(RpcError::new(
            Code::Unauthenticated,
            format!("envd runs as {} and cannot act as '{name}'", own.name),
        ));
    }
    Ok(user)
}

/// Resolves `path` as envd does: `~` and `~/x` are the user's home, relative paths are under
/// the home, an empty path is `default` (the default workdir, else the home).
pub fn resolve_path(path: &str, user: &User, default: Option<&Path>) -> Result<PathBuf, RpcError> {
    let p = if path.is_empty() {
        default
            .map(Path::to_path_buf)
            .unwrap_or_else(|| user.home.clone())
    } else if path == "~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix("~/") {
        user.home.join(rest)
    } else if path.starts_with('~') {
        return Err(RpcError::invalid(format!(
            "path '{path}': only the caller's own home (~) can be named"
        )));
    } else if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        user.home.join(path)
    };
    Ok(normalize(&p))
}

/// `..` and `.` removed lexically (the path need not exist).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> (tempfile::TempDir, Accounts) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("group"),
            "root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\n",
        )
        .unwrap();
        let a = Accounts::at(dir.path());
        (dir, a)
    }

    #[test]
    fn accounts_come_from_passwd_and_group() {
        let (_d, a) = accounts();
        let u = a.lookup("user").unwrap();
        assert_eq!((u.uid, u.gid, u.groups.clone()), (1000, 1000, vec![10]));
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert!(a.lookup("nobody-here").is_none());
        assert_eq!(a.user_name(1000), "user");
        assert_eq!(a.group_name(10), "wheel");
        assert_eq!(a.group_name(4242), "4242");
    }

    #[test]
    fn basic_auth_names_the_user() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_user(&h).unwrap(), None);
        h.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap().as_deref(), Some("root"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap_err().code, Code::Unauthenticated);
    }

    #[test]
    fn paths_resolve_against_the_home() {
        let (_d, a) = accounts();
        let u = a.lookup("user").unwrap();
        let r = |p: &str| resolve_path(p, &u, None).map(|p| p.display().to_string());
        assert_eq!(r("").unwrap(), "/home/user");
        assert_eq!(r("~").unwrap(), "/home/user");
        assert_eq!(r("~/a/b").unwrap(), "/home/user/a/b");
        assert_eq!(r("rel/x").unwrap(), "/home/user/rel/x");
        assert_eq!(r("/tmp/../etc/./x").unwrap(), "/etc/x");
        assert_eq!(r("~root/x").unwrap_err().code, Code::InvalidArgument);
        let w = resolve_path("", &u, Some(Path::new("/work"))).unwrap();
        assert_eq!(w, PathBuf::from("/work"));
    }
}
