//! Compiles proto/shoal/v1 with tonic-prost-build and writes the FileDescriptorSet used by
//! server reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "common",
        "metrics",
        "decider",
        "provisioner",
        "reconciler",
        "provider",
        "audit",
    ]
    .map(|name| proto_root.join(format!("shoal/v1/{name}.proto")))
    .into_iter()
    // Cluster Autoscaler's externalgrpc protocol, and the part of a v1.Node its template needs.
    .chain(
        ["cloudprovider", "k8s_node"]
            .map(|name| proto_root.join(format!("externalgrpc/{name}.proto"))),
    )
    .collect::<Vec<_>>();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Ordered maps: deterministic output, and cheaper to build than SipHash tables.
        .btree_map(".")
        .file_descriptor_set_path(out_dir.join("shoal_v1_descriptor.bin"))
        .compile_protos(&files, &[proto_root])?;
    Ok(())
}
