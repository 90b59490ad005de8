//! Reading resource files: files, directories (their `.yaml`/`.yml` files, recursively, in name
//! order) and `-` for standard input.

use std::io::Read;
use std::path::{Path, PathBuf};

use sluice_api::document::MAX_SOURCE_BYTES;
use sluice_api::{parse_documents, Document};

/// Reads every path. Problems (unreadable files, YAML syntax) are returned as lines; the
/// documents that could be read are returned either way.
pub fn read_documents(paths: &[PathBuf]) -> (Vec<Document>, Vec<String>) {
    let mut problems = Vec::new();
    let sources = read_sources(paths, None, &mut problems);
    let documents = parse_sources(sources, &mut problems, |doc| doc);
    (documents, problems)
}

/// Every source's documents, each made into what the caller keeps of it by `keep` as its file
/// is parsed, so that a file's text and YAML trees go before the next file is read; sources that
/// are not YAML add a problem each.
pub fn parse_sources<T>(
    sources: Vec<(String, String)>,
    problems: &mut Vec<String>,
    mut keep: impl FnMut(Document) -> T,
) -> Vec<T> {
    let mut kept = Vec::new();
    for (name, text) in sources {
        match parse_documents(&name, &text) {
            Ok(docs) => kept.extend(docs.into_iter().map(&mut keep)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    kept
}

/// The files behind `paths`, with their contents, in a stable order. `-` is `stdin` when given
/// (read once by the caller), standard input otherwise.
pub fn read_sources(
    paths: &[PathBuf],
    stdin: Option<&str>,
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    visit_sources(paths, stdin, problems, |name, text| out.push((name, text)));
    out
}

/// [`read_sources`] one source at a time: each is handed to `each` before the next is read, so
/// that a caller looking at many files need not hold them all.
pub fn visit_sources(
    paths: &[PathBuf],
    stdin: Option<&str>,
    problems: &mut Vec<String>,
    mut each: impl FnMut(String, String),
) {
    for path in paths {
        if let (true, Some(text)) = (path.as_os_str() == "-", stdin) {
            each("-".to_string(), text.to_string());
            continue;
        }
        if path.as_os_str() == "-" {
            let mut text = String::new();
            match std::io::stdin()
                .take(MAX_SOURCE_BYTES as u64 + 1)
                .read_to_string(&mut text)
            {
                Ok(_) => each("-".to_string(), text),
                Err(e) => problems.push(format!("-: cannot read standard input: {e}")),
            }
            continue;
        }
        let mut files = Vec::new();
        collect(path, &mut files, problems, 0);
        for file in files {
            match read_file(&file) {
                Ok(text) => each(file.display().to_string(), text),
                Err(e) => problems.push(format!("{}: cannot read: {e}", file.display())),
            }
        }
    }
}

fn collect(path: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<String>, depth: usize) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{}: cannot read: {e}", path.display()));
            return;
        }
    };
    if !meta.is_dir() {
        files.push(path.to_path_buf());
        return;
    }
    if depth > 16 {
        problems.push(format!("{}: directories nested too deep", path.display()));
        return;
    }
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("{}: cannot list: {e}", path.display()));
            return;
        }
    };
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for child in children {
        let name = child.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if child.is_dir() {
            collect(&child, files, problems, depth + 1);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            files.push(child);
        }
    }
}

fn read_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    // One byte over the limit is enough for the parser to refuse it with a clear message.
    file.take(MAX_SOURCE_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    Ok(text)
}
