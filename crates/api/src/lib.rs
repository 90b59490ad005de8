#![forbid(unsafe_code)]
//! Sluice's resources: reading YAML in the dialects users already write, validating it with
//! errors that name the document and the field, and translating it into one internal model.
//! Pure code, no I/O.

pub mod diag;
pub mod document;
pub mod gloo;
pub mod hostname;
pub mod istio;
pub mod kuma;
pub mod model;
pub mod names;
pub mod node;
pub mod registry;
pub mod resource;

pub use diag::{Diagnostic, DocRef, Severity};
pub use document::{parse_documents, Document};
pub use registry::{identify, load, parse, resolve, Loaded, Parsed, Registry};
