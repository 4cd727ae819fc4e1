//! `filesystem.Filesystem`'s unary calls on real files, with entries described as envd does
//! (permission bits, Go-style permission strings, owner and group names) except that a symlink
//! is reported as a symlink (`type` SYMLINK and `is_symlink`), so every SDK shows it as one.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::connect::{Code, RpcError, RpcResult};
use crate::users::{Accounts, User};
use crate::wire::{EntryInfo, FileType};

fn io_error(path: &Path, e: std::io::Error) -> RpcError {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            RpcError::not_found(format!("file not found: {}", path.display()))
        }
        std::io::ErrorKind::PermissionDenied => RpcError::new(
            Code::PermissionDenied,
            format!("permission denied: {}", path.display()),
        ),
        _ => RpcError::internal(format!("{}: {e}", path.display())),
    }
}

/// Go's `FileMode.String()` for an lstat mode.
pub fn permissions(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => "d",
        libc::S_IFLNK => "L",
        libc::S_IFIFO => "p",
        libc::S_IFSOCK => "S",
        libc::S_IFBLK => "D",
        libc::S_IFCHR => "Dc",
        _ => "",
    };
    let mut s = String::from(kind);
    if mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

fn rfc3339(secs: i64, nanos: i64) -> String {
    jiff::Timestamp::new(secs, nanos as i32)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The entry for `path` (lstat), named `shown` in listings.
pub fn entry(accounts: &Accounts, path: &Path, shown: &Path) -> RpcResult<EntryInfo> {
    let md = std::fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
    let ft = md.file_type();
    let (kind, mode, symlink_target) = if ft.is_symlink() {
        let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let bits = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(md.mode() & 0o777);
        (FileType::Symlink, bits, Some(target.display().to_string()))
    } else if ft.is_dir() {
        (FileType::Directory, md.mode() & 0o7777 & 0o777, None)
    } else if ft.is_file() {
        (FileType::File, md.mode() & 0o777, None)
    } else {
        (FileType::Unspecified, md.mode() & 0o777, None)
    };
    Ok(EntryInfo {
        name: shown
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind,
        path: shown.display().to_string(),
        size: md.len(),
        mode,
        permissions: permissions(md.mode()),
        owner: accounts.user_name(md.uid()),
        group: accounts.group_name(md.gid()),
        modified_time: rfc3339(md.mtime(), md.mtime_nsec()),
        is_symlink: kind == FileType::Symlink,
        symlink_target,
        metadata: Default::default(),
    })
}

pub fn stat(accounts: &Accounts, path: &Path) -> RpcResult<EntryInfo> {
    entry(accounts, path, path)
}

/// Gives `path` to `user` when envd acts for someone else.
pub fn chown(path: &Path, user: &User, switch_user: bool) {
    if switch_user {
        if let Err(e) = std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)) {
            tracing::warn!(path = %path.display(), error = %e, "chown failed");
        }
    }
}

/// `mkdir -p`, each new directory owned by the user; an existing directory is
/// `already_exists` (the SDK's `make_dir` then answers false), an existing file
/// `invalid_argument`.
pub fn make_dir(
    accounts: &Accounts,
    path: &Path,
    user: &User,
    switch: bool,
) -> RpcResult<EntryInfo> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            return Err(RpcError::new(
                Code::AlreadyExists,
                format!("directory already exists: {}", path.display()),
            ))
        }
        Ok(_) => {
            return Err(RpcError::invalid(format!(
                "path already exists but is not a directory: {}",
                path.display()
            )))
        }
        Err(_) => {}
    }
    make_parents(path, user, switch)?;
    stat(accounts, path)
}

