//! `model.summary()`: Keras 3's table and parameter totals.

use super::layers::{shape_str, Layer, Shape};
use super::model::Model;

/// One row of the summary: a layer of `model.layers`.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    /// The layer's name.
    pub name: String,
    /// Keras's class name.
    pub class_name: String,
    /// The output shapes of the layer's first call (several with `return_state`).
    pub output_shapes: Vec<Shape>,
    /// The number of weights (trainable and not).
    pub params: usize,
    /// The tensors the layer reads, as `layer[node][tensor]` (functional models).
    pub connected_to: Vec<String>,
}

impl Model {
    /// The summary's rows, in `model.layers` order: Sequential models leave out their
    /// Input layer, functional models list theirs with 0 params.
    pub fn summary_rows(&self) -> Vec<SummaryRow> {
        let mut rows = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if matches!(slot.layer, Layer::Op(_))
                || (self.sequential && matches!(slot.layer, Layer::Input(_)))
            {
                continue;
            }
            let first = self.nodes.iter().find(|n| n.slot == i);
            let output_shapes = first
                .map(|n| {
                    n.outputs
                        .iter()
                        .map(|t| self.tensors[t.0].shape.clone())
                        .collect()
                })
                .unwrap_or_default();
            let connected_to = first
                .map(|n| {
                    n.inputs
                        .iter()
                        .chain(&n.args.initial_state)
                        .chain(&n.args.mask)
                        .map(|&t| {
                            let (layer, call, index) = self.history_of(t);
                            format!("{layer}[{call}][{index}]")
                        })
                        .collect()
                })
                .unwrap_or_default();
            rows.push(SummaryRow {
                name: slot.name.clone(),
                class_name: slot.layer.class_name().to_string(),
                output_shapes,
                params: slot.weights.iter().map(|w| w.value.len()).sum(),
                connected_to,
            });
        }
        rows
    }

    /// `model.summary()` as Keras 3 prints it: the table of layers with their output
    /// shapes and parameter counts ("Connected to" for functional models), then total,
    /// trainable and non-trainable parameters with their float32 sizes.
    pub fn summary(&self) -> String {
        let rows = self.summary_rows();
        let functional = !self.sequential;
        let mut header = vec!["Layer (type)", "Output Shape", "Param #"];
        let mut widths = vec![33usize, 24, 15];
        if functional {
            header.push("Connected to");
            widths = vec![31, 25, 12, 22];
        }
        let right = [false, false, true, false];
        let cells: Vec<Vec<Vec<String>>> = rows
            .iter()
            .map(|r| {
                let shapes = match r.output_shapes.as_slice() {
                    [one] => shape_str(one),
                    many => format!(
                        "[{}]",
                        many.iter()
                            .map(|s| shape_str(s))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let mut c = vec![
                    vec![format!("{} ({})", r.name, r.class_name)],
                    vec![shapes],
                    vec![thousands(r.params)],
                ];
                if functional {
                    c.push(if r.connected_to.is_empty() {
                        vec!["-".to_string()]
                    } else {
                        r.connected_to.clone()
                    });
                }
                c
            })
            .collect();
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                for line in c {
                    *w = (*w).max(line.chars().count() + 2);
                }
            }
        }
        let rule = |l: &str, m: &str, r: &str, fill: &str| {
            let parts: Vec<String> = widths.iter().map(|&w| fill.repeat(w)).collect();
            format!("{l}{}{r}\n", parts.join(m))
        };
        let line = |texts: &[&str], edge: &str| {
            let parts: Vec<String> = widths
                .iter()
                .zip(texts)
                .enumerate()
                .map(|(i, (&w, t))| {
                    let pad = w - 2 - t.chars().count().min(w - 2);
                    if right[i] {
                        format!(" {}{t} ", " ".repeat(pad))
                    } else {
                        format!(" {t}{} ", " ".repeat(pad))
                    }
                })
                .collect();
            format!("{edge}{}{edge}\n", parts.join(edge))
        };
        let mut out = format!("Model: \"{}\"\n", self.name);
        out += &rule("┏", "┳", "┓", "━");
        out += &line(&header, "┃");
        out += &rule("┡", "╇", "┩", "━");
        for (i, row) in cells.iter().enumerate() {
            let height = row.iter().map(Vec::len).max().unwrap_or(1);
            for k in 0..height {
                let texts: Vec<&str> = row
                    .iter()
                    .map(|c| c.get(k).map_or("", String::as_str))
                    .collect();
                out += &line(&texts, "│");
            }
            if i + 1 < cells.len() {
                out += &rule("├", "┼", "┤", "─");
            }
        }
        out += &rule("└", "┴", "┘", "─");
        let (total, trainable, frozen) = self.param_counts();
        out += &format!(
            " Total params: {} ({})\n",
            thousands(total),
            bytes(total * 4)
        );
        out += &format!(
            " Trainable params: {} ({})\n",
            thousands(trainable),
            bytes(trainable * 4)
        );
        out += &format!(
            " Non-trainable params: {} ({})\n",
            thousands(frozen),
            bytes(frozen * 4)
        );
        out
    }
}

/// `164106` → `164,106`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Keras's readable memory size: `641.04 KB` (powers of 1024).
pub fn bytes(n: usize) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_keras() {
        assert_eq!(thousands(164106), "164,106");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(bytes(164106 * 4), "641.04 KB");
        assert_eq!(bytes(0), "0.00 B");
    }
}
