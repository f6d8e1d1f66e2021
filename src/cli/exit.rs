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
/// The bulk change is not in a state that allows it (cancel a finished one, resume one that is
/// not paused, retry-failed with no failed device).
pub const CONFLICT: u8 = 5;

pub fn not_found() -> ExitCode {
    ExitCode::from(NOT_FOUND)
}

pub fn differences() -> ExitCode {
    ExitCode::from(DIFFERENCES)
}

/// The exit code and message of an operator command the engine refused: not found (3), not
/// allowed in the bulk change's state (5), or `None` for a failure to report as an error.
pub fn refused(
    id: crate::domain::BulkChangeId,
    e: &crate::app::Error,
) -> Option<(ExitCode, String)> {
    use crate::domain::bulk_change::Error as Refused;
    match e {
        crate::app::Error::Rejected(Refused::NotAccepted) => {
            Some((not_found(), format!("bulk change {id} is not known")))
        }
        crate::app::Error::Rejected(why) => {
            Some((ExitCode::from(CONFLICT), format!("bulk change {id}: {why}")))
        }
        _ => None,
    }
}

/// Reports a refused operator command with its exit code; any other error is returned.
pub fn report_refused(
    id: crate::domain::BulkChangeId,
    e: crate::app::Error,
) -> anyhow::Result<ExitCode> {
    match refused(id, &e) {
        Some((code, message)) => {
            eprintln!("{message}");
            Ok(code)
        }
        None => Err(e.into()),
    }
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
            super::CONFLICT,
        ];
        let set: std::collections::BTreeSet<_> = codes.iter().collect();
        assert_eq!(set.len(), codes.len());
    }
}
