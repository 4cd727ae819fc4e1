//! The committed Envoy configs are the rendered template, and real Envoy accepts them.

use sandgate_tests::envoy::{committed, validate};

#[test]
fn committed_configs_match_the_template() {
    for (path, want) in committed() {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} drifted from envoy/bootstrap.yaml.in: run `cargo run -p sandgate-tests --bin sandgate-envoy-render`",
            path.display()
        );
    }
}

#[test]
fn envoy_validates_every_config() {
    for (path, _) in committed() {
        validate(&path).unwrap();
    }
}
