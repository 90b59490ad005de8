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
        let n = match self.value {
            Value::Number(n) => n,
            Value::String(s) if s.trim().parse::<u16>().is_ok() => {
                d.error(
                    &self.path,
                    format!("must be a number, found the string {s:?}; write it without quotes"),
                );
                return None;
            }
            other => {
                d.error(
                    &self.path,
                    format!(
                        "must be a port number between 1 and 65535, found {}",
                        kind_of(other)
                    ),
                );
                return None;
            }
        };
        if n.is_f64() {
            d.error(
                &self.path,
                format!("must be a whole number between 1 and 65535, found {n}"),
            );
            return None;
        }
        match n.as_u64().and_then(|p| u16::try_from(p).ok()) {
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
                handled: Vec::new(),
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
                    &child_path(&self.path, k),
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
    /// Fields read, listed as expected when an unknown field is found.
    seen: Vec<&'static str>,
    /// Fields handled elsewhere (refused with their own error): not unknown, not listed.
    handled: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn child_path(&self, key: &str) -> String {
        child_path(&self.path, key)
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

    /// Reports `message` if the field is present; it is then neither unknown nor suggested.
    pub fn refuse(&mut self, key: &'static str, message: &str, d: &mut Diagnostics) -> bool {
        self.handled.push(key);
        let present = self.has(key);
        if present {
            d.error(&self.child_path(key), message);
        }
        present
    }

    /// Reports every field that was not read as a warning: for formats whose other fields are
    /// legitimate but mean nothing to Sluice.
    pub fn warn_rest(self, message: &str, d: &mut Diagnostics) {
        for key in self.map.keys() {
            let key = key.as_str();
            if !self.seen.contains(&key) && !self.handled.contains(&key) {
                d.warn(&self.child_path(key), message);
            }
        }
    }

    /// Reports every field that was not read.
    pub fn finish(self, d: &mut Diagnostics) {
        let mut known: Vec<&str> = self.seen.clone();
        known.sort_unstable();
        known.dedup();
        for key in self.map.keys() {
            let key = key.as_str();
            if known.contains(&key) || self.handled.contains(&key) {
                continue;
            }
            let hint = match known.iter().find(|k| looks_like(key, k)) {
                Some(k) => format!("did you mean {k}? "),
                None => String::new(),
            };
            let message = if known.is_empty() {
                "unknown field; remove it".to_string()
            } else {
                format!("unknown field; {hint}expected one of: {}", known.join(", "))
            };
            d.error(&self.child_path(key), message);
        }
    }
}

/// `parent.key`, or `parent["key"]` when the key is not a plain word (labels such as
/// `kuma.io/mesh`, keys with spaces or control characters), so every path stays one line
/// and unambiguous.
pub fn child_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (plain, parent.is_empty()) {
        (true, true) => key.to_string(),
        (true, false) => format!("{parent}.{key}"),
        (false, _) => format!("{parent}[{key:?}]"),
    }
}

/// A likely misspelling of `known`: same letters in another case, or at most two edits.
fn looks_like(unknown: &str, known: &str) -> bool {
    if unknown.eq_ignore_ascii_case(known) {
        return true;
    }
    let a: Vec<char> = unknown.to_ascii_lowercase().chars().collect();
    let b: Vec<char> = known.to_ascii_lowercase().chars().collect();
    if a.len().abs_diff(b.len()) > 2 || b.len() < 4 {
        return false;
    }
    // Levenshtein distance over one rolling row.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()] <= 2
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_paths() {
        for (parent, key, want) in [
            ("", "spec", "spec"),
            ("spec", "match", "spec.match"),
            ("spec.endpoints[0]", "port", "spec.endpoints[0].port"),
            (
                "metadata.labels",
                "kuma.io/mesh",
                r#"metadata.labels["kuma.io/mesh"]"#,
            ),
            ("", "a b", r#"["a b"]"#),
            ("spec", "x\ny", r#"spec["x\ny"]"#),
            ("spec", "", r#"spec[""]"#),
        ] {
            assert_eq!(child_path(parent, key), want, "{parent} + {key:?}");
        }
    }

    #[test]
    fn misspellings() {
        for (unknown, known, want) in [
            ("serverNmae", "serverName", true),
            ("servername", "serverName", true),
            ("ServerName", "serverName", true),
            ("endpoint", "endpoints", true),
            ("adress", "address", true),
            ("colour", "caCert", false),
            ("minimum", "min", false),
            ("tipe", "type", true),
            ("xy", "ab", false),
        ] {
            assert_eq!(looks_like(unknown, known), want, "{unknown} vs {known}");
        }
    }

    fn port_of(yaml: serde_json::Value) -> (Option<u16>, Vec<String>) {
        let mut d = Diagnostics::default();
        let at = At {
            value: &yaml,
            path: "p".into(),
        };
        let port = at.port(&mut d);
        (
            port,
            d.into_vec().iter().map(|x| x.message.clone()).collect(),
        )
    }

    #[test]
    fn ports() {
        use serde_json::json;
        for (value, want, message) in [
            (json!(1), Some(1), ""),
            (json!(65535), Some(65535), ""),
            (json!(0), None, "must be between 1 and 65535"),
            (json!(65536), None, "must be between 1 and 65535"),
            (json!(-1), None, "must be between 1 and 65535"),
            (
                json!(80.5),
                None,
                "must be a whole number between 1 and 65535, found 80.5",
            ),
            (
                json!("80"),
                None,
                "must be a number, found the string \"80\"; write it without quotes",
            ),
            (
                json!("http"),
                None,
                "must be a port number between 1 and 65535, found a string",
            ),
            (
                json!(true),
                None,
                "must be a port number between 1 and 65535, found a boolean",
            ),
        ] {
            let (port, messages) = port_of(value.clone());
            assert_eq!(port, want, "{value}");
            let got = messages.first().map(String::as_str).unwrap_or("");
            assert_eq!(got, message, "{value}");
        }
    }
}
