//! Logging as every daemon sets it up: to stderr (journald picks it up), text without colour
//! or JSON lines, with a filter a SIGHUP can change.

use tracing_subscriber::EnvFilter;

/// Applies a new filter (`log_level` syntax) to the running logger.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the global logger; an invalid `level` falls back to `info`.
pub fn init_logging(level: &str, json: bool) -> SetLogLevel {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    fn setter<S: 'static>(handle: tracing_subscriber::reload::Handle<EnvFilter, S>) -> SetLogLevel {
        Box::new(move |level| {
            let f = EnvFilter::try_new(level).map_err(|e| format!("log_level `{level}`: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())
        })
    }
    if json {
        let b = tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        setter(handle)
    } else {
        let b = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        setter(handle)
    }
}
