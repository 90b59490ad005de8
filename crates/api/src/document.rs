//! Splitting YAML text into documents, bounded against hostile input.

use std::sync::Arc;

use serde_json::Value;

use crate::diag::{Diagnostic, DocRef, Severity};

/// Larger inputs are refused before parsing: no resource file is anywhere near this.
pub const MAX_SOURCE_BYTES: usize = 8 * 1024 * 1024;

/// One YAML document and where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub doc: DocRef,
    pub value: Value,
}

/// Parses every document of `text`. Documents are numbered from 0 in order; documents with
/// no content at all (`---` followed directly by `---`) are not counted.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let whole_file = |message: String| Diagnostic {
        severity: Severity::Error,
        doc: None,
        path: String::new(),
        message: format!("{source}: {message}"),
    };
    if text.len() > MAX_SOURCE_BYTES {
        return Err(whole_file(format!(
            "file is {} bytes, more than the limit of {MAX_SOURCE_BYTES}; split it into several files",
            text.len()
        )));
    }
    let values: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| whole_file(yaml_error(&e)))?;
    let source: Arc<str> = Arc::from(source);
    Ok(values
        .into_iter()
        // Filtered before counting, so that indices have no gaps.
        .filter(|value| !value.is_null())
        .enumerate()
        .map(|(index, value)| Document {
            doc: DocRef {
                source: source.clone(),
                index,
            },
            value,
        })
        .collect())
}

/// The parser's message for users, without the source snippet (several lines) and with the
/// line and column, as one line.
pub(crate) fn yaml_error(e: &serde_saphyr::Error) -> String {
    let mut options = serde_saphyr::RenderOptions::new(&serde_saphyr::UserMessageFormatter);
    options.snippets = serde_saphyr::SnippetMode::Off;
    let message = one_line(&e.render_with_options(options));
    let fix = match e.without_snippet() {
        serde_saphyr::Error::DuplicateMappingKey { .. } => "; keep only one of them",
        _ => "",
    };
    format!("not valid YAML: {message}{fix}")
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_keeps_indices() {
        let docs = parse_documents("a.yaml", "a: 1\n---\n---\nb: [1, 2]\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].doc.index, 0);
        assert_eq!(docs[1].doc.index, 1);
        assert_eq!(docs[1].value["b"][1], 2);
    }

    #[test]
    fn syntax_error_is_one_line_naming_the_file() {
        let err = parse_documents("bad.yaml", "a: [1, 2\nb: }\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("bad.yaml: not valid YAML"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn duplicate_key_is_refused() {
        let err = parse_documents("dup.yaml", "a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "dup.yaml: not valid YAML: duplicate mapping key `c` is not allowed here at line 4, column 3; keep only one of them"
        );
    }

    #[test]
    fn billion_laughs_is_bounded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse_documents("bomb.yaml", &text).unwrap_err().to_string();
        assert!(err.contains("too large or too complex"), "{err}");
    }
}
