//! How a command ends: an exit status, and a message for failures.

/// Everything went as it should.
pub(crate) const EXIT_OK: u8 = 0;
/// The command ran and found something wrong (a double charge, a
/// violation, a lease it should have kept).
pub(crate) const EXIT_WRONG: u8 = 1;
/// Bad usage, or a server that cannot be reached.
pub(crate) const EXIT_USAGE: u8 = 2;

/// A failure that ends the command with a message and a status.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: u8,
    pub(crate) message: String,
}

impl Failure {
    /// Bad usage or an unreachable server ([`EXIT_USAGE`]).
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            status: EXIT_USAGE,
            message: message.into(),
        }
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::usage(e.to_string())
    }
}

/// The result of every command: its exit status, or a failure.
pub(crate) type CommandResult = Result<u8, Failure>;
