//! Model references: what parses (printed canonically), what is refused and why, serde as strings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use rbee_models::{HfRef, ModelRef};

fn hf(org: &str, name: &str, rev: &str, file: Option<&str>) -> ModelRef {
    ModelRef::Hf(HfRef {
        org: org.into(),
        name: name.into(),
        revision: rev.into(),
        file: file.map(Into::into),
    })
}

#[test]
fn valid_references_parse_and_print_canonically() {
    let cases: Vec<(&str, ModelRef, &str)> = vec![
        (
            "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            hf("HuggingFaceTB", "SmolLM2-135M-Instruct-GGUF", "main", None),
            "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        ),
        (
            "hf:org/repo:model.Q4_1.gguf",
            hf("org", "repo", "main", Some("model.Q4_1.gguf")),
            "hf:org/repo:model.Q4_1.gguf",
        ),
        (
            "hf:org/repo@v1.0:sub/dir/m.gguf",
            hf("org", "repo", "v1.0", Some("sub/dir/m.gguf")),
            "hf:org/repo@v1.0:sub/dir/m.gguf",
        ),
        (
            "hf:org/repo@main:m.gguf",
            hf("org", "repo", "main", Some("m.gguf")),
            "hf:org/repo:m.gguf",
        ),
        (
            "hf:o.r_g-1/re.po@0123abcd",
            hf("o.r_g-1", "re.po", "0123abcd", None),
            "hf:o.r_g-1/re.po@0123abcd",
        ),
        (
            "file:models/x.gguf",
            ModelRef::File(PathBuf::from("models/x.gguf")),
            "file:models/x.gguf",
        ),
        (
            "file:/abs/x.gguf",
            ModelRef::File(PathBuf::from("/abs/x.gguf")),
            "file:/abs/x.gguf",
        ),
        // Parsed; the catalog refuses it when resolving.
        (
            "file:../x.gguf",
            ModelRef::File(PathBuf::from("../x.gguf")),
            "file:../x.gguf",
        ),
    ];
    for (input, expected, display) in cases {
        let parsed: ModelRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(parsed, expected, "{input}");
        assert_eq!(parsed.to_string(), display, "{input}");
        assert_eq!(display.parse::<ModelRef>().unwrap(), expected, "{display}");
    }
}

#[test]
fn invalid_references_are_refused_with_the_reason() {
    let cases = [
        ("", "expected `hf:"),
        ("org/repo", "expected `hf:"),
        ("https://huggingface.co/org/repo", "expected `hf:"),
        ("hf:", "must be `org/name`"),
        ("hf:repo", "must be `org/name`"),
        ("hf:org/repo/extra", "exactly `org/name`"),
        ("hf:/repo", "repo org is empty"),
        ("hf:org/", "repo name is empty"),
        ("hf:../repo", "may not be `..`"),
        ("hf:org/..", "may not be `..`"),
        ("hf:./repo", "may not be `.`"),
        ("hf:org/re po", "contains ' '"),
        ("hf:org/répo", "contains 'é'"),
        ("hf:org/repo@", "revision is empty"),
        ("hf:org/repo@a/b", "revision contains '/'"),
        ("hf:org/repo@..:x.gguf", "revision may not be `..`"),
        ("hf:org/repo:", "file is empty"),
        ("hf:org/repo:../x.gguf", "may not contain `..`"),
        ("hf:org/repo:a/../../x.gguf", "may not contain `..`"),
        ("hf:org/repo:./x.gguf", "may not contain `.`"),
        ("hf:org/repo:/etc/passwd", "must be relative"),
        ("hf:org/repo:a\\b.gguf", "backslash"),
        ("hf:org/repo:a\0b.gguf", "control characters"),
        ("hf:org/repo:a\nb.gguf", "control characters"),
        ("hf:org/repo:a//b.gguf", "empty component"),
        ("hf:org/repo:dir/", "empty component"),
        ("hf:org/repo:x:y.gguf", "contains ':'"),
        ("hf:org/repo:a b.gguf", "contains ' '"),
        ("file:", "path after `file:` is empty"),
        ("file:a\0.gguf", "control characters"),
    ];
    for (input, reason) in cases {
        let err = input
            .parse::<ModelRef>()
            .expect_err(&format!("{input:?} must be refused"));
        assert_eq!(err.code().as_str(), "INVALID_MODEL_REF", "{input:?}");
        assert_eq!(err.status(), 400, "{input:?}");
        let msg = err.to_string();
        assert!(msg.contains(reason), "{input:?}: {msg}");
        assert!(
            !msg.contains('\0') && !msg.contains('\n'),
            "{input:?}: {msg}"
        );
    }
    let long = format!("hf:org/{}", "a".repeat(97));
    let err = long.parse::<ModelRef>().unwrap_err();
    assert!(err.to_string().contains("longer than 96"), "{err}");
}

#[test]
fn references_serialize_as_strings() {
    let r: ModelRef = "hf:org/repo@v2:m.gguf".parse().unwrap();
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        "\"hf:org/repo@v2:m.gguf\""
    );
    let back: ModelRef = serde_json::from_str("\"hf:org/repo@v2:m.gguf\"").unwrap();
    assert_eq!(back, r);
    assert!(serde_json::from_str::<ModelRef>("\"hf:org/../x\"").is_err());
    let h = HfRef::new("org/repo", "main", Some("m.gguf")).unwrap();
    assert_eq!(h.repo(), "org/repo");
    assert_eq!(h.to_string(), "hf:org/repo:m.gguf");
    assert_eq!(
        HfRef::new("org/repo", "main", Some("../m.gguf"))
            .unwrap_err()
            .code()
            .as_str(),
        "INVALID_MODEL_REF"
    );
    assert_eq!(
        h.with_file("q/other.gguf").unwrap().to_string(),
        "hf:org/repo:q/other.gguf"
    );
}
