//! The vmgate host: the daemon's parts (configuration, events, control socket) and the glue
//! that runs the migration engine over the authenticated channel.

pub mod daemon;
pub mod host;
