//! The documentation names only things that exist: every relative link in `README.md`,
//! `CHANGELOG.md` and `docs/*.md` leads to a file of the repository (and its `#anchor` to a
//! heading there), and every repository path written in code (`scripts/env.sh`,
//! `runtime/kernels/unfused.rs`, `tests/ui/*.rs`, ...) exists. Plain Rust, no tool to install.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The repository's root (this package's manifest directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files checked: the front page, the changelog and `docs/`.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![root.join("README.md"), root.join("CHANGELOG.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Paths named in the docs that belong to other repositories, each with where it lives.
const ELSEWHERE: &[&str] = &[
    // larq's MNIST notebook, in the larq/docs repository.
    "docs/larq/tutorials/mnist.ipynb",
];

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks), with GitHub's `-1`, `-2`
/// suffixes for repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// The targets of inline links `[text](target)` and images `![alt](target)` outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    targets
}

/// The words of inline code spans and code blocks that name a path in this repository: they
/// start with one of its top-level entries and a `/`.
fn code_paths(text: &str, top: &BTreeSet<String>) -> Vec<String> {
    let mut code = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            code.push_str(line);
            code.push('\n');
        } else {
            // Inline spans: every other piece between backticks.
            for (i, piece) in line.split('`').enumerate() {
                if i % 2 == 1 {
                    code.push_str(piece);
                    code.push('\n');
                }
            }
        }
    }
    let mut paths = Vec::new();
    for word in code.split(|c: char| {
        c.is_whitespace() || matches!(c, '"' | '\'' | '(' | ')' | ',' | ';' | '=' | '<' | '>' | '`')
    }) {
        let word = word.trim_end_matches(['.', ':']);
        // A compiler's `file:line:column` names the file.
        let word = word.split(':').next().unwrap_or(word);
        let Some((first, _)) = word.split_once('/') else { continue };
        if top.contains(first) && !word.contains("://") {
            paths.push(word.to_string());
        }
    }
    paths
}

/// Whether `path` (relative to the root; `*` is a glob within one name) exists.
fn exists(root: &Path, path: &str) -> bool {
    let Some(star) = path.find('*') else { return root.join(path).exists() };
    // A glob: its directory exists and holds at least one match.
    let (dir, pattern) = path.rsplit_once('/').unwrap_or(("", path));
    if dir.contains('*') {
        return false;
    }
    let _ = star;
    let (prefix, suffix) = pattern.split_once('*').unwrap_or((pattern, ""));
    fs::read_dir(root.join(dir)).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).any(|name| {
            name.starts_with(prefix) && name.ends_with(suffix) && name.len() >= pattern.len() - 1
        })
    })
}

#[test]
fn every_relative_link_and_anchor_exists() {
    let root = root();
    let mut missing = Vec::new();
    for doc in documents() {
        let text = fs::read_to_string(&doc).unwrap();
        let dir = doc.parent().unwrap();
        let name = doc.strip_prefix(&root).unwrap().display().to_string();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file_path = if file.is_empty() { doc.clone() } else { dir.join(file) };
            if !file_path.exists() {
                missing.push(format!("{name}: link to {target}: no such file"));
                continue;
            }
            // Links stay inside the repository: a packaged or published copy has nothing else.
            let inside =
                file_path.canonicalize().is_ok_and(|p| p.starts_with(root.canonicalize().unwrap()));
            if !inside {
                missing.push(format!("{name}: link to {target}: outside the repository"));
                continue;
            }
            if !anchor.is_empty() && file_path.extension().is_some_and(|e| e == "md") {
                let headings = anchors(&fs::read_to_string(&file_path).unwrap());
                if !headings.contains(anchor) {
                    missing.push(format!("{name}: link to {target}: no heading `#{anchor}`"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "broken links:\n{}", missing.join("\n"));
}

#[test]
fn every_repository_path_named_in_code_exists() {
    let root = root();
    // Top-level entries of the repository, as a path in the docs starts (hidden ones, like
    // `.ci`, included).
    let top: BTreeSet<String> = fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "target")
        .collect();
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(&root).unwrap().display().to_string();
        for path in code_paths(&text, &top) {
            checked += 1;
            if !ELSEWHERE.contains(&path.as_str()) && !exists(&root, &path) {
                missing.push(format!("{name}: `{path}` does not exist"));
            }
        }
    }
    assert!(missing.is_empty(), "paths named but missing:\n{}", missing.join("\n"));
    // The scan finds the paths the docs are full of (a broken scan would pass vacuously).
    assert!(checked > 50, "only {checked} paths found");
}

#[test]
fn the_scanners_find_what_they_should() {
    let text = "See [a](docs/a.md#x-y) and ![img](p.png).\n\
                Run `scripts/env.sh cargo test` on `runtime/lib.rs`.\n\
                ```sh\nscripts/gpu_run.sh --out /tmp/x\n```\n## X Y\n### `code` (in: a, b)\n";
    assert_eq!(link_targets(text), ["docs/a.md#x-y", "p.png"]);
    let top: BTreeSet<String> = ["scripts", "runtime"].map(String::from).into();
    assert_eq!(code_paths(text, &top), ["scripts/env.sh", "runtime/lib.rs", "scripts/gpu_run.sh"]);
    assert_eq!(anchors(text), ["code-in-a-b", "x-y"].map(String::from).into());
    assert!(exists(&root(), "tests/ui/*.rs"));
    assert!(!exists(&root(), "tests/ui/*.nothing"));
}
