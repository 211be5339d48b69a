//! vexec's own exit statuses, as `timeout(1)` and `env(1)` use them: every
//! front end ends with the command's status or one of these.

/// vexec itself failed: bad input, a VM that could not run the command.
pub const STATUS_FAILED: i32 = 125;
/// `--timeout` expired.
pub const STATUS_TIMEOUT: i32 = 124;
