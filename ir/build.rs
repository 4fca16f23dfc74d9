//! Compiles the vendored `onnx.proto` with the pure-Rust `protox` compiler, so building
//! cellgraph never needs a `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/onnx/onnx.proto", "proto/onnx/onnx-data.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let mut config = prost_build::Config::new();
    config.compile_fds(fds)?;
    Ok(())
}