/// Creates `dir` and its missing parents, each owned by the user.
pub fn make_parents(dir: &Path, user: &User, switch: bool) -> RpcResult<()> {
    let mut missing = Vec::new();
    let mut p = dir.to_path_buf();
    while !p.exists() {
        missing.push(p.clone());
        if !p.pop() {
            break;
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(&d) {
            Ok(()) => chown(&d, user, switch),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(&d, e)),
        }
    }
    if !dir.is_dir() {
        return Err(RpcError::invalid(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    Ok(())
}

pub fn rename(
    accounts: &Accounts,
    from: &Path,
    to: &Path,
    user: &User,
    switch: bool,
) -> RpcResult<EntryInfo> {
    std::fs::symlink_metadata(from).map_err(|e| io_error(from, e))?;
    if let Some(parent) = to.parent() {
        make_parents(parent, user, switch)?;
    }
    std::fs::rename(from, to).map_err(|e| io_error(to, e))?;
    stat(accounts, to)
}

/// `rm -rf`: a missing path is no error.
pub fn remove(path: &Path) -> RpcResult<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path, e)),
    };
    let r = if md.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(path, e)),
        _ => Ok(()),
    }
}

/// The entries under `dir`, `depth` levels down (0 is 1), the directory itself left out; each
/// entry's path is `dir` joined with its relative name. A symlinked `dir` is followed.
pub fn list_dir(accounts: &Accounts, dir: &Path, depth: u32) -> RpcResult<Vec<EntryInfo>> {
    let md = std::fs::metadata(dir).map_err(|e| io_error(dir, e))?;
    if !md.is_dir() {
        return Err(RpcError::invalid(format!(
            "path is not a directory: {}",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    walk(accounts, dir, depth.max(1), &mut out)?;
    Ok(out)
}

fn walk(accounts: &Accounts, dir: &Path, depth: u32, out: &mut Vec<EntryInfo>) -> RpcResult<()> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for p in names {
        let Ok(e) = entry(accounts, &p, &p) else {
            continue; // gone since read_dir
        };
        let is_dir = e.kind == FileType::Directory;
        out.push(e);
        if is_dir && depth > 1 {
            walk(accounts, &p, depth - 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings_are_gos() {
        assert_eq!(permissions(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(
            permissions(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
    }

    #[test]
    fn files_dirs_links_list_move_and_remove() {
        let a = Accounts::default();
        let u = a.own();
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let d = make_dir(&a, &root.join("a/b"), &u, false).unwrap();
        assert_eq!(d.kind, FileType::Directory);
        assert_eq!(
            make_dir(&a, &root.join("a/b"), &u, false).unwrap_err().code,
            Code::AlreadyExists
        );
        std::fs::write(root.join("a/b/f.txt"), b"hello").unwrap();
        assert_eq!(
            make_dir(&a, &root.join("a/b/f.txt"), &u, false)
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
        std::os::unix::fs::symlink(root.join("a/b/f.txt"), root.join("a/l")).unwrap();
        let l = stat(&a, &root.join("a/l")).unwrap();
        assert!(l.is_symlink && l.kind == FileType::Symlink);
        assert!(l.symlink_target.unwrap().ends_with("a/b/f.txt"));
        let f = stat(&a, &root.join("a/b/f.txt")).unwrap();
        assert_eq!(
            (f.size, f.kind, f.name.as_str()),
            (5, FileType::File, "f.txt")
        );

        let one = list_dir(&a, &root.join("a"), 1).unwrap();
        let names: Vec<_> = one.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "l"]);
        let two = list_dir(&a, &root.join("a"), 2).unwrap();
        assert_eq!(two.len(), 3);
        assert_eq!(
            list_dir(&a, &root.join("a/b/f.txt"), 1).unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            list_dir(&a, &root.join("nope"), 1).unwrap_err().code,
            Code::NotFound
        );

        let moved = rename(
            &a,
            &root.join("a/b/f.txt"),
            &root.join("c/d/g.txt"),
            &u,
            false,
        )
        .unwrap();
        assert_eq!(moved.name, "g.txt");
        assert_eq!(
            rename(&a, &root.join("a/b/f.txt"), &root.join("x"), &u, false)
                .unwrap_err()
                .code,
            Code::NotFound
        );
        remove(&root.join("a")).unwrap();
        remove(&root.join("a")).unwrap();
        assert_eq!(stat(&a, &root.join("a")).unwrap_err().code, Code::NotFound);
    }
}
