//! Lowering one layer call to IR nodes: each layer's [`LayerKind::lower_call`].

use super::*;
use crate::keras::layers::kind::{CallIo, LayerKind};

/// Lowers one layer call: outputs with their masks. In training mode a
/// BatchNormalization pushes its batch mean and variance onto `extra`.
pub(super) fn lower_layer(
    e: &mut Emit,
    layer: &Layer,
    w: &[ValueRef],
    x: ValueRef,
    mask: Option<ValueRef>,
    init: Option<Vec<ValueRef>>,
    extra: &mut Vec<ValueRef>,
) -> R<Vec<(ValueRef, Option<ValueRef>)>> {
    layer.lower_call(
        e,
        CallIo {
            w,
            x,
            mask,
            init,
            extra,
        },
    )
}
