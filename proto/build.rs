//! Compiles the `.proto` files with protox (pure Rust, so no system `protoc`
//! is needed) and generates prost messages plus tonic clients and servers.
//! madsim-tonic-build emits both the real and the simulated service code;
//! `tonic::include_proto!` picks the one that matches `cfg(madsim)`.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/armada.proto", "proto/etcd.proto", "proto/replication.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_path = out.join("armada_descriptor.bin");
    std::fs::write(&fds_path, fds.encode_to_vec())?;
    tonic_build::configure()
        .file_descriptor_set_path(&fds_path)
        .skip_protoc_run()
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
