//! Validation cases as input/expected-output pairs: `cases/NAME.yaml` is loaded as one
//! configuration and every diagnostic it produces must equal, line for line, `cases/NAME.out`
//! (empty for a valid input). Set `SLUICE_BLESS=1` to write the `.out` files from the current output.

use std::fs;
use std::path::Path;

#[test]
fn validation_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no cases in {}", dir.display());
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut failures = Vec::new();
    for input in &inputs {
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        let text = fs::read_to_string(input).unwrap();
        let actual = match sluice_api::parse_documents(&name, &text) {
            Err(e) => format!("{e}\n"),
            Ok(docs) => sluice_api::load(&docs)
                .diagnostics
                .iter()
                .map(|d| format!("{d}\n"))
                .collect::<String>(),
        };
        let expected_path = input.with_extension("out");
        if bless {
            fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!("{} has no {}", name, expected_path.display())
        });
        if expected != actual {
            failures.push(format!(
                "{name}\n--- expected\n{expected}--- actual\n{actual}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}
