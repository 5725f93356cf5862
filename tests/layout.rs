//! Keeps the crate's shape honest: the top-level modules of `src/` import one another
//! in one direction only (no cycle), and no source file grows past 500 lines of code
//! (its unit tests aside). Reads the source files; needs nothing running.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest a file of `src/` may be, not counting its `#[cfg(test)] mod tests`.
const MAX_LINES: usize = 500;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The files of `src/` with the top-level module each belongs to (None: the crate
/// root, the binary), leaving out files that are tests only.
fn modules() -> Vec<(PathBuf, Option<String>, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let rel = path.strip_prefix(src()).expect("under src/");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "tests.rs" || rel.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_owned();
        let module = match first.as_str() {
            "lib" | "main" => None,
            // Test-only module: it may use anything, and nothing uses it.
            "fuzz" => continue,
            _ => Some(first),
        };
        let text = std::fs::read_to_string(&path).expect("read a source file");
        out.push((path, module, code_of(&text)));
    }
    out
}

/// The file's code: without its unit tests (from `#[cfg(test)]` followed by a `mod`)
/// and without comments.
fn code_of(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    if let Some(i) = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod "))
    {
        lines.truncate(i);
    }
    lines
        .iter()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a file's code names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `esm_gateway::crate::` never occurs; a preceding identifier character means
        // another path (`$crate::`, `my_crate::`).
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c};`: the first segment of each item at depth 0.
            let mut depth = 0;
            let mut item_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => ident.push(c),
                    _ if item_start && !ident.is_empty() => {
                        out.insert(std::mem::take(&mut ident));
                        item_start = false;
                    }
                    _ => {}
                }
            }
            if !ident.is_empty() {
                out.insert(ident);
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, module, code) in modules() {
        let Some(module) = module else { continue };
        let deps = graph.entry(module.clone()).or_default();
        for dep in imports(&code) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    // Depth-first search; a back edge is a cycle, reported as its path.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            cycles.push(cycle.join(" -> "));
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            visit(dep, graph, path, done, cycles);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let (mut done, mut cycles) = (BTreeSet::new(), Vec::new());
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(
        cycles.is_empty(),
        "top-level modules of src/ import each other in a cycle:\n  {}\n(the graph: {graph:#?})",
        cycles.join("\n  ")
    );
}

#[test]
fn the_import_scanner_sees_plain_paths_and_groups() {
    let code = "use crate::config::Config;\nuse crate::{record::Record, pipeline::{a, b}};\nlet x = crate::status::State::Running; $crate::nope; my_crate::no;";
    let got: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(got, ["config", "pipeline", "record", "status"]);
    let without_tests =
        code_of("use crate::a;\n// crate::b\n#[cfg(test)]\nmod tests {\nuse crate::c;\n}");
    assert_eq!(
        imports(&without_tests).into_iter().collect::<Vec<_>>(),
        ["a"]
    );
}

#[test]
fn no_source_file_is_longer_than_500_lines_of_code() {
    let long: Vec<String> = modules()
        .into_iter()
        .filter_map(|(path, _, _)| {
            let text = std::fs::read_to_string(&path).ok()?;
            let lines: Vec<&str> = text.lines().collect();
            let end = lines
                .windows(2)
                .position(|w| {
                    w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod ")
                })
                .unwrap_or(lines.len());
            (end > MAX_LINES).then(|| format!("{} ({end} lines)", path.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files of src/ longer than {MAX_LINES} lines besides their tests; split them:\n  {}",
        long.join("\n  ")
    );
}
