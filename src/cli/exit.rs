//! The exit codes of every `bulkflow` command (documented in `docs/operations.md`).

use std::process::ExitCode;

/// It did what was asked.
pub const OK: u8 = 0;
/// It failed (the error is printed): the database, the queue or the configuration.
pub const FAILURE: u8 = 1;
/// The command line was wrong (clap's own code).
pub const USAGE: u8 = 2;
/// What was named (a bulk change, a device) is not there.
pub const NOT_FOUND: u8 = 3;
/// `replay --verify` found the read models differ from the events.
pub const DIFFERENCES: u8 = 4;

pub fn not_found() -> ExitCode {
    ExitCode::from(NOT_FOUND)
}

pub fn differences() -> ExitCode {
    ExitCode::from(DIFFERENCES)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_codes_are_distinct() {
        let codes = [
            super::OK,
            super::FAILURE,
            super::USAGE,
            super::NOT_FOUND,
            super::DIFFERENCES,
        ];
        let set: std::collections::BTreeSet<_> = codes.iter().collect();
        assert_eq!(set.len(), codes.len());
    }
}
