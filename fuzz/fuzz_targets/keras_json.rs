//! Keras model.json text → model → summary, JSON export, IR lowering.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As `load_model` reads files whose weights follow: no initialisation cost.
    if let Ok(m) = cellgraph::keras::model_from_json_with(text, "fuzz.json", false) {
        let _ = m.summary();
        let _ = m.to_json();
        let sig: Vec<_> = m
            .input_shapes()
            .iter()
            .zip(m.input_dtypes())
            .map(|(s, dt)| {
                (
                    dt,
                    s.iter().map(|d| d.unwrap_or(1).min(4)).collect::<Vec<_>>(),
                )
            })
            .collect();
        let _ = m.to_graph(&sig);
    }
});
