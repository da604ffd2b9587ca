//! Generates the CSI messages and the Identity, Node and Controller
//! services (server and client halves) from the vendored spec,
//! `proto/csi.proto` (see proto/README.md), into `OUT_DIR/csi.v1.rs`, which
//! `src/csi/mod.rs` includes as `crate::csi::v1`.
//!
//! The proto is compiled by `protox`, in Rust, rather than by `protoc`: a
//! `cargo install` must not need a protobuf compiler on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/csi.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    // csi.proto's imports (descriptor, timestamp, wrappers) are protox's own
    // copies of the well-known types; prost maps them to `prost_types`.
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        // Paths are given above: the descriptor set names none on disk.
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
