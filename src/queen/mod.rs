//! What only the CLI side does: connecting to a node, the hive client, bringing a hive up and
//! stopping it, installing the binary, keys and models.

pub(crate) mod client;
pub(crate) mod install;
pub(crate) mod lifecycle;
pub(crate) mod node;
