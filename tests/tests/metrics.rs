//! Every metric docs/operating.md documents is on each binary's /metrics from the start (a rate or
//! an alert over a series that does not exist yet says nothing), every documented label value
//! included. Process level: the extproc, controller and API as `make run` and deploy/ run them.

use std::time::Duration;

use sandgate_tests::e2b::E2b;
use sandgate_tests::procs::{eventually, get, workspace_root};

/// A documented series: its name, and its label values (`label=a|b`), if fixed.
struct Documented {
    name: String,
    fixed: Vec<(String, String)>,
    /// Labels documented without values (`{route,code}`): such a family has a series per value
    /// seen, so none before the first one.
    free: bool,
}

/// The series the metrics tables of docs/operating.md list for `prefix`.
fn documented(prefix: &str) -> Vec<Documented> {
    let text = std::fs::read_to_string(workspace_root().join("docs/operating.md")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let Some(series) = rest.split('`').next() else {
            continue;
        };
        if !series.starts_with(prefix) {
            continue;
        }
        let series = series.replace("\\|", "|");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n.to_string(), l.trim_end_matches('}').to_string()),
            None => (series.clone(), String::new()),
        };
        let mut fixed = Vec::new();
        let mut free = false;
        for label in labels.split(',').filter(|l| !l.is_empty()) {
            match label.split_once('=') {
                Some((k, values)) => {
                    for v in values.split('|') {
                        fixed.push((k.to_string(), v.to_string()));
                    }
                }
                None => free = true,
            }
        }
        out.push(Documented { name, fixed, free });
    }
    assert!(!out.is_empty(), "no {prefix} metrics documented");
    out
}

/// What is missing from `text` (a /metrics page) of what is documented for `prefix`.
fn missing(text: &str, prefix: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for d in documented(prefix) {
        let family = d.name.strip_suffix("_total").unwrap_or(&d.name);
        let exported = text
            .lines()
            .any(|l| l.starts_with(&format!("# TYPE {family} ")));
        let none_yet = d.free && d.fixed.is_empty();
        if !exported && !none_yet {
            missing.push(d.name.clone());
            continue;
        }
        for (k, v) in &d.fixed {
            let head = format!("{}{{", d.name);
            let label = format!("{k}=\"{v}\"");
            let found = text.lines().any(|l| {
                l.strip_prefix(&head)
                    .and_then(|rest| rest.split_once('}'))
                    .is_some_and(|(labels, _)| labels.split(',').any(|kv| kv == label))
            });
            if !found {
                missing.push(format!("{head}{label}}}"));
            }
        }
    }
    missing
}

async fn page(port: u16) -> String {
    get(([127, 0, 0, 1], port).into(), "localhost", "/metrics", &[])
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

#[tokio::test]
async fn every_documented_series_is_exported_from_the_start() {
    // A fresh gateway, controller and API, before any sandbox traffic.
    let e = E2b::start(0, &[]).await;
    let extproc = page(e.cluster.gateways[0].extproc.admin_port).await;
    assert_eq!(missing(&extproc, "sandgate_extproc_"), Vec::<String>::new());
    let controller = e.cluster.controllers[0].admin_port;
    eventually(Duration::from_secs(10), || async {
        match missing(&page(controller).await, "sandgate_controller_") {
            m if m.is_empty() => Ok(()),
            m => Err(format!("the controller does not export {m:?}")),
        }
    })
    .await;
    assert_eq!(
        missing(&page(e.admin_port).await, "sandgate_api_"),
        Vec::<String>::new()
    );
}
