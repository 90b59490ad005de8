//! A path-aware walk over a parsed YAML document.
//!
//! Resources are read field by field rather than through `#[derive(Deserialize)]` so that every
//! problem in a document is reported at once, each with its exact path.

use serde_json::{Map, Value};

use crate::diag::Diagnostics;

/// A value and the path that leads to it.
pub struct At<'a> {
    pub value: &'a Value,
    pub path: String,
}

impl<'a> At<'a> {
    pub fn root(value: &'a Value) -> Self {
        Self {
            value,
            path: String::new(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn str(&self, d: &mut Diagnostics) -> Option<&'a str> {
        match self.value {
            Value::String(s) => Some(s),
            other => {
                d.error(
                    &self.path,
                    format!("must be a string, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    /// A non-empty string.
    pub fn text(&self, d: &mut Diagnostics) -> Option<&'a str> {
        let s = self.str(d)?;
        if s.trim().is_empty() {
            d.error(&self.path, "must not be empty");
            return None;
        }
        Some(s)
    }

    pub fn bool(&self, d: &mut Diagnostics) -> Option<bool> {
        match self.value {
            Value::Bool(b) => Some(*b),
            other => {
                d.error(
                    &self.path,
                    format!("must be true or false, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    pub fn port(&self, d: &mut Diagnostics) -> Option<u16> {
        if !self.value.is_number() {
            d.error(
                &self.path,
                format!(
                    "must be a port number between 1 and 65535, found {}",
                    kind_of(self.value)
                ),
            );
            return None;
        }
        match self.value.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p >= 1 => Some(p),
            _ => {
                d.error(&self.path, "must be between 1 and 65535");
                None
            }
        }
    }

    pub fn list(&self, d: &mut Diagnostics) -> Vec<At<'a>> {
        match self.value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, value)| At {
                    value,
                    path: format!("{}[{i}]", self.path),
                })
                .collect(),
            other => {
                d.error(
                    &self.path,
                    format!("must be a list, found {}", kind_of(other)),
                );
                Vec::new()
            }
        }
    }

    pub fn obj(&self, d: &mut Diagnostics) -> Option<Obj<'a>> {
        match self.value {
            Value::Object(map) => Some(Obj {
                map,
                path: self.path.clone(),
                seen: Vec::new(),
            }),
            other => {
                d.error(
                    &self.path,
                    format!("must be a mapping, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    /// A mapping of strings to strings (labels, tags).
    pub fn string_map(&self, d: &mut Diagnostics) -> Vec<(String, String)> {
        let Value::Object(map) = self.value else {
            d.error(
                &self.path,
                format!("must be a mapping, found {}", kind_of(self.value)),
            );
            return Vec::new();
        };
        let mut out = Vec::with_capacity(map.len());
        for (k, v) in map {
            match v {
                Value::String(s) => out.push((k.clone(), s.clone())),
                other => d.error(
                    &format!("{}.{k}", self.path),
                    format!("must be a string, found {}", kind_of(other)),
                ),
            }
        }
        out
    }
}

/// A mapping being read; fields not asked for are reported as unknown by [`Obj::finish`].
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    seen: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    pub fn path(&self) -> &str {
        &self.path
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The field, if present and not null.
    pub fn get(&mut self, key: &'static str) -> Option<At<'a>> {
        self.seen.push(key);
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(At {
                value,
                path: self.child_path(key),
            }),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    pub fn required(&mut self, key: &'static str, d: &mut Diagnostics) -> Option<At<'a>> {
        let found = self.get(key);
        if found.is_none() {
            d.error(&self.child_path(key), "is required");
        }
        found
    }

    /// Marks a field as known without reading it.
    pub fn allow(&mut self, key: &'static str) {
        self.seen.push(key);
    }

    /// Reports every field that was not read.
    pub fn finish(self, d: &mut Diagnostics) {
        for key in self.map.keys() {
            if !self.seen.contains(&key.as_str()) {
                let mut known: Vec<&str> = self.seen.clone();
                known.sort_unstable();
                known.dedup();
                d.error(
                    &self.child_path(key),
                    format!("unknown field; expected one of: {}", known.join(", ")),
                );
            }
        }
    }
}

pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
