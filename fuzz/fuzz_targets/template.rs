//! A chat template from a model's metadata, parsed and rendered with a fixed conversation:
//! any source, no panic, no hang (the budget stops loops).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = rbee_engine::ChatTemplate::new(source, "<s>", "</s>") else {
        return;
    };
    let messages = [
        rbee_engine::Message {
            role: "system",
            content: "Be brief.",
        },
        rbee_engine::Message {
            role: "user",
            content: "Hi {{ there }} {% raw %}",
        },
    ];
    let _ = template.render(&messages);
});
