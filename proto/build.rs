//! Compiles `herald/v1/*.proto` with `protox` (pure Rust), so building herald
//! needs cargo alone: no system `protoc`. The same descriptor set is written to
//! `OUT_DIR` for gRPC server reflection.

use std::{env, fs, io, path::PathBuf};

use prost::Message;

fn main() -> io::Result<()> {
    let files = ["herald/v1/broker.proto", "herald/v1/client.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."]).map_err(io::Error::other)?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| io::Error::other("OUT_DIR unset"))?);
    fs::write(out_dir.join("herald_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".herald.v1.Content.binary")
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)
}
