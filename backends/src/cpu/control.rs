//! `Scan`, `Loop` and `If`: loops and branches over compiled body graphs.

use super::shape::{concat, reshape};
use super::util::{axis, input};
use super::{tensor_bytes, Compiled, ControlError};
use crate::budget::Meter;
use crate::data::Data;
use cellgraph_ir::{Op, Tensor};
use ndarray::Axis;

type R<T> = Result<T, ControlError>;

fn take(t: &Tensor, ax: usize, i: usize) -> Tensor {
    super::util::map_all!(t, v => v.index_axis(Axis(ax), i).to_owned())
}

/// Stacks per-step tensors along a new axis `ax`; `empty` gives the element shape when
/// there are no steps.
fn stack(
    parts: &[Tensor],
    ax: usize,
    empty: impl FnOnce() -> Option<(cellgraph_ir::DType, Vec<usize>)>,
) -> Result<Tensor, String> {
    if parts.is_empty() {
        let (dt, mut shape) = empty().ok_or("cannot stack zero steps of unknown shape")?;
        shape.insert(ax.min(shape.len()), 0);
        return Ok(Tensor::zeros(dt, &shape));
    }
    let expanded: Vec<Tensor> = parts
        .iter()
        .map(|p| {
            let mut s = p.shape().to_vec();
            s.insert(ax, 1);
            reshape(p, &s)
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&Tensor> = expanded.iter().collect();
    concat(&refs, ax)
}

fn elem_of(body: &Compiled, out: usize) -> Option<(cellgraph_ir::DType, Vec<usize>)> {
    let ty = body.graph.output_types().get(out)?.clone();
    let t = ty.as_tensor()?;
    Some((
        t.dtype?,
        t.known_dims()?.into_iter().map(|d| d as usize).collect(),
    ))
}

/// Runs a control-flow op.
pub fn eval(
    op: &Op,
    ins: &[Option<&Data>],
    nout: usize,
    bodies: &[Compiled],
    outer: &[Vec<&Data>],
    opset: i64,
    meter: &Meter,
) -> R<Vec<Data>> {
    match op {
        Op::If { .. } => {
            let c = input(ins, 0)?;
            let cond = c
                .to_f64_vec()
                .first()
                .copied()
                .ok_or("condition is empty")?
                != 0.0;
            let k = if cond { 0 } else { 1 };
            Ok(bodies[k].run(Vec::new(), &outer[k], meter)?)
        }
        Op::Loop { .. } => {
            let body = &bodies[0];
            let max = match ins.first().copied().flatten() {
                Some(d) => Some(
                    d.tensor()?
                        .as_i64_vec()
                        .and_then(|v| v.first().copied())
                        .ok_or("trip count must be an integer scalar")?,
                ),
                None => None,
            };
            let mut cond = match ins.get(1).copied().flatten() {
                Some(d) => {
                    d.tensor()?
                        .to_f64_vec()
                        .first()
                        .copied()
                        .ok_or("condition is empty")?
                        != 0.0
                }
                None => true,
            };
            let n = ins.len() - 2;
            let mut carried: Vec<Data> = (0..n)
                .map(|i| {
                    ins[2 + i]
                        .cloned()
                        .ok_or_else(|| format!("loop-carried input {} is required", 2 + i))
                })
                .collect::<Result<_, String>>()?;
            let k = nout
                .checked_sub(n)
                .ok_or("fewer outputs than loop-carried values")?;
            let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); k];
            // A loop whose condition cannot turn false runs its whole trip count: refuse
            // at once what the trip budget would stop only after its last allowed trip.
            if let (true, true, Some(m)) = (cond, body.cond_never_changes, max) {
                let m = u64::try_from(m).unwrap_or(0);
                if m > meter.budget().max_loop_trips {
                    return Err(ControlError::Over(crate::budget::Overrun {
                        exceeded: crate::budget::Exceeded::LoopTrips,
                        asked: format!("{m} iterations (its condition never turns false)"),
                        limit: format!("{} iterations", meter.budget().max_loop_trips),
                    }));
                }
            }
            let mut i: i64 = 0;
            // Bytes of the scan outputs gathered so far (counted on the meter).
            let mut gathered = Gathered::new(meter);
            while cond && max.is_none_or(|m| i < m) {
                meter.trip(i as u64)?;
                let mut args = vec![
                    Data::Tensor(Tensor::I64(ndarray::ArrayD::from_elem(
                        ndarray::IxDyn(&[]),
                        i,
                    ))),
                    Data::Tensor(Tensor::Bool(ndarray::ArrayD::from_elem(
                        ndarray::IxDyn(&[]),
                        cond,
                    ))),
                ];
                args.append(&mut carried);
                let mut outs = body.run(args, &outer[0], meter)?;
                if outs.len() != 1 + n + k {
                    return Err(ControlError::Msg(format!(
                        "body gave {} outputs, expected {}",
                        outs.len(),
                        1 + n + k
                    )));
                }
                let scan_part = outs.split_off(1 + n);
                carried = outs.split_off(1);
                cond = outs[0]
                    .tensor()?
                    .to_f64_vec()
                    .first()
                    .copied()
                    .ok_or("condition is empty")?
                    != 0.0;
                for (j, (s, d)) in scans.iter_mut().zip(scan_part).enumerate() {
                    let t = d.into_tensor()?;
                    gathered.add(j, &t)?;
                    s.push(t);
                }
                i += 1;
            }
            let mut out = carried;
            gathered.ask_stacked()?;
            for (j, s) in scans.iter().enumerate() {
                out.push(Data::Tensor(stack(s, 0, || elem_of(body, 1 + n + j))?));
            }
            Ok(out)
        }
        Op::Scan {
            num_scan_inputs,
            scan_input_axes,
            scan_input_directions,
            scan_output_axes,
            scan_output_directions,
            directions,
            ..
        } => {
            let body = &bodies[0];
            let m = usize::try_from(*num_scan_inputs).map_err(|_| "num_scan_inputs is negative")?;
            let first = usize::from(opset < 9);
            let n = ins
                .len()
                .checked_sub(first + m)
                .ok_or("more scan inputs than inputs")?;
            let k = nout
                .checked_sub(n)
                .ok_or("fewer outputs than state variables")?;
            if opset < 9 {
                return scan8(ins, m, nout, directions.as_deref(), body, &outer[0], meter);
            }
            let states: Vec<Data> = (0..n)
                .map(|i| {
                    ins[i]
                        .cloned()
                        .ok_or_else(|| format!("state input {i} is required"))
                })
                .collect::<Result<_, String>>()?;
            let xs: Vec<&Tensor> = (0..m)
                .map(|j| input(ins, n + j))
                .collect::<Result<_, _>>()?;
            let in_axes: Vec<usize> = (0..m)
                .map(|j| {
                    axis(
                        scan_input_axes
                            .as_ref()
                            .and_then(|a| a.get(j).copied())
                            .unwrap_or(0),
                        xs[j].shape().len(),
                    )
                })
                .collect::<Result<_, _>>()?;
            let in_rev: Vec<bool> = (0..m)
                .map(|j| {
                    scan_input_directions
                        .as_ref()
                        .is_some_and(|d| d.get(j).is_some_and(|&v| v != 0))
                })
                .collect();
            let out_rev: Vec<bool> = (0..k)
                .map(|j| {
                    scan_output_directions
                        .as_ref()
                        .is_some_and(|d| d.get(j).is_some_and(|&v| v != 0))
                })
                .collect();
            let steps = xs.first().map(|x| x.shape()[in_axes[0]]).unwrap_or(0);
            for (j, x) in xs.iter().enumerate() {
                if x.shape()[in_axes[j]] != steps {
                    return Err(ControlError::Msg(format!(
                        "scan input {j} has {} steps, input 0 has {steps}",
                        x.shape()[in_axes[j]]
                    )));
                }
            }
            let mut gathered = Gathered::new(meter);
            let (states, scans) = run_scan(
                body,
                &outer[0],
                states,
                &xs,
                &in_axes,
                &in_rev,
                steps,
                k,
                &mut gathered,
            )?;
            gathered.ask_stacked()?;
            let mut out = states;
            for (j, mut s) in scans.into_iter().enumerate() {
                if out_rev[j] {
                    s.reverse();
                }
                let elem_rank = s
                    .first()
                    .map(|t| t.shape().len())
                    .or_else(|| elem_of(body, n + j).map(|e| e.1.len()))
                    .unwrap_or(0);
                let ax = axis(
                    scan_output_axes
                        .as_ref()
                        .and_then(|a| a.get(j).copied())
                        .unwrap_or(0),
                    elem_rank + 1,
                )?;
                out.push(Data::Tensor(stack(&s, ax, || elem_of(body, n + j))?));
            }
            Ok(out)
        }
        other => Err(ControlError::Msg(format!(
            "{} is not a control-flow op",
            other.name()
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_scan(
    body: &Compiled,
    outer: &[&Data],
    mut states: Vec<Data>,
    xs: &[&Tensor],
    axes: &[usize],
    rev: &[bool],
    steps: usize,
    k: usize,
    gathered: &mut Gathered<'_>,
) -> R<(Vec<Data>, Vec<Vec<Tensor>>)> {
    let n = states.len();
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::with_capacity(steps); k];
    // Hoist `x_t · W` with a loop-invariant W out of the loop: one product over all steps
    // (a scan input on axis 0 times W gives [T, ...]), sliced per step.
    let mut hoisted: Vec<(usize, usize, Tensor)> = Vec::new();
    for &(node, p, wslot) in &body.hoistable {
        let Some(j) = p.checked_sub(n).filter(|&j| j < xs.len() && axes[j] == 0) else {
            continue;
        };
        let Some(w) = body.static_value(wslot, outer) else {
            continue;
        };
        let w = w.tensor()?;
        if xs[j].shape().len() < 2 || w.shape().len() != 2 {
            continue;
        }
        // The product over all steps is as large as the per-step ones together.
        let rows = xs[j].shape()[..xs[j].shape().len() - 1]
            .iter()
            .fold(1u64, |a, &d| a.saturating_mul(d as u64));
        let size = rows
            .saturating_mul(w.shape()[1] as u64)
            .saturating_mul(xs[j].dtype().size_of() as u64);
        gathered.meter.ask(&[size])?;
        if let Ok(full) = super::nn::matmul_tensor(xs[j], w) {
            gathered.hold(&full)?;
            hoisted.push((node, j, full));
        }
    }
    for t in 0..steps {
        let mut args = std::mem::take(&mut states);
        for (j, x) in xs.iter().enumerate() {
            let i = if rev[j] { steps - 1 - t } else { t };
            args.push(Data::Tensor(take(x, axes[j], i)));
        }
        let overrides: Vec<(usize, Data)> = hoisted
            .iter()
            .map(|(node, j, full)| {
                (
                    *node,
                    Data::Tensor(take(full, 0, if rev[*j] { steps - 1 - t } else { t })),
                )
            })
            .collect();
        let mut outs = body.run_with(args, outer, overrides, gathered.meter)?;
        if outs.len() != n + k {
            return Err(ControlError::Msg(format!(
                "body gave {} outputs, expected {}",
                outs.len(),
                n + k
            )));
        }
        let scan_part = outs.split_off(n);
        states = outs;
        for (j, (s, d)) in scans.iter_mut().zip(scan_part).enumerate() {
            let t = d.into_tensor()?;
            gathered.add(j, &t)?;
            s.push(t);
        }
    }
    Ok((states, scans))
}

/// Scan as defined in opset 8: a leading optional `sequence_lens` input, a batch axis on
/// every state and scan input, each batch row scanned separately; scan outputs are
/// padded with zeros past each row's length.
fn scan8(
    ins: &[Option<&Data>],
    m: usize,
    nout: usize,
    directions: Option<&[i64]>,
    body: &Compiled,
    outer: &[&Data],
    meter: &Meter,
) -> R<Vec<Data>> {
    let n = ins.len() - 1 - m;
    let k = nout - n;
    let states: Vec<&Tensor> = (0..n)
        .map(|i| input(ins, 1 + i))
        .collect::<Result<_, _>>()?;
    let xs: Vec<&Tensor> = (0..m)
        .map(|j| input(ins, 1 + n + j))
        .collect::<Result<_, _>>()?;
    let batch = xs
        .first()
        .map(|x| x.shape()[0])
        .or_else(|| states.first().map(|s| s.shape()[0]))
        .unwrap_or(0);
    let max_t = xs
        .first()
        .map(|x| x.shape().get(1).copied().unwrap_or(0))
        .unwrap_or(0);
    let lens: Vec<usize> = match ins[0] {
        Some(d) => d
            .tensor()?
            .as_i64_vec()
            .ok_or("sequence_lens must be integers")?
            .into_iter()
            .map(|v| v as usize)
            .collect(),
        None => vec![max_t; batch],
    };
    let rev: Vec<bool> = (0..m)
        .map(|j| directions.is_some_and(|d| d.get(j).is_some_and(|&v| v != 0)))
        .collect();
    let mut final_states: Vec<Vec<Tensor>> = vec![Vec::new(); n];
    let mut scan_rows: Vec<Vec<Tensor>> = vec![Vec::new(); k];
    let mut kept = Gathered::new(meter);
    for b in 0..batch {
        let len = *lens
            .get(b)
            .ok_or("sequence_lens is shorter than the batch")?;
        if len > max_t {
            return Err(ControlError::Msg(format!(
                "sequence length {len} exceeds {max_t}"
            )));
        }
        let st: Vec<Data> = states.iter().map(|s| Data::Tensor(take(s, 0, b))).collect();
        let rows: Vec<Tensor> = xs.iter().map(|x| {
            let row = take(x, 0, b);
            super::util::map_all!(&row, v => v.slice_axis(Axis(0), ndarray::Slice::from(0..len)).to_owned())
        }).collect();
        let row_refs: Vec<&Tensor> = rows.iter().collect();
        let mut gathered = Gathered::new(meter);
        let (st, scans) = run_scan(
            body,
            outer,
            st,
            &row_refs,
            &vec![0; m],
            &rev,
            len,
            k,
            &mut gathered,
        )?;
        for (f, s) in final_states.iter_mut().zip(st) {
            f.push(s.into_tensor()?);
        }
        for (j, s) in scans.into_iter().enumerate() {
            let mut padded = s;
            if let Some(first) = padded.first().cloned() {
                while padded.len() < max_t {
                    padded.push(Tensor::zeros(first.dtype(), first.shape()));
                }
            }
            let row = stack(&padded, 0, || elem_of(body, n + j))?;
            kept.add(j, &row)?;
            scan_rows[j].push(row);
        }
    }
    kept.ask_stacked()?;
    let mut out = Vec::new();
    for f in &final_states {
        out.push(Data::Tensor(stack(f, 0, || None)?));
    }
    for s in &scan_rows {
        out.push(Data::Tensor(stack(s, 0, || None)?));
    }
    Ok(out)
}

/// The per-step values a loop keeps until it stacks them: counted on the meter while
/// the loop runs (each addition checked against the live budget), released when the
/// loop ends (its stacked outputs are then counted as the node's results).
struct Gathered<'a> {
    meter: &'a Meter,
    /// Bytes counted in all.
    bytes: u64,
    /// Bytes gathered per scan output.
    per_output: Vec<u64>,
}

impl<'a> Gathered<'a> {
    fn new(meter: &'a Meter) -> Gathered<'a> {
        Gathered {
            meter,
            bytes: 0,
            per_output: Vec::new(),
        }
    }

    /// Counts a value the loop keeps (not one of its outputs' parts).
    fn hold(&mut self, t: &Tensor) -> R<()> {
        let b = tensor_bytes(t);
        self.bytes = self.bytes.saturating_add(b);
        self.meter.hold(b);
        self.meter.check_live()?;
        Ok(())
    }

    /// Counts a part of scan output `j`.
    fn add(&mut self, j: usize, t: &Tensor) -> R<()> {
        if self.per_output.len() <= j {
            self.per_output.resize(j + 1, 0);
        }
        self.per_output[j] = self.per_output[j].saturating_add(tensor_bytes(t));
        self.hold(t)
    }

    /// Checks that the stacked outputs (each as large as its parts) may be made, and
    /// counts them while the parts still exist.
    fn ask_stacked(&mut self) -> R<()> {
        self.meter.ask(&self.per_output)?;
        let stacked = self
            .per_output
            .iter()
            .fold(0u64, |a, &b| a.saturating_add(b));
        self.bytes = self.bytes.saturating_add(stacked);
        self.meter.hold(stacked);
        Ok(())
    }
}

impl Drop for Gathered<'_> {
    fn drop(&mut self) {
        self.meter.release(self.bytes);
    }
}
