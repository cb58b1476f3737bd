//! The CI check that the CLI does not link the migration engine (tests/check-deps): it passes on
//! this workspace, and fails — naming the crates — on a copy of the workspace whose CLI depends
//! on vmgate-migrate again, and on a saved tree that contains kvm-ioctls.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(root().join("tests/check-deps"))
        .args(args)
        .output()
        .expect("run tests/check-deps")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Copies the workspace's sources (not `target/`, not `.git`) to `to`.
fn copy_workspace(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let dest = to.join(&name);
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_workspace(&entry.path(), &dest);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

#[test]
fn the_cli_does_not_depend_on_the_engine() {
    let out = check(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn the_check_fails_when_the_cli_depends_on_the_engine_again() {
    let tmp = tempfile::tempdir().unwrap();
    copy_workspace(&root(), tmp.path());
    let manifest = tmp.path().join("tools/Cargo.toml");
    let text_before = std::fs::read_to_string(&manifest).unwrap();
    let with_engine = text_before.replacen(
        "[dependencies]\n",
        "[dependencies]\nvmgate-migrate.workspace = true\n",
        1,
    );
    assert_ne!(
        with_engine, text_before,
        "tools/Cargo.toml has no [dependencies]"
    );
    std::fs::write(&manifest, with_engine).unwrap();
    let out = check(&[
        "--manifest-path".as_ref(),
        tmp.path().join("Cargo.toml").as_os_str(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vmgate-tools depends on vmgate-migrate"),
        "{err}"
    );
    assert!(err.contains("vmgate-tools depends on kvm-ioctls"), "{err}");
}

#[test]
fn the_check_reads_a_saved_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree.txt");
    std::fs::write(
        &tree,
        "0vmgate-tools v0.1.0 (/w/tools)\n1clap v4.5.0\n1vmgate-auth v0.1.0 (/w/auth)\n\
         2kvm-ioctls v0.25.1\n",
    )
    .unwrap();
    let out = check(&["--tree".as_ref(), tree.as_os_str()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("depends on kvm-ioctls"), "{err}");
    assert!(!err.contains("depends on vmgate-migrate"), "{err}");
    std::fs::write(&tree, "0vmgate-tools v0.1.0 (/w/tools)\n1clap v4.5.0\n").unwrap();
    assert_eq!(
        check(&["--tree".as_ref(), tree.as_os_str()]).status.code(),
        Some(0)
    );
}
