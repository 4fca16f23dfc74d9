//! Reading Keras JSON configs: typed accessors that name the file, the layer and the
//! key in their errors. Each layer's `from_config` reads its options with them.

use super::activation::Activation;
use super::KerasError;
use serde_json::Value;

type R<T> = Result<T, KerasError>;

/// Reads a Keras model config: the file it came from (for errors) and whether weights
/// are drawn or follow from a weights file.
pub(crate) struct Cx {
    /// The file the config came from.
    pub(crate) file: String,
    /// Draw initial weights (no weights file follows).
    pub(crate) initialize: bool,
}

impl Cx {
    pub(crate) fn err(&self, at: &str, msg: String) -> KerasError {
        KerasError::Config {
            path: format!("{} ({at})", self.file),
            msg,
        }
    }

    pub(crate) fn get<'v>(&self, v: &'v Value, key: &str, at: &str) -> R<&'v Value> {
        v.get(key)
            .ok_or_else(|| self.err(at, format!("missing {key:?}")))
    }

    pub(crate) fn str<'v>(&self, v: &'v Value, key: &str, at: &str) -> R<&'v str> {
        self.get(v, key, at)?
            .as_str()
            .ok_or_else(|| self.err(at, format!("{key:?} is not a string")))
    }

    pub(crate) fn bool(&self, v: &Value, key: &str, default: bool, at: &str) -> R<bool> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(at, format!("{key:?} = {other} is not a boolean"))),
        }
    }

    pub(crate) fn usize(&self, v: &Value, key: &str, at: &str) -> R<usize> {
        let x = self.get(v, key, at)?;
        x.as_u64()
            .filter(|&n| n <= (1 << 31))
            .map(|n| n as usize)
            .ok_or_else(|| self.err(at, format!("{key:?} = {x} is not a size")))
    }

    pub(crate) fn f32(&self, v: &Value, key: &str, default: f32, at: &str) -> R<f32> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f as f32)
                .ok_or_else(|| self.err(at, format!("{key:?} = {x} is not a number"))),
        }
    }

    pub(crate) fn activation(
        &self,
        v: &Value,
        key: &str,
        default: Activation,
        at: &str,
    ) -> R<Activation> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => s.parse().map_err(|e| match e {
                KerasError::Unsupported { what, .. } => KerasError::Unsupported {
                    layer: at.to_string(),
                    what: format!("{key} {what}"),
                },
                other => other,
            }),
            Some(other) => Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("{key} given as {other} (a string is expected)"),
            }),
        }
    }

    /// Options whose non-default values change the computation or training and are not
    /// implemented.
    pub(crate) fn refuse(&self, cfg: &Value, at: &str, keys: &[&str]) -> R<()> {
        for k in keys {
            match cfg.get(*k) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(v) => {
                    return Err(KerasError::Unsupported {
                        layer: at.to_string(),
                        what: format!("option {k} = {v}"),
                    })
                }
            }
        }
        Ok(())
    }

    pub(crate) fn dtype_ok(&self, cfg: &Value, at: &str) -> R<()> {
        let name = match cfg.get("dtype") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::String(s)) => s.as_str(),
            Some(obj) => obj
                .get("config")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("?"),
        };
        if name == "float32" {
            Ok(())
        } else {
            Err(KerasError::Unsupported {
                layer: at.to_string(),
                what: format!("dtype policy {name:?} (float32 is supported)"),
            })
        }
    }
}
