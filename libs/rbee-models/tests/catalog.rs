//! The model catalog over real directories: `file:` refs resolve inside them only, symlinks included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use rbee_models::{Catalog, ModelError, ModelRef};
use rbee_test_harness::temp_dir;

fn write(path: &Path, len: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, vec![7u8; len]).unwrap();
}

fn resolve(c: &Catalog, r: &str) -> Result<PathBuf, ModelError> {
    c.resolve(&r.parse::<ModelRef>().unwrap())
}

/// `<tmp>/outside.gguf` and a catalog over `<tmp>/models`.
fn setup(tag: &str) -> (PathBuf, Catalog) {
    let root = temp_dir(tag);
    write(&root.join("outside.gguf"), 10);
    let c = Catalog::new(vec![root.join("models")]).unwrap();
    (root, c)
}

#[test]
fn new_creates_the_first_directory_and_needs_one() {
    let root = temp_dir("cat-new");
    let dir = root.join("a/b/models");
    let c = Catalog::new(vec![dir.clone(), root.join("absent")]).unwrap();
    assert!(dir.is_dir());
    assert!(!root.join("absent").exists());
    assert_eq!(c.dirs(), &[dir.clone(), root.join("absent")]);
    assert_eq!(
        Catalog::new(vec![]).unwrap_err().code().as_str(),
        "INVALID_CONFIG"
    );
    assert_eq!(
        c.hub_path("org/repo", "q/m.gguf").unwrap(),
        dir.join("org/repo/q/m.gguf")
    );
    assert_eq!(
        c.hub_path("org/repo", "../m.gguf")
            .unwrap_err()
            .code()
            .as_str(),
        "INVALID_MODEL_REF"
    );
    assert_eq!(
        c.hub_path("../repo", "m.gguf").unwrap_err().code().as_str(),
        "INVALID_MODEL_REF"
    );
}

#[test]
fn file_refs_resolve_inside_the_directories_only() {
    let (root, c) = setup("cat-file");
    let models = root.join("models");
    write(&models.join("a.gguf"), 5);
    write(&models.join("sub/b.gguf"), 6);
    write(&models.join("notes.txt"), 1);
    fs::create_dir_all(models.join("dir.gguf")).unwrap();
    let canon = fs::canonicalize(&models).unwrap();

    assert_eq!(resolve(&c, "file:a.gguf").unwrap(), canon.join("a.gguf"));
    assert_eq!(
        resolve(&c, "file:sub/b.gguf").unwrap(),
        canon.join("sub/b.gguf")
    );
    assert_eq!(
        resolve(&c, "file:sub/../a.gguf").unwrap(),
        canon.join("a.gguf")
    );
    let abs = format!("file:{}", models.join("sub/b.gguf").display());
    assert_eq!(resolve(&c, &abs).unwrap(), canon.join("sub/b.gguf"));

    for outside in [
        "file:../outside.gguf".to_owned(),
        "file:sub/../../outside.gguf".to_owned(),
        "file:../missing.gguf".to_owned(),
        format!("file:{}", root.join("outside.gguf").display()),
        "file:/etc/passwd".to_owned(),
        format!("file:{}", models.display()),
    ] {
        let err = resolve(&c, &outside).unwrap_err();
        assert_eq!(
            err.code().as_str(),
            "OUTSIDE_MODEL_DIRS",
            "{outside}: {err}"
        );
        assert_eq!(err.status(), 400);
        assert!(
            err.to_string()
                .ends_with("is outside the configured model directories"),
            "{err}"
        );
    }

    let err = resolve(&c, "file:missing.gguf").unwrap_err();
    assert_eq!(err.code().as_str(), "MODEL_NOT_FOUND");
    assert_eq!(err.status(), 404);
    assert_eq!(err.to_string(), "model file not found: missing.gguf");
    let err = resolve(&c, "file:notes.txt").unwrap_err();
    assert_eq!(err.code().as_str(), "INVALID_MODEL_REF");
    assert!(err.to_string().contains("not a .gguf file"), "{err}");
    let err = resolve(&c, "file:dir.gguf").unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn symlinks_escaping_the_directories_are_refused() {
    let (root, c) = setup("cat-link");
    let models = root.join("models");
    write(&models.join("real.gguf"), 3);
    symlink(root.join("outside.gguf"), models.join("escape.gguf")).unwrap();
    symlink(&root, models.join("up")).unwrap();
    symlink(models.join("real.gguf"), models.join("alias.gguf")).unwrap();

    for r in ["file:escape.gguf", "file:up/outside.gguf"] {
        assert_eq!(
            resolve(&c, r).unwrap_err().code().as_str(),
            "OUTSIDE_MODEL_DIRS",
            "{r}"
        );
    }
    // A link that stays inside is fine and resolves to its target.
    assert_eq!(
        resolve(&c, "file:alias.gguf").unwrap(),
        fs::canonicalize(models.join("real.gguf")).unwrap()
    );
    // Listing neither follows the escaping links nor enters the linked directory.
    let ids: Vec<String> = c.list().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["alias.gguf", "real.gguf"]);
    // Nor does delete touch what lies outside.
    assert_eq!(
        c.delete("escape.gguf").unwrap_err().code().as_str(),
        "OUTSIDE_MODEL_DIRS"
    );
    assert_eq!(
        c.delete("up/outside.gguf").unwrap_err().code().as_str(),
        "OUTSIDE_MODEL_DIRS"
    );
    assert!(root.join("outside.gguf").is_file());
}

