//! Command-line helpers shared by the tasks: flag values and positional arguments.

use anyhow::Context;

/// The value after `name`, if present.
pub fn flag(args: &[String], name: &str) -> anyhow::Result<Option<String>> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .cloned()
            .map(Some)
            .with_context(|| format!("{name} needs a value")),
        None => Ok(None),
    }
}

/// Every value given after `name` (a flag that may repeat).
pub fn flag_all(args: &[String], name: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a == name {
            out.push(
                args.get(i + 1)
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))?,
            );
        }
    }
    Ok(out)
}

/// Arguments that are neither flags nor flag values.
pub fn positional(args: &[String], flags_with_values: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if flags_with_values.contains(&a.as_str()) {
            skip = true;
        } else {
            out.push(a.clone());
        }
    }
    out
}
