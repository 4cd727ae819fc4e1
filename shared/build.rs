fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh machine needs nothing installed.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(&["proto/sandgate/control/v1/control.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
