//! Prints the IR text of an ONNX file: `cargo run -p cellgraph-ir --example print_model -- FILE`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: print_model FILE.onnx")?;
    let m = cellgraph_ir::onnx::Model::load(path)?;
    print!("{}", cellgraph_ir::print_graph(&m.graph));
    Ok(())
}
