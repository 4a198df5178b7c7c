//! The adversarial corpus: every hostile file is refused with its expected error kind and a
//! one-line message naming the file; plus the filesystem cases (missing, permission denied).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use detect::corpus::{self, Content};
use detect::detect;

#[test]
fn every_corpus_case_fails_with_its_expected_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases = corpus::cases();
    assert!(cases.len() >= 40, "corpus shrank to {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let path = dir.path().join(case.name);
        match &case.content {
            Content::File(bytes) => std::fs::write(&path, bytes).unwrap(),
            Content::Directory => std::fs::create_dir(&path).unwrap(),
        }
        match detect(&path) {
            Ok(d) => failures.push(format!("{}: accepted as {:?}", case.name, d.format)),
            Err(e) => {
                let message = e.to_string();
                common::assert_one_line_naming(&message, &path);
                if e.kind() != case.expected {
                    failures.push(format!(
                        "{}: expected {}, got {} ({message})",
                        case.name,
                        case.expected,
                        e.kind()
                    ));
                } else if let Some(word) = case.detail
                    // Only the problem, after `PATH: ` (the file names contain the words too).
                    && !message[path.display().to_string().len() + 2..]
                        .to_lowercase()
                        .contains(word)
                {
                    failures.push(format!(
                        "{}: message does not mention {word:?}: {message}",
                        case.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn corpus_names_are_unique_and_cover_the_issue_list() {
    let cases = corpus::cases();
    let mut names: Vec<_> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "duplicate case names");
    for kind in [
        "empty",
        "truncated",
        "header_too_large",
        "invalid_json",
        "not_an_object",
        "not_utf8",
        "overlap",
        "gap",
        "offset_past_end",
        "unknown_dtype",
        "size_mismatch",
        "shape_overflow",
        "duplicate_name",
        "bad_metadata",
        "gguf",
        "is_directory",
        "unknown_format",
    ] {
        assert!(
            cases.iter().any(|c| c.expected == kind),
            "no corpus case expects {kind}"
        );
    }
    // Deterministic: two builds are identical.
    assert_eq!(corpus::cases(), cases);
}

#[test]
fn a_missing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.safetensors");
    let e = detect(&path).unwrap_err();
    assert_eq!(e.kind(), "not_found");
    assert_eq!(e.to_string(), format!("{}: no such file", path.display()));
}

const CHILD_ENV: &str = "DETECT_PERMISSION_CHILD_FILE";
const CHILD_MARKER: &str = "permission-child-result:";

/// Runs as an unprivileged user, re-executed by `permission_denied_is_reported`.
#[test]
#[ignore = "run by permission_denied_is_reported under an unprivileged uid"]
fn permission_denied_child() {
    let path = std::env::var_os(CHILD_ENV).expect("run by permission_denied_is_reported");
    let e = detect(Path::new(&path)).unwrap_err();
    common::assert_one_line_naming(&e.to_string(), Path::new(&path));
    println!("\n{CHILD_MARKER}{}", e.kind());
}

#[test]
fn permission_denied_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("locked.safetensors");
    std::fs::write(&path, common::safetensors(&[], &[])).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();

    if std::fs::File::open(&path).is_err() {
        // Unprivileged: the mode alone denies access.
        let e = detect(&path).unwrap_err();
        assert_eq!(e.kind(), "permission_denied", "{e}");
        assert_eq!(
            e.to_string(),
            format!("{}: permission denied", path.display())
        );
        return;
    }

    // Root ignores the mode: re-run the check in this test binary as `nobody`.
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect(
            "running as root without setpriv: cannot drop privileges to test permission denied",
        );
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "--exact",
            "permission_denied_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let result = stdout
        .split_once(CHILD_MARKER)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the child did not run the check:\n{stdout}\n{stderr}"));
    assert_eq!(result, "permission_denied");
}
