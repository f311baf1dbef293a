//! Weir's configuration. Pure: loading and validation touch no sockets and no globals, so a
//! config can be checked before anything is bound and reloads can be built beside the
//! running one.
//!
//! Layout:
//! - [`model`]: the resolved, typed configuration and the per-pool settings lookup.
//! - [`layers`]: the sources of settings and their precedence (built-in defaults < profile
//!   defaults < file < the file's profile < environment < `--set`), merged as TOML tables.
//! - [`load`]: the merged layers (or the quick-start command line) into the model; unknown
//!   keys are collected with a "did you mean", URLs and auth files are parsed.
//! - [`problem`]: a problem names the key path, the value and the fix; loading collects all
//!   of them before failing.

pub mod layers;
pub mod load;
pub mod model;
pub mod problem;

pub use layers::{BUILTIN_PROFILES, Input, Origin};
pub use load::{QuickStart, Source, from_file, from_toml_str, load, parse_auth_file};
pub use model::*;
pub use problem::{Problem, Problems, Severity};