#[test]
fn list_finds_gguf_files_with_ids_and_references() {
    let root = temp_dir("cat-list");
    let d0 = root.join("d0");
    let d1 = root.join("d1");
    write(
        &d0.join("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/model.gguf"),
        100,
    );
    write(
        &d0.join("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/other.gguf.part"),
        50,
    );
    write(&d0.join("flat.GGUF"), 10);
    write(&d0.join("my model.gguf"), 11);
    write(&d0.join("readme.md"), 1);
    write(&d0.join(".hidden/x.gguf"), 1);
    write(&d0.join("a/b/c/d/e/f/g/too-deep.gguf"), 1);
    write(&d1.join("shared.gguf"), 20);
    // Shadowed by d0's file of the same name: only an absolute reference reaches it.
    write(&d1.join("flat.GGUF"), 12);
    let c = Catalog::new(vec![d0.clone(), d1.clone()]).unwrap();

    let list = c.list();
    let got: Vec<(&str, &str, u64)> = list
        .iter()
        .map(|e| (e.id.as_str(), e.reference.as_str(), e.bytes))
        .collect();
    let space_id = list
        .iter()
        .find(|e| e.id.starts_with("my_model.gguf~"))
        .unwrap()
        .id
        .clone();
    let shared_id = list
        .iter()
        .find(|e| e.id.starts_with("shared.gguf~"))
        .unwrap()
        .id
        .clone();
    assert_eq!(space_id.len(), "my_model.gguf~".len() + 12);
    let shadowed_id = list
        .iter()
        .find(|e| e.id.starts_with("flat.GGUF~"))
        .unwrap()
        .id
        .clone();
    let shadowed_ref = format!("file:{}", d1.join("flat.GGUF").display());
    assert_eq!(
        got,
        vec![
            (
                "HuggingFaceTB--SmolLM2-135M-Instruct-GGUF--model.gguf",
                "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:model.gguf",
                100
            ),
            ("flat.GGUF", "file:flat.GGUF", 10),
            (shadowed_id.as_str(), shadowed_ref.as_str(), 12),
            (space_id.as_str(), "file:my model.gguf", 11),
            (shared_id.as_str(), "file:shared.gguf", 20),
        ]
    );
    for e in &list {
        assert!(
            e.id.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-~".contains(c)),
            "{}",
            e.id
        );
        assert!(e.modified.unwrap() > 1_600_000_000);
        // Every reference resolves back to the listed file.
        assert_eq!(
            resolve(&c, &e.reference).unwrap(),
            fs::canonicalize(&e.path).unwrap()
        );
        assert_eq!(c.find(&e.id).unwrap(), *e);
    }
    // Ids are stable.
    assert_eq!(c.list(), list);
    assert_eq!(c.find("nope"), None);
}

