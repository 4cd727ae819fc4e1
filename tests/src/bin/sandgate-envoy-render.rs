//! Writes envoy/production.yaml and envoy/local.yaml from envoy/bootstrap.yaml.in.
fn main() -> std::io::Result<()> {
    for (path, text) in sandgate_tests::envoy::committed() {
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
