//! Spec checks for pools and claims, done before anything is written: a value the API server
//! would refuse, or one that does not parse, is the user's mistake. It turns the object's status
//! into a condition with reason `InvalidSpec` and a message naming the field, and is never
//! retried as if it were a lost race. Pure: no client.

use sandgate_shared::meta::{check_annotations, check_labels};
use sandgate_shared::Contract;

use crate::crd::{SandboxClaimSpec, SandboxPoolSpec};
use crate::idle::parse_idle_timeout;

/// The condition reason both kinds carry when their spec is refused.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// What is wrong with a claim's spec, if anything.
pub fn check_claim(spec: &SandboxClaimSpec, contract: &Contract) -> Result<(), String> {
    if let Some(t) = &spec.idle_timeout {
        parse_idle_timeout(t).map_err(|_| {
            format!("spec.idleTimeout: {t:?} is not a duration (e.g. 90s, 15m, never)")
        })?;
    }
    if let Some(t) = &spec.timeout {
        match sandgate_shared::duration::parse_duration(t) {
            Ok(d) if !d.is_zero() => {}
            _ => {
                return Err(format!(
                    "spec.timeout: {t:?} is not a positive duration (e.g. 300s, 2h)"
                ))
            }
        }
    }
    check_labels("spec.labels", &spec.labels).map_err(|e| e.to_string())?;
    check_annotations("spec.annotations", &spec.annotations).map_err(|e| e.to_string())?;
    if let Some(k) = spec
        .labels
        .keys()
        .chain(spec.annotations.keys())
        .find(|k| k.starts_with(&contract.prefix))
    {
        return Err(format!(
            "{k}: keys under {:?} belong to sandgate and cannot be set by a claim",
            contract.prefix
        ));
    }
    Ok(())
}

/// What is wrong with a pool's spec, if anything.
pub fn check_pool(spec: &SandboxPoolSpec) -> Result<(), String> {
    if let Some(t) = &spec.default_idle_timeout {
        parse_idle_timeout(t).map_err(|_| {
            format!("spec.defaultIdleTimeout: {t:?} is not a duration (e.g. 90s, 15m, never)")
        })?;
    }
    if let Some(a) = &spec.max_pod_age {
        sandgate_shared::duration::parse_duration(a)
            .map_err(|_| format!("spec.maxPodAge: {a:?} is not a duration (e.g. 24h)"))?;
    }
    let meta = spec.template.metadata.clone().unwrap_or_default();
    check_labels(
        "spec.template.metadata.labels",
        &meta.labels.unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    check_annotations(
        "spec.template.metadata.annotations",
        &meta.annotations.unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    if spec
        .template
        .spec
        .as_ref()
        .is_none_or(|s| s.containers.is_empty())
    {
        return Err("spec.template.spec.containers: a pod needs at least one container".into());
    }
    Ok(())
}

/// Whether an API error is the server refusing the object itself (422 Invalid naming the fields
/// at fault), as opposed to a JSON patch `test` that failed because another writer won a race
/// (also a 422, with no field causes).
pub fn is_invalid_object(e: &kube::core::Status) -> bool {
    e.code == 422
        && e.reason == "Invalid"
        && e.details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| !c.field.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(spec: serde_json::Value) -> SandboxClaimSpec {
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn claims_the_api_server_would_refuse_are_invalid() {
        let c = Contract::default();
        let cases = [
            (json!({"poolName": "p"}), None),
            (
                json!({"poolName": "p", "labels": {"team": "a-1"}, "annotations": {"note": "any text at all"}}),
                None,
            ),
            (
                json!({"poolName": "p", "labels": {"team": "not valid"}}),
                Some("spec.labels[team]"),
            ),
            (
                json!({"poolName": "p", "labels": {"bad key": "v"}}),
                Some("spec.labels"),
            ),
            (
                json!({"poolName": "p", "annotations": {"a/b/c": "v"}}),
                Some("spec.annotations"),
            ),
            (
                json!({"poolName": "p", "idleTimeout": "soon"}),
                Some("spec.idleTimeout"),
            ),
            (
                json!({"poolName": "p", "timeout": "0s"}),
                Some("spec.timeout"),
            ),
            (json!({"poolName": "p", "timeout": "300s"}), None),
            (
                json!({"poolName": "p", "labels": {"sandgate.dev/phase": "idle"}}),
                Some("sandgate.dev/phase"),
            ),
        ];
        for (spec, want) in cases {
            let got = check_claim(&claim(spec.clone()), &c);
            match want {
                None => assert_eq!(got, Ok(()), "{spec}"),
                Some(field) => {
                    let e = got.expect_err(&spec.to_string());
                    assert!(e.starts_with(field), "{spec}: {e}");
                }
            }
        }
    }

    #[test]
    fn pools_with_unparseable_or_refused_fields_are_invalid() {
        let containers = json!({"spec": {"containers": [{"name": "c", "image": "i"}]}});
        let pool = |extra: serde_json::Value| {
            let mut spec = json!({"replicas": 1, "template": containers});
            json_patch::merge(&mut spec, &extra);
            serde_json::from_value::<SandboxPoolSpec>(spec).unwrap()
        };
        assert_eq!(check_pool(&pool(json!({}))), Ok(()));
        for (extra, field) in [
            (json!({"maxPodAge": "old"}), "spec.maxPodAge"),
            (
                json!({"defaultIdleTimeout": "1 hour"}),
                "spec.defaultIdleTimeout",
            ),
            (
                json!({"template": {"metadata": {"labels": {"x": "a b"}}}}),
                "spec.template.metadata.labels",
            ),
            (
                json!({"template": {"spec": {"containers": []}}}),
                "spec.template.spec.containers",
            ),
        ] {
            let e = check_pool(&pool(extra.clone())).expect_err(&extra.to_string());
            assert!(e.starts_with(field), "{extra}: {e}");
        }
    }

    #[test]
    fn a_failed_patch_test_is_a_race_not_an_invalid_object() {
        // As kube-apiserver answers each (checked on v1.36).
        let invalid: kube::core::Status = serde_json::from_value(json!({
            "status": "Failure", "code": 422, "reason": "Invalid",
            "message": "Pod \"p\" is invalid: metadata.labels: Invalid value: \"a b\"",
            "details": {"name": "p", "kind": "Pod", "causes": [
                {"reason": "FieldValueInvalid", "message": "Invalid value", "field": "metadata.labels"}]},
        }))
        .unwrap();
        let race: kube::core::Status = serde_json::from_value(json!({
            "status": "Failure", "code": 422, "reason": "Invalid",
            "message": "the server rejected our request due to an error in our request",
        }))
        .unwrap();
        assert!(is_invalid_object(&invalid));
        assert!(!is_invalid_object(&race));
    }
}
