//! Writes deploy/crds/*.yaml from the Rust types. `cargo run -p sandgate-controller --bin crdgen`.
use std::path::Path;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in sandgate_controller::crd::crds() {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
