//! Diagnostics that name the document, the field path and the rule.

use std::fmt;
use std::sync::Arc;

/// Where a resource came from: a file (or `-` for stdin) and its 0-based document index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocRef {
    pub source: Arc<str>,
    pub index: usize,
}

impl fmt::Display for DocRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.source, self.index)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem at one field of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// `None` for problems with a whole file (unreadable, not YAML).
    pub doc: Option<DocRef>,
    /// Field path inside the document, e.g. `spec.endpoints[1].port`; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        match (&self.doc, self.path.is_empty()) {
            (Some(doc), false) => write!(f, "{doc} {}: {}", self.path, self.message),
            (Some(doc), true) => write!(f, "{doc}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.path, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// Collects the diagnostics of one document while it is walked.
#[derive(Debug, Default)]
pub struct Diagnostics {
    doc: Option<DocRef>,
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn for_doc(doc: DocRef) -> Self {
        Self {
            doc: Some(doc),
            items: Vec::new(),
        }
    }

    pub fn error(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Error, path, message.into());
    }

    pub fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Warning, path, message.into());
    }

    fn push(&mut self, severity: Severity, path: &str, message: String) {
        self.items.push(Diagnostic {
            severity,
            doc: self.doc.clone(),
            path: path.to_string(),
            message,
        });
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.items
    }
}
