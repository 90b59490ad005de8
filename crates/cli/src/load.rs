//! Reading resource files: files, directories (their `.yaml`/`.yml` files, recursively, in name
//! order) and `-` for standard input.

use std::ffi::OsString;
use std::fs::{DirEntry, Metadata};
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
        collect(path, problems, 0, &mut |file, _| files.push(file));
        for file in files {
            match read_file(&file) {
                Ok(text) => each(file.display().to_string(), text),
                Err(e) => problems.push(format!("{}: cannot read: {e}", file.display())),
            }
        }
    }
}

/// The files [`read_sources`] would read, in its order, each with its metadata (links followed)
/// instead of its text; `-` is left out.
pub fn stat_files(
    paths: &[PathBuf],
    problems: &mut Vec<String>,
    mut each: impl FnMut(PathBuf, std::io::Result<Metadata>),
) {
    for path in paths.iter().filter(|p| p.as_os_str() != "-") {
        collect(path, problems, 0, &mut |file, entry| {
            // Asked of the directory when the listing says the entry is not a link, which
            // spares the kernel a walk of the whole path.
            let metadata = match entry {
                Some(e) if e.file_type().is_ok_and(|t| !t.is_symlink()) => e.metadata(),
                _ => std::fs::metadata(&file),
            };
            each(file, metadata);
        });
    }
}

/// Hands `found` every resource file behind `path`, in name order, with its directory entry
/// when it was found by listing one.
fn collect(
    path: &Path,
    problems: &mut Vec<String>,
    depth: usize,
    found: &mut dyn FnMut(PathBuf, Option<&DirEntry>),
) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{}: cannot read: {e}", path.display()));
            return;
        }
    };
    if !meta.is_dir() {
        found(path.to_path_buf(), None);
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
    // The watch lists every directory each second: the entry's type comes with the listing
    // (only a symbolic link needs a stat to say where it leads), and siblings are ordered by
    // their names rather than by their paths, component by component.
    let mut children: Vec<(OsString, DirEntry, bool)> = entries
        .filter_map(Result::ok)
        .map(|e| (e.file_name(), e))
        .filter(|(name, _)| !name.as_encoded_bytes().starts_with(b"."))
        .map(|(name, e)| {
            let dir = match e.file_type() {
                Ok(t) if !t.is_symlink() => t.is_dir(),
                _ => e.path().is_dir(),
            };
            (name, e, dir)
        })
        .collect();
    children.sort_unstable_by(|(a, ..), (b, ..)| a.cmp(b));
    for (name, entry, dir) in children {
        if dir {
            collect(&entry.path(), problems, depth + 1, found);
        } else if [".yaml", ".yml"]
            .iter()
            .any(|ext| name.as_encoded_bytes().ends_with(ext.as_bytes()))
        {
            found(entry.path(), Some(&entry));
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

/// An empty directory under the system's temporary one, removed when dropped.
#[cfg(test)]
pub(crate) struct TempDir(PathBuf);

#[cfg(test)]
impl TempDir {
    pub(crate) fn new(name: &str) -> TempDir {
        let dir =
            TempDir(std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(dir.path());
        std::fs::create_dir(dir.path()).unwrap();
        dir
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_mounted_config_map_is_listed_by_name_through_its_links() {
        // As Kubernetes mounts a ConfigMap: the files are links into a hidden directory that
        // the `..data` link names, swapped whole on an update.
        let dir = TempDir::new("list");
        let at = |name: &str| dir.path().join(name);
        let at_bytes = |name: &[u8]| dir.path().join(std::ffi::OsStr::from_bytes(name));
        std::fs::create_dir(at("..2026_12_07")).unwrap();
        std::fs::write(at("..2026_12_07/a.yaml"), "name: a").unwrap();
        std::fs::write(at("..2026_12_07/b.yml"), "name: b").unwrap();
        symlink("..2026_12_07", at("..data")).unwrap();
        symlink("..data/a.yaml", at("a.yaml")).unwrap();
        symlink("..data/b.yml", at("b.yml")).unwrap();
        std::fs::write(at("m.yaml"), "name: m").unwrap();
        // A name that is not UTF-8 is still a resource file.
        std::fs::write(at_bytes(b"n\xff.yaml"), "name: n").unwrap();
        std::fs::create_dir(at("z")).unwrap();
        std::fs::write(at("z/c.yaml"), "name: c").unwrap();
        std::fs::write(at("z/notes.txt"), "not a resource").unwrap();
        std::fs::write(at("z/.hidden.yaml"), "name: hidden").unwrap();
        std::fs::create_dir(at("links")).unwrap();
        symlink(at("z"), at("links/to-z")).unwrap();

        let mut problems = Vec::new();
        let mut files = Vec::new();
        stat_files(
            &[dir.path().to_path_buf(), PathBuf::from("-")],
            &mut problems,
            |file, metadata| {
                assert!(metadata.unwrap().is_file(), "{}", file.display());
                files.push(file);
            },
        );
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<_> = files
            .iter()
            .map(|f| {
                f.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "a.yaml",
                "b.yml",
                "links/to-z/c.yaml",
                "m.yaml",
                "n\u{fffd}.yaml",
                "z/c.yaml"
            ]
        );
    }
}