#[test]
fn hf_refs_resolve_to_the_hub_layout() {
    let (root, c) = setup("cat-hf");
    let models = root.join("models");
    let canon = fs::canonicalize(&models).unwrap();
    write(&models.join("org/one/m.gguf"), 4);
    write(&models.join("org/one/README.md"), 4);
    write(&models.join("org/two/a.gguf"), 4);
    write(&models.join("org/two/q/b.gguf"), 4);

    assert_eq!(
        resolve(&c, "hf:org/one:m.gguf").unwrap(),
        canon.join("org/one/m.gguf")
    );
    assert_eq!(
        resolve(&c, "hf:org/one").unwrap(),
        canon.join("org/one/m.gguf")
    );
    assert_eq!(
        resolve(&c, "hf:org/one@v2:m.gguf").unwrap(),
        canon.join("org/one/m.gguf")
    );
    assert_eq!(
        resolve(&c, "hf:org/two:q/b.gguf").unwrap(),
        canon.join("org/two/q/b.gguf")
    );
    let err = resolve(&c, "hf:org/two").unwrap_err();
    assert_eq!(err.code().as_str(), "AMBIGUOUS_MODEL_FILE");
    assert_eq!(
        err.to_string(),
        "org/two holds several .gguf files, name one (hf:org/two:FILE): a.gguf, q/b.gguf"
    );
    let err = resolve(&c, "hf:org/three").unwrap_err();
    assert_eq!(err.code().as_str(), "MODEL_NOT_FOUND");
    assert_eq!(err.to_string(), "model hf:org/three is not downloaded");
    assert_eq!(
        resolve(&c, "hf:org/one:x.gguf")
            .unwrap_err()
            .code()
            .as_str(),
        "MODEL_NOT_FOUND"
    );
}

#[test]
fn delete_removes_the_model_its_part_and_empty_folders() {
    let (root, c) = setup("cat-del");
    let models = root.join("models");
    write(&models.join("org/repo/m.gguf"), 4);
    write(&models.join("org/repo/m.gguf.part"), 2);
    write(&models.join("org/keep/k.gguf"), 4);
    write(&models.join("flat.gguf"), 4);
    write(&models.join("only.gguf.part"), 4);

    let id = "org--repo--m.gguf";
    assert_eq!(c.delete(id).unwrap(), models.join("org/repo/m.gguf"));
    assert!(!models.join("org/repo").exists());
    assert!(models.join("org/keep/k.gguf").is_file());
    assert!(models.is_dir());

    assert_eq!(c.delete("flat.gguf").unwrap(), models.join("flat.gguf"));
    assert_eq!(
        c.delete("hf:org/keep:k.gguf").unwrap(),
        models.join("org/keep/k.gguf")
    );
    assert!(!models.join("org").exists());
    // A leftover partial download alone can be removed through its model path.
    assert_eq!(c.delete("only.gguf").unwrap(), models.join("only.gguf"));
    assert!(!models.join("only.gguf.part").exists());

    assert_eq!(c.delete(id).unwrap_err().code().as_str(), "MODEL_NOT_FOUND");
    assert_eq!(
        c.delete("../outside.gguf").unwrap_err().code().as_str(),
        "OUTSIDE_MODEL_DIRS"
    );
    assert_eq!(
        c.delete(&root.join("outside.gguf").display().to_string())
            .unwrap_err()
            .code()
            .as_str(),
        "OUTSIDE_MODEL_DIRS"
    );
    assert!(root.join("outside.gguf").is_file());
    assert!(c.list().is_empty());
}

#[test]
fn a_relative_file_ref_is_found_in_any_model_directory_first_one_first() {
    let root = temp_dir("cat-dirs");
    let (first, second) = (root.join("first"), root.join("second"));
    write(&second.join("only-second.gguf"), 4);
    write(&first.join("both.gguf"), 4);
    write(&second.join("both.gguf"), 4);
    let c = Catalog::new(vec![first.clone(), second.clone()]).unwrap();
    assert_eq!(
        resolve(&c, "file:only-second.gguf").unwrap(),
        fs::canonicalize(second.join("only-second.gguf")).unwrap()
    );
    assert_eq!(
        resolve(&c, "file:both.gguf").unwrap(),
        fs::canonicalize(first.join("both.gguf")).unwrap()
    );
    assert_eq!(
        resolve(&c, "file:nowhere.gguf")
            .unwrap_err()
            .code()
            .as_str(),
        "MODEL_NOT_FOUND"
    );
}
