//! deploy/crds/ is exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for (file, want) in sandgate_controller::crd::crds() {
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(have == want, "deploy/crds/{file} drifted from the CRD types: run `cargo run -p sandgate-controller --bin crdgen`");
    }
}
