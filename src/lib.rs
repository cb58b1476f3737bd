//! The vmgate host: the glue that runs the migration engine over the authenticated channel.

pub mod host;
