//! Weir's configuration. Pure: loading and validation touch no sockets and no globals, so a
//! config can be checked before anything is bound and reloads can be built beside the
//! running one.
//!
//! Layout:
//! - [`model`]: the resolved, typed configuration and the per-pool settings lookup.
//! - [`load`]: TOML (and the quick-start command line) into the model; unknown keys are
//!   collected with a "did you mean", URLs and auth files are parsed.
//! - [`problem`]: a problem names the key path, the value and the fix; loading collects all
//!   of them before failing.

pub mod load;
pub mod model;
pub mod problem;

pub use load::{QuickStart, from_file, from_toml_str, parse_auth_file};
pub use model::*;
pub use problem::{Problem, Problems, Severity};
