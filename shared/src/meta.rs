//! Kubernetes' rules for object metadata, checked before a write so a spec the API server would
//! refuse is reported as the user's mistake (with the field and the rule), not retried as if it
//! were a lost race. The rules are apimachinery's `IsQualifiedName`, `IsValidLabelValue` and
//! `ValidateAnnotations`.

use std::collections::BTreeMap;

/// Why a key or value is refused; `Display` reads like the API server's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: invalid value {value:?}: {rule}")]
pub struct InvalidMeta {
    pub field: String,
    pub value: String,
    pub rule: &'static str,
}

/// The most an object's annotations may hold, keys and values together.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

const NAME_RULE: &str = "must be 63 characters or less, begin and end with an alphanumeric \
                         character, and contain only alphanumerics, '-', '_' and '.'";
const PREFIX_RULE: &str = "a prefix must be a DNS subdomain: 253 characters or less of lower-case \
                           alphanumerics, '-' and '.', beginning and ending with an alphanumeric";

fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A label or annotation key: `[prefix/]name`.
pub fn check_key(field: &str, key: &str) -> Result<(), InvalidMeta> {
    let bad = |rule| {
        Err(InvalidMeta {
            field: field.to_string(),
            value: key.to_string(),
            rule,
        })
    };
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return bad(PREFIX_RULE);
    }
    if !is_name(name) {
        return bad(NAME_RULE);
    }
    Ok(())
}

/// A label value: empty, or a name as in [`check_key`].
pub fn check_label_value(field: &str, value: &str) -> Result<(), InvalidMeta> {
    if value.is_empty() || is_name(value) {
        return Ok(());
    }
    Err(InvalidMeta {
        field: field.to_string(),
        value: value.to_string(),
        rule: NAME_RULE,
    })
}

/// Labels as a pod would carry them (`field` names where they come from, e.g. `spec.labels`).
pub fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), InvalidMeta> {
    for (k, v) in labels {
        check_key(field, k)?;
        check_label_value(&format!("{field}[{k}]"), v)?;
    }
    Ok(())
}

/// Annotations as a pod would carry them: valid keys, at most [`MAX_ANNOTATIONS_BYTES`] in all.
pub fn check_annotations(
    field: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(), InvalidMeta> {
    let mut total = 0;
    for (k, v) in annotations {
        check_key(field, k)?;
        total += k.len() + v.len();
    }
    if total > MAX_ANNOTATIONS_BYTES {
        return Err(InvalidMeta {
            field: field.to_string(),
            value: format!("{total} bytes"),
            rule: "annotations may hold at most 256 KiB",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_api_servers_rules() {
        for ok in [
            "app",
            "a.b_c-d",
            "example.com/team",
            "sandgate.dev/pool",
            "A1",
            &"x".repeat(63),
        ] {
            assert_eq!(check_key("f", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "has space",
            "a/b/c",
            "Upper.Case/x",
            "/x",
            "x/",
            &"x".repeat(64),
            &format!("{}/x", "a".repeat(254)),
            "ünïcode",
        ] {
            assert!(check_key("f", bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn label_values_may_be_empty_but_not_arbitrary() {
        assert!(check_label_value("f", "").is_ok());
        assert!(check_label_value("f", "v1.2_3-x").is_ok());
        for bad in ["a b", "-a", &"v".repeat(64), "a/b", "x:y"] {
            let e = check_label_value("spec.labels[k]", bad).unwrap_err();
            assert_eq!(e.field, "spec.labels[k]");
        }
    }

    #[test]
    fn annotations_are_bounded_in_size() {
        let mut a = BTreeMap::new();
        a.insert("k".to_string(), "v".repeat(MAX_ANNOTATIONS_BYTES - 1));
        assert!(check_annotations("f", &a).is_ok());
        a.insert("k2".to_string(), "v".into());
        assert!(check_annotations("f", &a).is_err());
        let bad: BTreeMap<String, String> = [("not ok".to_string(), "v".to_string())].into();
        assert!(check_annotations("spec.annotations", &bad)
            .unwrap_err()
            .to_string()
            .starts_with("spec.annotations: invalid value \"not ok\""));
    }
}
