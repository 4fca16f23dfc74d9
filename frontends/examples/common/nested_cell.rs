//! The guide's `NestedCell`: per step it reads `[(batch, i1), (batch, i2, i3)]`, keeps the
//! states `[(batch, unit_1), (batch, unit_2, unit_3)]`, and returns
//! `output_1 = input_1 · kernel_1` and `output_2_3 = einsum("bij,ijkl->bkl", input_2,
//! kernel_2_3)`, each added to its state.

use cellgraph::keras::{CellBuilder, CellOps, CustomCell, Init, KerasError, Nest, Sym};
use std::sync::Arc;

/// The guide's nested cell.
#[derive(Clone, Debug)]
pub struct NestedCell {
    pub unit_1: usize,
    pub unit_2: usize,
    pub unit_3: usize,
}

impl CustomCell for NestedCell {
    fn class_name(&self) -> &str {
        "NestedCell"
    }

    fn state_size(&self) -> Vec<Vec<usize>> {
        vec![vec![self.unit_1], vec![self.unit_2, self.unit_3]]
    }

    fn output_size(&self) -> Vec<Vec<usize>> {
        vec![vec![self.unit_1], vec![self.unit_2, self.unit_3]]
    }

    fn build(&self, inputs: &Nest<Vec<usize>>, w: &mut CellBuilder) -> Result<(), String> {
        // Expects two inputs per step: (i1,) and (i2, i3).
        let parts = inputs.flatten();
        let (&[i1], &[i2, i3]) = (
            parts.first().map(|p| p.as_slice()).unwrap_or(&[]),
            parts.get(1).map(|p| p.as_slice()).unwrap_or(&[]),
        ) else {
            return Err(format!(
                "NestedCell takes [(batch, i1), (batch, i2, i3)] per step, got {parts:?}"
            ));
        };
        w.add_weight("kernel_1", &[i1, self.unit_1], Init::Uniform);
        w.add_weight(
            "kernel_2_3",
            &[i2, i3, self.unit_2, self.unit_3],
            Init::Uniform,
        );
        Ok(())
    }

    fn call(
        &self,
        ops: &mut CellOps,
        inputs: &Nest<Sym>,
        states: &[Sym],
    ) -> Result<(Vec<Sym>, Vec<Sym>), KerasError> {
        let x = inputs.flat();
        let (input_1, input_2) = (x[0], x[1]);
        let (s1, s2) = (states[0], states[1]);
        let kernel_1 = ops.weight("kernel_1")?;
        let kernel_2_3 = ops.weight("kernel_2_3")?;
        let output_1 = ops.matmul(input_1, kernel_1)?;
        let output_2_3 = ops.einsum("bij,ijkl->bkl", &[input_2, kernel_2_3])?;
        let state_1 = ops.add(s1, output_1)?;
        let state_2_3 = ops.add(s2, output_2_3)?;
        Ok((vec![output_1, output_2_3], vec![state_1, state_2_3]))
    }

    fn get_config(&self) -> serde_json::Value {
        serde_json::json!({"unit_1": self.unit_1, "unit_2": self.unit_2, "unit_3": self.unit_3})
    }
}

/// Registers `NestedCell` so that saved models containing it load back.
pub fn register() {
    cellgraph::keras::register_cell("NestedCell", |cfg| {
        let get = |k: &str| {
            cfg.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| format!("NestedCell config needs an integer {k:?}"))
        };
        Ok(Arc::new(NestedCell {
            unit_1: get("unit_1")?,
            unit_2: get("unit_2")?,
            unit_3: get("unit_3")?,
        }) as Arc<dyn CustomCell>)
    });
}
