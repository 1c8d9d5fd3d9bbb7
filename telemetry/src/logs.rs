//! The process's `tracing` subscriber: human-readable text (the default) or
//! one JSON object per line, for log collectors.
//!
//! Either way the filter comes from `RUST_LOG` (default `info`), lines go to
//! stderr, and each line carries the fields of the spans it was logged in:
//! every request runs in a span holding its `request_id` (`generate` on the
//! router, `prefill` and `decode` on the nodes), so one id finds a request's
//! lines in all three processes. In JSON the spans are the `span` (innermost)
//! and `spans` (outermost first) fields.

use std::str::FromStr;

use crate::TelemetryError;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `tracing`'s text format: time, level, spans with their fields, message.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields`, `target`, `span`, `spans`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected \"text\" or \"json\""
            )),
        }
    }
}

/// Installs the global `tracing` subscriber in `format`.
pub fn init_logs(format: LogFormat) -> Result<(), TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    installed.map_err(|e| TelemetryError::Logs(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("yaml"));
    }
}
