//! A GGUF file's header, metadata and tensor infos, as the hive reads them (admission,
//! `INVALID_GGUF`) and as the worker builds its tokenizer from them: any bytes, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.gguf");
    let mut cursor = std::io::Cursor::new(data);
    if let Ok(summary) = rbee_models::GgufSummary::read_from(&mut cursor, data.len() as u64, path)
    {
        let _ = rbee_models::estimate_memory(&summary, Some(4096));
    }
    let mut cursor = std::io::Cursor::new(data);
    if let Ok(content) = candle_core::quantized::gguf_file::Content::read(&mut cursor) {
        let _ = rbee_engine::Tokenizer::from_gguf(&content);
    }
});
